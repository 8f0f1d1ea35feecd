"""FlexStoreManager: the weights of every model, one KV pool and the page allocator of one device.

It is transport-free: :meth:`FlexStoreManager.handle` maps one protocol request to one reply
(errors included), so the ZeroMQ server, the tests and the benchmarks drive the same code.
"""

from __future__ import annotations

import logging
import os
import secrets

import torch

from muxserve.engine.kv_cache import KVLayout, KVPool, PageAllocator, pool_pages
from muxserve.engine.model_hub import resolve_model
from muxserve.engine.parallel import TensorParallel
from muxserve.flexstore import protocol as P
from muxserve.flexstore.config import FlexStoreConfig
from muxserve.flexstore.segments import SharedSegment, release_torch_ipc_files
from muxserve.flexstore.weights import StoredWeights, load_shared
from muxserve.ipc.devices import parse_device

logger = logging.getLogger(__name__)


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
    """Loads every model once, allocates one pool per device of the mesh, owns every page id; see ``handle``."""

    def __init__(self, config: FlexStoreConfig):
        self.config = config
        self.devices = [parse_device(d) for d in config.device_names()]
        self.device = self.devices[0]
        # Names are unique per instance: prefix, pid and a random token (two instances can share a host).
        self._tag = f"{config.shm_prefix}-{os.getpid()}-{secrets.token_hex(4)}"
        self._segments: list[SharedSegment] = []
        self.shards: dict[str, list[StoredWeights]] = {}  # per model, one entry per tensor-parallel rank
        self._preemptions: dict[str, int] = {}
        try:
            self._check_devices()
            for i, entry in enumerate(config.models):
                folder = resolve_model(entry.model)
                tp = entry.tensor_parallel_size
                shards = self.shards[entry.name] = []
                for rank, position in enumerate(entry.devices):
                    # Only the shapes and slicing of rank ``rank``; FlexStore never runs a forward pass.
                    parallel = TensorParallel(tp, rank)
                    stored = load_shared(entry, folder, self.devices[position],
                                         f"{self._tag}-w{i}" + (f"r{rank}" if tp > 1 else ""), parallel)
                    self._segments.append(stored.segment)
                    shards.append(stored)
                stored = shards[0]
                logger.info("loaded %s from %s: %s, %s, %.1f MiB of weights%s", entry.name, stored.folder,
                            stored.spec.architecture, stored.dtype, stored.segment.nbytes / 2**20,
                            f" per rank, tensor parallel over devices {list(entry.devices)}" if tp > 1 else "")
            pool_bytes = self._pool_bytes()
            self.pools: list[KVPool] = []
            self.pool_segments: list[SharedSegment] = []
            for position, device in enumerate(self.devices):
                name = f"{self._tag}-pool" + (f"{position}" if position else "")
                segment = SharedSegment.create(pool_bytes, device, name, zero=True)
                self._segments.append(segment)
                self.pool_segments.append(segment)
                self.pools.append(KVPool(segment.tensor, config.page_bytes))
            self.pool = self.pools[0]
            self.allocator = _Allocator(self.pool.num_pages)
            self.layouts: dict[str, KVLayout] = {}
            for entry in config.models:
                stored = self.shards[entry.name][0]
                s = stored.spec
                # One rank's kv heads: a token block costs layers x (kv heads / tp) page ids, the same
                # ids on every rank's device.
                layout = KVLayout(s.num_layers, s.num_kv_heads // entry.tensor_parallel_size, s.head_dim,
                                  stored.dtype, config.page_bytes)
                self.layouts[entry.name] = layout
                self.allocator.register_model(entry.name, layout)
                self._preemptions[entry.name] = 0
        except BaseException:
            self.close()
            raise
        where = f"each of {len(self.devices)} devices ({self.device} ...)" if len(self.devices) > 1 else self.device
        logger.info("KV pool on %s: %d pages of %d B (%.1f MiB)", where, self.pool.num_pages,
                    config.page_bytes, pool_bytes / 2**20)
        for name, layout in self.layouts.items():
            logger.info("  %s: %d layers x %d kv-heads x head_dim %d (%s): %d tokens per page, %d pages per "
                        "block; at most %d tokens with the whole pool", name, layout.num_layers,
                        layout.num_kv_heads, layout.head_dim, layout.dtype, layout.page_tokens,
                        layout.pages_per_block, self.allocator.max_tokens(name))

    def _check_devices(self) -> None:
        if self.device.type != "cuda":
            return
        visible = torch.cuda.device_count()
        needed = max(d.index for d in self.devices) + 1
        if needed > visible:
            raise ValueError(f"the mesh needs {len(self.devices)} GPU(s) ({', '.join(map(str, self.devices))}) but "
                             f"{visible} are visible (CUDA_VISIBLE_DEVICES="
                             f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")

    def _pool_bytes(self) -> int:
        cfg = self.config
        return pool_pages(cfg.page_bytes, self.devices, cfg.kv_cache_bytes, cfg.gpu_memory_utilization) * cfg.page_bytes

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
                          models=[self.model_info(n) for n in self.shards], num_devices=len(self.devices))
        if isinstance(req, P.Attach):
            return self.attach_info(self._known(req.model), req.rank)
        if isinstance(req, P.Shutdown):
            return P.Ok()
        raise FlexStoreError("invalid", f"unsupported request {type(req).__name__}")

    def _known(self, model: str) -> str:
        if model not in self.shards:
            raise FlexStoreError("unknown_model", f"unknown model {model!r}; served: {sorted(self.shards)}")
        return model

    # -- figures ----------------------------------------------------------------------------
    def model_info(self, name: str) -> P.ModelInfo:
        shards, layout = self.shards[name], self.layouts[name]
        stored = shards[0]
        entry = stored.entry
        return P.ModelInfo(
            name=name, folder=str(stored.folder), dtype=str(stored.dtype).removeprefix("torch."),
            layout=P.LayoutInfo(layout.num_layers, layout.num_kv_heads, layout.head_dim,
                                str(layout.dtype).removeprefix("torch."), layout.page_bytes, layout.page_tokens,
                                layout.pages_per_block),
            max_tokens=self.allocator.max_tokens(name), weight_bytes=sum(s.segment.nbytes for s in shards),
            tensor_parallel_size=entry.tensor_parallel_size, devices=entry.devices)

    def attach_info(self, name: str, rank: int = 0) -> P.AttachInfo:
        shards = self.shards[name]
        if not 0 <= rank < len(shards):
            raise FlexStoreError("invalid", f"model {name!r} has {len(shards)} tensor-parallel rank(s); "
                                            f"there is no rank {rank}")
        stored = shards[rank]
        position = stored.entry.devices[rank]
        return P.AttachInfo(model=self.model_info(name), spec=stored.spec, device=str(self.devices[position]),
                            weights=stored.segment.share(), tensors=stored.tensors,
                            pool=self.pool_segments[position].share(), num_pages=self.pool.num_pages)

    def stats(self) -> P.Stats:
        models = []
        for name in self.shards:
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
        self.shards = {}
        self.pool = None  # type: ignore[assignment]
        self.pools = []
        for segment in segments:
            try:
                segment.release()
            except Exception:  # keep releasing the others
                logger.exception("could not release segment %s", segment.descriptor.name or segment.descriptor.kind)
        if self.devices[0].type == "cuda":
            release_torch_ipc_files()
