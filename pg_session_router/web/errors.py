"""Exception handlers: each error becomes its HTTP status with a JSON body, never a bare 500.

Bodies are `{"error": <code>, "detail": <message>}`. Database errors caused by input the
client sent (constraint violations, values the column cannot hold) are 4xx; anything else from
the database is a 500 whose body says nothing about the server (the log has the details).
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exception_handlers import (
    http_exception_handler,
    request_validation_exception_handler,
)
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError
from starlette.exceptions import HTTPException as StarletteHTTPException

from pg_session_router.core.errors import DatabaseUnavailableError, RouterError
from pg_session_router.db.driver_errors import sqlstate

logger = logging.getLogger(__name__)


class ErrorBody(BaseModel):
    """Every error response of the router's handlers."""

    error: str
    detail: str


def _documented(description: str) -> dict[str, Any]:
    return {"model": ErrorBody, "description": description}


#: OpenAPI `responses` for routes that use a tenant session: every status they may answer.
TENANT_ROUTE_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: _documented("no tenant, a malformed tenant id or consistency token, a bad value"),
    401: _documented("the bearer token naming the tenant is missing, forged or expired"),
    403: _documented("the tenant is disabled"),
    404: _documented("unknown tenant, or no such object"),
    409: _documented("the change conflicts with existing data"),
    500: _documented(
        "a COMMIT whose outcome is unknown (never retried: check before writing again), "
        "or an error inside the database layer; the body names no server"
    ),
    503: _documented("no database server can serve the request now; see Retry-After"),
}


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


async def handle_database_error(request: Request, exc: Exception) -> JSONResponse:
    # SQLAlchemy's asyncpg dialect raises a plain DBAPIError for SQLSTATE class 22 (data
    # exception: out of range, invalid text representation...): input, so a 400 like DataError.
    if (sqlstate(exc) or "").startswith("22"):
        return await handle_data_error(request, exc)
    # Anything else from the database is a bug or an outage the router did not classify: the
    # log gets the details, the client a body that names nothing about the server.
    logger.error("%s %s: database error", request.method, request.url.path, exc_info=exc)
    return error_response(500, "database_error", RouterError.public_detail)


async def handle_validation_error(request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's 422, without echoing the input: its default handler echoes it, and fails
    with a 500 on input it cannot encode again (a lone surrogate in a JSON string)."""
    assert isinstance(exc, RequestValidationError)
    errors = [
        {
            "loc": [_printable(part) for part in error.get("loc", ())],
            "msg": _printable(error.get("msg", "")),
            "type": str(error["type"]),
        }
        for error in exc.errors()
    ]
    return JSONResponse({"error": "invalid_request", "detail": errors}, status_code=422)


def _printable(value: object) -> object:
    """A location part or message as JSON can carry it (a client's dict key may hold a lone
    surrogate, which cannot be encoded)."""
    if isinstance(value, int):
        return value
    return str(value).encode("utf-8", "replace").decode("utf-8")


async def handle_http_exception(request: Request, exc: Exception) -> Response:
    """The app's own `HTTPException`s in the same shape (`detail` stays where FastAPI puts it)."""
    assert isinstance(exc, StarletteHTTPException)
    headers = dict(exc.headers or {})
    if exc.status_code in (204, 304) or exc.status_code < 200:
        return Response(status_code=exc.status_code, headers=headers)  # no body allowed
    try:
        code = HTTPStatus(exc.status_code).phrase.lower().replace(" ", "_").replace("-", "_")
    except ValueError:  # a status outside the standard list (499, ...)
        code = "http_error"
    body = {"error": code, "detail": exc.detail}
    return JSONResponse(body, status_code=exc.status_code, headers=headers)


#: What FastAPI registers by itself: replaced (a host's own handlers are kept).
_FASTAPI_DEFAULTS = (http_exception_handler, request_validation_exception_handler)

_HANDLERS: dict[type[Exception], Any] = {
    RouterError: handle_router_error,
    IntegrityError: handle_integrity_error,
    DataError: handle_data_error,
    DBAPIError: handle_database_error,
    RequestValidationError: handle_validation_error,
    StarletteHTTPException: handle_http_exception,
}


def install_error_handlers(app: FastAPI) -> None:
    """Each router error its status, database errors 4xx/500 without details, FastAPI's 422 and
    HTTPExceptions in the same body shape. A handler the app registered itself for one of these
    types is kept. Call it on a sub-app mounted under the app `install_router` was called on
    (the router reaches it, the parent's handlers do not)."""
    for exc_type, handler in _HANDLERS.items():
        if app.exception_handlers.get(exc_type) in (None, *_FASTAPI_DEFAULTS):
            app.add_exception_handler(exc_type, handler)
