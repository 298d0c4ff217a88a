"""OpenAI's error shape for every answer that is not a success: `APIError` raised by a handler,
and the app's handlers for what FastAPI, the engine and the body limit raise."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llama_jax.serve import protocol as p
from llama_jax.serve.limits import BodyTooLarge, too_large
from llama_jax.serve.runner import EngineError


class APIError(Exception):
    """An error with its HTTP status, answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.detail = status, p.ErrorDetail(message=message, type=type, param=param, code=code)


def error_response(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    body = p.ErrorResponse(error=p.ErrorDetail(message=message, type=type, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_, e: APIError):
        return JSONResponse(p.ErrorResponse(error=e.detail).model_dump(), status_code=e.status)

    @app.exception_handler(EngineError)
    async def engine_error(_, e: EngineError):
        return error_response(500, str(e), "server_error")

    @app.exception_handler(BodyTooLarge)
    async def body_too_large(_, e: BodyTooLarge):
        return too_large(e.max_bytes)

    @app.exception_handler(Exception)
    async def internal_error(_, e: Exception):  # the traceback goes to the server's log, not the client
        return error_response(500, f"internal server error ({type(e).__name__})", "server_error")

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_, e: RequestValidationError):
        first = e.errors()[0]
        where = [str(part) for part in first.get("loc", ())[1:]]  # drop "body"
        if first.get("type") == "json_invalid":
            message = f"the request body is not valid JSON ({first.get('ctx', {}).get('error', first['msg'])})"
            where = []
        elif first.get("type") == "extra_forbidden":  # protocol.py: no field is silently dropped
            message = f"{'.'.join(where)}: unknown or unsupported field; this server does not implement it"
        else:
            message = first["msg"].removeprefix("Value error, ")
            if where:
                message = f"{'.'.join(where)}: {message}"
        return error_response(400, message, param=where[0] if where else None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, e: StarletteHTTPException):
        return error_response(e.status_code, str(e.detail), "not_found_error" if e.status_code == 404 else
                              "invalid_request_error")
