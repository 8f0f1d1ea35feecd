"""Placement optimizer: which LLMs share which GPU mesh, with which SM shares (reference §5).

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
   enumerated, i.e. the fewest and biggest meshes). ``placement.ilp`` solves the same problem
   exactly; on 1,189 random small instances the greedy alone was up to 30 % below the optimum and
   the greedy with local search up to 4.7 % (README.md, "Placement optimizer").

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

import itertools
from dataclasses import dataclass, field

from muxserve.errors import InputError
from muxserve.placement.estimator import Estimator, MeshEstimate
from muxserve.placement.llms import GB, PlacementLLM
from muxserve.workload.models_file import natural_key


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


def by_demand(llm: PlacementLLM) -> tuple:
    """Algorithm 1's order: computation demand (rate x model size), largest first."""
    return (-llm.rate * llm.params, -llm.params, natural_key(llm.name))


def by_memory(llm: PlacementLLM) -> tuple:
    """Memory-first order (the original's greedy_memory_placement): biggest weights first."""
    return (-llm.params, -llm.rate, natural_key(llm.name))


def packs(est: Estimator, meshes: list[Mesh], rest: list[PlacementLLM]) -> bool:
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
        raise InputError("; ".join(never_fits(est, name) for name in bad)
                         + ": profile bigger meshes or estimate them (--estimate-tp)")
    groups = []
    for group in mesh_groups(nnodes, ngpus_per_node):
        sizes = [s for split in group for s in split]
        if len(sizes) <= len(est.llms) and max(sizes) >= max(need):
            groups.append(group)
    return groups


def never_fits(est: Estimator, name: str) -> str:
    """Why an LLM has no mesh size: its weights, reserve and one sequence against each size's memory
    (the same alone as on an elastic mesh: a woken LLM needs all of it)."""
    s, llm = est.settings, est.llms[name]
    sizes = est.mesh_sizes(llm)
    if not sizes:
        return f"{name}: the cost table has no mesh size for {llm.cost_key!r} within {s.max_mesh_size} GPUs"
    seq = llm.kv_bytes_per_token * est.seq_len
    parts = []
    for n in sizes:
        weights = llm.mesh_weight_bytes(n, s.model_dtype) / n
        if est.kv_budget(n, [name]) >= seq:
            parts.append(f"{n} GPU{'s' if n > 1 else ''}: fits in memory but the cost table gives no usable latency")
            continue
        parts.append(f"{n} GPU{'s' if n > 1 else ''}: {weights / GB:.2f} GB weights + {s.reserve_gb:g} GB reserve "
                     f"+ {seq / n / GB:.3f} GB for one sequence > {s.usable_bytes / GB:.2f} GB usable per GPU")
    return f"{name} ({llm.model}) never fits, even alone: " + ", ".join(parts)


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


