"""Running the launches of one system side by side, merging their statistics, and MPS on/off.

Each system run of one workload is a list of launches (``e2e_plan.Launch``) started together
through ``launch_synced.py`` (a start barrier: all replays begin within milliseconds). If one
fails, the others are stopped. Their stats files are merged into one
(``runs/<system>.json``): every request record (output token ids dropped, their count kept),
the base latencies of every LLM, the summary recomputed over all records, and one entry per
launch (config, devices, MPS, schedule, its own summary, replay start). A run's launches use its
lane's GPUs, ports, MPS directory and CPUs (e2e_lanes.py).
"""

from __future__ import annotations

import logging
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import fields
from pathlib import Path

from benchmark.end_to_end.e2e_common import REPO, BenchError, read_json
from benchmark.end_to_end.e2e_lanes import Lane, launch_env, launch_ports
from benchmark.end_to_end.e2e_plan import SystemPlan
from muxserve.scheduler.stats import BaseLatency, RequestRecord, summarize_run

logger = logging.getLogger("end_to_end")
RECORD_FIELDS = {f.name for f in fields(RequestRecord)}


class MPSControl:
    """Starts and stops the MPS daemon (scripts/start_mps.sh DIR) as runs need it; always stops it at the end.
    ``env``: the scripts' environment (a lane's: its CUDA_VISIBLE_DEVICES; default: this process's)."""

    def __init__(self, mps_dir: Path, enabled: bool, env: dict[str, str] | None = None):
        self.dir = mps_dir
        self.enabled = enabled  # False on CPU: nothing to start
        self.env = env
        self.running = False

    def ensure(self, on: bool) -> None:
        if not self.enabled or on == self.running:
            return
        script = "start_mps.sh" if on else "stop_mps.sh"
        done = subprocess.run(["bash", str(REPO / "scripts" / script), str(self.dir)], capture_output=True, text=True,
                              env=self.env)
        logger.info("%s: %s", script, (done.stdout + done.stderr).strip())
        if done.returncode != 0:
            raise BenchError(f"scripts/{script} {self.dir} failed (exit {done.returncode}): {done.stderr.strip()}")
        self.running = on
        if on:
            time.sleep(0.5)

    def stop(self) -> None:
        try:
            self.ensure(False)
        except BenchError as e:
            logger.error("%s", e)

    def stop_stale(self) -> None:
        """Stop a daemon left in this directory by an earlier, killed runner (nothing if none)."""
        if self.enabled and (self.dir / "nvidia-mps" / "control").exists():
            self.running = True
            self.stop()
            self.running = False  # stopped, or found dead: either way no daemon serves this directory


class Cancelled(BenchError):
    """The runner is stopping (Ctrl-C, SIGTERM or another lane's error): the run was stopped, not failed."""


def launch_command(launch, point_dir: Path, run_dir: Path, rank: int, count: int, device: str,
                   mps_dir: Path | None, extra: list[str], max_drain_s: float | None = None,
                   ports: dict[str, int] | None = None, cpus: list[int] | None = None) -> list[str]:
    """``ports``: FlexStore, --master-port, --server-port (e2e_lanes.launch_ports); ``cpus``: CPU affinity."""
    cmd = [sys.executable, "-m", "benchmark.end_to_end.launch_synced", "--barrier-dir", str(run_dir / "barrier"),
           "--barrier-count", str(count), "--barrier-rank", str(rank)]
    if max_drain_s is not None:
        cmd += ["--max-drain-s", f"{max_drain_s:g}"]
    if cpus is not None:
        cmd += ["--cpus", ",".join(map(str, cpus))]
    if launch.calibrate_only:
        cmd += ["--calibrate-only"]
    ports = ports or {"flexstore": free_port()}
    cmd += ["--",
           str(point_dir / launch.config), "--workload-file", str(point_dir / launch.workload),
           "--stats-file", str(run_dir / f"{launch.name}.stats.json.gz"), "--flexstore-port", str(ports["flexstore"])]
    if "master" in ports:
        cmd += ["--master-port", str(ports["master"])]
    if "server" in ports:
        cmd += ["--server-port", str(ports["server"])]
    cmd += ["--log-dir", str(run_dir / "logs" / launch.name), "--device", device,
            "--schedule-approach", launch.schedule, *extra]
    if launch.mps:
        cmd += ["--mps-dir", str(mps_dir)]
    if launch.split_by_model:
        cmd += ["--split-by-model", launch.split_by_model]
    return cmd


def _tail(path: Path, n: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def _stop(procs: list[subprocess.Popen], timeout_s: float = 30.0) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_system(plan: SystemPlan, point_dir: Path, machine, lane: Lane, extra: list[str], timeout_s: float,
               max_drain_s: float | None = None, cancel: threading.Event | None = None) -> list[dict]:
    """Run every launch of ``plan`` side by side on ``lane`` (its GPUs, ports, MPS directory, CPUs);
    returns one dict per launch (its stats file and command). ``cancel`` set: stop them, raise Cancelled."""
    run_dir = point_dir / "runs" / plan.system
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    procs, parts = [], []
    try:
        for rank, launch in enumerate(plan.launches):
            cmd = launch_command(launch, point_dir, run_dir, rank, len(plan.launches), machine.device, lane.mps_dir,
                                 extra, max_drain_s, launch_ports(lane, rank), lane.cpus)
            log = run_dir / f"{launch.name}.log"
            env = launch_env(lane, launch.devices, launch.mps, machine.num_gpus, machine.device)
            with open(log, "w") as out:
                out.write(" ".join(cmd) + "\n")
                out.flush()
                procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT))
            parts.append({"launch": launch, "log": log, "stats": run_dir / f"{launch.name}.stats.json.gz",
                          "command": cmd[cmd.index("--") + 1:]})
        deadline = time.monotonic() + timeout_s
        while any(p.poll() is None for p in procs):
            if cancel is not None and cancel.is_set():
                (run_dir / "barrier").mkdir(exist_ok=True)
                (run_dir / "barrier" / "abort").write_text("the runner is stopping\n")
                _stop(procs)
                raise Cancelled(f"{plan.system}: stopped (the runner is stopping)")
            failed = [(i, p.returncode) for i, p in enumerate(procs) if p.poll() not in (None, 0)]
            if failed:
                i, code = failed[0]
                (run_dir / "barrier").mkdir(exist_ok=True)
                (run_dir / "barrier" / "abort").write_text(f"launch {plan.launches[i].name} exited {code}\n")
                _stop(procs)
                raise BenchError(f"{plan.system}: launch {plan.launches[i].name} exited with code {code}; "
                                 f"log {parts[i]['log']}:\n{_tail(parts[i]['log'])}")
            if time.monotonic() > deadline:
                _stop(procs)
                raise BenchError(f"{plan.system}: launches still running after {timeout_s:.0f} s (--run-timeout-s); "
                                 "stopped them")
            time.sleep(0.2)
        for i, p in enumerate(procs):
            if p.returncode != 0:
                raise BenchError(f"{plan.system}: launch {plan.launches[i].name} exited with code {p.returncode}; "
                                 f"log {parts[i]['log']}:\n{_tail(parts[i]['log'])}")
    except BaseException:
        _stop(procs)
        raise
    return parts


def merge_parts(plan: SystemPlan, point_dir: Path, parts: list[dict], expected: dict[int, tuple[str, int]],
                meta: dict) -> dict:
    """One stats document for the whole system run (see the module docstring). ``expected``: idx ->
    (LLM, output length) of every request of the workload; a request missing, without an end time
    or with fewer tokens is listed under ``unfinished``."""
    records, bases, entries, starts = [], {}, [], []
    run_dir = point_dir / "runs" / plan.system
    for rank, part in enumerate(parts):
        launch = part["launch"]
        doc = read_json(part["stats"])
        idx_map = read_json(point_dir / launch.idx_map) if launch.idx_map else None
        for r in doc["requests"]:
            r = dict(r)
            ids = r.pop("output_token_ids", [])
            r["num_output_tokens"] = len(ids)
            if idx_map is not None:
                r["idx"] = idx_map[r["idx"]]
            records.append(r)
        bases.update(doc.get("base_latency", {}))
        start_file = run_dir / "barrier" / f"start-{rank}"
        start = read_json(start_file)["wall"] if start_file.exists() else None
        starts.append(start)
        entries.append({"launch": launch.name, "config": launch.config, "workload": launch.workload,
                        "devices": launch.devices, "mps": launch.mps, "schedule_approach": launch.schedule,
                        "split_by_model": launch.split_by_model, "command": part["command"],
                        "replay_start_wall": start, "summary": doc["summary"]})
    records.sort(key=lambda r: (r["arrival"], r["idx"]))
    summary = summarize_run(to_records(records), to_bases(bases))
    known = [s for s in starts if s is not None]
    got = {r["idx"]: r for r in records}
    unfinished = sorted(i for i, (llm, out_len) in expected.items()
                        if i not in got or got[i]["end"] is None or got[i]["model"] != llm
                        or got[i]["num_output_tokens"] != out_len)
    return {**meta, "system": plan.system, "notes": plan.notes, "num_requests_expected": len(expected),
            "num_requests": len(records), "unfinished": unfinished,
            "replay_start_skew_s": (max(known) - min(known)) if len(known) > 1 else 0.0,
            "parts": entries, "base_latency": bases, "summary": summary, "requests": records}


def to_records(raw: list[dict]) -> list[RequestRecord]:
    return [RequestRecord(**{k: v for k, v in r.items() if k in RECORD_FIELDS}) for r in raw]


def to_bases(raw: dict) -> dict[str, BaseLatency]:
    return {name: BaseLatency(tuple((int(n), float(s)) for n, s in b["prefill_points"]), float(b["decode_step"]))
            for name, b in raw.items()}


def base_doc(bases: dict[str, BaseLatency]) -> dict:
    return {k: {"prefill_points": [list(p) for p in v.prefill_points], "decode_step": v.decode_step}
            for k, v in bases.items()}


def compact(run_dir: Path) -> None:
    """Drop the per-launch stats files (their token ids make them large); logs stay."""
    for path in run_dir.glob("*.stats.json*"):
        path.unlink()

