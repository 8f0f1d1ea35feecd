"""FlexStoreManager: the weights of every model, one KV pool and the page allocator of one device.

It is transport-free: :meth:`FlexStoreManager.handle` maps one protocol request to one reply
(errors included), so the ZeroMQ server, the tests and the benchmarks drive the same code.
"""

from __future__ import annotations

import logging
import math
import os
import secrets

import torch

from muxserve.engine.kv_cache import KVLayout, KVPool, PageAllocator, pool_pages
from muxserve.engine.model_hub import resolve_model
from muxserve.engine.parallel import TensorParallel
from muxserve.flexstore import protocol as P
from muxserve.flexstore.config import FlexStoreConfig
from muxserve.flexstore.elastic import ElasticMemory, Refused
from muxserve.flexstore.host_copy import HostCopy
from muxserve.flexstore.residency import BudgetError
from muxserve.flexstore.segments import SharedSegment, release_torch_ipc_files
from muxserve.flexstore.weights import StoredWeights, load_shared
from muxserve.ipc.devices import parse_device

logger = logging.getLogger(__name__)


class FlexStoreError(Exception):
    """A request FlexStore refused; ``code`` is one of ``protocol.ERROR_CODES``."""

    def __init__(self, code: str, message: str, numbers: dict[str, int] | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.numbers = numbers or {}  # a refused offload or wake: its figures


class _Allocator(PageAllocator):
    """The engine's allocator plus the per-model figures that Stats reports."""

    def usage(self, model: str) -> tuple[int, int]:
        owned = self._model(model).owned
        return len(owned), sum(map(len, owned.values()))


class FlexStoreManager:
    """Loads every model once, allocates one pool per device of the mesh, owns every page id; see ``handle``.

    With an elastic LLM (``ModelEntry.residency``) the device's memory is one budget instead
    (``elastic.ElasticMemory``): the pool is a range mapped as KV grows, elastic LLMs' weights have
    a host copy and move on ``Offload`` / ``Wake``; ``fd_socket`` (set by the server) is where
    runtimes follow the ranges' mappings.
    """

    def __init__(self, config: FlexStoreConfig):
        self.config = config
        self.devices = [parse_device(d) for d in config.device_names()]
        self.device = self.devices[0]
        # Names are unique per instance: prefix, pid and a random token (two instances can share a host).
        self._tag = f"{config.shm_prefix}-{os.getpid()}-{secrets.token_hex(4)}"
        self._segments: list[SharedSegment] = []
        self.shards: dict[str, list[StoredWeights]] = {}  # per model, one entry per tensor-parallel rank
        self._preemptions: dict[str, int] = {}
        self.elastic: ElasticMemory | None = None
        self.fd_socket = ""
        try:
            self._check_devices()
            for i, entry in enumerate(config.models):
                folder = resolve_model(entry.model)
                tp = entry.tensor_parallel_size
                shards = self.shards[entry.name] = []
                for rank, position in enumerate(entry.devices):
                    # Only the shapes and slicing of rank ``rank``; FlexStore never runs a forward pass.
                    parallel = TensorParallel(tp, rank)
                    # An elastic LLM is read into host memory: its host copy, copied to the device below.
                    elastic = entry.residency == "elastic"
                    where = torch.device("cpu") if elastic else self.devices[position]
                    stored = load_shared(entry, folder, where, f"{self._tag}-{'h' if elastic else 'w'}{i}"
                                         + (f"r{rank}" if tp > 1 else ""), parallel)
                    self._segments.append(stored.segment)
                    shards.append(stored)
                stored = shards[0]
                logger.info("loaded %s from %s: %s, %s, %.1f MiB of weights%s", entry.name, stored.folder,
                            stored.spec.architecture, stored.dtype, stored.segment.nbytes / 2**20,
                            f" per rank, tensor parallel over devices {list(entry.devices)}" if tp > 1 else "")
            pool_bytes = self._pool_bytes()
            self.layouts: dict[str, KVLayout] = {}
            for entry in config.models:
                stored = self.shards[entry.name][0]
                s = stored.spec
                # One rank's kv heads: a token block costs layers x (kv heads / tp) page ids, the same
                # ids on every rank's device.
                self.layouts[entry.name] = KVLayout(s.num_layers, s.num_kv_heads // entry.tensor_parallel_size,
                                                    s.head_dim, stored.dtype, config.page_bytes)
                self._preemptions[entry.name] = 0
            self.pool_segments: list[SharedSegment] = []
            if config.elastic:
                self._build_budget(pool_bytes)
            else:
                self._build_pools(pool_bytes)
        except BaseException:
            self.close()
            raise
        where = f"each of {len(self.devices)} devices ({self.device} ...)" if len(self.devices) > 1 else self.device
        logger.info("KV pool on %s: %d pages of %d B (%.1f MiB%s)", where, self.pool.num_pages,
                    config.page_bytes, self.pool.num_pages * config.page_bytes / 2**20,
                    ", mapped as KV grows" if self.elastic else "")
        for name, layout in self.layouts.items():
            logger.info("  %s: %d layers x %d kv-heads x head_dim %d (%s): %d tokens per page, %d pages per "
                        "block; at most %d tokens with the whole pool", name, layout.num_layers,
                        layout.num_kv_heads, layout.head_dim, layout.dtype, layout.page_tokens,
                        layout.pages_per_block, self.allocator.max_tokens(name))

    def _build_pools(self, pool_bytes: int) -> None:
        self.pools: list[KVPool] = []
        for position, device in enumerate(self.devices):
            name = f"{self._tag}-pool" + (f"{position}" if position else "")
            segment = SharedSegment.create(pool_bytes, device, name, zero=True)
            self._segments.append(segment)
            self.pool_segments.append(segment)
            self.pools.append(KVPool(segment.tensor, self.config.page_bytes))
        self.pool = self.pools[0]
        self.allocator = _Allocator(self.pool.num_pages)
        for name, layout in self.layouts.items():
            self.allocator.register_model(name, layout)

    def _build_budget(self, kv_bytes: int) -> None:
        cfg = self.config
        weight_bytes = {e.name: self.shards[e.name][0].segment.nbytes for e in cfg.models}
        self.elastic = ElasticMemory(self.device, self._tag, kv_bytes, cfg.page_bytes, cfg.granule_bytes,
                                     cfg.reserve_granules, weight_bytes, cfg.memory_budget_bytes)
        budget = self.elastic.budget
        if cfg.memory_budget_bytes is not None:
            check_budget_fits(budget, cfg, weight_bytes, self.layouts)
        for i, entry in enumerate(cfg.models):
            stored = self.shards[entry.name][0]
            if entry.residency == "elastic":
                self._segments.remove(stored.segment)  # the host copy: ElasticMemory releases it
                # Pinned LLMs first (they are counted below); an elastic LLM starts resident while its
                # weights leave a granule for KV, else offloaded (memory_budget_bytes only).
                pinned = sum(math.ceil(weight_bytes[e.name] / cfg.granule_bytes) for e in cfg.models[i:]
                             if e.residency != "elastic")
                granules = math.ceil(stored.segment.nbytes / cfg.granule_bytes)
                resident = granules + pinned + 1 <= budget.free_granules or cfg.memory_budget_bytes is None
                self.elastic.add_elastic(entry.name, self.layouts[entry.name], HostCopy(stored.segment), i, resident)
                if not resident:
                    logger.info("%s starts offloaded: its weights (%d granules) do not fit the budget's %d free "
                                "granules now", entry.name, granules, budget.free_granules)
            else:
                self.elastic.add_pinned(entry.name, self.layouts[entry.name], stored.segment.nbytes)
        self.pool = self.elastic.pool
        self.pools = [self.pool]
        self.allocator = self.elastic.budget
        figures = self.elastic.budget.figures()
        logger.info("memory budget on %s: %d granules of %.1f MiB (pinned weights %d, elastic weights %d, "
                    "KV room %d)", self.device, figures.num_granules, figures.granule_bytes / 2**20,
                    figures.pinned_granules, figures.elastic_granules, figures.free_granules)

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
            return P.Error(code=exc.code, message=exc.message, numbers=exc.numbers)
        except Exception as exc:  # a bug, not a bad request: report it and keep serving
            logger.exception("FlexStore failed on %r", type(request).__name__)
            return P.Error(code="internal", message=f"{type(exc).__name__}: {exc}")

    def _dispatch(self, req: P.Request) -> P.Reply:
        if isinstance(req, P.Allocate):
            allocate = self.elastic.allocate_sparse if self.elastic else self.allocator.allocate_sparse
            try:
                result = allocate(self._known(req.model), req.requests)
            except ValueError as exc:  # BudgetError too: an LLM that is not resident
                raise FlexStoreError("invalid", str(exc)) from None
            if result.preempted:
                self._preemptions[req.model] += len(result.preempted)
            return P.Allocated(new_pages=result.new_pages, preempted=result.preempted, kv_epoch=self.kv_epoch)
        if isinstance(req, (P.Offload, P.Wake)):
            return self._residency(req)
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

    def _residency(self, req: P.Offload | P.Wake) -> P.Offloaded | P.Woken:
        name = self._known(req.model)
        if self.elastic is None or self.elastic.budget.residency_of(name).value != "elastic":
            raise FlexStoreError("invalid", f"model {name!r} is pinned: only an LLM with residency 'elastic' "
                                            f"is offloaded and woken")
        try:
            if isinstance(req, P.Offload):
                return self.elastic.offload(name)
            woken = self.elastic.wake(name, req.protected)
        except Refused as exc:
            raise FlexStoreError("refused", str(exc), exc.numbers) from None
        except BudgetError as exc:  # not in the state the transition needs
            raise FlexStoreError("invalid", str(exc)) from None
        for model, ids in woken.preempted.items():
            self._preemptions[model] += len(ids)
        return woken

    @property
    def kv_epoch(self) -> int:
        return self.elastic.kv.epoch if self.elastic else 0

    def idle(self) -> None:
        """Nothing to serve for a while: unmap the KV granules beyond the reserve (a budget only)."""
        if self.elastic is not None:
            self.elastic.trim()

    def range_handler(self):
        """The fd server's handler for the ranges of the budget (None without one)."""
        return self.elastic.range_server if self.elastic else None

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
            tensor_parallel_size=entry.tensor_parallel_size, devices=entry.devices, residency=entry.residency,
            state=self.elastic.state(name).value if self.elastic else "resident")

    def attach_info(self, name: str, rank: int = 0) -> P.AttachInfo:
        shards = self.shards[name]
        if not 0 <= rank < len(shards):
            raise FlexStoreError("invalid", f"model {name!r} has {len(shards)} tensor-parallel rank(s); "
                                            f"there is no rank {rank}")
        stored = shards[rank]
        position = stored.entry.devices[rank]
        device = str(self.devices[position])
        if self.elastic is not None:
            weights_range = self.elastic.weights.get(name)
            return P.AttachInfo(model=self.model_info(name), spec=stored.spec, device=device,
                                weights=None if weights_range else stored.segment.share(), tensors=stored.tensors,
                                pool=None, num_pages=self.pool.num_pages,
                                weights_range=weights_range.descriptor if weights_range else None,
                                pool_range=self.elastic.kv.descriptor, fd_socket=self.fd_socket)
        return P.AttachInfo(model=self.model_info(name), spec=stored.spec, device=device,
                            weights=stored.segment.share(), tensors=stored.tensors,
                            pool=self.pool_segments[position].share(), num_pages=self.pool.num_pages)

    def stats(self) -> P.Stats:
        models = []
        for name in self.shards:
            requests, pages = self.allocator.usage(name)
            if self.elastic is None:
                models.append(P.ModelStats(name=name, requests=requests, pages=pages,
                                           preemptions=self._preemptions[name]))
                continue
            counts = self.elastic.counts[name]
            models.append(P.ModelStats(name=name, requests=requests, pages=pages, preemptions=self._preemptions[name],
                                       state=self.elastic.state(name).value, offloads=counts.offloads,
                                       wakes=counts.wakes))
        return P.Stats(num_pages=self.pool.num_pages, num_free=self.allocator.num_free, models=models,
                       kv_epoch=self.kv_epoch, budget=self.elastic.budget_info() if self.elastic else None)

    # -- shutdown ---------------------------------------------------------------------------
    def segment_names(self) -> list[str]:
        names = [s.descriptor.name for s in self._segments if s.descriptor.kind == "shm"]
        return names + (self.elastic.names() if self.elastic else [])

    def close(self) -> None:
        """Release every segment (unlink shm names, drop CUDA allocations). Idempotent."""
        segments, self._segments = self._segments, []
        elastic, self.elastic = self.elastic, None
        if elastic is not None:
            elastic.close()
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


def check_budget_fits(budget, cfg: FlexStoreConfig, weight_bytes: dict[str, int], layouts: dict[str, KVLayout]) -> None:
    """ValueError when the pinned LLMs' weights exceed ``memory_budget_bytes``, or when an elastic LLM's
    weights plus one token block of KV do not fit next to them (it could never run)."""
    g = cfg.granule_bytes
    pinned = sum(math.ceil(weight_bytes[e.name] / g) for e in cfg.models if e.residency != "elastic")
    if pinned > budget.num_granules:
        raise ValueError(f"memory_budget_bytes {cfg.memory_budget_bytes}: the pinned LLMs' weights need {pinned} "
                         f"granules of {g} B, more than the budget's {budget.num_granules}")
    for e in cfg.models:
        if e.residency != "elastic":
            continue
        need = math.ceil(weight_bytes[e.name] / g) + math.ceil(layouts[e.name].pages_per_block * cfg.page_bytes / g)
        if pinned + need > budget.num_granules:
            raise ValueError(f"memory_budget_bytes {cfg.memory_budget_bytes}: elastic LLM {e.name!r} can never run: "
                             f"its weights ({weight_bytes[e.name]} B) and one block of KV need {need} granules of "
                             f"{g} B, but the budget has {budget.num_granules - pinned} beside the pinned weights")
