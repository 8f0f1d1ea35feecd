"""What stands between the network and the handlers: the request size limit and the API key."""

from __future__ import annotations

import secrets
from collections.abc import Callable

import msgspec
from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from muxserve.server.protocol import ApiError

DEFAULT_MAX_REQUEST_BYTES = 4 << 20


class BodySizeLimit:
    """ASGI middleware: refuse a request body over ``max_bytes`` with a 413 before reading it all.

    A declared ``Content-Length`` over the limit is refused at once; a body without one (chunked)
    is counted as it arrives and refused as soon as it passes the limit. Otherwise the body, read
    here, is handed to the app. uvicorn discards the rest of a refused body and keeps the
    connection, so clients that send the whole body before reading still get the 413.
    """

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send, f"the request body of {int(declared)} bytes")
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before its body was complete
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                await self._refuse(send, "the request body")
                return
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(bytes(body), receive), send)

    async def _refuse(self, send, what: str) -> None:
        error = ApiError(413, f"{what} is larger than the limit of {self.max_bytes} bytes (--max-request-bytes)")
        payload = msgspec.json.encode(error.body())
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})


def _replay(body: bytes, receive) -> Callable:
    """A ``receive`` that gives the app the body read already, then the client's later messages
    (``http.disconnect``, watched by the handlers to abort a request whose client went away)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed():
        return pending.pop() if pending else await receive()

    return replayed


def api_key_check(api_key: str) -> Callable:
    """A FastAPI dependency: the request must carry ``Authorization: Bearer <api_key>`` (401 if not).

    The comparison takes the same time wherever the given key differs (``secrets.compare_digest``).
    """
    expected = api_key.encode()
    bearer = HTTPBearer(auto_error=False, description="the server's --api-key (or MUXSERVE_API_KEY)")

    async def check(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if credentials is None:
            raise ApiError(401, "the API key is missing: send the header 'Authorization: Bearer <key>'",
                           headers={"WWW-Authenticate": "Bearer"})
        # Header values arrive as latin-1 text: compare the bytes the client sent.
        if not secrets.compare_digest(credentials.credentials.encode("latin-1"), expected):
            raise ApiError(401, "the API key is incorrect", headers={"WWW-Authenticate": "Bearer"})

    return check
