"""Faults of python -m muxserve.launch with real processes: a dead runtime, a dead FlexStore, a killed
launcher, signals, a taken port, and two instances side by side."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from processes import (
    assert_nothing_left,
    descendants,
    flexstore_pid,
    run_dirs_of,
    runtime_pid,
    shm_segments,
    wait_until,
)

from muxserve.workload.workload_file import WorkloadRequest, write_workload

from .helpers import REPO, launch_args, run_launch

pytestmark = pytest.mark.timeout(600)
LLMS = ("llm-0", "llm-1", "llm-2")


@dataclass
class Launch:
    proc: subprocess.Popen
    tmp: Path

    @property
    def stderr(self) -> str:
        return (self.tmp / "stderr.txt").read_text(errors="replace")

    def stats(self) -> dict | None:
        path = self.tmp / "stats.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def wait_for(self, text: str, timeout: float = 180, count: int = 1) -> None:
        ok = wait_until(lambda: self.stderr.count(text) >= count or self.proc.poll() is not None, timeout)
        assert ok and self.stderr.count(text) >= count, f"no {text!r} in:\n{self.stderr[-3000:]}"


def start_launch(config: Path, workload: Path, tmp: Path, *extra: str) -> Launch:
    tmp.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(tmp / "stderr.txt", "wb") as err, open(tmp / "stdout.txt", "wb") as out:
        proc = subprocess.Popen(launch_args(config, workload, tmp, "--no-slo", *extra), cwd=REPO, env=env,
                                stdout=out, stderr=err)
    return Launch(proc, tmp)


def stretched(setup, tmp: Path, factor: float, early: str | None = None, keep=LLMS) -> tuple[Path, list]:
    """The setup's workload (LLMs ``keep``) with arrivals ``factor`` times later, a run long enough to
    hurt mid-way; the requests of LLM ``early`` all come in the first 1.5 s. Returns the file and its
    requests in file order (``write_workload`` numbers them 0, 1, ... by arrival)."""
    path = tmp / f"slow{factor}.json"
    kept = [WorkloadRequest(r.idx, r.llm, r.arrival * (0.5 if r.llm == early else factor), r.prompt_token_ids,
                            r.output_len) for r in setup.requests if r.llm in keep]
    write_workload(path, {}, kept)
    return path, sorted(kept, key=lambda r: (r.arrival, r.idx))


def stop_then_kill(pid: int, stopped_s: float = 2.5) -> None:
    """SIGSTOP first: the LLM's early requests are prefilled meanwhile and their decode job is sent to
    the stopped process, where it is stuck when SIGKILL comes (a death with a job in flight)."""
    os.kill(pid, signal.SIGSTOP)
    time.sleep(stopped_s)
    os.kill(pid, signal.SIGKILL)


def check_tokens(setup, stats, llms=LLMS, order: list | None = None) -> None:
    """Every request of ``llms`` finished with the offline engine's tokens; ``order``: the workload's
    requests by their index in the file, when it was written in another order than the setup's."""
    expected = {i: setup.expected[r.idx] for i, r in enumerate(order)} if order else setup.expected
    models = {i: r.llm for i, r in enumerate(order)} if order else {r.idx: r.llm for r in setup.requests}
    got = {r["idx"]: r for r in stats["requests"] if r["model"] in llms}
    assert set(got) == {i for i, llm in models.items() if llm in llms}
    for idx, rec in got.items():
        assert rec["output_token_ids"] == expected[idx], f"request {idx} ({rec['model']})"
        assert rec["end"] is not None


def test_a_killed_runtime_is_restarted_and_its_requests_recomputed(setup, tmp_path):
    workload, order = stretched(setup, tmp_path, 6, early="llm-1")
    run = start_launch(setup.config(), workload, tmp_path)
    run.wait_for("replaying")
    children = descendants(run.proc.pid)
    stop_then_kill(runtime_pid(run.proc.pid, "llm-1", "decode"))
    assert run.proc.wait(300) == 0, run.stderr[-3000:]
    err = run.stderr
    assert "runtime llm-1/decode exited with code -9 (SIGKILL)" in err
    assert "restarting runtime llm-1/decode (restart 1 of at most 3)" in err
    assert "runtime llm-1/decode is back (restart 1)" in err
    stats = run.stats()
    check_tokens(setup, stats, order=order)  # every request of every LLM, token for token
    recomputed = [r for r in stats["requests"] if r["num_preemptions"] > 0]
    assert stats["summary"]["overall"]["scheduler_preemptions"] == 0  # the pool never ran out ...
    assert recomputed and {r["model"] for r in recomputed} == {"llm-1"}  # ... the lost job was recomputed
    assert_nothing_left(run.proc.pid, children)


def test_a_runtime_that_keeps_dying_fails_its_llm_alone(setup, tmp_path):
    run = start_launch(setup.config(), stretched(setup, tmp_path, 6)[0], tmp_path, "--max-runtime-restarts", "1",
                       "--restart-backoff", "0.2")
    run.wait_for("replaying")
    children = descendants(run.proc.pid)
    first = runtime_pid(run.proc.pid, "llm-1", "decode")
    os.kill(first, signal.SIGKILL)
    run.wait_for("runtime llm-1/decode is back (restart 1)")
    second = runtime_pid(run.proc.pid, "llm-1", "decode")
    assert second not in (None, first)
    children |= {second}
    os.kill(second, signal.SIGKILL)
    assert run.proc.wait(300) == 1, run.stderr[-3000:]
    stats = run.stats()
    check_tokens(setup, stats, llms=("llm-0", "llm-2"))  # the other LLMs: every request, token for token
    llm1 = [r for r in stats["requests"] if r["model"] == "llm-1"]
    failed = [r for r in llm1 if r["end"] is None]
    assert failed and len(llm1) == sum(r.llm == "llm-1" for r in setup.requests)
    for r in llm1:  # what llm-1 did produce is right
        assert r["output_token_ids"] == setup.expected[r["idx"]][:len(r["output_token_ids"])]
    assert (f"error: LLM 'llm-1' failed: runtime llm-1/decode exited with code -9 (SIGKILL); 1 restart did not "
            f"bring it back; {len(failed)} of its requests did not finish (the other LLMs' requests were served)"
            ) in run.stderr
    assert stats["summary"]["overall"]["num_finished"] == len(setup.requests) - len(failed)
    assert_nothing_left(run.proc.pid, children)


def test_a_killed_flexstore_ends_the_launch_at_once_naming_it(setup, tmp_path):
    run = start_launch(setup.config(), stretched(setup, tmp_path, 6)[0], tmp_path)
    run.wait_for("replaying")
    children = descendants(run.proc.pid)
    store = flexstore_pid(run.proc.pid)
    os.kill(store, signal.SIGKILL)
    start = time.monotonic()
    code = run.proc.wait(60)
    assert time.monotonic() - start < 10
    assert code == 1
    assert (f"error: FlexStore (pid {store}), which holds the weights and the KV pool of every LLM, exited with "
            f"code -9 (SIGKILL); the instance cannot go on without it; its log: {tmp_path / 'logs' / 'flexstore.log'}"
            f"; every process of the instance was stopped") in run.stderr
    assert_nothing_left(run.proc.pid, children)


@pytest.mark.parametrize("signum, code, message", [
    (signal.SIGKILL, -9, None),
    (signal.SIGTERM, 143, "terminated (SIGTERM); every process of the instance was stopped"),
    (signal.SIGINT, 130, "interrupted; every process of the instance was stopped"),
])
def test_a_signalled_launcher_leaves_no_process_segment_or_directory(setup, tmp_path, signum, code, message):
    run = start_launch(setup.config(), stretched(setup, tmp_path, 6)[0], tmp_path)
    run.wait_for("replaying")
    children = descendants(run.proc.pid)
    assert len(children) >= 7 and shm_segments(f"muxserve{run.proc.pid}-") and run_dirs_of(run.proc.pid)
    os.kill(run.proc.pid, signum)
    assert run.proc.wait(60) == code
    if message:
        assert message in run.stderr
    assert_nothing_left(run.proc.pid, children)


def test_a_taken_flexstore_port_is_refused_before_anything_starts(setup, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc, stats = run_launch(setup.config(), setup.workload, tmp_path, "--flexstore-port", str(port))
    assert proc.returncode == 2
    assert (f"error: --flexstore-port: port {port} of 127.0.0.1 is already in use (another instance?); choose a "
            f"free port, or leave --flexstore-port out to use the instance's private directory") in proc.stderr
    assert stats is None and not (tmp_path / "logs").exists()  # nothing was started


def test_two_instances_with_default_settings_side_by_side(setup, tmp_path):
    # One with two tensor-parallel LLMs (their groups meet in the instance's directory), one
    # with a single LLM: both at once, each with its own FlexStore, both exact.
    doc = yaml.safe_load(setup.config().read_text())
    doc["num_gpus"] = 2
    for m in doc["models"]:
        if m["name"] != "llm-0":
            m.update(tensor_parallel_size=2, placement=[[0, 1]])
    tp = tmp_path / "tp.yaml"
    tp.write_text(yaml.safe_dump(doc))
    a = start_launch(tp, setup.workload, tmp_path / "a")
    b = start_launch(setup.config(), setup.workload, tmp_path / "b", "--split-by-model", "llm-1")
    assert a.proc.wait(400) == 0, a.stderr[-3000:]
    assert b.proc.wait(400) == 0, b.stderr[-3000:]
    check_tokens(setup, a.stats())
    check_tokens(setup, b.stats(), llms=("llm-1",))
    for run in (a, b):
        assert_nothing_left(run.proc.pid, set())


def test_a_killed_tensor_parallel_rank_restarts_its_whole_group(setup, tmp_path):
    doc = yaml.safe_load(setup.config().read_text())
    doc["num_gpus"] = 2
    doc["models"] = doc["models"][:2]
    doc["models"][1].update(tensor_parallel_size=2, placement=[[0, 1]])
    config = tmp_path / "tp.yaml"
    config.write_text(yaml.safe_dump(doc))
    workload, order = stretched(setup, tmp_path, 6, early="llm-1", keep=("llm-0", "llm-1"))
    run = start_launch(config, workload, tmp_path)
    run.wait_for("replaying")
    children = descendants(run.proc.pid)
    ranks = [runtime_pid(run.proc.pid, "llm-1", "decode", rank) for rank in (0, 1)]
    stop_then_kill(ranks[1])  # rank 0 gets the stuck job too and waits for rank 1 inside it
    run.wait_for("runtime llm-1/decode is back (restart 1)")
    new = [runtime_pid(run.proc.pid, "llm-1", "decode", rank) for rank in (0, 1)]
    assert not set(new) & set(ranks) and None not in new  # both ranks are new processes
    children |= set(new)
    assert run.proc.wait(300) == 0, run.stderr[-3000:]
    assert "llm-1/decode/rank1 exited with code -9 (SIGKILL)" in run.stderr
    stats = run.stats()
    check_tokens(setup, stats, llms=("llm-0", "llm-1"), order=order)
    assert any(r["num_preemptions"] > 0 for r in stats["requests"] if r["model"] == "llm-1")
    assert stats["summary"]["overall"]["scheduler_preemptions"] == 0
    assert_nothing_left(run.proc.pid, children)
