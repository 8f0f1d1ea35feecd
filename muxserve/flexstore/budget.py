"""One memory budget per device for weights and KV, and the page allocator that lives inside it.

Memory is counted in **granules** (2 MiB by default, CUDA's mapping granularity). The budget
holds ``budget_bytes // granule_bytes`` of them; at any time

    weight granules held + mapped KV granules <= granules of the budget.

* **Weights.** An LLM's weights take ``ceil(weight_bytes / granule_bytes)`` granules. A *pinned*
  LLM holds them for good; an *elastic* one holds them while resident, waking or offloading and
  gives them back once offloaded (:class:`WeightState`).
* **KV.** The pool is a range of ``budget // granule`` granules' worth of page ids; only pages of
  mapped granules are handed out. :class:`MemoryBudget` is the engine's ``PageAllocator`` (same
  allocate / free / preempt contract, same code) whose free pages come from mapped granules,
  fullest granule first, and which maps more granules when they run short and the budget has room.

**When granules are unmapped.** Mapping and unmapping KV is never free: every runtime process
maps the granule into its own address range before it may touch the pages, so each change costs
a round trip to every runtime. Hence:

* growth maps what is missing plus ``reserve_granules`` more, in one batch;
* whole free granules stay mapped until there are more than ``2 * reserve_granules`` of them;
  then :meth:`MemoryBudget.trim` (called lazily by the owner, e.g. when idle) unmaps the surplus
  down to ``reserve_granules``. Memory kept unmapped lets a wake take it without waiting for the
  runtimes; the reserve and the hysteresis keep KV growth free of map/unmap churn;
* a wake unmaps eagerly: first every whole free granule it needs (reserve included), then it
  preempts other LLMs' newest requests until enough granules are whole free.

Pure Python, single-threaded (FlexStore's request loop owns it).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import compress, repeat
from operator import gt, itemgetter

from muxserve.engine.kv_cache import DEFAULT_PAGE_BYTES, KVLayout, PageAllocator
from muxserve.flexstore.granules import GranulePages, granule_runs
from muxserve.flexstore.residency import (
    BudgetError,
    BudgetFigures,
    ElasticAllocation,
    OffloadPlan,
    OffloadRefused,
    Residency,
    WakePlan,
    WakeRefused,
    WeightState,
)

DEFAULT_GRANULE_BYTES = 2 * 1024 * 1024
DEFAULT_RESERVE_GRANULES = 32  # 64 MiB: about two decode steps of 256 Llama-3-8B requests

__all__ = ["BudgetError", "BudgetFigures", "ElasticAllocation", "MemoryBudget", "OffloadPlan", "OffloadRefused",
           "Residency", "WakePlan", "WakeRefused", "WeightState"]


@dataclass
class _Weights:
    granules: int
    residency: Residency
    state: WeightState

    @property
    def held(self) -> bool:
        return self.state is not WeightState.OFFLOADED


class MemoryBudget(PageAllocator):
    """Weights and KV of one device in one budget of granules; see the module docstring.

    ``self._free`` of the engine's allocator is only a staging list here: before an allocation it
    holds the pages that allocation may take (fullest granules first), afterwards whatever was
    left or freed goes back to the granules. So the engine's admission and preemption code runs
    unchanged on top.
    """

    def __init__(self, budget_bytes: int, page_bytes: int = DEFAULT_PAGE_BYTES,
                 granule_bytes: int = DEFAULT_GRANULE_BYTES, reserve_granules: int = DEFAULT_RESERVE_GRANULES):
        if page_bytes < 1 or granule_bytes < 1 or granule_bytes % page_bytes:
            raise ValueError(f"page size {page_bytes} B must divide the granule of {granule_bytes} B")
        if budget_bytes < granule_bytes:
            raise ValueError(f"a budget of {budget_bytes} B holds no granule of {granule_bytes} B")
        if reserve_granules < 0:
            raise ValueError(f"reserve_granules must be >= 0, got {reserve_granules}")
        # The engine's allocator would list every page of the range as free; none is mapped yet.
        super().__init__(1)
        self.page_bytes = page_bytes
        self.granule_bytes = granule_bytes
        self.pages_per_granule = granule_bytes // page_bytes
        self.num_granules = budget_bytes // granule_bytes
        self.num_pages = self.num_granules * self.pages_per_granule  # page ids of the whole KV range
        self.reserve_granules = reserve_granules
        self._free = []
        self._kv = GranulePages(self.num_granules, self.pages_per_granule)
        self._weights: dict[str, _Weights] = {}
        self._order: dict[tuple[str, str], None] = {}  # (model, request) holding pages, oldest first
        self._last_mapped: list[int] = []

    # -- models -----------------------------------------------------------------------------
    def register_model(self, name: str, layout: KVLayout, weight_bytes: int = 0,
                       residency: Residency | str = Residency.PINNED,
                       state: WeightState = WeightState.RESIDENT) -> None:
        """Add an LLM; its weights take their granules now unless it starts offloaded (elastic only)."""
        residency = Residency.parse(residency)
        if layout.page_bytes != self.page_bytes:
            raise ValueError(f"layout of {name!r} has {layout.page_bytes}-byte pages, the budget {self.page_bytes}")
        if weight_bytes < 0:
            raise ValueError(f"weight_bytes of {name!r} must be >= 0, got {weight_bytes}")
        if state not in (WeightState.RESIDENT, WeightState.OFFLOADED):
            raise ValueError(f"{name!r} must start resident or offloaded, not {state.value}")
        if residency is Residency.PINNED and state is not WeightState.RESIDENT:
            raise ValueError(f"pinned LLM {name!r} cannot start offloaded")
        if name in self._models:
            raise ValueError(f"model {name!r} is already registered")
        granules = math.ceil(weight_bytes / self.granule_bytes)
        if state is WeightState.RESIDENT and granules > self.free_granules:
            raise ValueError(f"weights of {name!r} need {granules} granules of {_size(self.granule_bytes)} but "
                             f"only {self.free_granules} of the budget's {self.num_granules} are free")
        super().register_model(name, layout)
        self._weights[name] = _Weights(granules, residency, state)

    def state_of(self, llm: str) -> WeightState:
        return self._llm(llm).state

    def residency_of(self, llm: str) -> Residency:
        return self._llm(llm).residency

    def weight_granules(self, llm: str) -> int:
        return self._llm(llm).granules

    def _llm(self, name: str) -> _Weights:
        try:
            return self._weights[name]
        except KeyError:
            raise KeyError(f"unknown model {name!r}; registered: {sorted(self._weights)}") from None

    # -- figures ----------------------------------------------------------------------------
    @property
    def held_weight_granules(self) -> int:
        return sum(w.granules for w in self._weights.values() if w.held)

    @property
    def kv_granules(self) -> int:
        return self._kv.num_mapped

    @property
    def free_granules(self) -> int:
        """Granules of the budget that neither weights nor mapped KV hold."""
        return self.num_granules - self.held_weight_granules - self._kv.num_mapped

    @property
    def num_free(self) -> int:
        """Pages an allocation can get now: free pages of mapped granules and of granules it may map."""
        return self._kv.num_free + self.free_granules * self.pages_per_granule

    @property
    def num_mapped_free(self) -> int:
        return self._kv.num_free

    def mapped_granules(self) -> list[int]:
        return self._kv.mapped()

    def whole_free_granules(self) -> list[int]:
        return self._kv.whole_free()

    def free_page_ids(self) -> list[int]:
        return self._kv.free_pages()

    def granule_of(self, page: int) -> int:
        return page // self.pages_per_granule

    def figures(self) -> BudgetFigures:
        weights = self._weights.values()
        return BudgetFigures(
            num_granules=self.num_granules, granule_bytes=self.granule_bytes,
            pinned_granules=sum(w.granules for w in weights if w.residency is Residency.PINNED),
            elastic_granules=sum(w.granules for w in weights if w.residency is Residency.ELASTIC and w.held),
            kv_granules=self._kv.num_mapped, kv_whole_free=len(self._kv.whole_free()),
            free_granules=self.free_granules, free_pages=self._kv.num_free,
            states={name: w.state for name, w in self._weights.items()})

    def max_tokens(self, model: str) -> int:
        """Tokens one request of ``model`` could hold with every granule that elastic residency can
        give to KV (all but the pinned weights and, for an elastic model, its own)."""
        state, own = self._model(model), self._llm(model)
        pinned = sum(w.granules for w in self._weights.values() if w.residency is Residency.PINNED)
        granules = self.num_granules - pinned - (own.granules if own.residency is Residency.ELASTIC else 0)
        return granules * self.pages_per_granule // state.pages_per_block * state.page_tokens

    def can_allocate(self, model: str, requests: Iterable[tuple[str, int]]) -> bool:
        return self._llm(model).state is WeightState.RESIDENT and super().can_allocate(model, requests)

    # -- allocation -------------------------------------------------------------------------
    def allocate(self, model: str, requests: Sequence[tuple[str, int]]) -> ElasticAllocation:
        """The engine's ``allocate`` (runs :meth:`allocate_sparse`), with the granules it mapped."""
        result = super().allocate(model, requests)
        return ElasticAllocation(result.new_pages, result.preempted, self._last_mapped)

    def allocate_sparse(self, model: str, requests: Sequence[tuple[str, int]]) -> ElasticAllocation:
        """The engine's ``allocate_sparse`` over mapped granules; maps more when they run short.

        The budget's room counts as free pages, so a batch is cut (its tail preempted) only when
        mapped free pages plus every granule the budget can still map do not cover it.
        """
        self._require_resident(model, "allocate pages for")
        state = self._model(model)
        if not isinstance(requests, (list, tuple)):
            requests = list(requests)
        need = self._pages_missing(state, requests)
        mapped = self._grow(need - self._kv.num_free)
        self._free = self._kv.take(min(need, self._kv.num_free))[::-1]  # a stack: next page last
        try:
            sparse = super().allocate_sparse(model, requests)
        except BaseException:
            self._drain()
            self._kv.unmap(mapped)  # the engine refuses before it takes a page: undo the growth
            raise
        self._drain()
        order = self._order
        for rid in sparse.preempted:
            order.pop((model, rid), None)
        for rid in sparse.new_pages:
            order.setdefault((model, rid))
        self._last_mapped = mapped
        return ElasticAllocation(sparse.new_pages, sparse.preempted, mapped)

    @staticmethod
    def _pages_missing(state, requests: Sequence[tuple[str, int]]) -> int:
        """The pages the batch misses: the ``total`` of the engine's ``allocate_sparse``, computed the
        same way (only requests that outgrow their blocks are visited in Python)."""
        ids = list(map(itemgetter(0), requests))
        tokens = list(map(itemgetter(1), requests))
        owned, pt, ppb = state.owned, state.page_tokens, state.pages_per_block
        wanting = compress(range(len(ids)), map(gt, tokens, map(state.capacity.get, ids, repeat(0))))
        return sum(-(-tokens[i] // pt) * ppb - len(owned.get(ids[i], ())) for i in wanting)

    def free(self, model: str, request_ids: Iterable[str]) -> int:
        request_ids = list(request_ids)
        returned = super().free(model, request_ids)
        self._drain()
        for rid in request_ids:
            self._order.pop((model, rid), None)
        return returned

    def trim(self, force: bool = False) -> list[int]:
        """Unmap whole free KV granules beyond the reserve; returns them (ascending) for the owner to
        unmap in every process. Acts only above ``2 * reserve_granules`` unless ``force``."""
        whole = self._kv.whole_free()
        if len(whole) <= (self.reserve_granules if force else 2 * self.reserve_granules):
            return []
        surplus = whole[self.reserve_granules:]  # the highest ones
        self._kv.unmap(surplus)
        return surplus

    def _grow(self, deficit_pages: int) -> list[int]:
        if deficit_pages <= 0:
            return []
        granules = -(-deficit_pages // self.pages_per_granule) + self.reserve_granules
        return self._kv.map(min(granules, self.free_granules))

    def _drain(self) -> None:
        if self._free:
            self._kv.put(self._free)
            self._free = []

    def _require_resident(self, llm: str, action: str) -> None:
        state = self._llm(llm).state
        if state is not WeightState.RESIDENT:
            raise BudgetError(f"cannot {action} {llm!r}: it is {state.value}; an LLM's requests are scheduled "
                              f"only while it is resident")

    # -- residency --------------------------------------------------------------------------
    def offload(self, llm: str) -> OffloadPlan:
        """Resident -> offloading. The granules stay held until :meth:`finish_offload`."""
        w = self._elastic(llm, "offload")
        self._expect(llm, w, WeightState.RESIDENT, "offload")
        owned = self._model(llm).owned
        if owned:
            pages = sum(map(len, owned.values()))
            raise OffloadRefused(f"cannot offload {llm!r}: {len(owned)} of its requests hold {pages} pages; an LLM "
                                 f"with requests in flight is never offloaded (free or preempt them first)")
        w.state = WeightState.OFFLOADING
        return OffloadPlan(llm, w.granules)

    def finish_offload(self, llm: str) -> int:
        """Offloading -> offloaded: every process has unmapped the weights; returns the granules freed."""
        w = self._elastic(llm, "finish offloading")
        self._expect(llm, w, WeightState.OFFLOADING, "finish offloading")
        w.state = WeightState.OFFLOADED
        return w.granules

    def wake(self, llm: str, protected: Iterable[tuple[str, str]] = ()) -> WakePlan:
        """Offloaded -> waking: reserve the weights' granules, from free budget first, then whole free
        KV granules, then by preempting other LLMs' newest requests (never a ``protected``
        ``(model, request id)``: those inside in-flight jobs). Raises :class:`WakeRefused` (and
        changes nothing) when even that cannot make room."""
        w = self._elastic(llm, "wake")
        self._expect(llm, w, WeightState.OFFLOADED, "wake")
        short = w.granules - self.free_granules
        plan = WakePlan(llm, w.granules)
        if short > 0:
            whole = len(self._kv.whole_free())
            if whole < short:
                victims = self._victims(llm, w.granules, short - whole, set(protected))
                for model, rid in reversed(victims):  # oldest first, as the scheduler re-queues them
                    plan.preempted.setdefault(model, []).append(rid)
                for model, rids in plan.preempted.items():
                    for rid in rids:
                        self._release(self._model(model), rid)
                        self._order.pop((model, rid))
                self._drain()
            whole_now = self._kv.whole_free()
            plan.unmap.extend(whole_now[len(whole_now) - short:])  # the highest ones
            self._kv.unmap(plan.unmap)
        w.state = WeightState.WAKING
        return plan

    def finish_wake(self, llm: str) -> None:
        """Waking -> resident: the weights are mapped and copied in every process."""
        w = self._elastic(llm, "finish waking")
        self._expect(llm, w, WeightState.WAKING, "finish waking")
        w.state = WeightState.RESIDENT

    def cancel_wake(self, llm: str) -> int:
        """Waking -> offloaded (the copy failed or was given up); returns the granules given back."""
        w = self._elastic(llm, "cancel the wake of")
        self._expect(llm, w, WeightState.WAKING, "cancel the wake of")
        w.state = WeightState.OFFLOADED
        return w.granules

    def _victims(self, llm: str, needed: int, extra: int, protected: set[tuple[str, str]]) -> list[tuple[str, str]]:
        """The newest requests of other LLMs whose pages empty ``extra`` more granules, newest first."""
        ppg, kv = self.pages_per_granule, self._kv
        freed: dict[int, int] = {}
        victims, emptied = [], 0
        for key in reversed(self._order):
            model, rid = key
            if key in protected or model == llm:
                continue
            victims.append(key)
            for g, run in granule_runs(self._models[model].owned[rid], ppg):
                count = freed[g] = freed.get(g, 0) + len(run)
                if count + kv.free_in(g) == ppg:
                    emptied += 1
            if emptied >= extra:
                return victims
        free, whole = self.free_granules, len(kv.whole_free())
        kept = sum(1 for key in protected if key in self._order)
        raise WakeRefused(
            f"cannot wake {llm!r}: its weights need {needed} granules of {_size(self.granule_bytes)}; the budget "
            f"has {free} free, {whole} whole free KV granules, and preempting every request outside in-flight jobs "
            f"would empty {emptied} more ({kept} protected requests keep their pages): short by "
            f"{needed - free - whole - emptied}", needed, free, whole, emptied)

    def _elastic(self, llm: str, action: str) -> _Weights:
        w = self._llm(llm)
        if w.residency is not Residency.ELASTIC:
            raise BudgetError(f"cannot {action} {llm!r}: it is pinned (residency: elastic lets it move)")
        return w

    @staticmethod
    def _expect(llm: str, w: _Weights, expected: WeightState, action: str) -> None:
        if w.state is not expected:
            raise BudgetError(f"cannot {action} {llm!r}: it is {w.state.value}, not {expected.value}")


def _size(nbytes: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if nbytes >= 1 << shift and nbytes % (1 << shift) == 0:
            return f"{nbytes >> shift} {unit}"
    return f"{nbytes} B"
