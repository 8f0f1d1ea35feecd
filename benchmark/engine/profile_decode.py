#!/usr/bin/env python
"""Where the GPU time of a decode step goes: per-kernel time inside the step, next to its wall time.

Builds a random-weight model shape (``examples/shapes/<shape>``, bf16) in one ``LLMEngine`` and,
for each batch size, runs ``--steps`` decode steps under ``torch.profiler`` (CUDA activity,
which records the kernels a CUDA graph replays), then prints per step: wall time, the sum of
kernel times, the gap between them (launch gaps and idle GPU), and the kernels grouped by kind
(GEMMs, this engine's Triton kernels, the rest) with the top kernels by time. ``--eager``
profiles the same steps without graphs.

Example: python -m benchmark.engine.profile_decode --shape llama-3-8b --batches 1 8 32 --output-json out.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from benchmark.engine import bench_gpu
from muxserve.engine.kv_cache import KVLayout
from muxserve.engine.llm_engine import EngineConfig, LLMEngine
from muxserve.engine.model_config import ModelSpec
from muxserve.ipc.runtime import Phase

GEMM_MARKERS = ("gemm", "gemv", "cutlass", "nvjet", "sm90_xmma", "cublas", "splitkreduce")


def kernel_kind(name: str) -> str:
    low = name.lower()
    if any(m in low for m in GEMM_MARKERS):
        return "gemm"
    if low.startswith("_") or "triton" in low:  # Triton kernels keep their Python names (_rmsnorm_kernel, ...)
        return "triton"
    return "other"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_gpu.add_shape_argument(p)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32], help="decode batch sizes")
    p.add_argument("--ctx", type=int, default=512, help="context tokens of each sequence (default: 512)")
    p.add_argument("--steps", type=int, default=20, help="profiled steps per batch size (default: 20)")
    p.add_argument("--top", type=int, default=12, help="kernels listed per batch size (default: 12)")
    p.add_argument("--eager", action="store_true", help="no CUDA graphs")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: a dry run (no kernels)")
    p.add_argument("--output-json", type=Path, help="write the figures here")
    args = p.parse_args(argv)
    args.folder = bench_gpu.parsed_shape(p, args.shape)
    bench_gpu.check_device(p, args.device)
    return args


def build_engine(args) -> tuple[LLMEngine, ModelSpec]:
    device = torch.device(args.device)
    dtype_name = "bfloat16" if args.device == "cuda" else "float32"
    dtype = getattr(torch, dtype_name)
    model, spec = bench_gpu.random_model(args.folder, dtype, device)
    # the pages of the largest batch at --ctx plus the profiled steps and their warm-up (as make_seqs
    # asks), with room to spare
    layout = KVLayout(spec.num_layers, spec.num_kv_heads, spec.head_dim, dtype)
    kv_bytes = int(1.25 * max(args.batches) * layout.pages_for(args.ctx + args.steps + 8) * layout.page_bytes)
    config = EngineConfig(model=str(args.folder), dtype=dtype_name, device=args.device,
                          kv_cache_bytes=kv_bytes + (256 << 20) if args.device == "cuda" else 64 << 20,
                          max_num_seqs=max(args.batches),
                          max_model_len=args.ctx + args.steps + 64, enforce_eager=args.eager)
    return LLMEngine(config, model=model), spec


def profile_batch(bench: bench_gpu.Ours, batch: int, args, vocab: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    seqs = bench.make_seqs([args.ctx] * batch, args.steps + 8, vocab)
    try:
        for _ in range(3):  # capture and warm up outside the profile
            for s, t in zip(seqs, bench.runner.step(seqs, Phase.DECODE)):
                s.output_token_ids.append(t)
        bench_gpu.sync()
        with profile(activities=activities) as prof:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                for s, t in zip(seqs, bench.runner.step(seqs, Phase.DECODE)):
                    s.output_token_ids.append(t)
            bench_gpu.sync()
            wall_ms = (time.perf_counter() - t0) * 1e3 / args.steps
    finally:
        bench.free(seqs)
    kernels: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            k = kernels[evt.name]
            k[0] += evt.time_range.elapsed_us() / 1e3  # a kernel's own duration, ms
            k[1] += 1
    per_step = {name: {"ms": t / args.steps, "calls": n / args.steps} for name, (t, n) in kernels.items()}
    kinds: dict[str, dict] = defaultdict(lambda: {"ms": 0.0, "calls": 0.0})
    for name, v in per_step.items():
        kinds[kernel_kind(name)]["ms"] += v["ms"]
        kinds[kernel_kind(name)]["calls"] += v["calls"]
    busy = sum(v["ms"] for v in per_step.values())
    top = sorted(per_step.items(), key=lambda kv: -kv[1]["ms"])[: args.top]
    return {"batch": batch, "wall_ms": wall_ms, "kernel_ms": busy, "gap_ms": wall_ms - busy,
            "kernels_per_step": sum(v["calls"] for v in per_step.values()), "kinds": dict(kinds),
            "top": [{"name": n[:120], **v} for n, v in top]}


def _cell(kinds: dict, kind: str) -> str:
    """``ms (calls)`` of one kind of kernel in a report row, ``-`` where there was none."""
    return f"{kinds[kind]['ms']:.3f} ({kinds[kind]['calls']:.0f})" if kind in kinds else "-"


def report(result: dict) -> str:
    lines = [f"# Decode step profile: {result['shape']} ({'eager' if result['eager'] else 'CUDA graphs'}), "
             f"context {result['ctx']}", "", f"- device: {result['device']}", f"- command: `{result['command']}`", "",
             "| batch | wall ms | kernels ms | gap ms | kernels/step | GEMM ms (calls) | Triton ms (calls) "
             "| other ms (calls) |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["batches"]:
        k = r["kinds"]
        lines.append(f"| {r['batch']} | {r['wall_ms']:.3f} | {r['kernel_ms']:.3f} | {r['gap_ms']:.3f} | "
                     f"{r['kernels_per_step']:.0f} | {_cell(k, 'gemm')} | {_cell(k, 'triton')} | {_cell(k, 'other')} |")
    for r in result["batches"]:
        lines += ["", f"Top kernels at batch {r['batch']} (ms per step, calls per step):", ""]
        lines += [f"- {t['ms']:.3f} ms, {t['calls']:.0f}x: `{t['name']}`" for t in r["top"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    bench_gpu.DEV = args.device
    engine, spec = build_engine(args)
    bench = bench_gpu.Ours.on_engine(engine)
    device = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    result = {"shape": args.folder.name, "ctx": args.ctx, "eager": args.eager, "device": device,
              "command": "python " + shlex.join(sys.argv), "batches": []}
    for batch in args.batches:
        result["batches"].append(profile_batch(bench, batch, args, spec.vocab_size))
        r = result["batches"][-1]
        print(f"batch {batch}: wall {r['wall_ms']:.3f} ms, kernels {r['kernel_ms']:.3f} ms, "
              f"{r['kernels_per_step']:.0f} kernels per step", flush=True)
    text = report(result)
    print(text)
    if args.output_json:
        args.output_json.parent.mkdir(parents=True, exist_ok=True)
        args.output_json.write_text(json.dumps(result, indent=1))
        args.output_json.with_suffix(".md").write_text(text)


if __name__ == "__main__":
    main()
