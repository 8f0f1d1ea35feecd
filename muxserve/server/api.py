"""The OpenAI-compatible HTTP API (FastAPI): /v1/models, /v1/completions, /v1/chat/completions,
/health, /version and /metrics.

Handlers run on the event loop and talk to the engine thread only through the EngineDriver.
Checking a request, rendering its chat template and tokenizing its prompt run on a worker
thread, so a large prompt does not hold up other requests (or /health). A generation yields one
delta per generated token (streams flush each as its own SSE chunk, which is what TTFT/ITL
benchmarks measure); a client that goes away aborts its request. An exception while handling
one request is that request's 500; the engine thread and the other requests go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import anyio
import msgspec
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import PlainTextResponse, Response
from starlette.responses import StreamingResponse

import muxserve
from muxserve.engine.sequence import FinishReason
from muxserve.server import prompts, schema
from muxserve.server.detokenizer import IncrementalDetokenizer
from muxserve.server.driver import EngineDriver, ErrorEvent, RequestHandle, ServedModel
from muxserve.server.errors import add_error_handlers
from muxserve.server.guards import DEFAULT_MAX_REQUEST_BYTES, BodySizeLimit, api_key_check
from muxserve.server.metrics import CONTENT_TYPE, ServerMetrics
from muxserve.server.protocol import ApiError, ChatCompletionRequest, CompletionRequest, _GenerationRequest

logger = logging.getLogger(__name__)

_json = msgspec.json.Encoder()


@dataclass
class ServerState:
    """What the handlers share; touched on the event loop only."""

    models: dict[str, ServedModel]
    driver: EngineDriver
    metrics: ServerMetrics
    draining: bool = False  # SIGTERM: new requests get 503 while the running ones finish
    active: int = 0  # generations in progress
    created: int = field(default_factory=lambda: int(time.time()))
    # One thread, as vLLM does: a tokenizer is not meant for concurrent calls, and one large
    # prompt at a time bounds the memory tokenization takes (about 130 bytes per prompt byte).
    prepare_pool: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="muxserve-tokenize"))

    def check_accepting(self) -> None:
        if self.draining:
            raise ApiError(503, "the server is shutting down")
        if not self.driver.alive:
            raise ApiError(503, "the engine is not running")


@dataclass
class Delta:
    text: str
    token_id: int
    finish_reason: FinishReason | None
    stop_reason: str | None = None


@dataclass
class Generation:
    """One request on its way through the engine."""

    model: ServedModel
    prompt_token_ids: list[int]
    handle: RequestHandle
    detokenizer: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: FinishReason | None = None
    stop_reason: str | None = None

    def usage(self) -> dict[str, int]:
        n, m = len(self.prompt_token_ids), len(self.token_ids)
        return {"prompt_tokens": n, "completion_tokens": m, "total_tokens": n + m}


def json_response(obj: Any, status: int = 200) -> Response:
    return Response(_json.encode(obj), status_code=status, media_type="application/json")


def sse(obj: Any) -> bytes:
    return b"data: " + _json.encode(obj) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


# -- running a generation ------------------------------------------------------------------------
async def prepare(state: ServerState, body: _GenerationRequest,
                  prompt_of: Callable[[Any, ServedModel], list[int]], max_tokens: int | None,
                  prompt_field: str) -> Generation:
    """Check ``body`` and tokenize its prompt (``prompt_of``) on the worker thread; an ApiError if refused."""

    def work():
        prompts.check_body(body)
        model = prompts.find_model(state.models, body.model)
        prompt_ids = prompt_of(body, model)
        params = prompts.sampling_params(body, model, len(prompt_ids), max_tokens, prompt_field)
        return model, prompt_ids, params, prompts.stop_strings(body)

    model, prompt_ids, params, stop = await asyncio.get_running_loop().run_in_executor(state.prepare_pool, work)
    detok = IncrementalDetokenizer(model.tokenizer, prompt_ids, stop)
    return Generation(model, prompt_ids, RequestHandle(model.name, prompt_ids, params), detok)


async def run(state: ServerState, gen: Generation) -> AsyncIterator[Delta]:
    """Submit, then yield one Delta per token until the request ends. Leaving early aborts it."""
    state.active += 1
    state.driver.submit(gen.handle)
    try:
        while True:
            event = await gen.handle.events.get()
            if isinstance(event, ErrorEvent):
                gen.handle.closed = True
                raise ApiError(event.status, event.message, event.param)
            gen.token_ids.append(event.token)
            text = gen.detokenizer.add(event.token)
            if gen.detokenizer.stopped:
                gen.finish_reason, gen.stop_reason = FinishReason.STOP, gen.detokenizer.matched
                state.driver.abort(gen.handle, FinishReason.STOP)  # the engine may still be generating it
            elif event.finish_reason is not None:
                gen.finish_reason = event.finish_reason
                gen.handle.closed = True
                text += gen.detokenizer.flush()
            gen.text += text
            yield Delta(text, event.token, gen.finish_reason, gen.stop_reason)
            if gen.finish_reason is not None:
                return
    finally:
        state.active -= 1
        state.driver.abort(gen.handle)  # no-op when it finished


async def collect(state: ServerState, gen: Generation, request: Request) -> None:
    """Run to the end; a client that disconnects meanwhile aborts the request."""

    async def consume() -> None:
        async with contextlib.aclosing(run(state, gen)) as deltas:
            async for _ in deltas:
                pass

    task = asyncio.ensure_future(consume())
    watcher = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():  # the client went away (or this handler was cancelled): abort
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        raise ApiError(499, "the client disconnected")
    task.result()  # an ApiError from the engine goes to the client


async def _until_disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class SSEResponse(StreamingResponse):
    """Streams while listening for the client going away, then closes the body iterator at once
    (so the generation is aborted now, not when the iterator is garbage-collected)."""

    def __init__(self, content: AsyncIterator[bytes]):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope, receive, send) -> None:
        try:
            async with anyio.create_task_group() as tg:
                async def stream() -> None:
                    with contextlib.suppress(OSError):
                        await self.stream_response(send)
                    tg.cancel_scope.cancel()

                tg.start_soon(stream)
                await self.listen_for_disconnect(receive)
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()


# -- the app -------------------------------------------------------------------------------------
def create_app(state: ServerState, lifespan=None, api_key: str | None = None,
               max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> FastAPI:
    """The API over ``state``; ``lifespan`` (an async context manager factory) runs around serving.

    ``api_key``: every /v1 route then needs ``Authorization: Bearer <api_key>``; /health,
    /version and /metrics stay open. Request bodies over ``max_request_bytes`` get a 413.
    """
    app = FastAPI(title="MuxServe", version=muxserve.__version__, docs_url=None, redoc_url=None,
                  lifespan=lifespan)
    app.state.mux = state
    app.add_middleware(BodySizeLimit, max_bytes=max_request_bytes)
    add_error_handlers(app)
    schema.install_openapi(app, list(state.models))

    @app.get("/health", responses={200: {"model": schema.Health, "description": "serving"}, **schema.errors(503)})
    async def health() -> Response:
        state.check_accepting()
        return json_response({"status": "ok"})

    @app.get("/version", responses={200: {"model": schema.Version, "description": "the server's version"}})
    async def version() -> Response:
        return json_response({"version": muxserve.__version__})

    @app.get("/metrics", response_class=PlainTextResponse,
             responses={200: {"description": "Prometheus text format"}})
    async def metrics() -> Response:
        await state.driver.refresh_metrics()
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    auth = [401] if api_key else []
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(api_key_check(api_key))] if api_key else [])

    @v1.get("/models", responses={200: {"model": schema.ModelList, "description": "every LLM served"},
                                  **schema.errors(*auth, 500)})
    async def models() -> Response:
        data = [{"id": m.name, "object": "model", "created": state.created, "owned_by": "muxserve",
                 "root": m.root, "parent": None, "max_model_len": m.max_model_len, "permission": []}
                for m in state.models.values()]
        return json_response({"object": "list", "data": data})

    generation_errors = schema.errors(400, *auth, 404, 413, 500, 503)

    @v1.post("/completions", responses={**schema.streamed(schema.CompletionResponse), **generation_errors})
    async def completions(body: CompletionRequest, request: Request) -> Response:
        state.check_accepting()
        gen = await prepare(state, body, prompts.completion_prompt, body.max_tokens, "prompt")
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            return SSEResponse(completion_stream(state, gen, body, rid, created))
        await collect(state, gen, request)
        choice = {"index": 0, "text": gen.text, "logprobs": None, "finish_reason": gen.finish_reason,
                  "stop_reason": gen.stop_reason}
        if body.return_token_ids:
            choice.update(prompt_token_ids=gen.prompt_token_ids, token_ids=gen.token_ids)
        return json_response({"id": rid, "object": "text_completion", "created": created, "model": gen.model.name,
                              "choices": [choice], "usage": gen.usage()})

    @v1.post("/chat/completions", responses={**schema.streamed(schema.ChatCompletionResponse), **generation_errors})
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        state.check_accepting()
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        gen = await prepare(state, body, prompts.chat_prompt, max_tokens, "messages")
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            return SSEResponse(chat_stream(state, gen, body, rid, created))
        await collect(state, gen, request)
        choice = {"index": 0, "message": {"role": "assistant", "content": gen.text}, "logprobs": None,
                  "finish_reason": gen.finish_reason, "stop_reason": gen.stop_reason}
        if body.return_token_ids:
            choice.update(token_ids=gen.token_ids)
        out = {"id": rid, "object": "chat.completion", "created": created, "model": gen.model.name,
               "choices": [choice], "usage": gen.usage()}
        if body.return_token_ids:
            out["prompt_token_ids"] = gen.prompt_token_ids
        return json_response(out)

    app.include_router(v1)
    return app


async def completion_stream(state: ServerState, gen: Generation, body: CompletionRequest, rid: str,
                            created: int) -> AsyncIterator[bytes]:
    head = {"id": rid, "object": "text_completion", "created": created, "model": gen.model.name}

    def choice(d, first: bool) -> dict:
        out = {"index": 0, "text": d.text, "logprobs": None, "finish_reason": d.finish_reason,
               "stop_reason": d.stop_reason}
        if body.return_token_ids:
            out["token_ids"] = [d.token_id]
            if first:
                out["prompt_token_ids"] = gen.prompt_token_ids
        return out

    async with contextlib.aclosing(_token_chunks(state, gen, body, head, choice)) as chunks:
        async for chunk in chunks:  # closed at once when the client goes away
            yield chunk


async def chat_stream(state: ServerState, gen: Generation, body: ChatCompletionRequest, rid: str,
                      created: int) -> AsyncIterator[bytes]:
    head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": gen.model.name}
    first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
    if body.return_token_ids:
        first["prompt_token_ids"] = gen.prompt_token_ids
    yield sse({**head, "choices": [first], **({"usage": None} if body.include_usage else {})})

    def choice(d, _first: bool) -> dict:
        out = {"index": 0, "delta": {"content": d.text}, "logprobs": None, "finish_reason": d.finish_reason,
               "stop_reason": d.stop_reason}
        if body.return_token_ids:
            out["token_ids"] = [d.token_id]
        return out

    async with contextlib.aclosing(_token_chunks(state, gen, body, head, choice)) as chunks:
        async for chunk in chunks:  # closed at once when the client goes away
            yield chunk


async def _token_chunks(state: ServerState, gen: Generation, body, head: dict, choice) -> AsyncIterator[bytes]:
    """One SSE chunk per token (``choice(delta, is_first)`` shapes it), an error chunk if the
    generation fails, the usage chunk when asked for, then ``[DONE]``."""
    usage_field = {"usage": None} if body.include_usage else {}
    try:
        async with contextlib.aclosing(run(state, gen)) as deltas:
            first = True
            async for d in deltas:
                yield sse({**head, "choices": [choice(d, first)], **usage_field})
                first = False
    except ApiError as exc:
        yield sse(exc.body())
    except Exception as exc:
        logger.exception("stream %s failed", head["id"])
        yield sse(ApiError(500, f"internal error while streaming: {type(exc).__name__}: {exc}").body())
    else:
        if body.include_usage:
            yield sse({**head, "choices": [], "usage": gen.usage()})
    yield SSE_DONE
