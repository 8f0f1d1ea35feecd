"""FlexStore's side of elastic residency: one memory budget, the KV range and each elastic LLM's weights.

When any LLM of a (single-device) FlexStore is elastic, FlexStore does not allocate a fixed pool:

* the **budget** (``budget.MemoryBudget``) counts every LLM's weights and the mapped KV granules
  against ``kv_cache_bytes`` (or the GPU share) plus the weights of every LLM: with everyone
  resident, KV gets what a fixed pool would; an offloaded LLM's weights become KV room. With
  ``memory_budget_bytes`` the budget is that instead, and the weights of all LLMs may exceed it:
  an elastic LLM that does not fit at start begins offloaded (only its host copy holds the weights);
* the **KV range** (``device_memory``) is reserved once for every page id of the budget and mapped
  granule by granule as the budget grows it (and trimmed when idle);
* each elastic LLM's weights live in a **weights range** of their own, filled from a **host copy**
  (``host_copy.HostCopy``, pinned on a GPU) at start and at every wake; offloading unmaps it.

Runtimes map the same ranges and follow FlexStore's mappings over the fd socket
(``RangeServer``): every range counts its changes in an epoch that travels with allocations, jobs
and residency notices. Memory of an unmapped granule returns to the device once every process
has unmapped it (at once on CPU, where unmapping punches a hole in the shared file).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch

from muxserve.engine.kv_cache import KVLayout, KVPool
from muxserve.flexstore import protocol as P
from muxserve.flexstore.budget import MemoryBudget
from muxserve.flexstore.device_memory import DeviceRange, RangeServer, create_range
from muxserve.flexstore.host_copy import HostCopy, map_and_copy_in
from muxserve.flexstore.residency import BudgetError, OffloadRefused, Residency, WakeRefused, WeightState

logger = logging.getLogger(__name__)


class Refused(Exception):
    """An offload or wake the budget refused; ``numbers`` are its figures (granules, requests, pages)."""

    def __init__(self, message: str, numbers: dict[str, int]):
        super().__init__(message)
        self.numbers = numbers


@dataclass
class ResidencyCounts:
    offloads: int = 0
    wakes: int = 0
    last_offload_s: float = 0.0
    last_wake_s: float = 0.0


class _Budget(MemoryBudget):
    def usage(self, model: str) -> tuple[int, int]:
        owned = self._model(model).owned
        return len(owned), sum(map(len, owned.values()))


class ElasticMemory:
    """The budget and ranges of one device; see the module docstring. Owned by FlexStoreManager."""

    def __init__(self, device: torch.device, tag: str, kv_bytes: int, page_bytes: int, granule_bytes: int,
                 reserve_granules: int, weight_bytes: dict[str, int], budget_bytes: int | None = None):
        self.device = device
        self.tag = tag
        self.granule_bytes = granule_bytes
        if budget_bytes is None:
            kv_granules = math.ceil(kv_bytes / granule_bytes)
            weight_granules = sum(math.ceil(n / granule_bytes) for n in weight_bytes.values())
            budget_bytes = (kv_granules + weight_granules) * granule_bytes
        self.budget = _Budget(budget_bytes, page_bytes, granule_bytes, reserve_granules)
        self.kv: DeviceRange = create_range(f"{tag}-kv", self.budget.num_pages * page_bytes, device, granule_bytes)
        self.pool = KVPool(self.kv.tensor, page_bytes)
        self.weights: dict[str, DeviceRange] = {}
        self.hosts: dict[str, HostCopy] = {}
        self.counts: dict[str, ResidencyCounts] = {}
        self.range_server = RangeServer([self.kv])

    # -- start ------------------------------------------------------------------------------
    def add_pinned(self, name: str, layout: KVLayout, weight_bytes: int) -> None:
        self.budget.register_model(name, layout, weight_bytes, Residency.PINNED)
        self.counts[name] = ResidencyCounts()

    def add_elastic(self, name: str, layout: KVLayout, host: HostCopy, index: int,
                    resident: bool = True) -> DeviceRange:
        """Register an elastic LLM and, when ``resident``, wake its weights range from ``host`` (so its
        runtimes can capture CUDA graphs over mapped memory); otherwise it starts offloaded (its
        runtimes capture on first use, as after a restart while offloaded)."""
        self.hosts[name] = host  # released by close() from now on
        granules = math.ceil(host.nbytes / self.granule_bytes)
        state = WeightState.RESIDENT if resident else WeightState.OFFLOADED
        self.budget.register_model(name, layout, host.nbytes, Residency.ELASTIC, state)
        rng = self.weights[name] = create_range(f"{self.tag}-e{index}", granules * self.granule_bytes, self.device,
                                                self.granule_bytes)
        self.range_server.add(rng)
        if self.device.type == "cuda":
            host.pin()
        if resident:
            map_and_copy_in(rng, host.tensor)
        self.counts[name] = ResidencyCounts()
        return rng

    # -- pages ------------------------------------------------------------------------------
    def allocate_sparse(self, model: str, requests):
        """The budget's allocation; the KV granules it grew into are mapped here (runtimes follow
        with the ``kv_epoch`` of the reply). A device that cannot back them raises MemoryError."""
        result = self.budget.allocate_sparse(model, requests)
        self.kv.map_granules(result.mapped)
        return result

    def trim(self) -> list[int]:
        """Unmap whole free KV granules beyond the reserve (when idle); returns them."""
        surplus = self.budget.trim()
        self.kv.unmap_granules(surplus)
        if surplus:
            logger.info("trimmed %d free KV granules (%.1f MiB)", len(surplus),
                        len(surplus) * self.granule_bytes / 2**20)
        return surplus

    # -- residency --------------------------------------------------------------------------
    def state(self, name: str) -> WeightState:
        return self.budget.state_of(name)

    def offload(self, name: str) -> P.Offloaded:
        start = time.perf_counter()
        try:
            self.budget.offload(name)
        except OffloadRefused as exc:
            requests, pages = self.budget.usage(name)
            raise Refused(str(exc), {"requests": requests, "pages": pages}) from None
        rng = self.weights[name]
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # no kernel of this process still reads the weights
        freed = rng.unmap_all()
        self.budget.finish_offload(name)
        seconds = time.perf_counter() - start
        c = self.counts[name]
        c.offloads += 1
        c.last_offload_s = seconds
        logger.info("offloaded %s: %.1f MiB of device memory back to the budget in %.1f ms", name,
                    freed / 2**20, seconds * 1e3)
        return P.Offloaded(name, freed, seconds, rng.epoch)

    def wake(self, name: str, protected: list[tuple[str, str]]) -> P.Woken:
        start = time.perf_counter()
        try:
            plan = self.budget.wake(name, [tuple(p) for p in protected])
        except WakeRefused as exc:
            raise Refused(str(exc), {"needed": exc.needed, "free": exc.free, "whole_free": exc.whole_free,
                                     "reclaimable": exc.reclaimable}) from None
        rng = self.weights[name]
        try:
            self.kv.unmap_granules(plan.unmap)
            report = map_and_copy_in(rng, self.hosts[name].tensor)
        except BaseException:
            for chunk in rng.chunks():
                rng.unmap(chunk.start)
            self.budget.cancel_wake(name)
            raise
        self.budget.finish_wake(name)
        seconds = time.perf_counter() - start
        c = self.counts[name]
        c.wakes += 1
        c.last_wake_s = seconds
        preempted = {m: list(ids) for m, ids in plan.preempted.items()}
        logger.info("woke %s: %.1f MiB copied in %.1f ms (%.1f GB/s), %d KV granules unmapped, preempted %s",
                    name, report.nbytes / 2**20, report.seconds * 1e3, report.gb_per_s, len(plan.unmap),
                    {m: len(ids) for m, ids in preempted.items()})
        return P.Woken(name, seconds, report.seconds, report.nbytes, preempted, self.kv.epoch, rng.epoch)

    # -- figures ----------------------------------------------------------------------------
    def budget_info(self) -> P.BudgetInfo:
        f = self.budget.figures()
        return P.BudgetInfo(f.num_granules, f.granule_bytes, f.pinned_granules, f.elastic_granules, f.kv_granules,
                            f.free_granules, f.kv_whole_free)

    def names(self) -> list[str]:
        """Shared-memory names of the ranges and host copies (CPU)."""
        ranges = [self.kv, *self.weights.values()]
        names = [r.name for r in ranges if r.descriptor.kind == "shm"]
        return names + [h.segment.descriptor.name for h in self.hosts.values()]

    def close(self) -> None:
        """Release every range and host copy (unlinks the names). Idempotent."""
        for rng in [*self.weights.values(), self.kv]:
            try:
                rng.close()
            except Exception:
                logger.exception("could not release range %s", rng.name)
        self.weights = {}
        for host in self.hosts.values():
            try:
                host.close()
            except Exception:
                logger.exception("could not release host copy %s", host.segment.descriptor.name)
        self.hosts = {}


__all__ = ["BudgetError", "ElasticMemory", "Refused", "ResidencyCounts"]
