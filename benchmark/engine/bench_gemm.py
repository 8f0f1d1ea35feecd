#!/usr/bin/env python
"""The decode step's four GEMMs alone: time per layer shape and batch, next to the copy bandwidth.

A decode step at batch <= 64 is bound by reading the weights, so each ``x (M, K) @ W (N, K)^T``
should move ``N x K x 2`` bytes at the copy bandwidth. For every linear layer shape of a model
(qkv, o, gate_up, down) and every M it replays, in one CUDA graph, the GEMM of all layers (each
layer its own weight, so nothing stays in L2) and reports microseconds per GEMM, GB/s and the
fraction of the copy bandwidth, for:

- ``cublas``: ``F.linear`` as the engine runs it (torch's default BLAS);
- ``cublaslt``: the same after ``torch.backends.cuda.preferred_blas_library("cublaslt")``;
- ``triton``: ``muxserve.engine.skinny_gemm`` (the best of its configurations).

Example: python -m benchmark.engine.bench_gemm --shape llama-3-8b --m 1 8 32 64 --output-json out.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmark.engine import bench_gpu
from muxserve.engine.model_config import ModelSpec


def layer_shapes(spec: ModelSpec) -> dict[str, tuple[int, int]]:
    """(N, K) of each linear layer of one decoder layer."""
    h = spec.hidden_size
    return {"qkv": (spec.q_size + 2 * spec.kv_size, h), "o": (h, spec.q_size),
            "gate_up": (2 * spec.intermediate_size, h), "down": (h, spec.intermediate_size)}


def graph_time_us(fn, reps: int = 20) -> float:
    """Median GPU microseconds of one replay of a graph that runs ``fn`` once."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    times.sort()
    return times[len(times) // 2]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bench_gpu.add_shape_argument(p)
    p.add_argument("--m", type=int, nargs="+", default=[1, 8, 32, 64], help="rows of x (decode batch sizes)")
    p.add_argument("--layers", type=int, help="weights per shape (default: the model's layer count)")
    p.add_argument("--output-json", type=Path, help="write the figures here")
    args = p.parse_args(argv)
    folder, spec = bench_gpu.cuda_shape(p, args.shape)
    from muxserve.engine import skinny_gemm

    layers = args.layers or spec.num_layers
    bw = bench_gpu.ceilings()["copy_bandwidth_GBps"]
    print(f"{torch.cuda.get_device_name(0)}; copy bandwidth {bw:.0f} GB/s; {layers} layers", flush=True)
    rows = []
    for name, (n, k) in layer_shapes(spec).items():
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(layers)]
        for m in args.m:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = F.linear(x, weights[0])
            row = {"layer": name, "n": n, "k": k, "m": m}
            for lib in ("cublas", "cublaslt"):
                torch.backends.cuda.preferred_blas_library(lib)
                row[lib] = graph_time_us(lambda: [F.linear(x, w) for w in weights]) / layers
            torch.backends.cuda.preferred_blas_library("cublas")
            best = None
            for cfg in skinny_gemm.candidate_configs(m, n, k):
                try:
                    out = skinny_gemm.gemm(x, weights[0], cfg)
                    t = graph_time_us(lambda: [skinny_gemm.gemm(x, w, cfg) for w in weights]) / layers
                except Exception as e:  # a configuration the GPU cannot run (shared memory): skip it
                    print(f"  skip {cfg}: {type(e).__name__}", flush=True)
                    continue
                err = (out.float() - ref.float()).abs().max().item()
                if best is None or t < best[0]:
                    best = (t, cfg, err)
            row["triton"], row["triton_config"], row["triton_max_err"] = best[0], str(best[1]), best[2]
            gb = n * k * 2 / 1e9
            for lib in ("cublas", "cublaslt", "triton"):
                row[f"{lib}_bw_frac"] = gb / (row[lib] * 1e-6) / bw
            rows.append(row)
            print(f"{name:8s} M={m:4d} N={n:6d} K={k:6d}: cublas {row['cublas']:7.1f} us "
                  f"({row['cublas_bw_frac']:.0%}), cublaslt {row['cublaslt']:7.1f} us ({row['cublaslt_bw_frac']:.0%}), "
                  f"triton {row['triton']:7.1f} us ({row['triton_bw_frac']:.0%}) {row['triton_config']} "
                  f"err {row['triton_max_err']:.3g}", flush=True)
        weights = None  # free this layer's copies before the next
        torch.cuda.empty_cache()
    if args.output_json:
        args.output_json.parent.mkdir(parents=True, exist_ok=True)
        args.output_json.write_text(json.dumps({"device": torch.cuda.get_device_name(0), "copy_gbps": bw,
                                                "shape": folder.name, "layers": layers, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
