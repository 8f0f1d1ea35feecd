#!/usr/bin/env python
"""Markdown tables from bench_gpu.py JSON files, with the performance targets marked.

Example:
    python -m benchmark.engine.report_gpu benchmark/results/engine_gpu_h100_*.json -o benchmark/results/engine_gpu.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DECODE_TARGET = 1.3  # x the memory floor, up to batch 32
PREFILL_TARGET = 0.60  # of the measured bf16 matmul peak
E2E_TARGET = 3.0  # x transformers at batch 32


def ms(x, digits: int = 2) -> str:
    return "-" if x is None else f"{x * 1e3:.{digits}f}"


def _decode_points(ours: dict, table: str):
    """(batch, context, floor seconds, entry) for each "BxC" decode point of ``ours[table]``."""
    for key, entry in ours[table].items():
        b, c = (int(x) for x in key.split("x"))
        yield b, c, ours["floor_s"][key], entry


def section(d: dict) -> list[str]:
    env, ceil, ours, hf = d["environment"], d["ceilings"], d["muxserve"], d.get("transformers", {})
    lines = [f"## {d['shape']} ({d['dtype']}, random weights)", "",
             f"- device: {env['device_name']}, driver {env['driver']}; torch {env['torch']} (CUDA {env['cuda']}), "
             f"triton {env['triton']}, transformers {env['transformers']}, python {env['python']}; date {d['date']}",
             f"- measured ceilings in the same run: copy bandwidth {ceil['copy_bandwidth_GBps']:.0f} GB/s "
             f"(read + write), bf16 8192^3 matmul {ceil['bf16_matmul_TFLOPs']:.0f} TFLOP/s",
             f"- weights read per decode step {ours['weight_bytes'] / 1e9:.2f} GB (input embedding not counted), "
             f"KV {ours['kv_bytes_per_token'] / 1024:.0f} KiB per cached token",
             f"- command: `{d['command']}`", "",
             "### Decode step latency (ms; muxserve = wall time of one engine step with CUDA graphs, "
             "host work and sampling included)", "",
             "| batch | context | muxserve | floor | muxserve / floor | target (<= 1.3x up to batch 32) "
             "| transformers | transformers / muxserve |",
             "|---:|---:|---:|---:|---:|---|---:|---:|"]
    for b, c, floor, t in _decode_points(ours, "decode_s"):
        ratio = t / floor
        target = ("met" if ratio <= DECODE_TARGET else "missed") if b <= 32 else "n/a"
        h = hf.get("decode_s", {}).get(f"{b}x{c}")
        lines.append(f"| {b} | {c} | {ms(t)} | {ms(floor)} | {ratio:.2f}x | {target} | {ms(h)} | "
                     f"{'-' if h is None else f'{h / t:.1f}x'} |")
    if ours.get("decode_breakdown"):
        lines += ["", "### Decode step breakdown (ms, medians over the steps of each point; `--step-breakdown`)", "",
                  "Host prep: `ModelRunner.step` up to `graph.replay()` (page tables, staging the inputs, "
                  "their copy); graph: GPU time of the replay alone (CUDA events); after graph: token ids "
                  "back or sampling, synchronization (wall - prep - graph); outside graph: wall - graph.", "",
                  "| batch | context | wall | host prep | graph (GPU) | after graph | outside graph | replay call "
                  "| graph / floor | wall / floor |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for b, c, floor, part in _decode_points(ours, "decode_breakdown"):
            lines.append(f"| {b} | {c} | {ms(part['wall_s'], 3)} | {ms(part['prep_s'], 3)} | "
                         f"{ms(part['replay_gpu_s'], 3)} | {ms(part['sample_s'], 3)} | {ms(part['host_s'], 3)} | "
                         f"{ms(part['launch_s'], 3)} | {part['replay_gpu_s'] / floor:.2f}x | "
                         f"{part['wall_s'] / floor:.2f}x |")
    if ours.get("decode_eager_s"):
        lines += ["", "Without CUDA graphs (enforce_eager): " + ", ".join(
            f"batch x context {k}: {ms(v)} ms (graphs {ms(ours['decode_s'].get(k))} ms)"
            for k, v in ours["decode_eager_s"].items())]
    if ours.get("decode_sampled_s"):
        points = list(next(iter(ours["decode_sampled_s"].values())))
        lines += ["", "### Decode steps with sampling (every request of the batch; ms)", "",
                  "| sampling | " + " | ".join(f"batch {p.replace('x', ', context ')}" for p in points) + " |",
                  "|---|" + "---:|" * len(points),
                  "| greedy | " + " | ".join(ms(ours["decode_s"].get(p)) for p in points) + " |"]
        for name, times in ours["decode_sampled_s"].items():
            lines.append(f"| {name} | " + " | ".join(ms(times.get(p)) for p in points) + " |")
    lines += ["", "### Prefill", "",
              "| prompts x tokens | muxserve ms | tokens/s | TFLOP/s | of matmul peak | target (>= 60 %) "
              "| transformers ms |", "|---|---:|---:|---:|---:|---|---:|"]
    for key, t in ours["prefill_s"].items():
        tf = ours["prefill_TFLOPs"][key]
        frac = tf / ceil["bf16_matmul_TFLOPs"] if ceil["bf16_matmul_TFLOPs"] else 0.0
        lines.append(f"| {key} | {ms(t)} | {ours['prefill_tokens_per_s'][key]:.0f} | {tf:.0f} | {frac:.0%} | "
                     f"{'met' if frac >= PREFILL_TARGET else 'missed'} | {ms(hf.get('prefill_s', {}).get(key))} |")
    if "e2e" in ours:
        e, he = ours["e2e"], hf.get("e2e")
        lines += ["", "### Offline throughput (ShareGPT-like lengths, greedy, ignore_eos)", "",
                  "| system | requests | elapsed s | output tok/s |", "|---|---:|---:|---:|",
                  f"| muxserve (max_num_seqs {e['max_num_seqs']}) | {e['requests']} | {e['elapsed_s']:.2f} | "
                  f"{e['output_tokens_per_s']:.0f} |"]
        if "e2e_same_as_hf" in ours:
            s = ours["e2e_same_as_hf"]
            lines.append(f"| muxserve, only transformers' requests | {s['requests']} | {s['elapsed_s']:.2f} | "
                         f"{s['output_tokens_per_s']:.0f} |")
        if he:
            lines.append(f"| transformers generate, batch {he['batch_size']} | {he['requests']} | "
                         f"{he['elapsed_s']:.2f} | {he['output_tokens_per_s']:.0f} |")
            speed = e["output_tokens_per_s"] / he["output_tokens_per_s"]
            lines += ["", f"muxserve / transformers (batch 32): {speed:.1f}x output tokens/s "
                      f"(target >= {E2E_TARGET:.0f}x: {'met' if speed >= E2E_TARGET else 'missed'}). "
                      f"Mean prompt {e['mean_prompt_len']}, mean output {e['mean_output_len']} tokens; "
                      f"preemptions {e['preemptions']}. Transformers ran the first {he['requests']} of the "
                      "same requests as one batch (each of its batches is independent, so its throughput on all "
                      "of them is that of such batches); every row of its batch generates the batch's longest "
                      "output and only each request's own tokens count."]
    return lines + [""]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("files", type=Path, nargs="+")
    p.add_argument("-o", "--output", type=Path)
    args = p.parse_args(argv)
    lines = ["# Engine on one GPU: muxserve (Triton backend, CUDA graphs) vs its floors and transformers", ""]
    for f in args.files:
        lines += section(json.loads(f.read_text()))
    text = "\n".join(lines)
    print(text)
    if args.output:
        args.output.write_text(text)


if __name__ == "__main__":
    main()
