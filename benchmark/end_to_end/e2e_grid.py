"""The grid of workloads x systems: plan, run (resumable, within a time budget), record.

Layout of the output folder::

    experiment.json            machine, systems, grid points, device and versions
    commands.txt               every command line that wrote into the folder
    costs.json                 cost table of the optional profile step
    points/<tag>/              one workload (tag: alpha1.3_scale1, condense1200, ...)
        models.yaml, workload.json
        plan.json              colocation, per-system launches, placement command
        configs/               the model configs of every launch
        placement/             output of python -m muxserve.muxsched.placement (with a cost table)
        <system>.json          merged statistics of a finished run  (resume: exists -> skipped)
        <system>.error.txt     why the last attempt failed
        runs/<system>/         per-launch stdout (*.log) and runtime logs (logs/)
"""

from __future__ import annotations

import logging
import shlex
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from e2e_common import REPO, SYSTEMS, BenchError, read_json, write_json
from e2e_placement import groups_doc, placement_groups
from e2e_plan import LLM, Machine, PlanOptions, default_groups, describe_llms, plan_systems
from e2e_runs import MPSControl, compact, merge_parts, run_system

from muxserve.muxsched.models_file import load_models_file
from muxserve.muxsched.workload import load_workload

logger = logging.getLogger("end_to_end")
RUN_ORDER = ("temporal", "muxserve", "spatial")  # MPS off first, then on
DEFAULT_OVERHEAD_S = 100.0  # start-up + calibration + drain of a run, until one was measured


@dataclass
class Point:
    tag: str
    labels: dict  # e.g. {"alpha": 1.3, "rate_scale": 1.0} or {"condense": 1200.0}


@dataclass
class GridOptions:
    systems: list[str] = field(default_factory=lambda: list(SYSTEMS))
    cost_file: Path | None = None
    placement_args: list[str] = field(default_factory=list)
    plan: PlanOptions = field(default_factory=PlanOptions)
    launch_args: list[str] = field(default_factory=list)
    run_timeout_s: float = 1800.0
    max_drain_s: float | None = None
    time_budget_s: float | None = None
    rerun: bool = False
    skip_failed: bool = False
    stop_on_error: bool = False
    dry_run: bool = False
    mps_dir: Path = Path("/tmp/muxserve-e2e-mps")
    export_tgz: Path | None = None  # rewritten after every run: results survive a killed call
    started: float | None = None  # time.monotonic() the time budget counts from (default: run_grid's start)


class OutOfTime(Exception):
    pass


def point_dir(out: Path, point: Point) -> Path:
    return out / "points" / point.tag


def stats_path(out: Path, point: Point, system: str) -> Path:
    return point_dir(out, point) / f"{system}.json"


def record_command(out: Path, argv: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "commands.txt", "a") as f:
        f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')}  {shlex.join(argv)}\n")


def todo_systems(out: Path, point: Point, opts: GridOptions) -> list[str]:
    todo = []
    for system in RUN_ORDER:
        if system not in opts.systems:
            continue
        if not opts.rerun and stats_path(out, point, system).exists():
            continue
        if opts.skip_failed and (point_dir(out, point) / f"{system}.error.txt").exists():
            continue
        todo.append(system)
    return todo


def export_tgz(out: Path, path: Path) -> None:
    """``out`` as a .tgz without runtime logs and workloads (the side that prepared them has them),
    written atomically."""
    def keep(info: tarfile.TarInfo):
        name = Path(info.name).name
        if "/logs" in info.name or name.startswith("workload") or name.endswith(".idx.json"):
            return None
        return info

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        tar.add(out, arcname=out.name, filter=keep)
    tmp.replace(path)


def plan_point(out: Path, point: Point, machine: Machine, opts: GridOptions):
    pdir = point_dir(out, point)
    workload = load_workload(pdir / "workload.json")
    models = load_models_file(pdir / "models.yaml")
    llms = describe_llms(models.models, workload, machine.dtype)
    placement_cmd = None
    if opts.cost_file is not None:
        groups, placement_cmd = placement_groups(pdir, pdir / "models.yaml", pdir / "workload.json", opts.cost_file,
                                                 llms, machine, opts.placement_args)
    else:
        groups = default_groups(llms, machine)
    plans = plan_systems(pdir, llms, machine, workload, "workload.json", groups, opts.systems, opts.plan)
    write_json(pdir / "plan.json", {
        "labels": point.labels, "llms": [asdict(m) for m in llms],
        "colocation": "placement" if placement_cmd else ("all on one GPU" if machine.num_gpus == 1 else "balanced"),
        "placement_command": placement_cmd, "groups": groups_doc(groups),
        "systems": {s: {"launches": [asdict(launch) for launch in p.launches], "notes": p.notes}
                    for s, p in plans.items()},
    })
    return workload, llms, plans


def describe_plan(point: Point, llms: list[LLM], plans) -> str:
    lines = [f"[{point.tag}] " + ", ".join(f"{m.name} {Path(m.model).name} {m.rate:g}/s" for m in llms)]
    for system, plan in plans.items():
        for launch in plan.launches:
            lines.append(f"  {system:9s} {launch.name:8s} GPU {launch.devices} {launch.schedule:5s} "
                         f"{'MPS' if launch.mps else 'no MPS'} {launch.config}"
                         + (f" --split-by-model {launch.split_by_model}" if launch.split_by_model else ""))
    return "\n".join(lines)


def run_grid(out: Path, points: list[Point], machine: Machine, opts: GridOptions) -> dict:
    """Run every (point, system) without stats yet; returns {done, failed, pending, skipped}."""
    status: dict[str, list[str]] = {"done": [], "failed": [], "pending": [], "skipped": []}
    start = opts.started if opts.started is not None else time.monotonic()
    overheads: list[float] = []
    mps = MPSControl(opts.mps_dir, enabled=machine.device == "cuda")
    try:
        for i, point in enumerate(points):
            todo = todo_systems(out, point, opts)
            status["skipped"] += [f"{point.tag}/{s}" for s in opts.systems if s not in todo]
            if not todo:
                continue
            workload, llms, plans = plan_point(out, point, machine, opts)
            print(describe_plan(point, llms, plans), flush=True)
            if opts.dry_run:
                status["pending"] += [f"{point.tag}/{s}" for s in todo]
                continue
            expected = {r.idx: (r.llm, r.output_len) for r in workload.requests}
            duration = workload.requests[-1].arrival if workload.requests else 0.0
            rates = {m.name: m.rate for m in llms}
            for system in todo:
                overhead = max(overheads) if overheads else DEFAULT_OVERHEAD_S  # the worst so far: stay in time
                spent = time.monotonic() - start
                if opts.time_budget_s is not None and spent + duration + overhead > opts.time_budget_s:
                    status["pending"] += [f"{point.tag}/{s}" for s in todo[todo.index(system):]]
                    status["pending"] += [f"{p.tag}/{s}" for p in points[i + 1:] for s in todo_systems(out, p, opts)]
                    raise OutOfTime
                t0 = time.monotonic()
                try:
                    mps.ensure(plans[system].needs_mps)
                    print(f"[{point.tag}] running {system} ({len(plans[system].launches)} launch(es))", flush=True)
                    parts = run_system(plans[system], point_dir(out, point), machine, opts.mps_dir, opts.launch_args,
                                       opts.run_timeout_s, opts.max_drain_s)
                    meta = {"tag": point.tag, "labels": point.labels, "offered_rates": rates,
                            "offered_total_rate": sum(rates.values()), "duration_s": duration,
                            "machine": asdict(machine), "wall_s": round(time.monotonic() - t0, 3)}
                    doc = merge_parts(plans[system], point_dir(out, point), parts, expected, meta)
                    write_json(stats_path(out, point, system), doc)
                    compact(point_dir(out, point) / "runs" / system)
                    (point_dir(out, point) / f"{system}.error.txt").unlink(missing_ok=True)
                    s = doc["summary"]["overall"]
                    print(f"[{point.tag}] {system}: {s.get('num_finished', 0)}/{doc['num_requests_expected']} "
                          f"finished, {s.get('throughput_req_s', 0):.2f} req/s, {doc['wall_s']:.0f} s wall",
                          flush=True)
                    status["done"].append(f"{point.tag}/{system}")
                except BenchError as e:
                    (point_dir(out, point) / f"{system}.error.txt").write_text(str(e) + "\n")
                    logger.error("[%s] %s failed: %s", point.tag, system, e)
                    status["failed"].append(f"{point.tag}/{system}")
                    if opts.stop_on_error:
                        raise
                overheads.append(max(0.0, time.monotonic() - t0 - duration))
                if opts.export_tgz is not None:
                    export_tgz(out, opts.export_tgz)
    except OutOfTime:
        print(f"time budget of {opts.time_budget_s:g} s reached: {len(status['pending'])} runs left; "
              "run the same command again to resume", flush=True)
    finally:
        mps.stop()
        if opts.export_tgz is not None and not opts.dry_run:
            export_tgz(out, opts.export_tgz)
    return status


# -- optional profile step -------------------------------------------------------------------------
def cost_key(model: str) -> str:
    return model.removeprefix("random:").rstrip("/").rsplit("/", 1)[-1]


def profile_models(out: Path, llms: list[LLM], machine: Machine, sm_percentages: list[int], batch_sizes: list[int],
                   seq_lens: list[int], mps_dir: Path) -> Path:
    """Cost table of every distinct model (python -m muxserve.muxsched.profile, merged into
    ``out/costs.json``); models already in it are skipped."""
    costs = out / "costs.json"
    have = set(read_json(costs)) if costs.exists() else set()
    models = {}
    for m in llms:
        models.setdefault(cost_key(m.model), m)
    mps = MPSControl(mps_dir, enabled=machine.device == "cuda" and sm_percentages != [100])
    try:
        for key, m in models.items():
            if key in have:
                continue
            mps.ensure(True)
            spec = f"{key}={'random:' if m.load_format == 'random' else ''}{m.model}"
            cmd = [sys.executable, "-m", "muxserve.muxsched.profile", "--model", spec, "--device", machine.device,
                   "--dtype", machine.dtype, "--sm-percentages", ",".join(map(str, sm_percentages)),
                   "--batch-sizes", ",".join(map(str, batch_sizes)), "--seq-lens", ",".join(map(str, seq_lens)),
                   "--output", str(costs), "--merge"]
            if mps.enabled:
                cmd += ["--mps-dir", str(mps_dir)]
            print("profiling:", shlex.join(cmd), flush=True)
            record_command(out, cmd)
            done = subprocess.run(cmd, cwd=REPO)
            if done.returncode != 0:
                raise BenchError(f"profiling {key} failed (exit {done.returncode})")
    finally:
        mps.stop()
    return costs
