"""An async session router for SQLAlchemy 2 + asyncpg + FastAPI on PostgreSQL."""
