"""FlexStoreManager: the weights of every model, one KV pool and the page allocator of one device.

It is transport-free: :meth:`FlexStoreManager.handle` maps one protocol request to one reply
(errors included), so the ZeroMQ server, the tests and the benchmarks drive the same code.
"""

from __future__ import annotations

import logging
import os
import secrets

import torch

from muxserve.engine.kv_cache import KVLayout, KVPool, PageAllocator
from muxserve.engine.model_hub import resolve_model
from muxserve.flexstore import protocol as P
from muxserve.flexstore.config import DEFAULT_CPU_KV_BYTES, FlexStoreConfig
from muxserve.flexstore.segments import SharedSegment, release_torch_ipc_files
from muxserve.flexstore.weights import StoredWeights, load_shared

logger = logging.getLogger(__name__)
POOL_PAGE_MULTIPLE = 128  # the original rounds the GPU pool down to a multiple of 128 pages


class FlexStoreError(Exception):
    """A request FlexStore refused; ``code`` is one of ``protocol.ERROR_CODES``."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class _Allocator(PageAllocator):
    """The engine's allocator plus the per-model figures that Stats reports."""

    def usage(self, model: str) -> tuple[int, int]:
        owned = self._model(model).owned
        return len(owned), sum(map(len, owned.values()))


class FlexStoreManager:
    """Loads every model once, allocates one pool, owns every page id; see ``handle``."""

    def __init__(self, config: FlexStoreConfig):
        from muxserve.engine.llm_engine import parse_device

        self.config = config
        self.device = parse_device(config.device)
        # Names are unique per instance: prefix, pid and a random token (two instances can share a host).
        self._tag = f"{config.shm_prefix}-{os.getpid()}-{secrets.token_hex(4)}"
        self._segments: list[SharedSegment] = []
        self.weights: dict[str, StoredWeights] = {}
        self._preemptions: dict[str, int] = {}
        try:
            for i, entry in enumerate(config.models):
                stored = load_shared(entry, resolve_model(entry.model), self.device, f"{self._tag}-w{i}")
                self._segments.append(stored.segment)
                self.weights[entry.name] = stored
                logger.info("loaded %s from %s: %s, %s, %.1f MiB of weights", entry.name, stored.folder,
                            stored.spec.architecture, stored.dtype, stored.segment.nbytes / 2**20)
            pool_bytes = self._pool_bytes()
            self.pool_segment = SharedSegment.create(pool_bytes, self.device, f"{self._tag}-pool", zero=True)
            self._segments.append(self.pool_segment)
            self.pool = KVPool(self.pool_segment.tensor, config.page_bytes)
            self.allocator = _Allocator(self.pool.num_pages)
            self.layouts: dict[str, KVLayout] = {}
            for name, stored in self.weights.items():
                s = stored.spec
                layout = KVLayout(s.num_layers, s.num_kv_heads, s.head_dim, stored.dtype, config.page_bytes)
                self.layouts[name] = layout
                self.allocator.register_model(name, layout)
                self._preemptions[name] = 0
        except BaseException:
            self.close()
            raise
        logger.info("KV pool on %s: %d pages of %d B (%.1f MiB)", self.device, self.pool.num_pages,
                    config.page_bytes, pool_bytes / 2**20)
        for name, layout in self.layouts.items():
            logger.info("  %s: %d layers x %d kv-heads x head_dim %d (%s): %d tokens per page, %d pages per "
                        "block; at most %d tokens with the whole pool", name, layout.num_layers,
                        layout.num_kv_heads, layout.head_dim, layout.dtype, layout.page_tokens,
                        layout.pages_per_block, self.allocator.max_tokens(name))

    def _pool_bytes(self) -> int:
        cfg = self.config
        if cfg.kv_cache_bytes is not None:
            pages = cfg.kv_cache_bytes // cfg.page_bytes
        elif self.device.type == "cpu":
            pages = DEFAULT_CPU_KV_BYTES // cfg.page_bytes
        else:
            total = torch.cuda.get_device_properties(self.device).total_memory
            pages = int(cfg.gpu_memory_utilization * total) // cfg.page_bytes // POOL_PAGE_MULTIPLE * POOL_PAGE_MULTIPLE
            free, _ = torch.cuda.mem_get_info(self.device)
            if pages * cfg.page_bytes > free:
                raise ValueError(f"gpu_memory_utilization {cfg.gpu_memory_utilization} asks for a KV pool of "
                                 f"{pages * cfg.page_bytes / 2**30:.1f} GiB but only {free / 2**30:.1f} GiB are free "
                                 "after the weights; lower it")
        if pages < 1:
            raise ValueError(f"KV pool of {cfg.kv_cache_bytes} bytes holds no page of {cfg.page_bytes} bytes")
        return pages * cfg.page_bytes

    # -- requests ---------------------------------------------------------------------------
    def handle_bytes(self, data: bytes) -> tuple[P.Request | None, bytes]:
        """Decode, dispatch and encode; any failure becomes an Error reply. Returns (request, reply)."""
        try:
            request = P.decode_request(data)
        except Exception as exc:  # msgspec.DecodeError / ValidationError, or anything odd in the bytes
            return None, P.encode(P.Error(code="malformed", message=f"malformed request: {exc}"))
        return request, P.encode(self.handle(request))

    def handle(self, request: P.Request) -> P.Reply:
        try:
            return self._dispatch(request)
        except FlexStoreError as exc:
            return P.Error(code=exc.code, message=exc.message)
        except Exception as exc:  # a bug, not a bad request: report it and keep serving
            logger.exception("FlexStore failed on %r", type(request).__name__)
            return P.Error(code="internal", message=f"{type(exc).__name__}: {exc}")

    def _dispatch(self, req: P.Request) -> P.Reply:
        if isinstance(req, P.Allocate):
            try:
                result = self.allocator.allocate_sparse(self._known(req.model), req.requests)
            except ValueError as exc:
                raise FlexStoreError("invalid", str(exc)) from None
            if result.preempted:
                self._preemptions[req.model] += len(result.preempted)
            return P.Allocated(new_pages=result.new_pages, preempted=result.preempted)
        if isinstance(req, P.Free):
            try:
                return P.Answer(self.allocator.free(self._known(req.model), req.request_ids))
            except KeyError as exc:
                raise FlexStoreError("unknown_request", exc.args[0]) from None
        if isinstance(req, P.CanAllocate):
            try:
                return P.Answer(int(self.allocator.can_allocate(self._known(req.model), req.requests)))
            except ValueError as exc:
                raise FlexStoreError("invalid", str(exc)) from None
        if isinstance(req, P.PagesOf):
            try:
                return P.Pages(self.allocator.pages_of(self._known(req.model), req.request_id))
            except KeyError as exc:
                raise FlexStoreError("unknown_request", exc.args[0]) from None
        if isinstance(req, P.Ping):
            return P.Pong(pid=os.getpid())
        if isinstance(req, P.GetStats):
            return self.stats()
        if isinstance(req, P.GetInfo):
            return P.Info(device=str(self.device), num_pages=self.pool.num_pages, page_bytes=self.pool.page_bytes,
                          models=[self.model_info(n) for n in self.weights])
        if isinstance(req, P.Attach):
            return self.attach_info(self._known(req.model))
        if isinstance(req, P.Shutdown):
            return P.Ok()
        raise FlexStoreError("invalid", f"unsupported request {type(req).__name__}")

    def _known(self, model: str) -> str:
        if model not in self.weights:
            raise FlexStoreError("unknown_model", f"unknown model {model!r}; served: {sorted(self.weights)}")
        return model

    # -- figures ----------------------------------------------------------------------------
    def model_info(self, name: str) -> P.ModelInfo:
        stored, layout = self.weights[name], self.layouts[name]
        return P.ModelInfo(
            name=name, folder=str(stored.folder), dtype=str(stored.dtype).removeprefix("torch."),
            layout=P.LayoutInfo(layout.num_layers, layout.num_kv_heads, layout.head_dim,
                                str(layout.dtype).removeprefix("torch."), layout.page_bytes, layout.page_tokens,
                                layout.pages_per_block),
            max_tokens=self.allocator.max_tokens(name), weight_bytes=stored.segment.nbytes)

    def attach_info(self, name: str) -> P.AttachInfo:
        stored = self.weights[name]
        return P.AttachInfo(model=self.model_info(name), spec=stored.spec, device=str(self.device),
                            weights=stored.segment.share(), tensors=stored.tensors,
                            pool=self.pool_segment.share(), num_pages=self.pool.num_pages)

    def stats(self) -> P.Stats:
        models = []
        for name in self.weights:
            requests, pages = self.allocator.usage(name)
            models.append(P.ModelStats(name=name, requests=requests, pages=pages,
                                       preemptions=self._preemptions[name]))
        return P.Stats(num_pages=self.pool.num_pages, num_free=self.allocator.num_free, models=models)

    # -- shutdown ---------------------------------------------------------------------------
    def segment_names(self) -> list[str]:
        return [s.descriptor.name for s in self._segments if s.descriptor.kind == "shm"]

    def close(self) -> None:
        """Release every segment (unlink shm names, drop CUDA allocations). Idempotent."""
        segments, self._segments = self._segments, []
        self.weights = {}
        self.pool = None  # type: ignore[assignment]
        for segment in segments:
            try:
                segment.release()
            except Exception:  # keep releasing the others
                logger.exception("could not release segment %s", segment.descriptor.name or segment.descriptor.kind)
        if self.device.type == "cuda":
            release_torch_ipc_files()
