"""Exception handlers: each error becomes its HTTP status with a JSON body, never a bare 500.

Bodies are `{"error": <code>, "detail": <message>}`. Database errors caused by input the
client sent (constraint violations, values the column cannot hold) are 4xx; anything else from
the database is a 500 whose body says nothing about the server (the log has the details).
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, IntegrityError

from pg_session_router.core.errors import DatabaseUnavailableError, RouterError

logger = logging.getLogger(__name__)


def error_response(status: int, code: str, detail: str) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail}, status_code=status)


async def handle_router_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RouterError)
    detail = str(exc)
    if exc.status_code >= 500:
        # The message names nodes and causes: for the log. The client learns what happened
        # and whether to retry, not the topology.
        logger.error("%s %s: %s", request.method, request.url.path, exc)
        detail = exc.public_detail
    response = error_response(exc.status_code, exc.code, detail)
    if isinstance(exc, DatabaseUnavailableError):
        response.headers["Retry-After"] = str(exc.retry_after)
    return response


async def handle_integrity_error(request: Request, exc: Exception) -> JSONResponse:
    return error_response(409, "conflict", "the change conflicts with existing data")


async def handle_data_error(request: Request, exc: Exception) -> JSONResponse:
    return error_response(400, "invalid_value", "a value cannot be stored as given")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RouterError, handle_router_error)
    app.add_exception_handler(IntegrityError, handle_integrity_error)
    app.add_exception_handler(DataError, handle_data_error)
