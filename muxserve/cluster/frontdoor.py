"""The front door: one OpenAI-compatible endpoint for every LLM of the cluster.

A POST under /v1 goes, body untouched, to the instance that serves its ``model``; its answer
(status, headers, body, or the SSE stream chunk by chunk) comes back as it is, errors included.
/v1/models lists every LLM with its instance and state; /metrics joins the instances' pages with
an ``instance`` label; /cluster shows the instances. An LLM whose instance is not ready answers
503 with ``Retry-After``. No Ray here: the controller keeps the RouteTable current.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.responses import StreamingResponse

import muxserve
from muxserve.cluster.metrics import CONTENT_TYPE, aggregate_metrics
from muxserve.cluster.routes import InstanceView, RouteTable


def _dumps(obj) -> str:
    return json.dumps(obj, separators=(",", ":"))


# Hop-by-hop headers and those the front door's own server writes.
DROPPED_HEADERS = {"content-length", "transfer-encoding", "connection", "keep-alive", "date", "server"}
ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
               503: "ServiceUnavailableError"}


class FrontDoorError(Exception):
    """An answer of the front door itself, in OpenAI's error shape."""

    def __init__(self, status: int, message: str, param: str | None = None, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.retry_after = status, message, param, retry_after

    def response(self) -> Response:
        body = {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "APIError"),
                          "param": self.param, "code": self.status}}
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after is not None else None
        return Response(_dumps(body), status_code=self.status, media_type="application/json", headers=headers)


@dataclass
class FrontDoorState:
    routes: RouteTable
    api_key: str | None = None  # what clients must present (Authorization: Bearer ...)
    instance_key: str | None = None  # what the front door presents to the instances
    client: httpx.AsyncClient | None = None
    draining: bool = False
    created: int = field(default_factory=lambda: int(time.time()))

    def open(self) -> None:
        # trust_env=False: a proxy of the environment must not sit between the front door and nodes
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=5.0), trust_env=False,
                                        limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()

    def instance_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.instance_key}"} if self.instance_key else {}


def unavailable(view: InstanceView, model: str) -> FrontDoorError:
    wait = view.retry_after()
    return FrontDoorError(503, f"LLM `{model}` is unavailable: its instance {view.name} is {view.state}; "
                               f"retry in {wait} s", retry_after=wait)


def gone(view: InstanceView, model: str, exc: Exception) -> FrontDoorError:
    """The instance went away under a request: it is being restarted (the controller sees it soon)."""
    wait = view.retry_after()
    return FrontDoorError(503, f"LLM `{model}` is unavailable: its instance {view.name} did not answer "
                               f"({type(exc).__name__}); retry in {wait} s", retry_after=wait)


def model_of(body: bytes) -> str:
    try:
        doc = json.loads(body)
    except ValueError as e:
        raise FrontDoorError(400, f"the request body is not valid JSON: {e}") from None
    model = doc.get("model") if isinstance(doc, dict) else None
    if not isinstance(model, str):
        raise FrontDoorError(400, "field 'model' is required (a string)", "model")
    return model


async def refresh_models(state: FrontDoorState, view: InstanceView) -> None:
    """Cache the instance's own /v1/models entries (max_model_len and all)."""
    resp = await state.client.get(f"{view.url}/v1/models", headers=state.instance_headers(), timeout=10)
    resp.raise_for_status()
    view.models = resp.json().get("data", [])


def create_app(state: FrontDoorState, lifespan=None) -> FastAPI:
    app = FastAPI(title="MuxServe cluster", version=muxserve.__version__, docs_url=None, redoc_url=None,
                  openapi_url=None, lifespan=lifespan)

    @app.exception_handler(FrontDoorError)
    async def _error(_request: Request, exc: FrontDoorError) -> Response:
        return exc.response()

    def check_key(request: Request) -> None:
        """With an API key, /v1 and /cluster need ``Authorization: Bearer KEY`` (as vLLM)."""
        given = request.headers.get("authorization", "")
        if state.api_key and not hmac.compare_digest(given.encode(), f"Bearer {state.api_key}".encode()):
            raise FrontDoorError(401, "Incorrect API key provided.")

    @app.get("/health")
    async def health() -> Response:
        if state.draining:
            raise FrontDoorError(503, "the cluster is shutting down")
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> Response:
        return Response(_dumps({"version": muxserve.__version__}), media_type="application/json")

    @app.get("/cluster")
    async def cluster(request: Request) -> Response:
        check_key(request)
        doc = {"instances": [v.public() for v in state.routes.instances.values()],
               "llms": {llm: state.routes.instance_of(llm).name for llm in state.routes.llms}}
        return Response(_dumps(doc), media_type="application/json")

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        check_key(request)
        doc = {"object": "list", "data": state.routes.model_entries(state.created)}
        return Response(_dumps(doc), media_type="application/json")

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(await aggregate_metrics(state.client, state.routes, state.instance_headers()),
                        media_type=CONTENT_TYPE)

    @app.post("/v1/{path:path}")
    async def forward(path: str, request: Request) -> Response:
        check_key(request)
        body = await request.body()
        model = model_of(body)
        view = state.routes.instance_of(model)
        if view is None:
            raise FrontDoorError(404, f"The model `{model}` does not exist.", "model")
        if state.draining:
            raise FrontDoorError(503, "the cluster is shutting down")
        if view.state != "ready" or not view.url:
            raise unavailable(view, model)
        upstream = state.client.build_request(
            "POST", f"{view.url}/v1/{path}", content=body, params=request.query_params,
            headers={"content-type": request.headers.get("content-type", "application/json"),
                     "accept": request.headers.get("accept", "*/*"), **state.instance_headers()})
        return await until_disconnect(request, exchange(state, upstream, view, model))

    return app


async def exchange(state: FrontDoorState, upstream: httpx.Request, view: InstanceView, model: str) -> Response:
    """Send to the instance; a stream is relayed chunk by chunk, anything else read whole."""
    try:
        resp = await state.client.send(upstream, stream=True)
    except httpx.TransportError as e:
        raise gone(view, model, e) from None
    headers = {k: v for k, v in resp.headers.items() if k.lower() not in DROPPED_HEADERS}
    headers["x-muxserve-instance"] = view.name
    if resp.headers.get("content-type", "").startswith("text/event-stream"):
        return StreamingResponse(relay(resp, view, model), status_code=resp.status_code, headers=headers)
    try:
        content = b"".join([chunk async for chunk in resp.aiter_raw()])
    except httpx.TransportError as e:
        raise gone(view, model, e) from None
    finally:
        await resp.aclose()
    return Response(content, status_code=resp.status_code, headers=headers)


async def relay(resp: httpx.Response, view: InstanceView, model: str) -> AsyncIterator[bytes]:
    """The instance's SSE chunks as they come; closing this (the client left) closes the upstream
    connection, which aborts the request on the instance."""
    try:
        async for chunk in resp.aiter_raw():
            yield chunk
    except httpx.TransportError as e:
        err = gone(view, model, e)
        body = {"error": {"message": err.message, "type": ERROR_TYPES[503], "param": None, "code": 503}}
        yield b"data: " + _dumps(body).encode() + b"\n\ndata: [DONE]\n\n"
    finally:
        await resp.aclose()


async def until_disconnect(request: Request, work) -> Response:
    """Run ``work``; if the client goes away first, cancel it (closing the upstream request)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        return Response(status_code=499)
    return task.result()


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
