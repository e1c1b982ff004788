"""Targeted scripts: small programs using the router outside a request (`python -m
app.scripts.report`, `python -m app.scripts.backfill`). Each parses arguments, reports what it
did and exits non-zero on failure, like the `python -m app` commands."""
