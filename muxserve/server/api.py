"""The OpenAI-compatible HTTP API (FastAPI): /v1/models, /v1/completions, /v1/chat/completions,
/tokenize, /detokenize, /health, /version and /metrics.

A request of ``n`` choices (or ``best_of``) is that many generations in the engine (``choices``);
their answers carry logprobs, echo, tool calls (parsed in the model family's format) as asked.

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
from dataclasses import dataclass, field, replace
from typing import Any

import anyio
import msgspec
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import PlainTextResponse, Response
from starlette.responses import StreamingResponse

import muxserve
from muxserve.engine.logprobs import TokenLogprobs
from muxserve.engine.sequence import FinishReason
from muxserve.server import prompts, schema
from muxserve.server.choices import (
    CompletionLogprobs,
    TokenText,
    best_indices,
    chat_logprobs,
    choice_seeds,
    cumulative_logprob,
)
from muxserve.server.detokenizer import IncrementalDetokenizer
from muxserve.server.driver import EngineDriver, ErrorEvent, RequestHandle, ServedModel
from muxserve.server.errors import add_error_handlers
from muxserve.server.guards import DEFAULT_MAX_REQUEST_BYTES, BodySizeLimit, api_key_check
from muxserve.server.metrics import CONTENT_TYPE, ServerMetrics
from muxserve.server.protocol import ApiError, ChatCompletionRequest, CompletionRequest, _GenerationRequest
from muxserve.server.tokenize import (
    DetokenizeRequest,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    detokenize,
    tokenize_messages,
    tokenize_prompt,
)
from muxserve.server.tools import StreamingToolParser, ToolFormat, ToolRequest

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
    logprob: TokenLogprobs | None = None  # the token's, when the request asked
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # with the first token, when asked (echo)


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
    index: int = 0  # the choice's index
    logprobs: list[TokenLogprobs | None] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    hidden_ids: frozenset[int] = frozenset()  # special tokens left out of the text (tool parsing keeps the others)

    def usage(self) -> dict[str, int]:
        n, m = len(self.prompt_token_ids), len(self.token_ids)
        return {"prompt_tokens": n, "completion_tokens": m, "total_tokens": n + m}


@dataclass
class Choices:
    """The generations of one request: ``n`` choices, or ``best_of`` of which the best ``n`` answer."""

    gens: list[Generation]
    n: int
    logprobs: bool  # the client asked for logprobs (best_of asks for them anyway, to rank)
    tools: ToolRequest | None = None
    fmt: ToolFormat | None = None

    @property
    def model(self) -> ServedModel:
        return self.gens[0].model

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.gens[0].prompt_token_ids

    def best(self) -> list[Generation]:
        """The choices answered, re-indexed: every one, or the ``n`` most likely of ``best_of``."""
        if len(self.gens) == self.n:
            return self.gens
        chosen = [self.gens[i] for i in best_indices([cumulative_logprob(g.logprobs) for g in self.gens], self.n)]
        for index, gen in enumerate(chosen):
            gen.index = index
        return chosen

    def usage(self) -> dict[str, int]:
        n, m = len(self.prompt_token_ids), sum(len(g.token_ids) for g in self.gens)
        return {"prompt_tokens": n, "completion_tokens": m, "total_tokens": n + m}

    @property
    def parses_tools(self) -> bool:
        return self.tools is not None and self.tools.parses_calls


def json_response(obj: Any, status: int = 200) -> Response:
    return Response(_json.encode(obj), status_code=status, media_type="application/json")


def sse(obj: Any) -> bytes:
    return b"data: " + _json.encode(obj) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


# -- running a generation ------------------------------------------------------------------------
async def prepare(state: ServerState, body: _GenerationRequest,
                  prompt_of: Callable[[Any, ServedModel], list[int]], max_tokens: int | None,
                  prompt_field: str) -> Choices:
    """Check ``body`` and tokenize its prompt (``prompt_of``) on the worker thread; an ApiError if refused."""

    def work():
        prompts.check_body(body)
        model = prompts.find_model(state.models, body.model)
        tools = fmt = None
        if isinstance(body, ChatCompletionRequest):
            tools = prompts.tool_request(body)
            fmt = prompts.tool_format(model) if tools is not None else None
        prompt_ids = prompt_of(body, model)
        spec = prompts.guided(body, model, tools, fmt)
        params = prompts.sampling_params(body, model, len(prompt_ids), max_tokens, prompt_field, spec)
        return model, prompt_ids, params, prompts.stop_strings(body), tools, fmt

    model, prompt_ids, params, stop, tools, fmt = await asyncio.get_running_loop().run_in_executor(
        state.prepare_pool, work)
    count = body.best_of or body.n
    asked = params.logprobs is not None
    if count > body.n and not asked:
        params = replace(params, logprobs=0)  # best_of ranks by cumulative logprob
    parses = tools is not None and tools.parses_calls
    hidden = _hidden_special_ids(model.tokenizer) if parses else frozenset()
    gens = []
    for index, seed in enumerate(choice_seeds(params.seed, count)):
        detok = IncrementalDetokenizer(model.tokenizer, prompt_ids, stop, skip_special_tokens=not parses)
        gens.append(Generation(model, prompt_ids, RequestHandle(model.name, prompt_ids, replace(params, seed=seed)),
                               detok, index=index, hidden_ids=hidden))
    return Choices(gens, body.n, asked, tools, fmt)


_TOOL_MARKERS = ("<tool_call>", "</tool_call>", "[TOOL_CALLS]", "<|python_tag|>")


_hidden: dict[int, frozenset[int]] = {}  # id(tokenizer) -> its hidden ids (tokenizers live as long as the server)


def _hidden_special_ids(tokenizer) -> frozenset[int]:
    """Special tokens kept out of the text of a tool-calling answer: all but the tool-call markers."""
    if tokenizer is None:
        return frozenset()
    hidden = _hidden.get(id(tokenizer))
    if hidden is None:
        vocab = tokenizer.get_vocab()
        markers = {vocab[m] for m in _TOOL_MARKERS if m in vocab}
        hidden = _hidden[id(tokenizer)] = frozenset(set(tokenizer.all_special_ids) - markers)
    return hidden


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
            gen.logprobs.append(event.logprob)
            if event.prompt_logprobs is not None:
                gen.prompt_logprobs = event.prompt_logprobs
            text = "" if event.token in gen.hidden_ids else gen.detokenizer.add(event.token)
            if gen.detokenizer.stopped:
                gen.finish_reason, gen.stop_reason = FinishReason.STOP, gen.detokenizer.matched
                state.driver.abort(gen.handle, FinishReason.STOP)  # the engine may still be generating it
            elif event.finish_reason is not None:
                gen.finish_reason = event.finish_reason
                gen.handle.closed = True
                text += gen.detokenizer.flush()
            gen.text += text
            yield Delta(text, event.token, gen.finish_reason, gen.stop_reason, event.logprob, event.prompt_logprobs)
            if gen.finish_reason is not None:
                return
    finally:
        state.active -= 1
        state.driver.abort(gen.handle)  # no-op when it finished


async def collect(state: ServerState, gens: list[Generation], request: Request) -> None:
    """Run every generation to the end; a client that disconnects meanwhile aborts them."""

    async def consume(gen: Generation) -> None:
        async with contextlib.aclosing(run(state, gen)) as deltas:
            async for _ in deltas:
                pass

    task = asyncio.ensure_future(asyncio.gather(*(consume(g) for g in gens)))
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


async def run_all(state: ServerState, gens: list[Generation]) -> AsyncIterator[tuple[Generation, Delta]]:
    """The deltas of every generation as they come; leaving early aborts those still running."""
    if len(gens) == 1:
        async with contextlib.aclosing(run(state, gens[0])) as deltas:
            async for d in deltas:
                yield gens[0], d
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(gen: Generation) -> None:
        try:
            async with contextlib.aclosing(run(state, gen)) as deltas:
                async for d in deltas:
                    queue.put_nowait((gen, d))
        except Exception as exc:
            queue.put_nowait((gen, exc))
        finally:
            queue.put_nowait((gen, None))

    tasks = [asyncio.ensure_future(pump(g)) for g in gens]
    try:
        left = len(gens)
        while left:
            gen, item = await queue.get()
            if item is None:
                left -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield gen, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


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
        choices = await prepare(state, body, prompts.completion_prompt, body.max_tokens, "prompt")
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        view = CompletionView(body, choices)
        if body.stream:
            return SSEResponse(completion_stream(state, view, rid, created))
        await collect(state, choices.gens, request)
        return json_response({"id": rid, "object": "text_completion", "created": created,
                              "model": choices.model.name, "choices": [view.whole(g) for g in choices.best()],
                              "usage": choices.usage()})

    @v1.post("/chat/completions", responses={**schema.streamed(schema.ChatCompletionResponse), **generation_errors})
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        state.check_accepting()
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        choices = await prepare(state, body, prompts.chat_prompt, max_tokens, "messages")
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            return SSEResponse(chat_stream(state, body, choices, rid, created))
        await collect(state, choices.gens, request)
        out = {"id": rid, "object": "chat.completion", "created": created, "model": choices.model.name,
               "choices": [chat_choice(body, choices, g) for g in choices.best()], "usage": choices.usage()}
        if body.return_token_ids:
            out["prompt_token_ids"] = choices.prompt_token_ids
        return json_response(out)

    app.include_router(v1)
    _tokenize_routes(app, state, api_key)
    return app


def _tokenize_routes(app: FastAPI, state: ServerState, api_key: str | None) -> None:
    """vLLM's /tokenize and /detokenize (no /v1 prefix); behind the API key like /v1."""
    deps = [Depends(api_key_check(api_key))] if api_key else []
    errors = schema.errors(400, *([401] if api_key else []), 404, 413, 500)

    async def on_worker(fn):
        try:
            return await asyncio.get_running_loop().run_in_executor(state.prepare_pool, fn)
        except ValueError as exc:  # its message starts with the field it is about
            field = str(exc).split(maxsplit=1)[0].rstrip(":")
            raise ApiError(400, str(exc), field if field in ("prompt", "messages", "tokens") else None) from None

    def tokenizer_of(name: str) -> ServedModel:
        model = prompts.find_model(state.models, name)
        if model.tokenizer is None:
            raise ApiError(400, f"model `{model.name}` has no tokenizer", "model")
        return model

    @app.post("/tokenize", dependencies=deps,
              responses={200: {"model": schema.TokenizeResponse, "description": "the prompt's token ids"}, **errors})
    async def tokenize(body: TokenizeCompletionRequest | TokenizeChatRequest) -> Response:
        model = tokenizer_of(body.model)
        if isinstance(body, TokenizeChatRequest):
            tools = body.model_extra.get("tools") if body.model_extra else None
            out = await on_worker(lambda: tokenize_messages(
                model.tokenizer, body.messages, model.max_model_len, body.add_generation_prompt,
                body.continue_final_message, tools if isinstance(tools, list) else None))
        else:
            out = await on_worker(lambda: tokenize_prompt(model.tokenizer, body.prompt, model.max_model_len,
                                                          body.add_special_tokens))
        return json_response(out)

    @app.post("/detokenize", dependencies=deps,
              responses={200: {"model": schema.DetokenizeResponse, "description": "the tokens' text"}, **errors})
    async def detokenize_route(body: DetokenizeRequest) -> Response:
        model = tokenizer_of(body.model)
        return json_response(await on_worker(lambda: detokenize(model.tokenizer, body.tokens, model.vocab_size)))


# -- shaping the answers ---------------------------------------------------------------------------
class CompletionView:
    """How the choices of one /v1/completions request are written: text (after the prompt with
    ``echo``), logprobs, token ids."""

    def __init__(self, body: CompletionRequest, choices: Choices):
        self.body = body
        self.choices = choices
        self.tokens = TokenText(choices.model.tokenizer)
        prompt = body.prompt[0] if isinstance(body.prompt, list) and body.prompt and isinstance(
            body.prompt[0], (str, list)) else body.prompt
        self.prompt_text = ""
        if body.echo:
            if isinstance(prompt, str):
                self.prompt_text = prompt
            elif choices.model.tokenizer is not None:
                self.prompt_text = choices.model.tokenizer.decode(choices.prompt_token_ids)
        self._logprobs: dict[int, CompletionLogprobs] = {}

    def _prompt_items(self, gen: Generation) -> list:
        if not self.body.echo:
            return []
        entries = gen.prompt_logprobs or [None] * len(gen.prompt_token_ids)
        return list(zip(gen.prompt_token_ids, entries))

    def whole(self, gen: Generation) -> dict:
        out = {"index": gen.index, "text": self.prompt_text + gen.text, "logprobs": None,
               "finish_reason": gen.finish_reason, "stop_reason": gen.stop_reason}
        if self.choices.logprobs:
            items = self._prompt_items(gen) + list(zip(gen.token_ids, gen.logprobs))
            out["logprobs"] = CompletionLogprobs(self.tokens).chunk(items)
        if self.body.return_token_ids:
            out.update(prompt_token_ids=gen.prompt_token_ids, token_ids=gen.token_ids)
        return out

    def chunk(self, gen: Generation, d: Delta, first: bool) -> dict:
        text = (self.prompt_text if first else "") + d.text
        out = {"index": gen.index, "text": text, "logprobs": None, "finish_reason": d.finish_reason,
               "stop_reason": d.stop_reason}
        if self.choices.logprobs:
            writer = self._logprobs.setdefault(gen.index, CompletionLogprobs(self.tokens))
            items = (self._prompt_items(gen) if first else []) + [(d.token_id, d.logprob)]
            out["logprobs"] = writer.chunk(items)
        if self.body.return_token_ids:
            out["token_ids"] = [d.token_id]
            if first:
                out["prompt_token_ids"] = gen.prompt_token_ids
        return out


def _finish(reason, calls: bool):
    return "tool_calls" if calls and reason is not None else reason


def chat_choice(body: ChatCompletionRequest, choices: Choices, gen: Generation) -> dict:
    message: dict[str, Any] = {"role": "assistant", "content": gen.text}
    calls = []
    if choices.parses_tools:
        parsed = choices.fmt.parse(gen.text)
        calls = parsed.tool_calls[:1] if body.parallel_tool_calls is False else parsed.tool_calls
        if calls:
            message = {"role": "assistant", "content": parsed.content, "tool_calls": [c.to_openai() for c in calls]}
    out = {"index": gen.index, "message": message, "logprobs": None,
           "finish_reason": _finish(gen.finish_reason, bool(calls)), "stop_reason": gen.stop_reason}
    if choices.logprobs:
        out["logprobs"] = chat_logprobs(TokenText(choices.model.tokenizer), gen.logprobs)
    if body.return_token_ids:
        out["token_ids"] = gen.token_ids
    return out


async def completion_stream(state: ServerState, view: CompletionView, rid: str, created: int) -> AsyncIterator[bytes]:
    head = {"id": rid, "object": "text_completion", "created": created, "model": view.choices.model.name}
    async with contextlib.aclosing(_token_chunks(state, view.choices, view.body, head, view.chunk)) as chunks:
        async for chunk in chunks:  # closed at once when the client goes away
            yield chunk


async def chat_stream(state: ServerState, body: ChatCompletionRequest, choices: Choices, rid: str,
                      created: int) -> AsyncIterator[bytes]:
    head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": choices.model.name}
    for gen in choices.gens:
        first = {"index": gen.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                 "finish_reason": None}
        if body.return_token_ids:
            first["prompt_token_ids"] = gen.prompt_token_ids
        yield sse({**head, "choices": [first], **({"usage": None} if body.include_usage else {})})
    tokens = TokenText(choices.model.tokenizer)
    parsers = {g.index: StreamingToolParser(choices.fmt) for g in choices.gens} if choices.parses_tools else {}

    def choice(gen: Generation, d: Delta, _first: bool) -> dict:
        parser = parsers.get(gen.index)
        calls = False
        if parser is None:
            delta: dict[str, Any] = {"content": d.text}
        else:
            delta = _merge(parser.feed(d.text), parser.finish() if d.finish_reason is not None else None)
            if body.parallel_tool_calls is False and "tool_calls" in delta:
                delta["tool_calls"] = [c for c in delta["tool_calls"] if c["index"] == 0] or None
                if delta["tool_calls"] is None:
                    del delta["tool_calls"]
            calls = parser.finish_reason is not None
        out = {"index": gen.index, "delta": delta, "logprobs": None,
               "finish_reason": _finish(d.finish_reason, calls), "stop_reason": d.stop_reason}
        if choices.logprobs:
            out["logprobs"] = chat_logprobs(tokens, [d.logprob])
        if body.return_token_ids:
            out["token_ids"] = [d.token_id]
        return out

    async with contextlib.aclosing(_token_chunks(state, choices, body, head, choice)) as chunks:
        async for chunk in chunks:  # closed at once when the client goes away
            yield chunk


def _merge(a: dict | None, b: dict | None) -> dict:
    """Two chat deltas of a tool parser as one."""
    out: dict[str, Any] = {}
    for part in (a, b):
        if not part:
            continue
        if "content" in part:
            out["content"] = out.get("content", "") + part["content"]
        if "tool_calls" in part:
            out["tool_calls"] = out.get("tool_calls", []) + part["tool_calls"]
    return out


async def _token_chunks(state: ServerState, choices: Choices, body, head: dict, choice) -> AsyncIterator[bytes]:
    """One SSE chunk per token of any choice (``choice(gen, delta, is_first)`` shapes it), an error
    chunk if a generation fails, the usage chunk when asked for, then ``[DONE]``."""
    usage_field = {"usage": None} if body.include_usage else {}
    try:
        started: set[int] = set()
        async with contextlib.aclosing(run_all(state, choices.gens)) as deltas:
            async for gen, d in deltas:
                first = gen.index not in started
                started.add(gen.index)
                yield sse({**head, "choices": [choice(gen, d, first)], **usage_field})
    except ApiError as exc:
        yield sse(exc.body())
    except Exception as exc:
        logger.exception("stream %s failed", head["id"])
        yield sse(ApiError(500, f"internal error while streaming: {type(exc).__name__}: {exc}").body())
    else:
        if body.include_usage:
            yield sse({**head, "choices": [], "usage": choices.usage()})
    yield SSE_DONE
