#!/usr/bin/env python
"""Green contexts against MPS: one LLM's prefill next to another's decode steps on one GPU.

    python -m benchmark.engine.bench_green_contexts [--prefill-shape llama-3-8b] \\
        [--decode-shape llama-3.2-3b] [--splits 0.5 0.7 0.8 0.9] [--mps-dir /tmp/mps-gc]

The work of each side is the weight GEMMs of its model shape, layer by layer, in bf16 (q/k/v, o,
gate/up, down; attention and sampling left out, they are the same under every partitioning):
a **prefill** of ``--prefill-tokens`` tokens (compute bound; one layer's weights reused for
every layer) and **decode steps** at batch ``--decode-batch`` (bound by reading the weights;
every layer its own weights, so nothing stays in L2). Each side runs as a loop of steps, each
step timed from its launch to its end (wall clock, stream synchronized), for ``--duration-s``.

Configurations, each measured the same way:

- ``alone``: each side alone on the whole GPU (the reference of every slowdown);
- ``shared``: both in one process on two plain streams, no partitioning (the hardware schedules
  their blocks as they come);
- ``green <f>``: both in one process, the prefill on a ``torch.cuda.GreenContext`` of fraction
  ``f`` of the SMs and the decode on one of the rest (``GreenContext.create(num_sms=...)``,
  ``set_context()``, its ``Stream()``), one configuration per ``--splits`` entry;
- ``mps <f>``: two processes under an MPS daemon (``--mps-dir``; started and stopped here with
  scripts/start_mps.sh, which needs root), the prefill process at ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE``
  ``100 f`` and the decode process at the rest (MuxServe's runtimes), started together.

Per configuration: p50/p99 step latency of each side, prefill tokens/s and decode tokens/s, and
their slowdown against ``alone``. The **cost of changing a split**: for green contexts, the time
to create the two contexts of a new split and run a first step on them (in a running process);
for MPS, the time from starting a process at a new percentage to its first step (a percentage is
fixed for the life of an MPS client, so a new split is a new process).

Writes ``<output-dir>/green_contexts_<gpu>.json`` and ``.md`` (default benchmark/results/).
Needs a CUDA GPU and a PyTorch with green contexts (CUDA 12.4+ driver); without them it stops with
a usage error.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import statistics
import subprocess
import threading
import time
from pathlib import Path

import torch

from benchmark.engine import bench_gpu
from muxserve.engine.model_config import ModelSpec

REPO = Path(__file__).resolve().parents[2]


# -- the two workloads ---------------------------------------------------------------------------
def _shapes(spec: ModelSpec) -> list[tuple[int, int]]:
    h = spec.hidden_size
    return [(spec.q_size + 2 * spec.kv_size, h), (h, spec.q_size), (2 * spec.intermediate_size, h),
            (h, spec.intermediate_size)]


class Side:
    """One side's step: its tensors on the GPU and the GEMMs of one step."""

    def __init__(self, spec: ModelSpec, rows: int, distinct_layers: bool, layers: int | None, seed: int):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        self.layers = layers or spec.num_layers
        count = self.layers if distinct_layers else 1
        self.weights = [[torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
                         for n, k in _shapes(spec)] for _ in range(count)]
        h = spec.hidden_size
        self.x = torch.randn(rows, h, device="cuda", dtype=torch.bfloat16, generator=gen)
        self.q_in = torch.randn(rows, spec.q_size, device="cuda", dtype=torch.bfloat16, generator=gen)
        self.act = torch.randn(rows, spec.intermediate_size, device="cuda", dtype=torch.bfloat16, generator=gen)
        self.rows = rows

    def step(self) -> None:
        for i in range(self.layers):
            qkv, o, gate_up, down = self.weights[i % len(self.weights)]
            torch.nn.functional.linear(self.x, qkv)
            torch.nn.functional.linear(self.q_in, o)
            torch.nn.functional.linear(self.x, gate_up)
            torch.nn.functional.linear(self.act, down)


def _timed_loop(side: Side, stream: torch.cuda.Stream, duration_s: float, start: threading.Barrier | None,
                out: list[float], warmup: int = 2) -> None:
    """Steps on ``stream`` until ``duration_s`` after the barrier; wall time of each into ``out``."""
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            side.step()
        stream.synchronize()
        if start is not None:
            start.wait()
        end = time.perf_counter() + duration_s
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            side.step()
            stream.synchronize()
            out.append(time.perf_counter() - t0)


def _summary(times: list[float], tokens_per_step: int, alone: dict | None) -> dict:
    if not times:
        return {"steps": 0}
    ordered = sorted(times)
    p50 = statistics.median(ordered)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    busy = sum(times)
    out = {"steps": len(times), "p50_ms": 1e3 * p50, "p99_ms": 1e3 * p99,
           "tokens_per_s": tokens_per_step * len(times) / busy if busy else 0.0}
    if alone and alone.get("p50_ms"):
        out["slowdown_p50"] = out["p50_ms"] / alone["p50_ms"]
    return out


def run_pair(prefill: Side, decode: Side, streams: tuple[torch.cuda.Stream, torch.cuda.Stream],
             duration_s: float, contexts=(None, None)) -> tuple[list[float], list[float]]:
    """Both loops side by side, one thread each (``contexts``: green contexts made current in them)."""
    times: tuple[list[float], list[float]] = ([], [])
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def work(i: int) -> None:
        ctx, entered = contexts[i], False
        try:
            if ctx is not None:
                ctx.set_context()
                entered = True
            _timed_loop((prefill, decode)[i], streams[i], duration_s, barrier, times[i])
        except BaseException as e:  # surfaced in the main thread
            errors.append(e)
            barrier.abort()
        finally:
            if entered:
                ctx.pop_context()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return times


# -- green contexts ------------------------------------------------------------------------------
def green_context(num_sms: int):
    from torch.cuda.green_contexts import GreenContext

    try:
        return GreenContext.create(num_sms=num_sms, device_id=0)
    except TypeError:  # PyTorch releases whose create() takes positional arguments
        return GreenContext.create(num_sms, 0)


def green_stream(ctx) -> torch.cuda.Stream:
    """The stream of a green context: ``Stream()`` where PyTorch has it, else the stream that
    ``set_context()`` makes current (releases before ``Stream()`` switched to it)."""
    if hasattr(ctx, "Stream"):
        return ctx.Stream()
    ctx.set_context()
    try:
        return torch.cuda.current_stream()
    finally:
        ctx.pop_context()


def green_split(total_sms: int, fraction: float, granularity: int) -> tuple[int, int]:
    """SMs of the prefill and the decode context: ``fraction`` of the GPU for the prefill, the rest
    for the decode, both multiples of ``granularity`` (the driver hands SMs out in groups) and > 0."""
    pre = max(granularity, int(round(total_sms * fraction / granularity)) * granularity)
    pre = min(pre, total_sms - granularity)
    return pre, (total_sms - pre) // granularity * granularity


def measure_green(prefill: Side, decode: Side, fraction: float, total_sms: int, granularity: int,
                  duration_s: float) -> dict:
    t0 = time.perf_counter()
    pre_sms, dec_sms = green_split(total_sms, fraction, granularity)
    ctxs = (green_context(pre_sms), green_context(dec_sms))
    streams = tuple(green_stream(c) for c in ctxs)
    created = time.perf_counter() - t0
    # the cost of a new split: contexts created and a first step of each side run on them
    for side, ctx, stream in ((prefill, ctxs[0], streams[0]), (decode, ctxs[1], streams[1])):
        ctx.set_context()
        try:
            with torch.cuda.stream(stream):
                side.step()
            stream.synchronize()
        finally:
            ctx.pop_context()
    first_steps = time.perf_counter() - t0
    times = run_pair(prefill, decode, streams, duration_s, ctxs)
    return {"prefill_sms": pre_sms, "decode_sms": dec_sms, "change_split_s": {"create": created,
                                                                              "create_and_first_steps": first_steps},
            "times": times}


# -- MPS: two processes ----------------------------------------------------------------------------
def _mps_child(role: str, args: dict, start, results) -> None:
    """One side in its own process (under MPS by its environment): (role, wall clock when its first
    step ended, step times)."""
    torch.cuda.init()
    spec = ModelSpec.from_folder(Path(args["folder"]))
    side = Side(spec, args["rows"], args["distinct"], args["layers"], args["seed"])
    stream = torch.cuda.Stream()
    times: list[float] = []
    with torch.cuda.stream(stream):
        side.step()
    stream.synchronize()
    ready = time.time()
    start.wait()
    _timed_loop(side, stream, args["duration_s"], None, times, warmup=0)
    results.put((role, ready, times))


def measure_mps(mps_dir: Path, fraction: float, child_args: dict[str, dict], duration_s: float) -> dict:
    from muxserve.instance.mps import mps_env

    share = {"prefill": max(1, min(99, round(100 * fraction))), "decode": max(1, 100 - round(100 * fraction))}
    ctx = mp.get_context("spawn")
    start, results = ctx.Barrier(2), ctx.Queue()
    procs, started = [], {}
    saved = dict(os.environ)
    try:
        for role in ("prefill", "decode"):
            os.environ.update(mps_env(str(mps_dir), share[role]))  # inherited by the spawned child
            procs.append(ctx.Process(target=_mps_child, args=(role, child_args[role], start, results)))
            started[role] = time.time()
            procs[-1].start()
            os.environ.clear()
            os.environ.update(saved)
        got = {}
        for _ in procs:
            role, ready, times = results.get(timeout=600)
            got[role] = (ready - started[role], times)  # interpreter, torch, CUDA context, weights, first step
    finally:
        os.environ.clear()
        os.environ.update(saved)
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    return {"prefill_percent": share["prefill"], "decode_percent": share["decode"],
            "change_split_s": {"process_start_to_first_step": max(got[r][0] for r in got)},
            "times": (got["prefill"][1], got["decode"][1])}


def mps_script(name: str, mps_dir: Path) -> None:
    done = subprocess.run(["bash", str(REPO / "scripts" / name), str(mps_dir)], capture_output=True, text=True)
    print((done.stdout + done.stderr).strip(), flush=True)
    if done.returncode != 0:
        raise RuntimeError(f"scripts/{name} {mps_dir} failed (exit {done.returncode})")


# -- report ----------------------------------------------------------------------------------------
def markdown(doc: dict) -> str:
    lines = [f"# Green contexts vs MPS on {doc['device']}", "",
             f"Prefill: {doc['prefill']['shape']}, {doc['prefill']['tokens']} tokens; decode: "
             f"{doc['decode']['shape']}, batch {doc['decode']['batch']}; weight GEMMs in bf16 (attention "
             f"left out); {doc['duration_s']:g} s per configuration; {doc['total_sms']} SMs. torch "
             f"{doc['torch']}.", "",
             "| configuration | prefill SMs | decode SMs | prefill p50 ms | prefill p99 ms | prefill tok/s "
             "| decode p50 ms | decode p99 ms | decode tok/s | prefill slowdown | decode slowdown | change split s |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def f(x, nd=1):
        return "-" if x is None else f"{x:.{nd}f}"

    for row in doc["rows"]:
        p, d = row["prefill"], row["decode"]
        change = row.get("change_split_s") or {}
        cost = change.get("create_and_first_steps", change.get("process_start_to_first_step"))
        lines.append(f"| {row['name']} | {row.get('prefill_sms', '-')} | {row.get('decode_sms', '-')} | "
                     f"{f(p.get('p50_ms'), 2)} | {f(p.get('p99_ms'), 2)} | {f(p.get('tokens_per_s'), 0)} | "
                     f"{f(d.get('p50_ms'), 2)} | {f(d.get('p99_ms'), 2)} | {f(d.get('tokens_per_s'), 0)} | "
                     f"{f(p.get('slowdown_p50'), 2)} | {f(d.get('slowdown_p50'), 2)} | {f(cost, 3)} |")
    lines += ["", "Slowdown: p50 step latency over the side alone on the whole GPU. Change split: green "
              "contexts = creating the two contexts of the split and a first step on each, in the running "
              "process; MPS = starting a process at the new percentage until its first step."]
    for note in doc.get("notes", []):
        lines.append(f"- {note}")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmark.engine.bench_green_contexts",
                                description=__doc__.split("\n\n")[0],
                                epilog="See the module docstring for what each configuration measures.")
    p.add_argument("--prefill-shape", default="llama-3-8b",
                   help="model shape of the prefill side: a folder under examples/shapes or any folder with a "
                        "config.json (default: llama-3-8b)")
    p.add_argument("--decode-shape", default="llama-3.2-3b",
                   help="model shape of the decode side, as --prefill-shape (default: llama-3.2-3b)")
    p.add_argument("--prefill-tokens", type=int, default=2048, help="tokens of one prefill step (default: 2048)")
    p.add_argument("--decode-batch", type=int, default=32, help="sequences of one decode step (default: 32)")
    p.add_argument("--layers", type=int, default=None,
                   help="layers per step for both sides (default: each shape's own layer count)")
    p.add_argument("--splits", type=float, nargs="+", default=[0.5, 0.7, 0.8, 0.9],
                   help="fractions of the SMs for the prefill side, the rest for the decode side "
                        "(default: 0.5 0.7 0.8 0.9)")
    p.add_argument("--duration-s", type=float, default=5.0,
                   help="seconds each configuration runs its two loops (default: 5)")
    p.add_argument("--sm-granularity", type=int, default=8,
                   help="SMs per group the driver hands green contexts (default: 8, Hopper's; a split is "
                        "rounded to it)")
    p.add_argument("--mps-dir", type=Path, default=None,
                   help="also measure each split under MPS with two processes: the MPS daemon's directory "
                        "(started and stopped here with scripts/start_mps.sh, which needs root); default: no MPS")
    p.add_argument("--skip-green", action="store_true", help="measure alone, shared and MPS only")
    p.add_argument("--output-dir", type=Path, default=REPO / "benchmark" / "results",
                   help="where green_contexts_<gpu>.json and .md go (default: benchmark/results)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU (green contexts and MPS partition a GPU's SMs)")
    from torch.cuda import green_contexts

    if not args.skip_green and not getattr(green_contexts, "SUPPORTED", False):
        p.error(f"this PyTorch ({torch.__version__}) was built without CUDA green contexts; "
                "use --skip-green to measure MPS only")
    if any(not 0 < s < 1 for s in args.splits):
        p.error(f"--splits are fractions strictly between 0 and 1, got {args.splits}")
    args.prefill_folder = bench_gpu.parsed_shape(p, args.prefill_shape)
    args.decode_folder = bench_gpu.parsed_shape(p, args.decode_shape)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    raw: dict[str, tuple] = {}  # configuration -> (prefill times, decode times, details)
    notes = []
    if args.mps_dir is not None:
        # first, before this process holds a CUDA context of its own next to the MPS server
        child = {"prefill": {"folder": str(args.prefill_folder), "rows": args.prefill_tokens, "distinct": False,
                             "layers": args.layers, "seed": 0, "duration_s": args.duration_s},
                 "decode": {"folder": str(args.decode_folder), "rows": args.decode_batch, "distinct": True,
                            "layers": args.layers, "seed": 1, "duration_s": args.duration_s}}
        mps_script("start_mps.sh", args.mps_dir)
        try:
            for frac in args.splits:
                got = measure_mps(args.mps_dir, frac, child, args.duration_s)
                raw[f"mps {frac:g}"] = (*got.pop("times"), got)
                print(f"mps {frac:g}: done", flush=True)
        finally:
            mps_script("stop_mps.sh", args.mps_dir)
    else:
        notes.append("MPS not measured (no --mps-dir)")
    device = torch.cuda.get_device_name(0)
    total_sms = torch.cuda.get_device_properties(0).multi_processor_count
    pre_spec, dec_spec = ModelSpec.from_folder(args.prefill_folder), ModelSpec.from_folder(args.decode_folder)
    prefill = Side(pre_spec, args.prefill_tokens, False, args.layers, seed=0)
    decode = Side(dec_spec, args.decode_batch, True, args.layers, seed=1)
    print(f"{device}: {total_sms} SMs; prefill {args.prefill_folder.name} x {args.prefill_tokens} tokens, "
          f"decode {args.decode_folder.name} at batch {args.decode_batch}", flush=True)
    solo = []
    for side in (prefill, decode):
        times: list[float] = []
        _timed_loop(side, torch.cuda.Stream(), args.duration_s, None, times)
        solo.append(times)
    raw = {"alone": (*solo, {}),
           "shared": (*run_pair(prefill, decode, (torch.cuda.Stream(), torch.cuda.Stream()), args.duration_s), {}),
           **raw}
    if not args.skip_green:
        for frac in args.splits:
            got = measure_green(prefill, decode, frac, total_sms, args.sm_granularity, args.duration_s)
            raw[f"green {frac:g}"] = (*got.pop("times"), got)
    order = {"alone": 0, "shared": 1, "green": 2, "mps": 3}
    rows = []
    alone = {"prefill": _summary(raw["alone"][0], args.prefill_tokens, None),
             "decode": _summary(raw["alone"][1], args.decode_batch, None)}
    for name in sorted(raw, key=lambda n: (order[n.split()[0]], n)):
        pre_times, dec_times, extra = raw[name]
        row = {"name": name, **extra, "prefill": _summary(pre_times, args.prefill_tokens, alone["prefill"]),
               "decode": _summary(dec_times, args.decode_batch, alone["decode"])}
        rows.append(row)
        print(f"{name:12s} prefill p50 {row['prefill'].get('p50_ms', 0):8.2f} ms, decode p50 "
              f"{row['decode'].get('p50_ms', 0):7.2f} ms p99 {row['decode'].get('p99_ms', 0):7.2f} ms", flush=True)
    doc = {"device": device, "total_sms": total_sms, "torch": torch.__version__, "duration_s": args.duration_s,
           "prefill": {"shape": args.prefill_folder.name, "tokens": args.prefill_tokens},
           "decode": {"shape": args.decode_folder.name, "batch": args.decode_batch},
           "sm_granularity": args.sm_granularity, "rows": rows, "notes": notes}
    key = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
    args.output_dir.mkdir(parents=True, exist_ok=True)
    out = args.output_dir / f"green_contexts_{key}"
    Path(f"{out}.json").write_text(json.dumps(doc, indent=1) + "\n")
    Path(f"{out}.md").write_text(markdown(doc))
    print(f"wrote {out}.json and {out}.md", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
