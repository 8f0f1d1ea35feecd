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
        <system>.json.gz       merged statistics of a finished run  (resume: exists -> skipped;
                               .json from older runs counts too)
        <system>.error.txt     why the last attempt failed
        runs/<system>/         per-launch stdout (*.log) and runtime logs (logs/)
"""

from __future__ import annotations

import io
import logging
import os
import queue
import shlex
import subprocess
import sys
import tarfile
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmark.end_to_end.e2e_common import BASE_RUN, REPO, STATS_SUFFIXES, SYSTEMS, BenchError, read_json, write_json
from benchmark.end_to_end.e2e_lanes import Lane, daemon_env, make_lanes
from benchmark.end_to_end.e2e_placement import groups_doc, placement_groups
from benchmark.end_to_end.e2e_plan import LLM, Machine, PlanOptions, default_groups, describe_llms, plan_systems
from benchmark.end_to_end.e2e_runs import Cancelled, MPSControl, compact, merge_parts, run_system
from muxserve.workload.models_file import load_models_file
from muxserve.workload.workload_file import load_workload

logger = logging.getLogger("end_to_end")
# per point; with lanes, consecutive runs start side by side. The common SLO base (BASE_RUN) first.
RUN_ORDER = (BASE_RUN, "temporal", "muxserve", "spatial", "instances")
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
    lanes: list[Lane] = field(default_factory=list)  # runs side by side (e2e_lanes); default: one, the whole machine
    started: float | None = None  # time.monotonic() the time budget counts from (default: run_grid's start)
    common_base: bool = True  # measure each LLM alone on the whole GPU per point (BASE_RUN): the SLO base

    @property
    def runs(self) -> list[str]:
        """The systems and, with the common base, BASE_RUN."""
        return ([BASE_RUN] if self.common_base else []) + list(self.systems)


def point_dir(out: Path, point: Point) -> Path:
    return out / "points" / point.tag


def stats_path(out: Path, point: Point, system: str) -> Path:
    """Where a finished run's merged statistics go (every request's record: compressed)."""
    return point_dir(out, point) / f"{system}.json.gz"


def finished(out: Path, point: Point, system: str) -> bool:
    return any((point_dir(out, point) / f"{system}{suffix}").exists() for suffix in STATS_SUFFIXES)


def record_command(out: Path, argv: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "commands.txt", "a") as f:
        f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')}  {shlex.join(argv)}\n")


def todo_systems(out: Path, point: Point, opts: GridOptions) -> list[str]:
    todo = []
    for system in RUN_ORDER:
        if system not in opts.runs:
            continue
        if not opts.rerun and finished(out, point, system):
            continue
        if opts.skip_failed and (point_dir(out, point) / f"{system}.error.txt").exists():
            continue
        todo.append(system)
    return todo


def export_tgz(out: Path, path: Path, skip: list[Path] | None = None) -> None:
    """``out`` as a .tgz without runtime logs and workloads (the side that prepared them has them),
    written atomically. ``skip``: folders of runs still going (left out). Files are read whole
    before they are added, and a file that vanishes meanwhile is left out, so runs of other lanes
    may write into ``out`` while this runs."""
    skipped = {p.resolve() for p in (skip or [])}

    def keep(rel: str, name: str) -> bool:
        return not ("/logs" in f"/{rel}" or name.startswith("workload") or name.endswith(".idx.json")
                    or (name.startswith(".") and ".tmp" in name))

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        for folder, dirs, files in os.walk(out):
            here = Path(folder)
            dirs[:] = sorted(d for d in dirs if (here / d).resolve() not in skipped
                             and keep(str((here / d).relative_to(out)), d))
            rel_dir = here.relative_to(out)
            info = tarfile.TarInfo(str(Path(out.name) / rel_dir) if str(rel_dir) != "." else out.name)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, int(time.time())
            tar.addfile(info)
            for name in sorted(files):
                rel = str((here / name).relative_to(out))
                if not keep(rel, name):
                    continue
                try:
                    data = (here / name).read_bytes()
                    mtime = (here / name).stat().st_mtime
                except OSError:  # gone meanwhile (a temporary file, a run's cleanup)
                    continue
                info = tarfile.TarInfo(f"{out.name}/{rel}")
                info.size, info.mode, info.mtime = len(data), 0o644, int(mtime)
                tar.addfile(info, io.BytesIO(data))
    tmp.replace(path)


def plan_point(out: Path, point: Point, machine: Machine, opts: GridOptions, workload=None):
    pdir = point_dir(out, point)
    workload = workload if workload is not None else load_workload(pdir / "workload.json")
    models = load_models_file(pdir / "models.yaml")
    llms = describe_llms(models.models, workload, machine.dtype)
    placement_cmd = None
    if opts.cost_file is not None:
        groups, placement_cmd = placement_groups(pdir, pdir / "models.yaml", pdir / "workload.json", opts.cost_file,
                                                 llms, machine, opts.placement_args)
    else:
        groups = default_groups(llms, machine)
    plans = plan_systems(pdir, llms, machine, workload, "workload.json", groups, opts.runs, opts.plan)
    # a call that runs some systems keeps the plans of the others (their statistics stay too)
    earlier = read_json(pdir / "plan.json").get("systems", {}) if (pdir / "plan.json").exists() else {}
    write_json(pdir / "plan.json", {
        "labels": point.labels, "llms": [asdict(m) for m in llms],
        "colocation": "placement" if placement_cmd else ("all on one GPU" if machine.num_gpus == 1 else "balanced"),
        "placement_command": placement_cmd, "groups": groups_doc(groups),
        "systems": {**earlier, **{s: {"launches": [asdict(launch) for launch in p.launches], "notes": p.notes}
                                  for s, p in plans.items()}},
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


@dataclass
class Job:
    point: Point
    system: str

    @property
    def name(self) -> str:
        return f"{self.point.tag}/{self.system}"


@dataclass
class Prepared:
    """A point's workload (loaded once) and, from its first dispatched run on, its plans."""
    workload: object
    duration: float
    plans: dict | None = None
    llms: list | None = None


def run_grid(out: Path, points: list[Point], machine: Machine, opts: GridOptions) -> dict:
    """Run every (point, system) without stats yet, one run per free lane at a time (``opts.lanes``;
    default: one lane with the whole machine); returns {done, failed, pending, skipped}.

    The lanes' runs are started and collected here; each runs in a thread of its own (launches,
    then merging its statistics). The export is rewritten here after every finished run, leaving out
    the folders of the runs still going."""
    status: dict[str, list[str]] = {"done": [], "failed": [], "pending": [], "skipped": []}
    start = opts.started if opts.started is not None else time.monotonic()
    lanes = opts.lanes or make_lanes(1, machine.num_gpus, None, machine.device, opts.mps_dir)
    jobs: deque[Job] = deque()
    for point in points:
        todo = todo_systems(out, point, opts)
        status["skipped"] += [f"{point.tag}/{s}" for s in opts.runs if s not in todo]
        jobs.extend(Job(point, s) for s in todo)
    if opts.dry_run:
        for point in dict.fromkeys(j.point.tag for j in jobs):
            p = next(pt for pt in points if pt.tag == point)
            workload, llms, plans = plan_point(out, p, machine, opts)
            print(describe_plan(p, llms, plans), flush=True)
        status["pending"] += [j.name for j in jobs]
        return status
    if len(lanes) > 1:
        print(f"{len(lanes)} lanes, one run each at a time: "
              + "; ".join(f"{lane.label} ports {lane.port_base}+" for lane in lanes), flush=True)
    mps = {lane.index: MPSControl(lane.mps_dir, enabled=machine.device == "cuda", env=daemon_env(lane))
           for lane in lanes}
    for control in mps.values():
        control.stop_stale()
    prepared: dict[str, Prepared] = {}
    overheads: list[float] = []
    free = list(lanes)
    running: dict[int, tuple[Job, Lane, threading.Thread]] = {}
    finished: queue.Queue = queue.Queue()
    cancel = threading.Event()
    out_of_time = stopping = False
    error: BaseException | None = None
    try:
        while jobs or running:
            while free and jobs and not stopping:
                job = jobs.popleft()
                prep = prepared.get(job.point.tag)
                if prep is None:
                    workload = load_workload(point_dir(out, job.point) / "workload.json")
                    prep = prepared[job.point.tag] = Prepared(
                        workload, workload.requests[-1].arrival if workload.requests else 0.0)
                overhead = max(overheads) if overheads else DEFAULT_OVERHEAD_S  # the worst so far: stay in time
                spent = time.monotonic() - start
                if opts.time_budget_s is not None and spent + prep.duration + overhead > opts.time_budget_s:
                    status["pending"].append(job.name)
                    out_of_time = True
                    continue
                if prep.plans is None:  # once per point and call, before any of its runs starts
                    _, prep.llms, prep.plans = plan_point(out, job.point, machine, opts, prep.workload)
                    print(describe_plan(job.point, prep.llms, prep.plans), flush=True)
                lane = free.pop(0)
                thread = threading.Thread(target=_run_job, name=f"lane{lane.index}", daemon=True,
                                          args=(out, job, lane, len(lanes), machine, opts, prep, mps[lane.index],
                                                cancel, finished))
                running[lane.index] = (job, lane, thread)
                print(f"[{job.point.tag}] running {job.system} ({len(prep.plans[job.system].launches)} launch(es)) "
                      f"on {lane.label}", flush=True)
                thread.start()
            if not running:
                break
            try:
                lane_index, result, wall = finished.get(timeout=0.5)
            except queue.Empty:
                continue
            job, lane, thread = running.pop(lane_index)
            thread.join()
            free.append(lane)
            free.sort(key=lambda x: x.index)
            overheads.append(max(0.0, wall - prepared[job.point.tag].duration))
            if isinstance(result, Cancelled):
                status["pending"].append(job.name)
            elif isinstance(result, BenchError):
                logger.error("[%s] %s failed on %s: %s", job.point.tag, job.system, lane.label, result)
                status["failed"].append(job.name)
                if opts.stop_on_error and error is None:
                    error, stopping = result, True
            elif isinstance(result, BaseException):
                error, stopping = result, True
                cancel.set()
            else:
                s = result["summary"]["overall"]
                print(f"[{job.point.tag}] {job.system}: {s.get('num_finished', 0)}/{result['num_requests_expected']} "
                      f"finished, {s.get('throughput_req_s', 0):.2f} req/s, {result['wall_s']:.0f} s wall "
                      f"({lane.label})", flush=True)
                status["done"].append(job.name)
            if opts.export_tgz is not None:
                export_tgz(out, opts.export_tgz, skip=[point_dir(out, j.point) / "runs" / j.system
                                                       for j, _, _ in running.values()])
        if error is not None:
            raise error
        if out_of_time:
            print(f"time budget of {opts.time_budget_s:g} s reached: {len(status['pending'])} runs left; "
                  "run the same command again to resume", flush=True)
    finally:
        cancel.set()  # nothing if every run finished; else (Ctrl-C, SIGTERM, an error) stop the lanes' launches
        for _job, _lane, thread in running.values():
            thread.join()
        while not finished.empty():  # what the stopped lanes ended with
            lane_index, result, _ = finished.get()
            job = running[lane_index][0]
            status["done" if isinstance(result, dict) else "pending"].append(job.name)
        status["pending"] += [j.name for j in jobs if j.name not in status["pending"]]
        for control in mps.values():
            control.stop()
        if opts.export_tgz is not None:
            export_tgz(out, opts.export_tgz)
    return status


def _run_job(out: Path, job: Job, lane: Lane, num_lanes: int, machine: Machine, opts: GridOptions, prep: Prepared,
             mps: MPSControl, cancel: threading.Event, finished: queue.Queue) -> None:
    """One system run on one lane (in the lane's thread): MPS for the lane if the system needs it, the
    launches, the merged statistics. Puts (lane index, document or exception, wall seconds) into ``finished``."""
    t0 = time.monotonic()
    pdir = point_dir(out, job.point)
    plan = prep.plans[job.system]
    result: object
    try:
        try:
            mps.ensure(plan.needs_mps)
            parts = run_system(plan, pdir, machine, lane, opts.launch_args, opts.run_timeout_s, opts.max_drain_s,
                               cancel)
        finally:
            mps.stop()  # each run gets a fresh daemon; a run without MPS finds none of its lane's
        rates = {m.name: m.rate for m in prep.llms}
        expected = {} if job.system == BASE_RUN else {r.idx: (r.llm, r.output_len) for r in prep.workload.requests}
        meta = {"tag": job.point.tag, "labels": job.point.labels, "offered_rates": rates,
                "offered_total_rate": sum(rates.values()), "duration_s": prep.duration,
                "machine": asdict(machine), "wall_s": round(time.monotonic() - t0, 3), "lane": lane.doc(num_lanes)}
        doc = merge_parts(plan, pdir, parts, expected, meta)
        write_json(stats_path(out, job.point, job.system), doc)
        compact(pdir / "runs" / job.system)
        (pdir / f"{job.system}.error.txt").unlink(missing_ok=True)
        result = doc
    except Cancelled as e:
        result = e
    except BenchError as e:
        write_text(pdir / f"{job.system}.error.txt", f"{e}\n(on {lane.label})\n")
        result = e
    except BaseException as e:  # a bug: the runner stops, after the other lanes' runs were stopped
        logger.exception("[%s] %s on %s", job.point.tag, job.system, lane.label)
        result = e
    finished.put((lane.index, result, time.monotonic() - t0))


def write_text(path: Path, text: str) -> None:
    """Atomically (the export may read the folder at any moment)."""
    tmp = path.with_name(f".{path.name}.tmp-{threading.get_ident()}")
    tmp.write_text(text)
    tmp.replace(path)


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
