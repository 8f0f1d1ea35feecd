#!/usr/bin/env python
"""Decode attention alone: time per layer for each launch setting, next to the copy bandwidth.

For a model shape (kv heads, head size, layers) it fills a KV pool with random pages, gives every
sequence of a batch random pages of every layer (as the allocator does), and replays in one CUDA
graph ``decode_attention`` over all layers (split-context kernel and its combine), for each
launch setting (tokens per iteration, warps, stages) and grid fill (context splits so that the
grid covers the GPU ``fill`` times). It prints microseconds per layer and the fraction of the
copy bandwidth that the KV bytes read per layer make, and the largest difference from the
default setting's output.

Example: python -m benchmark.engine.bench_decode_attention --shape llama-3-8b --batches 1 8 32 64 --ctx 512 2048
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from benchmark.engine import bench_gpu
from benchmark.engine.bench_gemm import graph_time_us
from muxserve.engine.kv_cache import KVLayout, KVPool

LAUNCHES = [(32, 4, 2), (32, 4, 3), (32, 4, 4), (64, 4, 2), (64, 4, 3), (64, 4, 4), (64, 8, 3), (128, 4, 2),
            (128, 8, 2), (128, 8, 3)]
FILLS = [1, 2, 4, 8]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bench_gpu.add_shape_argument(p)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64], help="decode batch sizes")
    p.add_argument("--ctx", type=int, nargs="+", default=[512, 2048], help="cached tokens per sequence")
    p.add_argument("--output-json", type=Path, help="write the figures here")
    args = p.parse_args(argv)
    folder, spec = bench_gpu.cuda_shape(p, args.shape)
    from muxserve.engine.attention import triton_kernels as K

    layers, heads, d = spec.num_layers, spec.num_kv_heads, spec.head_dim
    layout = KVLayout(layers, heads, d, torch.bfloat16)  # the engine's 16 KiB pages, any head size
    t = layout.page_tokens
    bw = bench_gpu.ceilings()["copy_bandwidth_GBps"]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"{torch.cuda.get_device_name(0)}; copy bandwidth {bw:.0f} GB/s; {sms} SMs; {layers} layers, "
          f"{heads} kv heads, head_dim {d}, {t} tokens per page", flush=True)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for ctx in args.ctx:
        for b in args.batches:
            blocks = -(-(ctx + 1) // t)
            num_pages = b * blocks * layers * heads
            # the pool as the engine sees it: strided by the page size
            kv = KVPool.allocate(num_pages * layout.page_bytes, "cuda").view(layout).normal_()
            tables = torch.randperm(num_pages, generator=gen).to(torch.int32).view(b, blocks, layers * heads).cuda()
            slots = torch.arange(b, device="cuda")
            seq_lens = torch.full((b,), ctx + 1, device="cuda", dtype=torch.int32)
            q = torch.randn(b, spec.num_heads, d, device="cuda", dtype=torch.bfloat16)
            scale = d**-0.5

            def run(launch, splits):
                return [K.decode_attention(q, kv, tables, slots, seq_lens, layer, heads, scale, splits, launch=launch)
                        for layer in range(layers)]

            default_splits = K.decode_splits(b, heads, sms)
            ref = run(None, default_splits)[0].float()
            gb = b * (ctx + 1) * heads * 2 * d * 2 / 1e9
            default_us = graph_time_us(lambda: run(None, default_splits)) / layers
            results = []
            for launch in LAUNCHES:
                for fill in FILLS:
                    splits = K.decode_splits(b, heads, sms, max_splits=32, fill=fill)
                    try:
                        out = run(launch, splits)[0].float()
                        us = graph_time_us(lambda: run(launch, splits)) / layers
                    except Exception as e:  # a setting the GPU cannot run (shared memory): skip it
                        print(f"  skip {launch} fill {fill}: {type(e).__name__}", flush=True)
                        continue
                    results.append({"launch": launch, "fill": fill, "splits": splits, "us": us,
                                    "max_diff": (out - ref).abs().max().item()})
            results.sort(key=lambda r: r["us"])
            best = results[0]
            row = {"batch": b, "ctx": ctx, "kv_gb_per_layer": gb, "default_us": default_us,
                   "default_splits": default_splits, "default_bw_frac": gb / (default_us * 1e-6) / bw,
                   "best": best, "best_bw_frac": gb / (best["us"] * 1e-6) / bw, "top": results[:6]}
            rows.append(row)
            print(f"b={b:3d} ctx={ctx:5d}: default {default_us:6.1f} us ({row['default_bw_frac']:.0%}, "
                  f"{default_splits} splits); best {best['us']:6.1f} us ({row['best_bw_frac']:.0%}) "
                  f"launch {best['launch']} fill {best['fill']} ({best['splits']} splits), "
                  f"max diff {max(r['max_diff'] for r in results):.3g}", flush=True)
            for r in results[1:6]:
                print(f"      {r['us']:6.1f} us launch {r['launch']} fill {r['fill']} ({r['splits']} splits)")
            kv = tables = None  # free this pool before the next one
            torch.cuda.empty_cache()
    if args.output_json:
        args.output_json.parent.mkdir(parents=True, exist_ok=True)
        args.output_json.write_text(json.dumps({"device": torch.cuda.get_device_name(0), "copy_gbps": bw,
                                                "shape": folder.name, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
