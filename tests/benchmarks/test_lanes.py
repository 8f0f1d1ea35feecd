"""Lanes of the end-to-end runner: GPU, port, MPS and CPU assignment, the environment of a launch,
and the scheduler of run_grid (runs faked: no process is started)."""

from __future__ import annotations

import socket
import tarfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from benchmark.end_to_end import e2e_grid
from benchmark.end_to_end.e2e_common import BenchError, read_json
from benchmark.end_to_end.e2e_lanes import LANE_PORTS, daemon_env, launch_env, launch_ports, make_lanes
from benchmark.end_to_end.e2e_plan import Launch, Machine, SystemPlan
from benchmark.end_to_end.e2e_runs import Cancelled, launch_command

SMI = [("0", "GPU-aaaa"), ("1", "GPU-bbbb"), ("2", "GPU-cccc"), ("3", "GPU-dddd")]


def test_four_gpus_make_four_single_gpu_lanes_with_own_ports_mps_and_cpus(tmp_path):
    lanes = make_lanes("auto", 1, None, "cuda", tmp_path / "mps", split_cpus=True, cpus=list(range(64)), smi=SMI)
    assert [lane.gpus for lane in lanes] == [["GPU-aaaa"], ["GPU-bbbb"], ["GPU-cccc"], ["GPU-dddd"]]
    assert [lane.physical for lane in lanes] == [["0"], ["1"], ["2"], ["3"]]
    assert [lane.label for lane in lanes] == ["lane 0 GPU 0", "lane 1 GPU 1", "lane 2 GPU 2", "lane 3 GPU 3"]
    assert [lane.mps_dir for lane in lanes] == [tmp_path / "mps" / f"lane{k}" for k in range(4)]
    assert [lane.cpus for lane in lanes] == [list(range(16 * k, 16 * k + 16)) for k in range(4)]
    assert [lane.port_base for lane in lanes] == [20000, 21000, 22000, 23000]
    assert lanes[2].doc(4) == {"index": 2, "num_lanes": 4, "gpus": ["2"], "cuda_visible_devices": "GPU-cccc",
                               "port_base": 22000, "mps_dir": str(tmp_path / "mps" / "lane2"), "cpus": "32-47"}
    two = make_lanes(2, 2, None, "cuda", tmp_path / "mps", smi=SMI)
    assert [lane.gpus for lane in two] == [["GPU-aaaa", "GPU-bbbb"], ["GPU-cccc", "GPU-dddd"]]
    assert all(lane.cpus is None for lane in two)
    named = make_lanes(2, 1, ["2", "3"], "cuda", tmp_path / "mps", smi=SMI)
    assert [lane.physical for lane in named] == [["2"], ["3"]]


def test_lane_errors_and_the_default_pipe_directory(tmp_path):
    with pytest.raises(BenchError, match="need 6 GPUs"):
        make_lanes(3, 2, None, "cuda", tmp_path, smi=SMI)
    with pytest.raises(BenchError, match="no GPU found"):
        make_lanes(2, 1, None, "cuda", tmp_path, smi=[])
    with pytest.raises(BenchError, match="default pipe directory"):
        make_lanes(1, 1, None, "cuda", Path("/tmp"))
    with pytest.raises(BenchError, match="port-base"):
        make_lanes(4, 1, None, "cuda", tmp_path, port_base=64000, smi=SMI)


def test_one_lane_is_the_runner_without_lanes(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", "/somewhere/else")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    (lane,) = make_lanes(1, 1, None, "cuda", tmp_path / "mps")  # no nvidia-smi needed
    assert lane.whole_machine and lane.gpus == [] and lane.mps_dir == tmp_path / "mps" and lane.cpus is None
    env = launch_env(lane, [0], True, 1, "cuda")
    assert "CUDA_VISIBLE_DEVICES" not in env and not any(k.startswith("CUDA_MPS_") for k in env)
    assert "CUDA_VISIBLE_DEVICES" not in daemon_env(lane)
    (lane2,) = make_lanes(1, 2, None, "cuda", tmp_path / "mps")
    assert launch_env(lane2, [1], False, 2, "cuda")["CUDA_VISIBLE_DEVICES"] == "1"  # as before: plan indices
    (auto,) = make_lanes("auto", 1, None, "cuda", tmp_path / "mps", smi=SMI[:1])
    assert auto.whole_machine
    cpu = make_lanes(2, 1, None, "cpu", tmp_path / "mps")
    assert [(lane.gpus, lane.port_base, lane.cpus) for lane in cpu] == [([], 20000, None), ([], 21000, None)]


def test_launch_environment_names_the_lane_gpus_for_mps_and_plain_clients(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps")
    lanes = make_lanes(2, 2, None, "cuda", tmp_path, smi=SMI)
    for mps in (True, False):  # a UUID is the same GPU inside and outside the lane's MPS server
        env = launch_env(lanes[1], [1], mps, 2, "cuda")
        assert env["CUDA_VISIBLE_DEVICES"] == "GPU-dddd"
        assert not any(k.startswith("CUDA_MPS_") for k in env)  # no daemon but the one --mps-dir names
    assert daemon_env(lanes[1])["CUDA_VISIBLE_DEVICES"] == "GPU-cccc,GPU-dddd"
    assert "CUDA_MPS_PIPE_DIRECTORY" not in daemon_env(lanes[1])
    # without nvidia-smi the lanes keep indices: the lane's MPS server counts its GPUs from 0
    plain = make_lanes(2, 2, ["0", "1", "2", "3"], "cuda", tmp_path, smi=[])
    assert launch_env(plain[1], [1], True, 2, "cuda")["CUDA_VISIBLE_DEVICES"] == "1"
    assert launch_env(plain[1], [1], False, 2, "cuda")["CUDA_VISIBLE_DEVICES"] == "3"
    assert daemon_env(plain[1])["CUDA_VISIBLE_DEVICES"] == "2,3"


def test_ports_are_disjoint_across_lanes_and_launches_and_skip_busy_ones(tmp_path):
    lanes = make_lanes(2, 1, None, "cpu", tmp_path, port_base=24000)
    seen = set()
    for lane in lanes:
        for rank in range(4):
            ports = launch_ports(lane, rank)
            assert lane.port_base <= min(ports.values()) and max(ports.values()) < lane.port_base + LANE_PORTS
            assert not seen & set(ports.values())
            seen |= set(ports.values())
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        lane = SimpleNamespace(port_base=port)
        assert launch_ports(lane, 0)["flexstore"] == port + 1
    with pytest.raises(BenchError, match="ports"):
        launch_ports(lanes[0], LANE_PORTS)
    launch = Launch("mesh0", "configs/m.yaml", "w.json", [0], "adbs", True)
    cmd = launch_command(launch, tmp_path, tmp_path / "run", 0, 1, "cuda", tmp_path / "mps" / "lane1", [],
                         ports={"flexstore": 21000, "master": 21010, "server": 21020}, cpus=[4, 5])
    assert cmd[cmd.index("--cpus") + 1] == "4,5" and cmd.index("--cpus") < cmd.index("--")
    assert [cmd[cmd.index(f) + 1] for f in ("--flexstore-port", "--master-port", "--server-port", "--mps-dir")] == [
        "21000", "21010", "21020", str(tmp_path / "mps" / "lane1")]


# -- the scheduler, with faked runs ------------------------------------------------------------------
class FakeMPS:
    log: list = []

    def __init__(self, mps_dir, enabled, env=None):
        self.dir, self.env, self.running = mps_dir, env or {}, False

    def ensure(self, on):
        if on != self.running:
            FakeMPS.log.append((str(self.dir.name), "start" if on else "stop", self.env.get("CUDA_VISIBLE_DEVICES")))
        self.running = on

    def stop(self):
        self.ensure(False)

    def stop_stale(self):
        pass


def _fake_grid(monkeypatch, tmp_path, run_s=0.3, fail=None):
    """9 runs (3 points x 3 systems) whose 'launches' sleep ``run_s``; returns (points, record)."""
    record = {"active": 0, "most": 0, "runs": [], "lock": threading.Lock()}
    workload = SimpleNamespace(requests=[SimpleNamespace(idx=0, llm="llm-0", output_len=1, arrival=0.0)])
    llms = [SimpleNamespace(name="llm-0", model="m", rate=1.0)]

    def plan_point(out, point, machine, opts, workload_=None):
        plans = {s: SystemPlan(s, [Launch("mesh0", "c.yaml", "w.json", [0], "adbs", s != "temporal")])
                 for s in opts.systems}
        return workload, llms, plans

    def run_system(plan, pdir, machine, lane, extra, timeout, drain, cancel):
        with record["lock"]:
            record["active"] += 1
            record["most"] = max(record["most"], record["active"])
        t0 = time.monotonic()
        try:
            if fail == (pdir.name, plan.system):
                raise RuntimeError("a bug")
            (pdir / "runs" / plan.system).mkdir(parents=True, exist_ok=True)
            (pdir / "runs" / plan.system / "x.log").write_text("log")
            while time.monotonic() - t0 < run_s:
                if cancel.is_set():
                    raise Cancelled("stopped")
                time.sleep(0.01)
        finally:
            with record["lock"]:
                record["active"] -= 1
        record["runs"].append((pdir.name, plan.system, lane.index, t0, time.monotonic()))
        return []

    def merge_parts(plan, pdir, parts, expected, meta):
        return {**meta, "system": plan.system, "num_requests_expected": 1,
                "summary": {"overall": {"num_finished": 1, "throughput_req_s": 1.0}}}

    monkeypatch.setattr(e2e_grid, "plan_point", plan_point)
    monkeypatch.setattr(e2e_grid, "run_system", run_system)
    monkeypatch.setattr(e2e_grid, "merge_parts", merge_parts)
    monkeypatch.setattr(e2e_grid, "load_workload", lambda path: workload)
    monkeypatch.setattr(e2e_grid, "MPSControl", FakeMPS)
    FakeMPS.log = []
    points = [e2e_grid.Point(f"p{i}", {"i": i}) for i in range(3)]
    return points, record


def _opts(tmp_path, lanes, **kw):
    return e2e_grid.GridOptions(systems=["muxserve", "temporal", "spatial"], lanes=lanes, common_base=False, **kw)


def test_the_common_base_runs_first_at_every_point_unless_turned_off(tmp_path):
    point = e2e_grid.Point("p", {})
    opts = e2e_grid.GridOptions(systems=["spatial", "instances"])
    assert e2e_grid.todo_systems(tmp_path, point, opts) == ["alone", "spatial", "instances"]
    (tmp_path / "points" / "p").mkdir(parents=True)
    (tmp_path / "points" / "p" / "alone.json.gz").write_bytes(b"")
    assert e2e_grid.todo_systems(tmp_path, point, opts) == ["spatial", "instances"]  # measured once per point
    opts = e2e_grid.GridOptions(systems=["muxserve"], common_base=False)
    assert opts.runs == ["muxserve"] and e2e_grid.todo_systems(tmp_path, point, opts) == ["muxserve"]


def test_two_lanes_run_every_run_once_two_at_a_time_and_export(tmp_path, monkeypatch):
    points, record = _fake_grid(monkeypatch, tmp_path)
    machine = Machine(2, "cuda", 80.0)
    lanes = make_lanes(2, 2, None, "cuda", tmp_path / "mps", smi=SMI)
    out = tmp_path / "runs"
    status = e2e_grid.run_grid(out, points, machine, _opts(tmp_path, lanes, export_tgz=tmp_path / "e.tgz"))
    assert len(status["done"]) == 9 and not status["failed"] and not status["pending"]
    assert record["most"] == 2 and {r[2] for r in record["runs"]} == {0, 1}
    assert sorted((r[0], r[1]) for r in record["runs"]) == sorted((p.tag, s) for p in points
                                                                  for s in ("muxserve", "temporal", "spatial"))
    for p, system, lane, _, _ in record["runs"]:
        doc = read_json(out / "points" / p / f"{system}.json.gz")
        assert doc["lane"]["index"] == lane and doc["lane"]["num_lanes"] == 2
        assert doc["lane"]["gpus"] == (["0", "1"] if lane == 0 else ["2", "3"])
    # one daemon per lane and MPS run, for the lane's GPUs only, stopped after the run; none for temporal
    starts = [e for e in FakeMPS.log if e[1] == "start"]
    assert len(starts) == 6 and len([e for e in FakeMPS.log if e[1] == "stop"]) == 6
    assert {(d, gpus) for d, _, gpus in starts} <= {("lane0", "GPU-aaaa,GPU-bbbb"), ("lane1", "GPU-cccc,GPU-dddd")}
    with tarfile.open(tmp_path / "e.tgz") as tar:
        names = set(tar.getnames())
    assert {f"runs/points/p{i}/{s}.json.gz" for i in range(3) for s in ("muxserve", "temporal", "spatial")} <= names
    # resume: nothing left
    again = e2e_grid.run_grid(out, points, machine, _opts(tmp_path, lanes))
    assert len(again["skipped"]) == 9 and not again["done"]


def test_time_budget_starts_nothing_that_would_end_late_and_lets_runs_finish(tmp_path, monkeypatch):
    points, record = _fake_grid(monkeypatch, tmp_path, run_s=0.4)
    monkeypatch.setattr(e2e_grid, "DEFAULT_OVERHEAD_S", 0.4)
    lanes = make_lanes(2, 1, None, "cpu", tmp_path / "mps")
    budget = 1.0
    t0 = time.monotonic()
    status = e2e_grid.run_grid(tmp_path / "runs", points, Machine(1, "cpu", 1.0),
                               _opts(tmp_path, lanes, time_budget_s=budget, started=t0))
    assert status["pending"] and len(status["done"]) == len(record["runs"]) >= 2
    assert len(status["done"]) + len(status["pending"]) == 9
    for _, _, _, start, _ in record["runs"]:  # estimated end (start + worst run so far) within the budget
        assert start - t0 + 0.4 <= budget + 0.05


def test_an_unexpected_error_stops_the_other_lanes(tmp_path, monkeypatch):
    points, record = _fake_grid(monkeypatch, tmp_path, run_s=5.0, fail=("p0", "muxserve"))
    lanes = make_lanes(2, 1, None, "cpu", tmp_path / "mps")
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="a bug"):
        e2e_grid.run_grid(tmp_path / "runs", points, Machine(1, "cpu", 1.0), _opts(tmp_path, lanes))
    assert time.monotonic() - t0 < 4.0  # the temporal run of the other lane was stopped, not waited for
    assert not list((tmp_path / "runs").glob("points/*/*.json*"))


def test_export_leaves_out_running_runs_and_vanished_files(tmp_path, monkeypatch):
    out = tmp_path / "runs"
    (out / "points" / "p" / "runs" / "muxserve" / "logs").mkdir(parents=True)
    (out / "points" / "p" / "runs" / "muxserve" / "logs" / "a.log").write_text("x")
    (out / "points" / "p" / "runs" / "spatial").mkdir(parents=True)
    (out / "points" / "p" / "runs" / "spatial" / "llm-0.log").write_text("running")
    (out / "points" / "p" / "muxserve.json").write_text("{}")
    (out / "points" / "p" / "workload.json").write_text("[]")
    (out / "points" / "p" / ".temporal.json.tmp-1").write_text("{")
    real = Path.read_bytes

    def read_bytes(self):
        if self.name == "gone.txt":
            raise FileNotFoundError(self)
        return real(self)

    (out / "gone.txt").write_text("soon gone")
    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    e2e_grid.export_tgz(out, tmp_path / "x.tgz", skip=[out / "points" / "p" / "runs" / "spatial"])
    with tarfile.open(tmp_path / "x.tgz") as tar:
        names = set(tar.getnames())
        assert tar.extractfile("runs/points/p/muxserve.json").read() == b"{}"
    assert "runs/points/p/runs/muxserve" in names
    assert not [n for n in names if "spatial" in n or "logs" in n or "workload" in n or "tmp" in n or "gone" in n]
