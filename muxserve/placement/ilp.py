"""Exact placement with an integer program (pulp + CBC), to measure the greedy's quality.

It optimizes the same objective as the greedy (the sum of the unit throughput F over meshes) over
every mesh group and every colocation at once: F is evaluated for every subset of LLMs on every
mesh size (so it suits small clusters: at most ``MAX_LLMS`` LLMs), then

    maximize   sum_{n,S} F(n, S) * y[n,S]
    subject to sum_S y[n,S] <= sum_g z[g] * count_g(n)      for every mesh size n
               sum_{n, S containing i} y[n,S] = 1           for every LLM i
               sum_g z[g] = 1,   z binary,   y integer >= 0

where ``y[n,S]`` counts the meshes of size ``n`` that hold exactly the LLMs ``S`` and ``z[g]``
picks the mesh group. Meshes of one size are interchangeable for F, so this is exact with respect
to the estimator.
"""

from __future__ import annotations

import itertools
import warnings
from collections import Counter

from muxserve.errors import InputError
from muxserve.placement.estimator import Estimator
from muxserve.placement.greedy import Mesh, Placement, build_meshes, feasible_groups

MAX_LLMS = 12


def unit_values(est: Estimator, sizes: set[int]) -> dict[tuple[int, tuple[str, ...]], float]:
    """F of every subset of LLMs that fits a mesh of each size."""
    names = list(est.llms)
    values = {}
    for size in sorted(sizes):
        usable = [n for n in names if size in est.candidates[n]]
        for k in range(1, len(usable) + 1):
            for subset in itertools.combinations(usable, k):
                e = est.estimate(size, subset)
                if e is not None:
                    values[(size, subset)] = e.served
    return values


def ilp_place(est: Estimator, nnodes: int, ngpus_per_node: int, time_limit_s: float = 60.0) -> Placement | None:
    """The placement that maximizes the total F; None when no placement holds every LLM."""
    import pulp

    if len(est.llms) > MAX_LLMS:
        raise InputError(f"the exact placement handles at most {MAX_LLMS} LLMs, got {len(est.llms)}")
    groups = feasible_groups(est, nnodes, ngpus_per_node)
    counts = [Counter(s for split in g for s in split) for g in groups]
    values = unit_values(est, {s for c in counts for s in c})
    prob = pulp.LpProblem("muxserve_placement", pulp.LpMaximize)
    z = [prob.add_variable(f"group_{i}", cat="Binary") for i in range(len(groups))]
    y = {key: prob.add_variable(f"unit_{i}", lowBound=0, cat="Integer") for i, key in enumerate(values)}
    prob += pulp.lpSum(values[key] * var for key, var in y.items())
    prob += pulp.lpSum(z) == 1
    for size in {s for c in counts for s in c}:
        prob += (pulp.lpSum(var for (n, _), var in y.items() if n == size)
                 <= pulp.lpSum(c[size] * zi for c, zi in zip(counts, z)))
    for name in est.llms:
        prob += pulp.lpSum(var for (_, subset), var in y.items() if name in subset) == 1
    with warnings.catch_warnings():  # pulp 3.3 announces the bundled CBC's removal in 4.0
        warnings.simplefilter("ignore", DeprecationWarning)
        status = prob.solve(pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit_s))
    if pulp.LpStatus[status] != "Optimal":
        return None
    group = groups[next(i for i, zi in enumerate(z) if zi.value() > 0.5)]
    meshes = build_meshes(group)
    free: dict[int, list[Mesh]] = {}
    for mesh in meshes:
        free.setdefault(mesh.size, []).append(mesh)
    for (size, subset), var in sorted(y.items(), key=lambda kv: kv[0]):
        for _ in range(round(var.value() or 0)):
            mesh = free[size].pop(0)
            mesh.llms = list(subset)
            mesh.estimate = est.estimate(size, subset)
    return Placement(group, meshes, method="ilp")
