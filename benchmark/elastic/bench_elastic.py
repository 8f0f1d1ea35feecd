#!/usr/bin/env python
"""Elastic memory on one device: what offloading and waking an LLM cost.

Once per run:
* **baseline**: a plain pinned host -> device copy (torch, from ``pin_memory=True`` memory) of
  ``--copy-bytes``, the bandwidth the wake is measured against;
* **copy in**: ``host_copy.copy_in`` of the same size from a pinned host copy into a mapped
  device range (chunks of ``--chunk-bytes`` on a copy stream);
* **map / unmap**: 64 MiB as one chunk (weights' way) and as 32 granules (the KV pool's way),
  and a remap (unmap + map) of one 64 MiB chunk.

Per random-weight shape (``examples/shapes/<name>/config.json``, bf16; the bytes follow
``weights.plan_layout``, filled with a pattern since timing does not depend on values):
* host copy: creation, fill and pinning (once per LLM at start);
* **wake**: ``map_and_copy_in`` (map the range chunk by chunk just ahead of the copy), first byte
  issued to last byte landed, checked against the host copy; **offload**: unmap every chunk,
  nothing copied back; the device memory the LLM still holds when offloaded (target <= 64 MiB);
* a second process attached to the range over the fd socket (as a runtime is) follows each wake
  and offload: the time its sync takes (import and map, or unmap, of every chunk).

End to end (``ttft.py``): one elastic LLM of ``--ttft-shapes`` (random weights) in a real instance
(FlexStore, runtimes, CUDA graphs): time to first token of a request that wakes it, against the
same request while resident, and the tokens of both (equal: graphs replayed over woken weights).

Targets (``targets`` in the JSON, PASS/FAIL in the markdown): an offloaded LLM holds <= 64 MiB of
device memory; a wake copies at >= 80 % of the plain pinned copy measured in the same run; an 8B
LLM's first token after a wake within 0.5 s.

Example (GPU):  python -m benchmark.elastic.bench_elastic
Example (CPU):  python -m benchmark.elastic.bench_elastic --device cpu --shapes llama-3.2-1b
Writes ``benchmark/results/elastic_<device>.json`` and ``.md`` unless told otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from importlib import metadata
from pathlib import Path

import torch

from muxserve.engine.model_config import ModelSpec
from muxserve.flexstore.auth import SECRET_ENV, new_secret
from muxserve.flexstore.device_memory import RangeServer, create_range
from muxserve.flexstore.fd_passing import FdServer
from muxserve.flexstore.host_copy import HostCopy, copy_in, map_and_copy_in
from muxserve.flexstore.weights import meta_model, plan_layout

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "benchmark" / "results"
SHAPES = REPO / "examples" / "shapes"
MiB = 1 << 20


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (the H200) or cpu (shared-memory ranges)")
    p.add_argument("--shapes", nargs="+", default=None,
                   help="folders of examples/shapes (default: llama-3.2-1b llama-3-8b qwen2.5-14b; on cpu the 1B only)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="weight dtype of the shapes (default: bfloat16)")
    p.add_argument("--granule-bytes", type=int, default=2 * MiB,
                   help="bytes mapped or unmapped at a time (default: 2 MiB, CUDA's granularity)")
    p.add_argument("--chunk-bytes", type=int, default=64 * MiB, help="bytes per host-to-device copy (default: 64 MiB)")
    p.add_argument("--map-granules", type=int, default=256, help="granules per mapped chunk of weights")
    p.add_argument("--copy-bytes", type=int, default=1 << 30, help="size of the bandwidth measurements")
    p.add_argument("--repeats", type=int, default=3, help="offload + wake cycles per shape")
    p.add_argument("--no-runtime", action="store_true", help="skip the attached second process")
    p.add_argument("--ttft-shapes", nargs="*", default=None,
                   help="shapes whose TTFT after a wake is measured in a real instance (default: llama-3-8b; on cpu "
                        "a tiny Llama; none: skip)")
    p.add_argument("--prompt-len", type=int, default=None, help="prompt tokens of the TTFT request (default: 512; "
                                                                "cpu: 64)")
    p.add_argument("--output-len", type=int, default=16, help="tokens the TTFT request generates (default: 16)")
    p.add_argument("--kv-cache-bytes", type=int, default=4 << 30, help="KV room of the TTFT instance (default: 4 GiB; "
                                                                       "cpu: 64 MiB)")
    p.add_argument("--output-json", type=Path, default=None, help="write the figures as JSON here")
    p.add_argument("--output-md", type=Path, default=None, help="write the figures as a markdown table here")
    p.add_argument("--attached", nargs=2, metavar=("DESCRIPTOR", "SOCKET"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


# -- the attached process ----------------------------------------------------------------------
def attached_main(descriptor_json: str, socket_path: str) -> None:
    """A runtime stand-in: on each 'sync' line, follow the owner's mappings and report the time."""
    import msgspec

    from muxserve.flexstore.device_memory import RangeDescriptor, attach_range, sync_range

    rng = attach_range(msgspec.json.decode(descriptor_json, type=RangeDescriptor))
    secret = os.environ[SECRET_ENV]
    for line in sys.stdin:
        if line.strip() != "sync":
            break
        began = time.perf_counter()
        sync_range(rng, socket_path, secret)
        seconds = time.perf_counter() - began
        print(json.dumps({"seconds": seconds, "mapped_bytes": rng.mapped_bytes}), flush=True)
    rng.close()


class Attached:
    """The owner's handle on the attached process."""

    def __init__(self, rng, socket_path: str, secret: str):
        import msgspec

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmark.elastic.bench_elastic", "--attached",
             msgspec.json.encode(rng.descriptor).decode(), socket_path],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO,
            env={**os.environ, SECRET_ENV: secret})

    def sync(self) -> dict:
        self.proc.stdin.write("sync\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the attached process exited with {self.proc.wait()}")
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


# -- measurements ------------------------------------------------------------------------------
def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_used(device: torch.device) -> int:
    """Device memory in use outside torch's caching allocator (all processes)."""
    free, total = torch.cuda.mem_get_info(device)
    return total - free - torch.cuda.memory_reserved(device)


def plain_copy_gbps(device: torch.device, nbytes: int, repeats: int) -> float:
    """The baseline: a torch copy from pinned host memory (on CPU: memory to memory)."""
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")
    src.fill_(1)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    best = 0.0
    for _ in range(repeats + 1):  # the first is a warm-up
        sync_device(device)
        began = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        sync_device(device)
        best = max(best, nbytes / (time.perf_counter() - began) / 1e9)
    return best


def map_unmap_times(device: torch.device, granule: int, repeats: int = 10) -> dict:
    size = 64 * MiB
    count = size // granule
    rng = create_range(f"bench-map-{uuid.uuid4().hex[:8]}", size, device, granule)
    try:
        times: dict[str, list[float]] = {k: [] for k in ("map_64mib_s", "unmap_64mib_s", "map_32_granules_s",
                                                          "unmap_32_granules_s", "remap_64mib_s")}
        for _ in range(repeats):
            times["map_64mib_s"].append(_timed(lambda: rng.map(0, count)))
            times["unmap_64mib_s"].append(_timed(lambda: rng.unmap(0)))
            times["map_32_granules_s"].append(_timed(lambda: rng.map_granules(list(range(count)))))
            times["unmap_32_granules_s"].append(_timed(lambda: rng.unmap_granules(list(range(count)))))
            rng.map(0, count)
            times["remap_64mib_s"].append(_timed(lambda: (rng.unmap(0), rng.map(0, count))))
            rng.unmap(0)
        return {k: statistics.median(v) for k, v in times.items()}
    finally:
        rng.close()


def _timed(fn) -> float:
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


def copy_in_gbps(device: torch.device, nbytes: int, granule: int, chunk_bytes: int, repeats: int) -> float:
    tag = uuid.uuid4().hex[:8]
    host = HostCopy.create(f"bench-host-{tag}", nbytes)
    rng = create_range(f"bench-copy-{tag}", -(-nbytes // granule) * granule, device, granule)
    try:
        host.tensor.fill_(3)
        if device.type == "cuda":
            host.pin()
        rng.map_all(256)
        return max(copy_in(rng.tensor, host.tensor, chunk_bytes).gb_per_s for _ in range(repeats + 1))
    finally:
        rng.close()
        host.close()


def weight_bytes(shape: str, dtype: torch.dtype) -> int:
    spec = ModelSpec.from_folder(SHAPES / shape)
    return plan_layout(meta_model(spec, dtype))[1]


def fill_pattern(host: HostCopy, chunk: int = 64 * MiB) -> None:
    """Distinct bytes per chunk (a random block plus the chunk number), quickly."""
    block = torch.randint(0, 256, (chunk,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for i, a in enumerate(range(0, host.nbytes, chunk)):
        b = min(a + chunk, host.nbytes)
        torch.add(block[: b - a], i % 251, out=host.tensor[a:b])


def check_sample(rng, host: HostCopy) -> bool:
    n = host.nbytes
    spots = [(0, MiB), (n // 2, n // 2 + MiB), (max(0, n - MiB), n)]
    return all(torch.equal(rng.tensor[a:b].cpu(), host.tensor[a:b]) for a, b in spots)


def bench_shape(shape: str, args, device: torch.device, server: RangeServer, socket_path: str, secret: str) -> dict:
    dtype = getattr(torch, args.dtype)
    nbytes = weight_bytes(shape, dtype)
    granules = -(-nbytes // args.granule_bytes)
    tag = uuid.uuid4().hex[:8]
    out = {"shape": shape, "dtype": args.dtype, "weight_bytes": nbytes, "granules": granules}
    began = time.perf_counter()
    host = HostCopy.create(f"bench-w-{tag}", nbytes)
    fill_pattern(host)
    out["host_fill_s"] = time.perf_counter() - began
    if device.type == "cuda":
        out["pin_s"] = _timed(host.pin)
    rng = create_range(f"bench-r-{tag}", granules * args.granule_bytes, device, args.granule_bytes)
    server.add(rng)
    attached = None if args.no_runtime else Attached(rng, socket_path, secret)
    try:
        if attached:
            attached.sync()  # attached before the first wake, as runtimes are
        sync_device(device)
        before = device_used(device) if device.type == "cuda" else 0
        wake, offload, runtime_wake, runtime_offload, checks, held = [], [], [], [], [], []
        for _ in range(args.repeats):
            report = map_and_copy_in(rng, host.tensor, args.map_granules, args.chunk_bytes)
            wake.append(report.seconds)
            checks.append(check_sample(rng, host))
            if attached:
                runtime_wake.append(attached.sync()["seconds"])
            offload.append(_timed(rng.unmap_all))
            if attached:
                runtime_offload.append(attached.sync()["seconds"])
            sync_device(device)
            held.append(device_used(device) - before if device.type == "cuda" else rng.allocated_bytes())
        out.update(wake_s=wake, wake_gbps=nbytes / min(wake) / 1e9, offload_s=offload, bytes_checked=all(checks),
                   held_when_offloaded_bytes=max(held), runtime_sync_wake_s=runtime_wake,
                   runtime_sync_offload_s=runtime_offload, map_chunks=-(-granules // args.map_granules))
        return out
    finally:
        if attached:
            attached.close()
        server.ranges.pop(rng.name, None)
        rng.close()
        host.close()


def environment(device: torch.device) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "host": platform.node(),
           "cpu": platform.processor() or platform.machine()}
    try:
        env["cuda-bindings"] = metadata.version("cuda-bindings")
    except metadata.PackageNotFoundError:
        env["cuda-bindings"] = None
    if device.type == "cuda":
        env.update(device=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                   driver=_driver_version(), device_memory_bytes=torch.cuda.get_device_properties(device).total_memory)
    else:
        env["device"] = "cpu (/dev/shm)"
    return env


def _driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired, IndexError):
        return None


def markdown(result: dict) -> str:
    env, base = result["environment"], result["baseline"]
    lines = [f"# Elastic memory on {env['device']}", "",
             f"`{result['command']}` ({result['date']}; torch {env['torch']}, cuda-bindings {env['cuda-bindings']}"
             + (f", CUDA {env.get('cuda')}, driver {env.get('driver')}" if "cuda" in env else "") + ")", "",
             f"- plain copy ({'pinned host -> device' if 'cuda' in env else 'memory to memory'}): "
             f"**{base['plain_copy_gbps']:.1f} GB/s**; "
             f"copy in through the device memory layer: **{base['copy_in_gbps']:.1f} GB/s** "
             f"({base['copy_in_gbps'] / base['plain_copy_gbps']:.0%})",
             "- map / unmap of 64 MiB: one chunk {map_64mib_s:.2e} / {unmap_64mib_s:.2e} s; 32 granules "
             "{map_32_granules_s:.2e} / {unmap_32_granules_s:.2e} s; remap of one chunk {remap_64mib_s:.2e} s"
             .format(**result["map_unmap"]), "",
             "| shape | weights | wake (best) | wake GB/s | offload (best) | held offloaded | runtime sync wake / "
             "offload | bytes ok |", "|---|---|---|---|---|---|---|---|"]
    for m in result["models"]:
        rw = f"{min(m['runtime_sync_wake_s']) * 1e3:.1f} / {min(m['runtime_sync_offload_s']) * 1e3:.1f} ms" \
            if m["runtime_sync_wake_s"] else "-"
        lines.append(f"| {m['shape']} | {m['weight_bytes'] / 2**30:.2f} GiB | {min(m['wake_s']) * 1e3:.0f} ms | "
                     f"{m['wake_gbps']:.1f} | {min(m['offload_s']) * 1e3:.1f} ms | "
                     f"{m['held_when_offloaded_bytes'] / MiB:.1f} MiB | {rw} | {m['bytes_checked']} |")
    for t in result.get("ttft", []):
        lines.append("")
        lines.append(f"- {t['shape']} ({t['dtype']}, prompt {t['prompt_len']}, {t['output_len']} tokens): "
                     f"TTFT resident {statistics.median(t['ttft_resident_s']) * 1e3:.0f} ms, after a wake "
                     f"{t['ttft_after_wake_median_s'] * 1e3:.0f} ms (wake {min(t['wake_s']) * 1e3:.0f} ms, copy "
                     f"{min(t['wake_copy_s']) * 1e3:.0f} ms of {t['wake_bytes'] / 2**30:.2f} GiB; offload "
                     f"{min(t['offload_s']) * 1e3:.1f} ms); tokens equal: {t['tokens_equal']}")
    if result.get("targets"):
        lines += ["", "| target | value | |", "|---|---|---|"]
        for row in result["targets"]:
            value = row["value"] if isinstance(row["value"], bool) else f"{row['value']:.3g}"
            lines.append(f"| {row['what']} | {value} | {'PASS' if row['ok'] else 'FAIL'} |")
    return "\n".join(lines) + "\n"


def ttft_runs(args, device: torch.device) -> list[dict]:
    from benchmark.elastic import ttft

    cpu = device.type == "cpu"
    shapes = args.ttft_shapes if args.ttft_shapes is not None else (["tiny"] if cpu else ["llama-3-8b"])
    out = []
    with tempfile.TemporaryDirectory(prefix="bench-elastic-shapes-") as root:
        for shape in shapes:
            folder = ttft.tiny_shape(Path(root), SHAPES / "llama-3.2-1b") if shape == "tiny" else SHAPES / shape
            out.append(ttft.measure(folder, "cpu" if cpu else "cuda", "float32" if cpu else args.dtype,
                                    args.prompt_len or (64 if cpu else 512), args.output_len, args.repeats,
                                    64 * MiB if cpu else args.kv_cache_bytes))
    return out


def targets(result: dict) -> list[dict]:
    """The proof's targets against this run's figures."""
    base = result["baseline"]["plain_copy_gbps"]
    rows = []
    for m in result["models"]:
        rows.append({"what": f"{m['shape']}: device memory held offloaded <= 64 MiB",
                     "value": m["held_when_offloaded_bytes"] / MiB,
                     "ok": m["held_when_offloaded_bytes"] <= 64 * MiB})
        rows.append({"what": f"{m['shape']}: wake at >= 80 % of the plain copy ({base:.1f} GB/s)",
                     "value": m["wake_gbps"] / base, "ok": m["wake_gbps"] >= 0.8 * base})
    for t in result.get("ttft", []):
        if "8b" in t["shape"].lower():
            rows.append({"what": f"{t['shape']}: first token after a wake <= 0.5 s",
                         "value": t["ttft_after_wake_median_s"], "ok": t["ttft_after_wake_median_s"] <= 0.5})
        rows.append({"what": f"{t['shape']}: tokens after a wake equal the resident ones", "value": t["tokens_equal"],
                     "ok": t["tokens_equal"]})
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.attached:
        attached_main(*args.attached)
        return 0
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print("bench_elastic.py needs a CUDA GPU (or --device cpu for the shared-memory layer)", file=sys.stderr)
            return 2
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
    elif device.type != "cpu":
        print(f"--device must be cuda or cpu, got {args.device!r}", file=sys.stderr)
        return 2
    shapes = args.shapes or (["llama-3.2-1b", "llama-3-8b", "qwen2.5-14b"] if device.type == "cuda"
                             else ["llama-3.2-1b"])
    result = {"command": " ".join(["python", "-m", "benchmark.elastic.bench_elastic", *sys.argv[1:]]),
              "date": datetime.datetime.now().isoformat(timespec="seconds"), "environment": environment(device),
              "settings": {k: getattr(args, k) for k in ("dtype", "granule_bytes", "chunk_bytes", "map_granules",
                                                         "copy_bytes", "repeats")}}
    result["baseline"] = {"plain_copy_gbps": plain_copy_gbps(device, args.copy_bytes, args.repeats),
                          "copy_in_gbps": copy_in_gbps(device, args.copy_bytes, args.granule_bytes,
                                                       args.chunk_bytes, args.repeats)}
    result["map_unmap"] = map_unmap_times(device, args.granule_bytes)
    secret = new_secret()
    server = RangeServer()
    with tempfile.TemporaryDirectory(prefix="bench-elastic-") as folder, \
            FdServer(Path(folder) / "fd.sock", secret, server).start() as fds:
        result["models"] = [bench_shape(s, args, device, server, fds.path, secret) for s in shapes]
    result["ttft"] = ttft_runs(args, device)
    result["targets"] = targets(result)
    name = "cpu" if device.type == "cpu" else torch.cuda.get_device_name(device).split()[-1].lower()
    json_path = args.output_json or RESULTS / f"elastic_{name}.json"
    md_path = args.output_md or json_path.with_suffix(".md")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    md_path.write_text(markdown(result))
    print(markdown(result))
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
