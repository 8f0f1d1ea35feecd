"""``python -m benchmark.serve.runtime_memory``: host memory of an instance's processes as LLMs are added.

For each N of ``--num-llms`` it starts a real instance (muxserve.instance.Instance: FlexStore, two
runtime processes per LLM, exactly as the launcher and the server start them) holding N copies of
one model, waits until every runtime is ready, reads ``/proc/PID/smaps_rollup`` of each process and
stops the instance. Per process:

* **USS** (unique set size) = Private_Clean + Private_Dirty: what the process alone holds; the
  memory freed if it exits.
* **PSS** (proportional set size): private memory plus each shared page divided by the number of
  processes that map it. PSS summed over processes is the instance's real footprint.
* **shared** = Shared_Clean + Shared_Dirty: pages mapped by other processes too (libraries,
  FlexStore's shared-memory weights and KV pool, copy-on-write pages of the Python interpreter).

Host memory only: on a GPU each process also holds a CUDA context (not in these figures; see
``--device cuda`` for the device memory per process from nvidia-smi). The default model is a tiny
random-weight Llama (``--hidden-size``, ``--num-layers``) so that N is bounded by processes, not by
weights.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

logger = logging.getLogger("benchmark.runtime_memory")

FIELDS = ("Rss", "Pss", "Shared_Clean", "Shared_Dirty", "Private_Clean", "Private_Dirty", "Pss_Anon", "Pss_File",
          "Pss_Shmem", "Swap")


def smaps_rollup(pid: int) -> dict[str, int]:
    """The fields of /proc/PID/smaps_rollup, in bytes."""
    return parse_smaps(Path(f"/proc/{pid}/smaps_rollup").read_text())


def parse_smaps(text: str) -> dict[str, int]:
    out = {}
    for line in text.splitlines()[1:]:
        key, _, rest = line.partition(":")
        parts = rest.split()
        if key in FIELDS and parts:
            out[key] = int(parts[0]) * 1024
    return out


def process_figures(pid: int) -> dict[str, int]:
    return figures_of(smaps_rollup(pid))


def figures_of(s: dict[str, int]) -> dict[str, int]:
    return {"uss": s.get("Private_Clean", 0) + s.get("Private_Dirty", 0), "pss": s.get("Pss", 0),
            "rss": s.get("Rss", 0), "shared": s.get("Shared_Clean", 0) + s.get("Shared_Dirty", 0),
            "pss_anon": s.get("Pss_Anon", 0), "pss_file": s.get("Pss_File", 0), "pss_shmem": s.get("Pss_Shmem", 0),
            "swap": s.get("Swap", 0)}


def gpu_memory_by_pid() -> dict[int, int]:
    """Device memory per process (bytes) from nvidia-smi; empty where it is missing."""
    try:
        text = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    out = {}
    for line in text.splitlines():
        pid, _, mib = line.partition(",")
        if pid.strip().isdigit() and mib.strip().isdigit():
            out[int(pid)] = int(mib) * 2**20
    return out


def gpu_memory_used() -> int | None:
    """Device memory in use on GPU 0 (bytes, every process of the machine), from nvidia-smi."""
    try:
        text = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                              capture_output=True, text=True, timeout=30, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return int(text) * 2**20 if text.isdigit() else None


def write_tiny_model(folder: Path, hidden: int, layers: int, vocab: int) -> Path:
    """A folder with only a Llama config.json: the instance gives it seeded random weights."""
    folder.mkdir(parents=True, exist_ok=True)
    heads = max(1, hidden // 64)
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab, "hidden_size": hidden,
        "intermediate_size": 4 * hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": heads, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False}))
    return folder


def config_doc(n: int, model: str, load_format: str, dtype: str, kv_cache_bytes: int) -> dict:
    models = []
    for i in range(n):
        entry = {"name": f"llm-{i}", "model": model, "mps_percentage": [100, 40], "model_dtype": dtype}
        if load_format != "auto":
            entry["load_format"] = load_format
        models.append(entry)
    return {"num_gpus": 1, "max_num_seqs": 16, "overload_threshold": 2, "kv_cache_bytes": kv_cache_bytes,
            "models": models}


def measure(n: int, args, root: Path) -> dict:
    from muxserve.config import load_config
    from muxserve.instance.instance import Instance
    from muxserve.instance.options import InstanceOptions
    from muxserve.scheduler.policy import get_policy

    doc = config_doc(n, args.model, args.load_format, args.dtype, args.kv_cache_bytes)
    (root / f"config_n{n}.yaml").write_text(yaml.safe_dump(doc))
    config = load_config(root / f"config_n{n}.yaml")
    options = InstanceOptions(policy=get_policy("adbs"), device=args.device, log_dir=root / f"logs_n{n}",
                              ready_timeout_s=args.ready_timeout_s, enforce_eager=args.enforce_eager)
    instance = Instance(config, options)
    before = gpu_memory_used() if args.device == "cuda" else None
    started = time.monotonic()
    instance.start()
    try:
        ready_s = time.monotonic() - started
        time.sleep(args.settle_s)  # let lazy allocations settle
        gpu = gpu_memory_by_pid() if args.device == "cuda" else {}
        after = gpu_memory_used() if args.device == "cuda" else None
        procs = [{"name": "flexstore", "pid": instance.flexstore.proc.pid}]
        procs += [{"name": c.name, "pid": c.proc.pid} for c in instance.processes.children]
        procs.append({"name": "scheduler (this process)", "pid": os.getpid()})
        for p in procs:
            p.update(process_figures(p["pid"]))
            if gpu:
                p["gpu"] = gpu.get(p["pid"], 0)
    finally:
        instance.stop()
    runtimes = [p for p in procs if p["name"] not in ("flexstore", "scheduler (this process)")]
    total = {k: sum(p[k] for p in procs) for k in ("uss", "pss", "rss")}
    per_runtime = {k: round(sum(p[k] for p in runtimes) / len(runtimes))
                   for k in ("uss", "pss", "rss", "shared", "pss_anon", "pss_file", "pss_shmem")}
    row = {"num_llms": n, "num_runtimes": len(runtimes), "ready_s": round(ready_s, 2), "processes": procs,
           "per_runtime": per_runtime, "total": total,
           "runtimes_pss": sum(p["pss"] for p in runtimes), "runtimes_uss": sum(p["uss"] for p in runtimes)}
    if gpu:
        row["gpu_total"] = sum(p.get("gpu", 0) for p in procs)
        row["gpu_per_runtime"] = round(sum(p.get("gpu", 0) for p in runtimes) / len(runtimes))
    if before is not None and after is not None:
        row["gpu_used_growth"] = after - before  # the whole device: FlexStore (weights, KV) and every runtime
    return row


def fit(rows: list[dict], key: str) -> tuple[float, float]:
    """Least squares ``key = a + b x runtimes``: (fixed bytes, bytes per runtime)."""
    xs = [r["num_runtimes"] for r in rows]
    ys = [r[key] if not isinstance(r[key], dict) else r[key]["pss"] for r in rows]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0
    return my - b * mx, b


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def markdown(result: dict) -> str:
    rows = result["runs"]
    lines = [f"# Host memory of an instance's processes ({result['device']})", "",
             f"Machine: {result['machine']}. Model: {result['model_note']}. Command: `{result['command']}`.", "",
             "| LLMs | runtimes | ready s | USS / runtime MiB | PSS / runtime MiB (anon / file / shmem) | "
             "shared / runtime MiB | runtimes PSS MiB | FlexStore PSS MiB | total PSS MiB | total USS MiB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        pr = r["per_runtime"]
        store = next(p for p in r["processes"] if p["name"] == "flexstore")
        lines.append(f"| {r['num_llms']} | {r['num_runtimes']} | {r['ready_s']} | {mib(pr['uss'])} | {mib(pr['pss'])} "
                     f"({mib(pr['pss_anon'])} / {mib(pr['pss_file'])} / {mib(pr['pss_shmem'])}) "
                     f"| {mib(pr['shared'])} | {mib(r['runtimes_pss'])} | {mib(store['pss'])} | "
                     f"{mib(r['total']['pss'])} | {mib(r['total']['uss'])} |")
    lines += ["", "Total = FlexStore + runtimes + the scheduler's process (this script, which imports torch too)."]
    if any("gpu_used_growth" in r or "gpu_total" in r for r in rows):
        lines += ["", "| LLMs | device memory per runtime MiB (nvidia-smi per process) | device memory of all "
                  "processes MiB | device memory in use grew by MiB |", "|---|---|---|---|"]
        lines += [f"| {r['num_llms']} | {mib(r['gpu_per_runtime']) if 'gpu_per_runtime' in r else 'n/a'} | "
                  f"{mib(r['gpu_total']) if 'gpu_total' in r else 'n/a'} | "
                  f"{mib(r['gpu_used_growth']) if 'gpu_used_growth' in r else 'n/a'} |" for r in rows]
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmark.serve.runtime_memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-llms", type=int, nargs="+", default=[2, 4, 8],
                   help="instances to start, one per value, with this many LLMs (2 runtimes each) (default: 2 4 8)")
    p.add_argument("--model", default=None,
                   help="model of every LLM (short name, folder); default: a tiny random Llama written to the "
                        "work folder (--hidden-size, --num-layers)")
    p.add_argument("--load-format", choices=("auto", "random"), default=None,
                   help="random: seeded weights from config.json (default: random for the tiny model, else auto)")
    p.add_argument("--hidden-size", type=int, default=256, help="hidden size of the tiny model (default: 256)")
    p.add_argument("--num-layers", type=int, default=4, help="layers of the tiny model (default: 4)")
    p.add_argument("--vocab-size", type=int, default=32000, help="vocabulary of the tiny model (default: 32000)")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32", help="model dtype (default: fp32)")
    p.add_argument("--kv-cache-bytes", type=int, default=16 << 20, help="the shared KV pool (default: 16 MiB)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu, or cuda (adds each process's device memory from nvidia-smi) (default: cpu)")
    p.add_argument("--enforce-eager", action="store_true",
                   help="decode runtimes without CUDA graphs (default: with them, as the instance runs)")
    p.add_argument("--ready-timeout-s", type=float, default=600.0, help="start-up limit per instance (default: 600)")
    p.add_argument("--settle-s", type=float, default=2.0, help="wait after ready before reading (default: 2)")
    p.add_argument("--work-dir", default=None, help="configs and logs (default: a temporary folder)")
    p.add_argument("--output-json", default=None, help="write the figures as JSON here")
    p.add_argument("--output-md", default=None, help="write the table as markdown here")
    p.add_argument("--machine", default=None, help="description of the machine for the report (default: from /proc)")
    return p.parse_args(argv)


def machine_description() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = next((int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), 0)
    return f"{cpu}, {os.cpu_count()} logical CPUs, {mem / 2**20:.0f} GiB RAM, Linux {platform.release()}"


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    if any(n < 1 for n in args.num_llms):
        print("error: --num-llms values must be >= 1", file=sys.stderr)
        return 2
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("error: --device cuda needs a CUDA device; this machine has none", file=sys.stderr)
            return 2
    with tempfile.TemporaryDirectory(prefix="runtime_memory_") as tmp:
        root = Path(args.work_dir or tmp)
        root.mkdir(parents=True, exist_ok=True)
        tiny = args.model is None
        if tiny:
            args.model = str(write_tiny_model(root / "tiny-llama", args.hidden_size, args.num_layers, args.vocab_size))
        if args.load_format is None:
            args.load_format = "random" if tiny else "auto"
        runs = []
        for n in args.num_llms:
            logger.info("instance with %d LLMs", n)
            runs.append(measure(n, args, root))
            r = runs[-1]
            logger.info("%d LLMs: %d runtimes, PSS per runtime %s MiB, USS %s MiB, total PSS %s MiB", n,
                        r["num_runtimes"], mib(r["per_runtime"]["pss"]), mib(r["per_runtime"]["uss"]),
                        mib(r["total"]["pss"]))
    fixed, per = fit(runs, "total") if len(runs) > 1 else (0.0, 0.0)
    note = (f"tiny random Llama (hidden {args.hidden_size}, {args.num_layers} layers, vocab {args.vocab_size}, "
            f"{args.dtype})" if tiny else f"{args.model} ({args.dtype})")
    result = {"device": args.device, "machine": args.machine or machine_description(), "model_note": note,
              "command": "python -m benchmark.serve.runtime_memory " + " ".join(argv if argv is not None
                                                                                 else sys.argv[1:]),
              "runs": runs, "fit_total_pss": {"fixed_bytes": round(fixed), "bytes_per_runtime": round(per)}}
    text = markdown(result)
    print(text)
    if len(runs) > 1:
        print(f"total PSS ~ {mib(fixed)} MiB + {mib(per)} MiB per runtime process")
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(result, indent=1) + "\n")
    if args.output_md:
        Path(args.output_md).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
