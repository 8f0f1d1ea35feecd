#!/usr/bin/env python
"""How far the greedy placement is from the exact optimum (pulp + CBC), on random small instances.

    python examples/placement/greedy_vs_ilp.py --instances 1300

Each seed makes 2-6 LLMs (1.1 B / 8 B / 13 B shapes, rates 0.2-20 req/s) on 1x2, 1x4, 2x2 or 1x8
GPUs of 40 or 80 GB, with the synthetic A100-like cost table of ``muxserve.placement.synthetic``.
Instances that no placement can hold are skipped. Prints the worst gaps of the greedy alone
(Algorithm 1) and of the greedy with local search (the default).
"""

from __future__ import annotations

import argparse
import tempfile
import time

from muxserve.errors import InputError
from muxserve.placement.costs import CostModel
from muxserve.placement.estimator import Estimator
from muxserve.placement.greedy import optimize
from muxserve.placement.ilp import ilp_place
from muxserve.placement.llms import PlacementSettings, describe_llms
from muxserve.placement.synthetic import SCALES, SHAPES, random_instance, synthetic_table, write_shape


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--instances", type=int, default=300)
    p.add_argument("--first-seed", type=int, default=0)
    args = p.parse_args()
    folders = {shape: write_shape(f"{tempfile.mkdtemp()}/{shape}", shape) for shape in SHAPES}
    costs = CostModel(synthetic_table({folders[s]: scale for s, scale in SCALES.items()}), 161, 338)
    gaps: dict[str, list[tuple[float, int]]] = {"greedy": [], "greedy+local-search": []}
    failed: dict[str, list[int]] = {k: [] for k in gaps}
    start = time.perf_counter()
    for seed in range(args.first_seed, args.first_seed + args.instances):
        nnodes, ngpus, entries, gpu_gb = random_instance(seed, folders)
        est = Estimator(describe_llms(entries, costs, "fp16"), costs, PlacementSettings(gpu_memory_gb=gpu_gb))
        try:
            exact = ilp_place(est, nnodes, ngpus)
        except InputError:  # some LLM fits no mesh at all
            continue
        if exact is None:
            continue
        for kind, refine in (("greedy", False), ("greedy+local-search", True)):
            try:
                served = optimize(est, nnodes, ngpus, refine=refine).served
            except InputError:
                failed[kind].append(seed)
                continue
            gaps[kind].append((1 - served / exact.served, seed))
    print(f"{len(gaps['greedy+local-search'])} instances with a placement, {time.perf_counter() - start:.0f} s")
    for kind, values in gaps.items():
        values.sort(reverse=True)
        worst = ", ".join(f"{g:.2%} (seed {s})" for g, s in values[:5])
        over = sum(g > 0.01 for g, _ in values)
        mean = sum(g for g, _ in values) / max(1, len(values))
        print(f"{kind}: worst {worst}; {over} over 1 %; mean {mean:.3%}; no placement found for seeds {failed[kind]}")


if __name__ == "__main__":
    main()
