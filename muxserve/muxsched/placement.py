"""Placement optimizer: which LLMs share which GPU mesh, with which SM shares (reference §5).

    python -m muxserve.muxsched.placement --model-yaml models.yaml --cost-file costs.json --output-dir DIR

1. **Mesh groups**: every way to cut each node into meshes of 1, 2, 4, 8 ... GPUs (powers of two);
   meshes never span nodes. Groups with more meshes than LLMs are skipped.
2. **Parallel candidates** (Algorithm 2): for each LLM and mesh size, the smallest profiled decode
   SM share (up to ``max_decode_sm``) whose estimated throughput alone on the mesh meets its rate.
3. **Unit throughput F** (the estimator): the mesh's KV memory (GPU memory minus weights minus a
   per-LLM reserve) is split in proportion to rate x KV bytes per token; from batch size 1, the
   batch of the unsatisfied LLM furthest below its rate grows by one while its KV share allows,
   with ``tpt_i = bs_i / (t_dec_i(bs_i) x avg_output_len + sum_j t_prefill_j(bs_j))``. F is the best
   ``sum_i min(tpt_i, rate_i)`` seen (requests/s served). Decode latencies are stretched by
   ``max(1, sum of decode SM% / 100)``; the decode shares of one mesh may add up to
   ``100 + overload_sm``.
4. **Greedy** (Algorithm 1): LLMs by rate x parameter count, largest first; each goes to the mesh
   where F grows most (ties: the least loaded, then the smaller, then the first mesh). Where that
   order leaves an LLM without a mesh, the group is tried again biggest model first, and then
   (not in the original) in the first order with a packing lookahead: the mesh of the largest gain
   among those after which the remaining LLMs still fit (first fit, biggest first).
5. **Local search** (not in the original): the best move of one LLM to another mesh, or swap of
   two, while the total F grows. The group with the largest total F wins (ties: the first
   enumerated, i.e. the fewest and biggest meshes). ``placement_ilp`` solves the same problem
   exactly; on 1,189 random small instances the greedy alone was up to 30 % below the optimum and
   the greedy with local search up to 4.7 % (README_SECTION.md).

Model memory comes from each model's ``config.json`` (parameter count x dtype bytes). On a mesh of
``n`` GPUs an LLM runs with tensor parallelism ``n`` (as the original): each GPU holds one rank's
shard (heads, kv heads and MLP rows split, embeddings, norms and lm_head replicated, as the engine
builds it), so the mesh holds ``n x`` the parameters of one rank; a mesh size that does not divide
the model's heads, kv heads or MLP is no candidate. The smallest mesh of an LLM is the smallest
where its weights, the per-GPU reserve and one sequence of KV fit (Llama-3-70B in bf16 on 80 GB
GPUs: 4). Mesh sizes that the cost table lacks get estimated latencies only with
``PlacementSettings.tp_estimate`` (``costs.TPEstimate``).
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from functools import lru_cache

from muxserve.errors import InputError
from muxserve.muxsched.costs import CostModel, TPEstimate, models_of
from muxserve.workload.models_file import LLMEntry, natural_key

GB = 1024**3
DTYPE_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}


@dataclass(frozen=True)
class PlacementSettings:
    gpu_memory_gb: float = 80.0  # per GPU
    memory_fraction: float = 0.98  # of each GPU's memory that weights, reserve and KV may use
    reserve_gb: float = 7.6  # per LLM and GPU: activations (6 GB) + two runtime processes (2 x 0.8 GB)
    overload_sm: int = 20  # the decode SM shares of a mesh may add up to 100 + overload_sm
    max_decode_sm: int = 90
    prefill_sm: int | None = None  # None: 80 up to 10B parameters, 90 up to 20B, else 100
    model_dtype: str = "fp16"
    max_mesh_size: int | None = None  # largest mesh an LLM may get (the GPUs of a node); None: any in the table
    tp_estimate: TPEstimate | None = None  # latencies for mesh sizes the cost table lacks (an estimate)
    tp_sizes: tuple[int, ...] = ()  # the mesh sizes to estimate where missing (e.g. 2, 4, 8)

    @property
    def usable_bytes(self) -> float:
        return self.gpu_memory_gb * GB * self.memory_fraction


@dataclass(frozen=True)
class LLMInfo:
    name: str
    model: str
    rate: float
    cost_key: str  # the model's name in the cost table
    params: int
    kv_bytes_per_token: int  # K and V of every layer and kv-head, whole model
    num_layers: int = 0
    hidden_size: int = 0
    rank_params: tuple[tuple[int, int], ...] = ()  # (TP, parameters of one rank) for each TP the model splits into

    def weight_bytes(self, dtype: str) -> int:
        return self.params * DTYPE_BYTES[dtype]

    def tp_sizes(self) -> list[int]:
        return [tp for tp, _ in self.rank_params]

    def mesh_weight_bytes(self, size: int, dtype: str) -> int:
        """Weights of the LLM on a mesh of ``size`` GPUs with TP = size (replicated parts counted on
        every GPU); the whole model where the shard sizes are unknown."""
        rank = dict(self.rank_params).get(size)
        return (size * rank if rank is not None else self.params) * DTYPE_BYTES[dtype]


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


@dataclass
class Mesh:
    node: int
    size: int
    devices: tuple[int, ...]  # GPU ids on the node
    llms: list[str] = field(default_factory=list)
    estimate: MeshEstimate | None = None

    @property
    def served(self) -> float:
        return self.estimate.served if self.estimate else 0.0


@dataclass
class Placement:
    group: tuple[tuple[int, ...], ...]  # mesh sizes per node
    meshes: list[Mesh]
    method: str = "greedy"

    @property
    def served(self) -> float:
        return sum(m.served for m in self.meshes)

    def mesh_of(self, llm: str) -> Mesh:
        return next(m for m in self.meshes if llm in m.llms)


def model_facts(model: str) -> tuple[int, int]:
    """(parameter count, KV elements per token) of a model, from its config.json."""
    return _model_facts(model.removeprefix("random:"))


@lru_cache(maxsize=None)
def _model_facts(model: str) -> tuple[int, int]:
    import torch

    from muxserve.engine.model_config import ModelSpec
    from muxserve.engine.model_hub import resolve_model
    from muxserve.engine.models import build_model

    try:
        spec = ModelSpec.from_folder(resolve_model(model))
    except (FileNotFoundError, ValueError) as e:
        raise InputError(f"cannot size model {model!r} (placement reads its config.json): {e}") from None
    with torch.device("meta"):
        params = sum(p.numel() for p in build_model(spec).parameters())
    return params, 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim


TP_CANDIDATES = (1, 2, 4, 8, 16, 32, 64)


def model_tp_facts(model: str) -> tuple[int, int, tuple[tuple[int, int], ...]]:
    """(layers, hidden size, ((tp, parameters of one rank), ...)) for each power-of-two TP up to 64
    that the engine can split the model into (``muxserve.engine.parallel.check_tensor_parallel``)."""
    return _model_tp_facts(model.removeprefix("random:"))


@lru_cache(maxsize=None)
def _model_tp_facts(model: str) -> tuple[int, int, tuple[tuple[int, int], ...]]:
    import torch

    from muxserve.engine.model_config import ModelSpec
    from muxserve.engine.model_hub import resolve_model
    from muxserve.engine.models import build_model
    from muxserve.engine.parallel import check_tensor_parallel, shard_spec

    try:
        spec = ModelSpec.from_folder(resolve_model(model))
    except (FileNotFoundError, ValueError) as e:
        raise InputError(f"cannot size model {model!r} (placement reads its config.json): {e}") from None
    def count(s) -> int:
        with torch.device("meta"):
            return sum(p.numel() for p in build_model(s).parameters())

    ranks = []
    for tp in TP_CANDIDATES:
        try:
            check_tensor_parallel(spec, tp)
        except ValueError:
            continue
        # one rank's model with 1 and 2 layers: the rest (embeddings, final norm, lm_head) and one layer
        one, two = (count(shard_spec(dataclasses.replace(spec, num_layers=n), tp)) for n in (1, 2))
        ranks.append((tp, one + (spec.num_layers - 1) * (two - one)))
    return spec.num_layers, spec.hidden_size, tuple(ranks)


def cost_key(model: str, costs: CostModel) -> str | None:
    """The model's name in the cost table: its ``model`` string, else the folder's base name."""
    if model in costs.table:
        return model
    key = model.removeprefix("random:").rstrip("/").rsplit("/", 1)[-1]
    return key if key in costs.table else None


def describe_llms(entries: list[LLMEntry], costs: CostModel, dtype: str) -> list[LLMInfo]:
    out = []
    for e in entries:
        key = cost_key(e.model, costs)
        if key is None:
            raise InputError(f"{e.name}: model {e.model!r} is not in the cost table (it has {models_of(costs.table)}); "
                             "profile it with python -m muxserve.muxsched.profile --model KEY=MODEL")
        params, kv_elems = model_facts(e.model)
        layers, hidden, ranks = model_tp_facts(e.model)
        out.append(LLMInfo(e.name, e.model, e.rate, key, params, kv_elems * DTYPE_BYTES[dtype], layers, hidden, ranks))
    return out


def node_splits(ngpus: int) -> list[tuple[int, ...]]:
    """Every multiset of power-of-two mesh sizes adding up to ``ngpus``, biggest meshes first."""
    def parts(rest: int, largest: int) -> list[tuple[int, ...]]:
        if rest == 0:
            return [()]
        out = []
        size = largest
        while size >= 1:
            if size <= rest:
                out += [(size,) + p for p in parts(rest - size, size)]
            size //= 2
        return out

    return parts(ngpus, 1 << (ngpus.bit_length() - 1))


def mesh_groups(nnodes: int, ngpus_per_node: int) -> list[tuple[tuple[int, ...], ...]]:
    """Mesh groups of the cluster: one split per node, unordered across nodes."""
    return list(itertools.combinations_with_replacement(node_splits(ngpus_per_node), nnodes))


def build_meshes(group: tuple[tuple[int, ...], ...]) -> list[Mesh]:
    meshes = []
    for node, split in enumerate(group):
        first = 0
        for size in split:  # biggest first, so every mesh is aligned to its size
            meshes.append(Mesh(node, size, tuple(range(first, first + size))))
            first += size
    return meshes


class Estimator:
    """Candidates (Algorithm 2) and the memoized unit throughput F (reference §5.2)."""

    def __init__(self, llms: list[LLMInfo], costs: CostModel, settings: PlacementSettings):
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

    def prefill_sm(self, llm: LLMInfo, ngpu: int) -> int:
        want = self.settings.prefill_sm or (80 if llm.params <= 10e9 else 90 if llm.params <= 20e9 else 100)
        return self.costs.nearest_sm(llm.cost_key, ngpu, want)

    def decode_sms(self, llm: LLMInfo, ngpu: int) -> list[int]:
        values = self.costs.sm_values(llm.cost_key, ngpu)
        low = [v for v in values if v <= self.settings.max_decode_sm]
        return low or values[-1:]

    def kv_budget(self, size: int, names: list[str]) -> float:
        """KV bytes of a mesh of ``size`` GPUs that holds ``names`` (negative: does not fit)."""
        s = self.settings
        weights = sum(self.llms[n].mesh_weight_bytes(size, s.model_dtype) for n in names)
        return size * s.usable_bytes - weights - size * len(names) * s.reserve_gb * GB

    def mesh_sizes(self, llm: LLMInfo) -> list[int]:
        """Mesh sizes the LLM may get: in the cost table (measured or estimated), splittable with TP =
        mesh size, and at most ``max_mesh_size``."""
        sizes = self.costs.mesh_sizes(llm.cost_key)
        if llm.rank_params:
            sizes = [n for n in sizes if n in llm.tp_sizes()]
        if self.settings.max_mesh_size is not None:
            sizes = [n for n in sizes if n <= self.settings.max_mesh_size]
        return sizes

    def _candidates(self, llm: LLMInfo) -> dict[int, Candidate]:
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


def by_demand(llm: LLMInfo) -> tuple:
    """Algorithm 1's order: computation demand (rate x model size), largest first."""
    return (-llm.rate * llm.params, -llm.params, natural_key(llm.name))


def by_memory(llm: LLMInfo) -> tuple:
    """Memory-first order (the original's greedy_memory_placement): biggest weights first."""
    return (-llm.params, -llm.rate, natural_key(llm.name))


def packs(est: Estimator, meshes: list[Mesh], rest: list[LLMInfo]) -> bool:
    """Whether ``rest`` still fits the meshes as they are filled (first fit, biggest weights first,
    smallest mesh first); a sufficient check, not an exact one."""
    held = {j: list(m.llms) for j, m in enumerate(meshes)}
    order = sorted(range(len(meshes)), key=lambda j: (meshes[j].size, j))
    for llm in sorted(rest, key=by_memory):
        j = next((j for j in order if meshes[j].size in est.candidates[llm.name]
                  and est.estimate(meshes[j].size, held[j] + [llm.name]) is not None), None)
        if j is None:
            return False
        held[j].append(llm.name)
    return True


def greedy_place(est: Estimator, group: tuple[tuple[int, ...], ...], order=by_demand,
                 lookahead: bool = False) -> Placement | None:
    """Algorithm 1 on one mesh group; None when some LLM fits nowhere.

    With ``lookahead`` (not in the original) an LLM goes to the mesh of the largest gain among
    those after which the LLMs still to place pack (:func:`packs`), so that tight packings (big
    models, more LLMs than GPUs) do not strand a model; where no mesh passes, the largest gain."""
    meshes = build_meshes(group)
    todo = sorted(est.llms.values(), key=order)
    for k, llm in enumerate(todo):
        options = []
        for j, mesh in enumerate(meshes):
            if mesh.size not in est.candidates[llm.name]:
                continue
            new = est.estimate(mesh.size, mesh.llms + [llm.name])
            if new is None:
                continue
            load = sum(est.llms[n].rate * est.llms[n].params for n in mesh.llms) / mesh.size
            options.append(((round(new.served - mesh.served, 9), -load, -mesh.size, -j), j, new))
        if not options:
            return None
        options.sort(key=lambda o: o[0], reverse=True)
        _, best_index, best_est = options[0]
        if lookahead and k + 1 < len(todo):
            for _, j, new in options:
                trial = [Mesh(m.node, m.size, m.devices, m.llms + [llm.name] if i == j else list(m.llms))
                         for i, m in enumerate(meshes)]
                if packs(est, trial, todo[k + 1:]):
                    best_index, best_est = j, new
                    break
        meshes[best_index].llms.append(llm.name)
        meshes[best_index].estimate = best_est
    for mesh in meshes:
        mesh.llms.sort(key=natural_key)
    return Placement(group, meshes)


def local_search(est: Estimator, placement: Placement, max_rounds: int = 1000) -> Placement:
    """Apply the best improving move of one LLM to another mesh, or swap of two LLMs, until none is left."""
    meshes = placement.meshes
    for _ in range(max_rounds):
        best_gain, best_change = 1e-9, None
        for i, mi in enumerate(meshes):
            for a in mi.llms:
                without_a = [n for n in mi.llms if n != a]
                for j, mj in enumerate(meshes):
                    if j == i:
                        continue
                    # a moves to mesh j; or, for j > i, a trades places with some b of mesh j
                    options = [(without_a, mj.llms + [a])]
                    if j > i:
                        options += [(without_a + [b], [n for n in mj.llms if n != b] + [a]) for b in mj.llms]
                    for new_i, new_j in options:
                        ei, ej = est.estimate(mi.size, new_i), est.estimate(mj.size, new_j)
                        if ei is None or ej is None:
                            continue
                        gain = ei.served + ej.served - mi.served - mj.served
                        if gain > best_gain:
                            best_gain, best_change = gain, (i, new_i, ei, j, new_j, ej)
        if best_change is None:
            break
        i, new_i, ei, j, new_j, ej = best_change
        meshes[i].llms, meshes[i].estimate = sorted(new_i, key=natural_key), ei
        meshes[j].llms, meshes[j].estimate = sorted(new_j, key=natural_key), ej
    for mesh in meshes:
        if not mesh.llms:
            mesh.estimate = None
    placement.method += "+local-search"
    return placement


def feasible_groups(est: Estimator, nnodes: int, ngpus_per_node: int) -> list[tuple[tuple[int, ...], ...]]:
    """Mesh groups worth trying: no more meshes than LLMs, and a mesh big enough for every LLM."""
    need = [est.min_mesh_size(n) for n in est.llms]
    if any(n is None for n in need):
        bad = [name for name, n in zip(est.llms, need) if n is None]
        sizes = {name: est.mesh_sizes(est.llms[name]) for name in bad}
        raise InputError(f"{', '.join(bad)}: no mesh size of the cost table (here {sizes}) holds the weights and one "
                         f"sequence ({est.settings.gpu_memory_gb:g} GB per GPU, {est.settings.reserve_gb:g} GB reserve "
                         "per LLM and GPU); profile bigger meshes or estimate them (--estimate-tp)")
    groups = []
    for group in mesh_groups(nnodes, ngpus_per_node):
        sizes = [s for split in group for s in split]
        if len(sizes) <= len(est.llms) and max(sizes) >= max(need):
            groups.append(group)
    return groups


def optimize(est: Estimator, nnodes: int, ngpus_per_node: int, refine: bool = True) -> Placement:
    """The best placement over every mesh group: Algorithm 1 (memory-first order where it fails,
    then with packing lookahead), then, with ``refine``, local search."""
    best = None
    for group in feasible_groups(est, nnodes, ngpus_per_node):
        placement = greedy_place(est, group)
        if placement is None:
            placement = greedy_place(est, group, by_memory)
            if placement is not None:
                placement.method = "greedy(memory-first)"
        if placement is None:
            placement = greedy_place(est, group, lookahead=True)
            if placement is None:
                continue
            placement.method = "greedy(lookahead)"
        if refine:
            placement = local_search(est, placement)
        if best is None or placement.served > best.served + 1e-9:
            best = placement
    if best is None:
        raise InputError("no mesh group of the cluster can hold every LLM (memory or SM shares); "
                         "add GPUs or lower the reserve")
    return best


def spatial_size(est: Estimator, name: str) -> int:
    """Mesh size of an LLM alone (spatial partitioning): the smallest that meets its rate, else the smallest."""
    cands = est.candidates[name]
    return next((n for n in sorted(cands) if cands[n].satisfied), min(cands))


def main(argv: list[str] | None = None) -> int:
    from muxserve.muxsched.placement_cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
