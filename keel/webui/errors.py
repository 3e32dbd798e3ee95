"""The web UI's error handlers, shared by every router: each error is one line in OpenAI's error form.

    add_error_handlers(app)
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from keel.core.errors import KeelError
from keel.serve.api import ApiError

log = logging.getLogger("keel.webui")


def add_error_handlers(app: FastAPI):
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):  # unknown path, wrong method
        return ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                        kind="not_found_error" if exc.status_code == 404 else "invalid_request_error").response()

    @app.exception_handler(RequestValidationError)
    async def bad_query(request: Request, exc: RequestValidationError):  # a missing or mistyped ?param=
        err = exc.errors()[0]
        param = str(err["loc"][-1]) if err.get("loc") else None
        return ApiError(400, f"'{param}': {err['msg']}", param).response()

    @app.exception_handler(KeelError)
    async def keel_error(request: Request, exc: KeelError):
        return ApiError(400, " ".join(str(exc).split())).response()

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception):
        log.exception("keel web-ui: internal error on %s", request.url.path)
        # The exception's text can hold the server's paths: it goes to the log, the client gets its type.
        return ApiError(500, f"internal error: {type(exc).__name__}", kind="server_error").response()
