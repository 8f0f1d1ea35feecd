"""Head-wise paged KV cache: one byte pool of pages shared by every model, and its allocator.

A page holds K and V of one (layer, kv-head) for ``page_tokens`` tokens, so models with
different layer counts, head counts, head sizes and dtypes share one pool. ``page_tokens`` is
``floor(page_bytes / (2 * head_dim * dtype_bytes))``: a page starts with the K of its tokens,
V follows right after them, and whatever bytes remain at the end of the page stay unused
(80-dim bf16 in 16 KiB: 51 tokens, 64 bytes unused). So a model's view of the pool is strided:
one page is ``page_bytes`` apart from the next, whatever its head size.

A request of a model owns its pages as a flat list in block-major order::

    pages[b * L * H + l * H + h]  = page of token block b, layer l, kv-head h

so ``torch.tensor(pages).view(num_blocks, L, H)`` is its page table.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import compress, repeat
from operator import gt, itemgetter

import torch

DEFAULT_PAGE_BYTES = 16 * 1024
DEFAULT_CPU_KV_BYTES = 512 * 1024 * 1024
POOL_PAGE_MULTIPLE = 128  # the original rounds a GPU pool down to a multiple of 128 pages


def pool_pages(page_bytes: int, devices: Sequence[torch.device], kv_cache_bytes: int | None = None,
               gpu_memory_utilization: float = 0.5) -> int:
    """Pages of the KV pool of each device (a mesh's devices get as many each): the one sizing rule.

    ``kv_cache_bytes`` when given; otherwise 512 MiB on CPU and, as in the original, on GPUs
    ``gpu_memory_utilization`` x the smallest GPU's *total* memory, rounded down to a multiple of
    128 pages. The weights and the activations live in the rest: a pool larger than the memory
    still free on a device is refused.
    """
    if kv_cache_bytes is not None:
        pages = kv_cache_bytes // page_bytes
    elif devices[0].type == "cpu":
        pages = DEFAULT_CPU_KV_BYTES // page_bytes
    else:
        total = min(torch.cuda.get_device_properties(d).total_memory for d in devices)
        pages = int(gpu_memory_utilization * total) // page_bytes // POOL_PAGE_MULTIPLE * POOL_PAGE_MULTIPLE
        for device in devices:
            free, _ = torch.cuda.mem_get_info(device)
            if pages * page_bytes > free:
                raise ValueError(f"gpu_memory_utilization {gpu_memory_utilization} asks for a KV pool of "
                                 f"{pages * page_bytes / 2**30:.1f} GiB but only {free / 2**30:.1f} GiB are "
                                 f"free on {device} after the weights; lower it")
    if pages < 1:
        raise ValueError(f"KV pool of {kv_cache_bytes} bytes holds no page of {page_bytes} bytes")
    return pages


@dataclass(frozen=True)
class KVLayout:
    """How one model (one tensor-parallel rank of it) reads the pages of the pool."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    page_bytes: int = DEFAULT_PAGE_BYTES

    def __post_init__(self) -> None:
        if self.head_dim < 1:
            raise ValueError(f"head_dim must be >= 1, got {self.head_dim}")
        # Pages are views of one byte buffer: each must start on an element of the dtype.
        if self.page_bytes % self.dtype_bytes:
            raise ValueError(f"page size {self.page_bytes} B is not a multiple of the {self.dtype_bytes}-byte "
                             f"elements of {self.dtype}")
        if self.page_tokens < 1:
            raise ValueError(f"page size {self.page_bytes} B holds no token of K+V "
                             f"({self.token_bytes} B for head_dim {self.head_dim}, {self.dtype})")

    @property
    def dtype_bytes(self) -> int:
        return self.dtype.itemsize

    @property
    def token_bytes(self) -> int:
        """K and V of one token of one (layer, kv-head)."""
        return 2 * self.head_dim * self.dtype_bytes

    @property
    def page_tokens(self) -> int:
        return self.page_bytes // self.token_bytes

    @property
    def page_elements(self) -> int:
        """Elements of ``dtype`` from one page to the next (the page stride of ``KVPool.view``)."""
        return self.page_bytes // self.dtype_bytes

    @property
    def pages_per_block(self) -> int:
        """Pages that one block of ``page_tokens`` tokens takes over all layers and heads."""
        return self.num_layers * self.num_kv_heads

    def num_blocks(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.page_tokens)

    def pages_for(self, num_tokens: int) -> int:
        return self.num_blocks(num_tokens) * self.pages_per_block


class KVPool:
    """A flat byte buffer cut into ``num_pages`` pages; each model views it with its layout."""

    def __init__(self, buffer: torch.Tensor, page_bytes: int = DEFAULT_PAGE_BYTES):
        if buffer.dtype != torch.uint8 or buffer.dim() != 1 or buffer.numel() % page_bytes:
            raise ValueError("KV pool buffer must be a 1-D uint8 tensor of whole pages")
        self.buffer = buffer
        self.page_bytes = page_bytes
        self.num_pages = buffer.numel() // page_bytes

    @classmethod
    def allocate(cls, num_bytes: int, device: str | torch.device = "cpu",
                 page_bytes: int = DEFAULT_PAGE_BYTES) -> KVPool:
        num_pages = num_bytes // page_bytes
        if num_pages < 1:
            raise ValueError(f"KV cache of {num_bytes} bytes holds no page of {page_bytes} bytes")
        return cls(torch.zeros(num_pages * page_bytes, dtype=torch.uint8, device=device), page_bytes)

    def view(self, layout: KVLayout) -> torch.Tensor:
        """(num_pages, 2, page_tokens, head_dim) tensor of ``layout.dtype``; index 0 is K, 1 is V.

        Strided: pages are ``layout.page_elements`` apart, which is more than 2 * page_tokens *
        head_dim when the head size does not divide the page. Within a page, K and V of a
        token are rows of ``head_dim`` contiguous elements and V starts ``page_tokens`` rows after K.
        """
        if layout.page_bytes != self.page_bytes:
            raise ValueError(f"layout page size {layout.page_bytes} != pool page size {self.page_bytes}")
        flat = self.buffer.view(layout.dtype)
        t, d = layout.page_tokens, layout.head_dim
        return flat.as_strided((self.num_pages, 2, t, d), (layout.page_elements, t * d, d, 1),
                               flat.storage_offset())


@dataclass
class Allocation:
    """Result of one batch allocation."""

    new_pages: dict[str, list[int]] = field(default_factory=dict)  # admitted id -> pages added now
    preempted: list[str] = field(default_factory=list)  # tail ids whose pages were all freed


@dataclass
class _ModelState:
    pages_per_block: int
    page_tokens: int
    owned: dict[str, list[int]] = field(default_factory=dict)
    # Tokens that the whole blocks a request owns can hold (kept with `owned`): a request
    # needs pages exactly when it asks for more tokens than this.
    capacity: dict[str, int] = field(default_factory=dict)

    def pages_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.page_tokens) * self.pages_per_block


class PageAllocator:
    """The single owner of page ids for one pool, across all models that share it."""

    def __init__(self, num_pages: int):
        if num_pages < 1:
            raise ValueError(f"num_pages must be >= 1, got {num_pages}")
        self.num_pages = num_pages
        # LIFO free list; reversed so that a fresh pool hands out 0, 1, 2, ...
        self._free: list[int] = list(range(num_pages - 1, -1, -1))
        self._models: dict[str, _ModelState] = {}

    # -- models ---------------------------------------------------------------------------
    def register_model(self, name: str, layout: KVLayout) -> None:
        if name in self._models:
            raise ValueError(f"model {name!r} is already registered")
        self._models[name] = _ModelState(layout.pages_per_block, layout.page_tokens)

    def _model(self, name: str) -> _ModelState:
        try:
            return self._models[name]
        except KeyError:
            raise KeyError(f"unknown model {name!r}; registered: {sorted(self._models)}") from None

    @property
    def models(self) -> list[str]:
        return list(self._models)

    # -- figures --------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self._free)

    def used_by(self, model: str) -> int:
        return sum(len(p) for p in self._model(model).owned.values())

    def pages_of(self, model: str, request_id: str) -> list[int]:
        state = self._model(model)
        if request_id not in state.owned:
            raise KeyError(f"request {request_id!r} of model {model!r} owns no pages")
        return list(state.owned[request_id])

    def owns(self, model: str, request_id: str) -> bool:
        return request_id in self._model(model).owned

    def max_tokens(self, model: str) -> int:
        """Tokens one request of ``model`` could hold if it had the whole pool."""
        state = self._model(model)
        return self.num_pages // state.pages_per_block * state.page_tokens

    def can_allocate(self, model: str, requests: Iterable[tuple[str, int]]) -> bool:
        missing = self._missing(self._model(model), list(requests))
        return missing is not None and sum(missing) <= self.num_free

    # -- allocation -----------------------------------------------------------------------
    def allocate(self, model: str, requests: Sequence[tuple[str, int]]) -> Allocation:
        """Give each (request id, tokens it will hold) the pages it misses, in batch order.

        A request that already owns pages keeps them and gets only the missing ones. When the
        pool cannot cover the whole batch, the longest prefix that fits (counting the pages the
        dropped tail holds) is admitted and the tail is preempted: its pages are freed.
        ``new_pages`` has every admitted id, in batch order (an empty list if it needed none).
        """
        if not isinstance(requests, (list, tuple)):
            requests = list(requests)
        sparse = self.allocate_sparse(model, requests)
        admitted = len(requests) - len(sparse.preempted)
        new_pages = {rid: [] for rid, _ in requests[:admitted]}
        new_pages.update(sparse.new_pages)  # keeps the batch order of the keys
        return Allocation(new_pages, sparse.preempted)

    def allocate_sparse(self, model: str, requests: Sequence[tuple[str, int]]) -> Allocation:
        """``allocate``, but ``new_pages`` lists only the admitted requests that got pages.

        The hot path of every decode step: the scan for requests that need a page runs in C
        (map/compress over the batch), and page lists move by slicing.
        """
        state = self._model(model)
        if not isinstance(requests, (list, tuple)):
            requests = list(requests)
        ids = list(map(itemgetter(0), requests))
        tokens = list(map(itemgetter(1), requests))
        if len(set(ids)) != len(ids):
            raise ValueError(f"duplicate request ids in one allocation for model {model!r}")
        least = min(tokens, default=0)
        if least < 0:
            raise ValueError(f"negative token count in allocation for model {model!r}")
        owned, capacity, free = state.owned, state.capacity, self._free
        pt, ppb = state.page_tokens, state.pages_per_block
        wanting = list(compress(range(len(ids)), map(gt, tokens, map(capacity.get, ids, repeat(0)))))
        # -(-t // pt) is ceil(t / pt); owned pages always come in whole blocks of ppb.
        need = {i: -(-tokens[i] // pt) * ppb - len(owned.get(ids[i], ())) for i in wanting}
        total = sum(need.values())
        admitted = len(ids)
        if total > len(free):  # shortage: drop the tail until the prefix fits (the tail's pages count)
            tail_held = 0
            while admitted > 0 and total > len(free) + tail_held:
                admitted -= 1
                total -= need.get(admitted, 0)
                tail_held += len(owned.get(ids[admitted], ()))
            wanting = [i for i in wanting if i < admitted]
        result = Allocation(preempted=ids[admitted:])
        for rid in result.preempted:
            self._release(state, rid)
        if least == 0:  # a request admitted with no tokens yet still becomes known (and freeable)
            for rid in ids[:admitted]:
                owned.setdefault(rid, [])
        for i in wanting:
            rid, n = ids[i], need[i]
            pages = free[-n:]  # what n pops would return, in the same order
            pages.reverse()
            del free[-n:]
            result.new_pages[rid] = pages
            held = owned.get(rid)
            if held is None:
                owned[rid] = pages.copy()
            else:
                held.extend(pages)
            capacity[rid] = -(-tokens[i] // pt) * pt
        return result

    def free(self, model: str, request_ids: Iterable[str]) -> int:
        """Return every page of finished or aborted requests; unknown ids are an error."""
        state = self._model(model)
        request_ids = list(request_ids)
        unknown = [rid for rid in request_ids if rid not in state.owned]
        if unknown:
            raise KeyError(f"requests {unknown!r} of model {model!r} own no pages (unknown or already freed)")
        return sum(self._release(state, rid) for rid in request_ids)

    def _missing(self, state: _ModelState, requests: Sequence[tuple[str, int]]) -> list[int] | None:
        pt, ppb, get = state.page_tokens, state.pages_per_block, state.owned.get
        # -(-t // pt) is ceil(t / pt)
        if requests and min(map(itemgetter(1), requests)) < 0:
            return None
        out = [-(-t // pt) * ppb - len(get(rid, ())) for rid, t in requests]
        return [m if m > 0 else 0 for m in out]

    def _release(self, state: _ModelState, request_id: str) -> int:
        state.capacity.pop(request_id, None)
        pages = state.owned.pop(request_id, [])
        # Reverse so the request's first page is handed out first next time.
        self._free.extend(reversed(pages))
        return len(pages)
