"""The unit throughput F of a mesh (reference §5.2) and each LLM's parallel candidates (Algorithm 2).

Elastic meshes (``PlacementSettings.elastic``, not in the original): an LLM idle for
``idle_timeout_s`` is offloaded and woken by its next request (scheduler/residency_policy.py), so
a mesh may hold more LLMs than fit at once. With Poisson arrivals at rate ``r``, an LLM is
resident when a request came in the last ``T = idle_timeout_s`` seconds::

    p_resident = 1 - exp(-r T)            wakes/s = r exp(-r T)  (requests that find it offloaded)

and the mesh is estimated on its *expected* resident set: KV memory = mesh memory - sum
``p_resident x weights`` - per LLM and GPU ``p_resident x reserve_gb + (1 - p_resident) x
idle_reserve_gb`` (an offloaded LLM keeps its runtime processes); the decode SM shares count
``p_resident x share``. Every member must still fit alone with one sequence (its candidate). Each
wake copies the LLM's weights while the mesh decodes (decode is bound by the same memory), so
every throughput is scaled by ``1 - sum wakes/s x wake_s``: ``wake_s`` from the cost table's
``_wake_s`` note where measured, else ``weights per GPU / wake_gbps + wake_overhead_s`` (an
estimate: the H200 copied pinned host memory at 55.3 GB/s, the default 25 GB/s leaves room for
other traffic). Arrivals in bursts make LLMs resident less often than this, steadier ones more.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

from muxserve.placement.costs import CostModel
from muxserve.placement.llms import DTYPE_BYTES, GB, PlacementLLM, PlacementSettings
from muxserve.workload.models_file import natural_key


@dataclass(frozen=True)
class Candidate:
    """How an LLM runs alone on a mesh of ``ngpu`` GPUs (Algorithm 2)."""

    ngpu: int
    prefill_sm: int
    decode_sm: int
    batch_size: int
    throughput: float
    satisfied: bool


@dataclass(frozen=True)
class MeshEstimate:
    served: float  # sum of min(tpt, rate), requests/s
    batch_sizes: dict[str, int]  # estimated steady-state batch per LLM
    max_num_seqs: dict[str, int]  # KV share of each LLM, in sequences of the average length
    throughputs: dict[str, float]  # estimated requests/s per LLM (capped at its rate)
    kv_bytes_per_gpu: float
    weight_bytes: float = 0.0  # weights of every member, whole mesh
    resident_bytes: float = 0.0  # expected weights held (elastic), else weight_bytes
    wakes_per_s: dict[str, float] = field(default_factory=dict)  # elastic: expected wakes per LLM
    wake_fraction: float = 0.0  # elastic: share of the time the mesh spends copying woken weights


class Estimator:
    """Candidates (Algorithm 2) and the memoized unit throughput F (reference §5.2)."""

    def __init__(self, llms: list[PlacementLLM], costs: CostModel, settings: PlacementSettings):
        self.llms = {m.name: m for m in sorted(llms, key=lambda m: natural_key(m.name))}
        self.costs = costs
        self.settings = settings
        if settings.tp_estimate is not None and settings.tp_sizes:
            for m in self.llms.values():  # one shape per cost key: the first LLM's
                if m.cost_key not in costs.estimated and m.num_layers:
                    costs.add_tp_estimates(m.cost_key, [n for n in settings.tp_sizes if n in m.tp_sizes()],
                                           settings.tp_estimate, m.num_layers, m.hidden_size,
                                           DTYPE_BYTES[settings.model_dtype])
        self.seq_len = costs.avg_prompt_len + costs.avg_output_len  # KV a sequence needs at its end
        self.candidates = {m.name: self._candidates(m) for m in self.llms.values()}
        self.mesh = lru_cache(maxsize=None)(self._mesh)

    def prefill_sm(self, llm: PlacementLLM, ngpu: int) -> int:
        want = self.settings.prefill_sm or (80 if llm.params <= 10e9 else 90 if llm.params <= 20e9 else 100)
        return self.costs.nearest_sm(llm.cost_key, ngpu, want)

    def decode_sms(self, llm: PlacementLLM, ngpu: int) -> list[int]:
        values = self.costs.sm_values(llm.cost_key, ngpu)
        low = [v for v in values if v <= self.settings.max_decode_sm]
        return low or values[-1:]

    def kv_budget(self, size: int, names: list[str], expected: bool = False) -> float:
        """KV bytes of a mesh of ``size`` GPUs that holds ``names`` (negative: does not fit); with
        ``expected`` (elastic meshes) weights and reserves of the expected resident set."""
        s = self.settings
        if not expected:
            weights = sum(self.llms[n].mesh_weight_bytes(size, s.model_dtype) for n in names)
            return size * s.usable_bytes - weights - size * len(names) * s.reserve_gb * GB
        total = size * s.usable_bytes
        for n in names:
            p = self.p_resident(n)
            total -= p * self.llms[n].mesh_weight_bytes(size, s.model_dtype)
            total -= size * (p * s.reserve_gb + (1 - p) * s.idle_reserve_gb) * GB
        return total

    def p_resident(self, name: str) -> float:
        """Chance that an elastic LLM is resident: a request in the last ``idle_timeout_s`` seconds."""
        return -math.expm1(-self.llms[name].rate * self.settings.idle_timeout_s)

    def wakes_per_s(self, name: str) -> float:
        """Requests that find an elastic LLM offloaded: those after a gap of ``idle_timeout_s``."""
        rate = self.llms[name].rate
        return rate * math.exp(-rate * self.settings.idle_timeout_s)

    def wake_s(self, name: str, size: int) -> float:
        """Seconds to wake the LLM on a mesh of ``size`` GPUs: measured (cost table) or estimated."""
        llm, s = self.llms[name], self.settings
        measured = self.costs.wake_s(llm.cost_key, size)
        if measured is not None:
            return measured
        return llm.mesh_weight_bytes(size, s.model_dtype) / size / (s.wake_gbps * 1e9) + s.wake_overhead_s

    def mesh_sizes(self, llm: PlacementLLM) -> list[int]:
        """Mesh sizes the LLM may get: in the cost table (measured or estimated), splittable with TP =
        mesh size, and at most ``max_mesh_size``."""
        sizes = self.costs.mesh_sizes(llm.cost_key)
        if llm.rank_params:
            sizes = [n for n in sizes if n in llm.tp_sizes()]
        if self.settings.max_mesh_size is not None:
            sizes = [n for n in sizes if n <= self.settings.max_mesh_size]
        return sizes

    def _candidates(self, llm: PlacementLLM) -> dict[int, Candidate]:
        out = {}
        for ngpu in self.mesh_sizes(llm):
            max_bs = int(self.kv_budget(ngpu, [llm.name]) // (llm.kv_bytes_per_token * self.seq_len))
            if max_bs < 1:
                continue  # the weights (and one sequence) do not fit this mesh
            prefill_sm, best = self.prefill_sm(llm, ngpu), None
            for sm in self.decode_sms(llm, ngpu):
                lat = self.costs.pair(llm.cost_key, ngpu, prefill_sm, sm)
                if lat is None:
                    continue
                est = self.costs.best_batch(lat, llm.rate, max_bs)
                cand = Candidate(ngpu, prefill_sm, sm, est.batch_size, est.throughput, est.satisfied)
                if est.satisfied:
                    best = cand
                    break
                if best is None or cand.throughput > best.throughput:
                    best = cand
            if best is not None and best.batch_size >= 1:
                out[ngpu] = best
        return out

    def min_mesh_size(self, name: str) -> int | None:
        sizes = sorted(self.candidates[name])
        return sizes[0] if sizes else None

    def _mesh(self, size: int, names: tuple[str, ...]) -> MeshEstimate | None:
        """F of a mesh of ``size`` GPUs holding ``names`` (sorted), or None if they do not fit."""
        if not names:
            return MeshEstimate(0.0, {}, {}, {}, self.settings.usable_bytes)
        cands = [self.candidates[n].get(size) for n in names]
        if any(c is None for c in cands):
            return None
        elastic = self.settings.elastic
        p_res = [self.p_resident(n) if elastic else 1.0 for n in names]
        sm_total = sum(p * c.decode_sm for p, c in zip(p_res, cands))
        if sm_total > 100 + self.settings.overload_sm + 1e-9:
            return None
        budget = self.kv_budget(size, list(names), expected=elastic)
        members = [self.llms[n] for n in names]
        mesh_weights = [m.mesh_weight_bytes(size, self.settings.model_dtype) for m in members]
        wakes = {n: self.wakes_per_s(n) for n in names} if elastic else {}
        wake_fraction = sum(wakes[n] * self.wake_s(n, size) for n in wakes)
        if wake_fraction >= 1:
            return None  # the mesh would do nothing but wake LLMs
        seq_bytes = [m.kv_bytes_per_token * self.seq_len for m in members]
        if budget < sum(seq_bytes):
            return None
        lats = [self.costs.pair(m.cost_key, size, c.prefill_sm, c.decode_sm) for m, c in zip(members, cands)]
        # one sequence each, the rest in proportion to rate x KV bytes per token
        spare = budget - sum(seq_bytes)
        weights = [m.rate * m.kv_bytes_per_token for m in members]
        total = sum(weights) or 1.0
        caps = [min(lat.max_bs, 1 + int(spare * w / total // b)) for lat, w, b in zip(lats, weights, seq_bytes)]
        slow = max(1.0, sm_total / 100)
        out_len = self.costs.avg_output_len
        rates = [m.rate for m in members]
        bs = [1] * len(members)
        best = None
        while True:
            prefill = sum(lat.prefill[b] for lat, b in zip(lats, bs))
            tpt = [b / (lat.decode[b] * slow * out_len + prefill) * (1 - wake_fraction) for lat, b in zip(lats, bs)]
            served = sum(min(t, r) for t, r in zip(tpt, rates))
            if best is None or served > best[0] + 1e-12:
                best = (served, list(bs), tpt)
            grow = [i for i in range(len(bs)) if tpt[i] < rates[i] and bs[i] < caps[i]]
            if not grow:
                break
            i = min(grow, key=lambda k: (tpt[k] / rates[k], k))
            bs[i] += 1
        served, best_bs, tpt = best
        return MeshEstimate(served, dict(zip(names, best_bs)), dict(zip(names, caps)),
                            {n: min(t, r) for n, t, r in zip(names, tpt, rates)}, budget / size,
                            float(sum(mesh_weights)), sum(p * w for p, w in zip(p_res, mesh_weights)), wakes,
                            wake_fraction)

    def estimate(self, size: int, names) -> MeshEstimate | None:
        return self.mesh(size, tuple(sorted(names, key=natural_key)))


