"""Every error the HTTP API answers, in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

import msgspec
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from muxserve.server.prompts import short_repr
from muxserve.server.protocol import ApiError

_json = msgspec.json.Encoder()
_JSON_KINDS = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean"}


def add_error_handlers(app: FastAPI) -> None:
    """Every error is OpenAI's JSON shape, whatever raised it."""

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> Response:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> Response:
        return _error_response(validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> Response:
        # 404 of an unknown path, 405 (its Allow header lists the methods), FastAPI's body errors
        return _error_response(ApiError(exc.status_code, str(exc.detail), headers=exc.headers))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> Response:
        # Starlette re-raises it after this answer: uvicorn logs the traceback and closes the
        # connection, which the client must know so as not to send its next request on it.
        return _error_response(ApiError(500, f"internal error while handling {request.method} "
                                             f"{request.url.path}: {type(exc).__name__}: {exc}",
                                        headers={"Connection": "close"}))


def _error_response(exc: ApiError) -> Response:
    response = Response(_json.encode(exc.body()), status_code=exc.status, media_type="application/json")
    response.headers.update(exc.headers or {})
    return response


def validation_error(exc: RequestValidationError) -> ApiError:
    """The first problem of a body that does not parse, as a 400 naming the field and its value."""
    errors = exc.errors()
    if not errors:
        return ApiError(400, "invalid request body")
    err = errors[0]
    if err.get("type") == "json_invalid":
        return ApiError(400, f"the request body is not valid JSON: {err.get('ctx', {}).get('error', err['msg'])}")
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    param = loc[0] if loc else None  # the top-level field, as OpenAI's ``param``
    value = err.get("input")
    if err.get("type") == "string_unicode":  # a field name with a lone surrogate
        return ApiError(400, f"the request body holds a field name that is not valid Unicode: {short_repr(value)}")
    if param is None:  # the body itself: absent, not JSON, or not an object
        if err.get("type") == "missing" or value is None:
            return ApiError(400, "the request body is missing: send a JSON object with "
                                 "Content-Type: application/json")
        if isinstance(value, (bytes, bytearray)):
            return ApiError(400, "the request body must be a JSON object sent with Content-Type: application/json")
        kind = _JSON_KINDS.get(type(value), type(value).__name__)
        return ApiError(400, f"the request body must be a JSON object, got {kind} {short_repr(value)}")
    if err.get("type") == "missing":
        return ApiError(400, f"field {param!r} is required", param)
    return ApiError(400, f"invalid value for {param}: {short_repr(value)} ({err['msg']})", param)
