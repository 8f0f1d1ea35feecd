"""The unit throughput F of a mesh (reference §5.2) and each LLM's parallel candidates (Algorithm 2)."""

from __future__ import annotations

from dataclasses import dataclass
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

    def kv_budget(self, size: int, names: list[str]) -> float:
        """KV bytes of a mesh of ``size`` GPUs that holds ``names`` (negative: does not fit)."""
        s = self.settings
        weights = sum(self.llms[n].mesh_weight_bytes(size, s.model_dtype) for n in names)
        return size * s.usable_bytes - weights - size * len(names) * s.reserve_gb * GB

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
        sm_total = sum(c.decode_sm for c in cands)
        if sm_total > 100 + self.settings.overload_sm:
            return None
        budget = self.kv_budget(size, list(names))
        members = [self.llms[n] for n in names]
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
            tpt = [b / (lat.decode[b] * slow * out_len + prefill) for lat, b in zip(lats, bs)]
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
                            {n: min(t, r) for n, t, r in zip(names, tpt, rates)}, budget / size)

    def estimate(self, size: int, names) -> MeshEstimate | None:
        return self.mesh(size, tuple(sorted(names, key=natural_key)))


