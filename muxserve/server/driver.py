"""The engine thread: the only owner of the Instance (scheduler, sockets, FlexStore client).

HTTP handlers never touch the scheduler. They post commands (submit, abort, refresh metrics,
stop) on a thread-safe queue and write one byte to a pipe that wakes the engine thread out of
its wait for runtime results. The engine thread answers through each request's asyncio queue,
one batch of events per poll, with ``loop.call_soon_threadsafe``. Requests are scheduled by the
same MuxScheduler as the offline launcher; the scheduler's ``on_token`` hook feeds the streams.

An exception while handling one request's command or token fails that request alone (a 500 for
its client). A runtime that dies is restarted by the Instance and its requests recomputed, unseen
here; an LLM whose runtime cannot come back fails alone (its requests get 503 naming it). A dead
FlexStore ends the engine: every request gets a 500 naming it and the server exits.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from muxserve.engine.logprobs import TokenLogprobs
from muxserve.engine.sampling_params import SamplingParams
from muxserve.engine.sequence import FinishReason
from muxserve.engine.structured import grammar_cache_for
from muxserve.instance.instance import Instance
from muxserve.scheduler.recovery import LLMUnavailable
from muxserve.scheduler.state import Request
from muxserve.server.metrics import ServerMetrics

logger = logging.getLogger(__name__)

IDLE_WAIT_S = 1.0  # nothing to do: wait this long for a command (a command wakes us at once)
BUSY_WAIT_S = 0.05  # jobs in flight: wait this long for a result


@dataclass(frozen=True)
class ServedModel:
    """What the HTTP layer needs to know of one LLM; fixed once the instance is up."""

    name: str
    root: str  # the config's ``model`` (short name, folder or .gguf)
    folder: Path
    max_model_len: int
    vocab_size: int
    max_tokens: int  # tokens one request can hold in the KV pool
    tokenizer: Any | None  # None: the folder has no tokenizer (prompts must be token ids)
    architecture: str | None = None  # config.json's: the tool-call format of its family
    eos_ids: frozenset[int] = frozenset()
    residency: str = "pinned"  # or "elastic": its weights may leave the device while it is idle
    weight_bytes: int = 0

    def grammars(self):
        """The ``GrammarCache`` of this model's tokenizer (compiled grammars, made once)."""
        return grammar_cache_for(self.folder, self.vocab_size, self.eos_ids)


@dataclass(frozen=True)
class TokenEvent:
    token: int
    finish_reason: FinishReason | None  # stop or length on the last token
    logprob: TokenLogprobs | None = None  # when the request asked for logprobs
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # on the first token, when it asked (echo)


@dataclass(frozen=True)
class ErrorEvent:
    status: int
    message: str
    param: str | None = None


@dataclass(eq=False)
class RequestHandle:
    """One HTTP request's side of a generation. Created and read on the event loop."""

    llm: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival: float = field(default_factory=time.monotonic)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    closed: bool = False  # finished, or an abort/finish was sent: no more commands for it


# Commands from the event loop to the engine thread.
@dataclass(frozen=True)
class _Submit:
    handle: RequestHandle


@dataclass(frozen=True)
class _Abort:
    handle: RequestHandle
    reason: FinishReason  # abort (client gone) or stop (a stop string was found)


@dataclass(frozen=True)
class _AbortAll:
    message: str


@dataclass(frozen=True)
class _Refresh:
    done: concurrent.futures.Future


@dataclass(frozen=True)
class _Call:
    """Run ``fn(instance)`` on the engine thread (the Instance is not thread-safe); its result or
    exception goes to ``done``."""

    fn: Callable[[Instance], Any]
    done: concurrent.futures.Future


@dataclass(frozen=True)
class _Stop:
    pass


_Command = _Submit | _Abort | _AbortAll | _Refresh | _Call | _Stop


@dataclass
class _Tracked:
    handle: RequestHandle
    request: Request
    first_token: float | None = None
    last_token: float | None = None


class EngineDriver:
    """Runs ``instance`` (already started) on its own thread until :meth:`stop`."""

    def __init__(self, instance: Instance, metrics: ServerMetrics, on_fatal: Callable[[BaseException], None]):
        self.instance = instance
        self.metrics = metrics
        self.on_fatal = on_fatal  # called on the event loop when the engine dies
        self.error: BaseException | None = None
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False  # the engine thread has ended: commands are answered at once
        self._closed_lock = threading.Lock()  # orders _post against the engine thread's last drain
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._tracked: dict[str, _Tracked] = {}  # engine thread only
        self._by_handle: dict[int, str] = {}  # id(handle) -> req_id, engine thread only
        self._outbox: list[tuple[RequestHandle, Any]] = []  # engine thread only
        self._failed: list[str] = []  # requests whose token handling failed: aborted after the poll

    # -- event loop side --------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Hand the instance over to the engine thread (nothing else touches it from now on)."""
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="muxserve-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    def submit(self, handle: RequestHandle) -> None:
        if not self._post(_Submit(handle)):
            handle.events.put_nowait(ErrorEvent(503, self._stopped_message()))

    def abort(self, handle: RequestHandle, reason: FinishReason = FinishReason.ABORT) -> None:
        """End a request early: ``abort`` (client gone) or ``stop`` (a stop string was found)."""
        if not handle.closed:
            handle.closed = True
            self._post(_Abort(handle, reason))

    def abort_all(self, message: str) -> None:
        """Fail every unfinished request with a 503 (drain timeout, forced shutdown)."""
        self._post(_AbortAll(message))

    async def refresh_metrics(self, timeout_s: float = 5.0) -> None:
        """Ask the engine thread to update the load gauges; returns when done (or on timeout)."""
        if not self.alive:
            return
        fut: concurrent.futures.Future = concurrent.futures.Future()
        if not self._post(_Refresh(fut)):
            return
        try:
            await asyncio.wait_for(asyncio.wrap_future(fut), timeout_s)
        except (asyncio.TimeoutError, RuntimeError) as exc:
            logger.warning("metrics refresh did not complete: %s", exc)

    async def call(self, fn: Callable[[Instance], Any]) -> Any:
        """``fn(instance)`` run on the engine thread between two polls; raises what it raises, or
        RuntimeError when the engine thread has ended."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        if not self._post(_Call(fn, fut)):
            raise RuntimeError(self._stopped_message())
        return await asyncio.wrap_future(fut)

    def stop(self, timeout_s: float = 60.0) -> None:
        """Fail what is left, stop the engine thread, then every process of the instance."""
        if self._thread is None:
            self.instance.stop()
            return
        self._post(_Stop())
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            logger.error("engine thread did not stop in %.0f s", timeout_s)
            return
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _post(self, command: _Command) -> bool:
        """Queue a command for the engine thread and wake it; False once the engine thread has ended."""
        with self._closed_lock:
            if self._closed:
                return False
            self._commands.put(command)
            try:
                os.write(self._wake_w, b"\0")
            except BlockingIOError:  # the pipe is full: a wake-up is pending anyway
                pass
        return True

    def _stopped_message(self) -> str:
        if self.error is None:
            return "the server is shutting down"
        return f"the engine failed: {type(self.error).__name__}: {self.error}"

    # -- engine thread --------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while self._handle_commands():
                self._flush()  # refusals of the commands just handled go out now, not after the wait
                wait = BUSY_WAIT_S if self.instance.has_work() else IDLE_WAIT_S
                self.instance.poll(wait, wake_fd=self._wake_r)
                self._abort_failed()
                self._flush()
        except BaseException as exc:
            logger.exception("engine failed")
            self.error = exc
            self._fail_all(500, f"the engine failed: {type(exc).__name__}: {exc}", abort=False)
            self._flush()
            self._call_soon(self.on_fatal, exc)
        finally:
            try:
                self.instance.stop()
            finally:
                self._drain_late_commands()

    def _handle_commands(self) -> bool:
        """Apply every queued command; False once asked to stop."""
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return True
            if isinstance(cmd, _Stop):
                self._fail_all(503, "the server is shutting down")
                self._flush()
                return False
            if isinstance(cmd, _AbortAll):
                self._fail_all(503, cmd.message)
            elif isinstance(cmd, _Refresh):
                self._refresh(cmd.done)
            elif isinstance(cmd, _Call):
                try:
                    cmd.done.set_result(cmd.fn(self.instance))
                except Exception as exc:  # goes to the caller, who answers with it
                    cmd.done.set_exception(exc)
            else:
                self._request_command(cmd)

    def _request_command(self, cmd: _Submit | _Abort) -> None:
        """Submit or abort one request; a bug while doing it fails that request only."""
        try:
            if isinstance(cmd, _Submit):
                self._submit(cmd.handle)
            else:
                self._abort(cmd.handle, cmd.reason)
        except Exception as exc:
            logger.exception("%s of a request failed", type(cmd).__name__.strip("_").lower())
            self._fail(cmd.handle, exc)

    def _submit(self, handle: RequestHandle) -> None:
        if handle.closed:  # aborted before it reached us
            return
        try:
            req = self.instance.submit(handle.llm, handle.prompt_token_ids, handle.params, handle.arrival,
                                       on_token=self._on_token, on_error=self._on_error)
        except ValueError as exc:  # the HTTP layer checks first; this is the engine's last word
            self._outbox.append((handle, ErrorEvent(400, str(exc))))
            return
        except LLMUnavailable as exc:  # its runtime kept dying
            self._outbox.append((handle, ErrorEvent(503, str(exc))))
            return
        self._tracked[req.req_id] = _Tracked(handle, req)
        self._by_handle[id(handle)] = req.req_id

    def _fail(self, handle: RequestHandle, exc: Exception) -> None:
        """Answer ``handle`` with a 500 and forget it (the engine side, if any, is aborted after the poll)."""
        req_id = self._by_handle.pop(id(handle), None)
        if req_id is not None and self._tracked.pop(req_id, None) is not None:
            self._failed.append(req_id)
        self._outbox.append((handle, ErrorEvent(500, f"internal error while handling the request: "
                                                     f"{type(exc).__name__}: {exc}")))

    def _abort_failed(self) -> None:
        for req_id in self._failed:
            try:
                self.instance.abort(req_id)
            except Exception:
                logger.exception("abort of failed request %s failed", req_id)
        self._failed.clear()

    def _abort(self, handle: RequestHandle, reason: FinishReason) -> None:
        req_id = self._by_handle.pop(id(handle), None)
        tracked = self._tracked.pop(req_id, None) if req_id is not None else None
        if tracked is None:
            return  # finished meanwhile, or never submitted
        self.instance.abort(req_id)
        self.metrics.on_finish(tracked.request, reason, time.monotonic(), tracked.first_token)

    def _fail_all(self, status: int, message: str, abort: bool = True) -> None:
        """Every tracked request gets ``message``; ``abort``: also drop it from the instance (not once it died)."""
        for req_id, tracked in list(self._tracked.items()):
            try:
                if abort:
                    self.instance.abort(req_id)
            except Exception:
                logger.debug("abort of %s failed", req_id, exc_info=True)
            self.metrics.on_finish(tracked.request, FinishReason.ABORT, time.monotonic(), tracked.first_token)
            self._outbox.append((tracked.handle, ErrorEvent(status, message)))
        self._tracked.clear()
        self._by_handle.clear()

    def _on_token(self, req: Request, token: int) -> None:
        tracked = self._tracked.get(req.req_id)
        if tracked is None:
            return  # failed while the engine thread handled one of its tokens: aborted after the poll
        try:
            self._deliver_token(tracked, req, token)
        except Exception as exc:
            logger.exception("request %s: handling a token failed", req.req_id)
            self._fail(tracked.handle, exc)

    def _deliver_token(self, tracked: _Tracked, req: Request, token: int) -> None:
        now = time.monotonic()
        self.metrics.on_token(req, now, tracked.last_token)
        if tracked.first_token is None:
            tracked.first_token = now
        tracked.last_token = now
        logprob = req.logprobs[-1] if req.params.logprobs is not None and req.logprobs else None
        prompt = req.prompt_logprobs if len(req.output_token_ids) == 1 else None
        self._outbox.append((tracked.handle, TokenEvent(token, req.finish_reason, logprob, prompt)))
        if req.finish_reason is not None:
            self.metrics.on_finish(req, req.finish_reason, now, tracked.first_token)
            del self._tracked[req.req_id]
            self._by_handle.pop(id(tracked.handle), None)

    def _on_error(self, req: Request) -> None:
        """``req``'s LLM failed: its client gets a 503 that names the LLM and the runtime."""
        tracked = self._tracked.pop(req.req_id, None)
        if tracked is None:
            return  # failed while the engine thread handled one of its tokens
        self._by_handle.pop(id(tracked.handle), None)
        self.metrics.on_finish(req, FinishReason.ABORT, time.monotonic(), tracked.first_token)
        self._outbox.append((tracked.handle, ErrorEvent(503, req.error or "the LLM failed")))

    def _refresh(self, fut: concurrent.futures.Future) -> None:
        try:
            self.metrics.set_load(self.instance.load())
            self.metrics.set_residency(self.instance.metrics().residency_events)
        except Exception as exc:
            fut.set_exception(exc)
            return
        fut.set_result(None)

    def _flush(self) -> None:
        if self._outbox:
            batch, self._outbox = self._outbox, []
            self._call_soon(_deliver, batch)

    def _call_soon(self, fn, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    def _drain_late_commands(self) -> None:
        """Commands that came after the engine stopped still get an answer; later ones are refused."""
        with self._closed_lock:
            self._closed = True
        message = self._stopped_message()
        late = []
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                break
            if isinstance(cmd, _Submit):
                late.append((cmd.handle, ErrorEvent(503, message)))
            elif isinstance(cmd, _Refresh):
                cmd.done.set_result(None)
            elif isinstance(cmd, _Call):
                cmd.done.set_exception(RuntimeError(message))
        if late:
            self._call_soon(_deliver, late)


def _deliver(batch: list[tuple[RequestHandle, Any]]) -> None:
    for handle, event in batch:
        handle.events.put_nowait(event)
