"""Talking to FlexStore: an allocator-shaped client, and attaching a model's weights and the pool.

``FlexStoreClient`` has the methods of ``engine.kv_cache.PageAllocator`` that the engine's
Scheduler calls (``allocate``, ``free``, ``can_allocate``, ``max_tokens``, ``num_free``, ...), so
it can stand in for the in-process allocator. One client per thread. It presents the
instance's secret (``auth.py``); a refused secret raises :class:`FlexStoreAuthError` at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import zmq

from muxserve.engine.kv_cache import Allocation, KVLayout, KVPool
from muxserve.engine.model_config import ModelSpec
from muxserve.engine.parallel import SINGLE, TensorParallel
from muxserve.flexstore import protocol as P
from muxserve.flexstore.auth import present_secret
from muxserve.flexstore.device_memory import DeviceRange, attach_range, sync_range
from muxserve.flexstore.manager import FlexStoreError
from muxserve.flexstore.segments import SharedSegment
from muxserve.flexstore.weights import attach_model
from muxserve.ipc.devices import parse_device, parse_dtype

logger = logging.getLogger(__name__)

__all__ = ["FlexStoreClient", "FlexStoreError", "FlexStoreTimeout", "FlexStoreAuthError", "FlexStoreDied",
           "AttachedModel"]

WAIT_SLICE_S = 0.1  # a wait for a reply checks the handshake and FlexStore's life this often
_REFUSED = zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL


class FlexStoreTimeout(TimeoutError):
    """FlexStore did not answer in time (not running, or busy)."""


class FlexStoreAuthError(ConnectionRefusedError):
    """FlexStore refused this client: it presented no secret or a wrong one."""


class FlexStoreDied(RuntimeError):
    """The FlexStore process ended while this client waited for it (see ``FlexStoreClient(alive=...)``)."""


@dataclass
class AttachedModel:
    """One model mapped from FlexStore: its weights bound to the shared segment, and the shared pool."""

    name: str
    folder: Path
    spec: ModelSpec
    dtype: torch.dtype
    device: torch.device
    layout: KVLayout
    model: torch.nn.Module
    pool: KVPool
    _segments: list[SharedSegment] = field(default_factory=list, repr=False)
    # Under a memory budget: the KV range and (an elastic LLM) the weights range, which follow
    # FlexStore's mappings over the fd socket (``sync``); their addresses never change.
    kv_range: DeviceRange | None = None
    weights_range: DeviceRange | None = None
    fd_socket: str = ""
    secret: str = field(default="", repr=False)

    @property
    def weights_mapped(self) -> bool:
        """Whether the weights are on the device now (False while an elastic LLM is offloaded)."""
        rng = self.weights_range
        return rng is None or rng.mapped_bytes == rng.nbytes

    def sync(self, kv_epoch: int = 0, weights_epoch: int = 0) -> bool:
        """Map what FlexStore mapped and unmap what it unmapped, for each range behind the given epoch;
        whether anything was asked of FlexStore."""
        synced = False
        for rng, epoch in ((self.kv_range, kv_epoch), (self.weights_range, weights_epoch)):
            if rng is not None and epoch > rng.epoch:
                sync_range(rng, self.fd_socket, self.secret)
                synced = True
        return synced

    def close(self) -> None:
        """Drop this process's mappings (never unlinks: FlexStore owns the segments)."""
        self.model = None  # type: ignore[assignment]
        self.pool = None  # type: ignore[assignment]
        for segment in self._segments:
            segment.release()
        self._segments = []
        for rng in (self.kv_range, self.weights_range):
            if rng is not None:
                rng.close()
        self.kv_range = self.weights_range = None


class FlexStoreClient:
    """Request/response client of one FlexStore (a ZeroMQ REQ socket) that presents ``secret``
    (None: no secret, which FlexStore refuses).

    Every method raises :class:`FlexStoreError` (with ``.code`` and ``.message``) when FlexStore
    answers with an error, :class:`FlexStoreAuthError` when FlexStore refuses the secret,
    :class:`FlexStoreTimeout` when it does not answer in ``timeout_s``, and
    :class:`FlexStoreDied` as soon as ``alive()`` (optional; e.g. ``FlexStoreProcess.alive``)
    turns False during a wait.
    """

    kv_epoch = 0  # the newest epoch of FlexStore's KV range this client has heard of (a memory budget)
    _secret = ""

    def __init__(self, address: str, secret: str | None, timeout_s: float = 30.0,
                 alive: Callable[[], bool] | None = None):
        self.address = address
        self.timeout_ms = int(timeout_s * 1000)
        self._alive = alive
        self._secret = secret or ""
        self._socket, self._monitor = self._connect(secret)
        self._info: P.Info | None = None

    def _connect(self, secret: str | None) -> tuple[zmq.Socket, zmq.Socket]:
        sock = zmq.Context.instance().socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        # After a timeout the next send starts over instead of failing on REQ's strict send/recv turn.
        sock.setsockopt(zmq.REQ_RELAXED, 1)
        sock.setsockopt(zmq.REQ_CORRELATE, 1)
        if secret is not None:
            present_secret(sock, secret)
        monitor = sock.get_monitor_socket(_REFUSED)  # handshake refusals, to fail at once instead of timing out
        sock.connect(self.address)
        return sock, monitor

    def call(self, request: P.Request) -> P.Reply:
        """Send one request, wait for its reply; Error replies raise FlexStoreError."""
        return self._check(self.call_raw(P.encode(request)))

    def call_raw(self, data: bytes) -> P.Reply:
        """Send arbitrary bytes (tests use it for garbage) and decode the reply, errors included."""
        self._socket.send(data)
        return P.decode_reply(self._receive())

    def _receive(self) -> bytes:
        """The reply, waited for in slices: between them, a refused handshake or a dead FlexStore ends the wait."""
        deadline = time.monotonic() + self.timeout_ms / 1000
        while True:
            remaining = deadline - time.monotonic()
            if self._socket.poll(max(1, int(1000 * min(remaining, WAIT_SLICE_S)))):
                return self._socket.recv()
            if self._monitor.poll(0):
                self._monitor.recv_multipart()
                raise FlexStoreAuthError(f"FlexStore at {self.address} refused this client: "
                                         "it presented no secret or a wrong one")
            if self._alive is not None and not self._alive():
                raise FlexStoreDied(f"FlexStore at {self.address} exited while this client waited for its answer")
            if time.monotonic() >= deadline:
                raise FlexStoreTimeout(f"FlexStore at {self.address} did not answer within {self.timeout_ms} ms")

    @staticmethod
    def _check(reply: P.Reply) -> P.Reply:
        if isinstance(reply, P.Error):
            raise FlexStoreError(reply.code, reply.message, reply.numbers)
        return reply

    def close(self) -> None:
        self._socket.disable_monitor()
        self._monitor.close(linger=0)
        self._socket.close(linger=0)

    def __enter__(self) -> FlexStoreClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- service ----------------------------------------------------------------------------
    def ping(self) -> int:
        """FlexStore's process id, once it is ready."""
        return self.call(P.Ping()).pid

    def info(self, refresh: bool = False) -> P.Info:
        if self._info is None or refresh:
            self._info = self.call(P.GetInfo())
        return self._info

    def stats(self) -> P.Stats:
        return self.call(P.GetStats())

    def shutdown(self) -> None:
        self.call(P.Shutdown())

    # -- elastic residency ------------------------------------------------------------------
    def offload(self, model: str) -> P.Offloaded:
        """Offload an elastic LLM that holds no pages; FlexStoreError ``refused`` (with ``numbers``) otherwise."""
        return self.call(P.Offload(model))

    def wake(self, model: str, protected: Iterable[tuple[str, str]] = ()) -> P.Woken:
        """Wake an offloaded LLM; other LLMs' requests in ``Woken.preempted`` lost their pages (recompute
        them). FlexStoreError ``refused`` (with ``numbers``) when even preemption cannot make room."""
        woken = self.call(P.Wake(model, [tuple(p) for p in protected]))
        self.kv_epoch = max(self.kv_epoch, woken.kv_epoch)
        return woken

    # -- the PageAllocator interface --------------------------------------------------------
    @property
    def num_pages(self) -> int:
        return self.info().num_pages

    @property
    def models(self) -> list[str]:
        return [m.name for m in self.info().models]

    @property
    def num_free(self) -> int:
        return self.stats().num_free

    def max_tokens(self, model: str) -> int:
        for m in self.info().models:
            if m.name == model:
                return m.max_tokens
        raise FlexStoreError("unknown_model", f"unknown model {model!r}; served: {sorted(self.models)}")

    def used_by(self, model: str) -> int:
        for m in self.stats().models:
            if m.name == model:
                return m.pages
        raise FlexStoreError("unknown_model", f"unknown model {model!r}; served: {sorted(self.models)}")

    def can_allocate(self, model: str, requests: Iterable[tuple[str, int]]) -> bool:
        return bool(self.call(P.CanAllocate(model, _as_list(requests))).value)

    def allocate(self, model: str, requests: Sequence[tuple[str, int]]) -> Allocation:
        """Same contract as ``PageAllocator.allocate``; every admitted id is in ``new_pages``."""
        requests = _as_list(requests)
        reply = self.call(P.Allocate(model, requests))
        if reply.kv_epoch > self.kv_epoch:
            self.kv_epoch = reply.kv_epoch
        admitted = len(requests) - len(reply.preempted)
        new_pages = {rid: [] for rid, _ in requests[:admitted]}
        new_pages.update(reply.new_pages)  # FlexStore sends only the requests that got pages
        return Allocation(new_pages, reply.preempted)

    def free(self, model: str, request_ids: Iterable[str]) -> int:
        return self.call(P.Free(model, list(request_ids))).value

    def pages_of(self, model: str, request_id: str) -> list[int]:
        return self.call(P.PagesOf(model, request_id)).pages

    def owns(self, model: str, request_id: str) -> bool:
        try:
            self.pages_of(model, request_id)
        except FlexStoreError as exc:
            if exc.code == "unknown_request":
                return False
            raise
        return True

    # -- attaching --------------------------------------------------------------------------
    def attach(self, model: str, rank: int = 0,
               init_parallel: Callable[[torch.device], TensorParallel] | None = None) -> AttachedModel:
        """Map ``model``'s weights and its device's pool into this process (zero copy).

        A tensor-parallel model's rank ``rank`` maps its own shard and the pool of its own device;
        ``init_parallel(device)`` then joins the rank's process group (it runs once the device is
        known, before the model is built) and returns this rank's ``TensorParallel``.
        """
        info: P.AttachInfo = self.call(P.Attach(model, rank))
        dtype = parse_dtype(info.model.dtype)
        device = parse_device(info.device)
        tp = info.model.tensor_parallel_size
        parallel = init_parallel(device) if init_parallel is not None else SINGLE
        if parallel.world_size != tp or parallel.rank != rank:
            raise ValueError(f"model {model!r} is stored for tensor_parallel_size {tp}; this process is rank "
                             f"{parallel.rank} of {parallel.world_size} (asked for rank {rank})")
        lay = info.model.layout
        layout = KVLayout(lay.num_layers, lay.num_kv_heads, lay.head_dim, parse_dtype(lay.dtype), lay.page_bytes)
        if info.pool_range is not None:
            return self._attach_ranges(info, dtype, device, layout, parallel)
        weights = SharedSegment.attach(info.weights)
        try:
            pool_segment = SharedSegment.attach(info.pool)
        except BaseException:
            weights.release()
            raise
        net = attach_model(info.spec, dtype, device, weights.tensor, info.tensors, parallel)
        pool = KVPool(pool_segment.tensor, lay.page_bytes)
        return AttachedModel(model, Path(info.model.folder), info.spec, dtype, device, layout, net, pool,
                             [weights, pool_segment])

    def _attach_ranges(self, info: P.AttachInfo, dtype: torch.dtype, device: torch.device, layout: KVLayout,
                       parallel: TensorParallel) -> AttachedModel:
        """Under a memory budget: attach the KV range (and an elastic LLM's weights range) and catch up
        with FlexStore's mappings; a pinned LLM's weights are still a segment."""
        name = info.model.name
        attached = AttachedModel(name, Path(info.model.folder), info.spec, dtype, device, layout, None, None,
                                 fd_socket=info.fd_socket, secret=self._secret)
        try:
            attached.kv_range = attach_range(info.pool_range, device)
            if info.weights_range is not None:
                attached.weights_range = attach_range(info.weights_range, device)
                buffer = attached.weights_range.tensor
            else:
                segment = SharedSegment.attach(info.weights)
                attached._segments.append(segment)
                buffer = segment.tensor
            for rng in (attached.kv_range, attached.weights_range):
                if rng is not None:
                    sync_range(rng, info.fd_socket, self._secret)
            attached.model = attach_model(info.spec, dtype, device, buffer, info.tensors, parallel)
            attached.pool = KVPool(attached.kv_range.tensor, layout.page_bytes)
        except BaseException:
            attached.close()
            raise
        return attached


def attached_engine(client: FlexStoreClient, model: str, **engine_kwargs):
    """An ``LLMEngine`` for ``model`` that runs on FlexStore's weights, pool and page allocator."""
    from muxserve.engine.llm_engine import EngineConfig, LLMEngine

    attached = client.attach(model)
    config = EngineConfig(model=str(attached.folder), dtype=str(attached.dtype).removeprefix("torch."),
                          device=str(attached.device), page_bytes=attached.pool.page_bytes, **engine_kwargs)
    # The engine's tensors keep the mappings alive; nothing else needs to hold ``attached``.
    return LLMEngine(config, model=attached.model, pool=attached.pool, allocator=client, model_name=model)


def _as_list(requests) -> list:
    return requests if isinstance(requests, list) else list(requests)
