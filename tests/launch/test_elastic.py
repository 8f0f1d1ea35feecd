"""Elastic residency with real processes (CPU): an LLM offloaded and woken while the others decode, a
wake that preempts other LLMs' newest requests, and the launcher's idle-timeout policy. Every
token equals the offline engine's (an always-resident run)."""

from __future__ import annotations

import time

import pytest
import yaml

from muxserve.config import load_config
from muxserve.engine import SamplingParams
from muxserve.instance.instance import Instance
from muxserve.instance.options import InstanceOptions
from muxserve.scheduler.policy import get_policy
from muxserve.workload.workload_file import WorkloadRequest, write_workload

from .helpers import run_launch

pytestmark = pytest.mark.timeout(600)
PAGE = 16384
GRANULE = 4 * PAGE


def elastic_config(setup, name: str, kv_cache_bytes: int, elastic=("llm-2",)):
    path = setup.config(name, kv_cache_bytes=kv_cache_bytes)
    doc = yaml.safe_load(path.read_text())
    for m in doc["models"]:
        if m["name"] in elastic:
            m["residency"] = "elastic"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture(autouse=True)
def _no_segment_left():
    """An Instance of this process names its segments muxserve<pid>-...: none may outlive its stop()."""
    import os

    from processes import shm_segments, wait_until

    yield
    prefix = f"muxserve{os.getpid()}-"
    wait_until(lambda: not shm_segments(prefix), 10)
    assert shm_segments(prefix) == set()


def submit(instance, setup, llm: str) -> list:
    return [instance.submit(r.llm, r.prompt_token_ids, SamplingParams(max_tokens=r.output_len, temperature=0,
                                                                      ignore_eos=True), time.monotonic(), r.idx)
            for r in setup.requests if r.llm == llm]


def poll_until(instance, condition, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        instance.poll(0.02)


def test_offloaded_llm_is_woken_by_its_request_and_the_wake_preempts_the_newest(setup, tmp_path):
    config = load_config(elastic_config(setup, "elastic.yaml", kv_cache_bytes=12 * PAGE))
    options = InstanceOptions(policy=get_policy("roundrobin"), device="cpu", log_dir=tmp_path / "logs",
                              page_bytes=PAGE, granule_bytes=GRANULE, reserve_granules=1)
    instance = Instance(config, options)
    try:
        instance.start()
        store = instance._allocator
        weights = next(m.weight_bytes for m in instance.store_info.models if m.name == "llm-2")
        room = store.stats().budget.free_granules  # KV room with llm-2 resident
        event = instance.offload("llm-2")
        assert event.kind == "offload" and event.nbytes == -(-weights // GRANULE) * GRANULE
        assert instance.load().llms["llm-2"].state == "offloaded"
        poll_until(instance, lambda: not instance.residency.unacknowledged)  # every runtime followed the notice
        with pytest.raises(ValueError, match="already offloaded"):
            instance.offload("llm-2")
        with pytest.raises(ValueError, match="not an elastic LLM"):
            instance.offload("llm-0")
        first = submit(instance, setup, "llm-0") + submit(instance, setup, "llm-1")
        # The others decode into llm-2's memory: past what they could hold with llm-2 resident.
        grains = -(-weights // GRANULE)
        poll_until(instance, lambda: store.stats().budget.kv_granules >= room + grains // 2)
        late = submit(instance, setup, "llm-2")
        poll_until(instance, lambda: instance.residency.elastic["llm-2"].resident)
        [wake] = [e for e in instance.residency.events if e.kind == "wake"]
        assert wake.llm == "llm-2" and wake.nbytes == weights and wake.waited >= 0
        instance.run_until_done()
        metrics = instance.metrics()
        stats = {m.name: m for m in store.stats().models}
        assert (stats["llm-2"].state, stats["llm-2"].offloads, stats["llm-2"].wakes) == ("resident", 1, 1)
    finally:
        instance.stop()
    for req in first + late:
        assert req.output_token_ids == setup.expected[req.idx], f"request {req.idx} of {req.llm}"
    assert metrics.residency["llm-2"]["offloads"] == 1 and metrics.residency["llm-2"]["wakes"] == 1
    # The wake took pages back from the newest requests of the others: recomputed, the same tokens.
    assert wake.preempted > 0 and sum(r.num_preemptions for r in first) >= wake.preempted
    assert metrics.residency["llm-2"]["wake_preempted"] == wake.preempted


def test_launch_offloads_an_idle_llm_and_wakes_it_while_the_others_decode(setup, tmp_path):
    # llm-2's requests come in two waves with a gap; llm-0 and llm-1 run throughout.
    workload, order = waves(setup, tmp_path)
    config = elastic_config(setup, "elastic-launch.yaml", kv_cache_bytes=8 << 20)
    proc, stats = run_launch(config, workload, tmp_path, "--no-slo", "--offload-idle-s", "0.5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = {r["idx"]: r["output_token_ids"] for r in stats["requests"]}
    assert len(got) == len(order)  # write_workload renumbers by arrival
    for new_idx, r in enumerate(order):
        assert got[new_idx] == setup.expected[r.idx], f"request {r.idx} of {r.llm}"
    residency = stats["summary"]["per_model"]["llm-2"]["residency"]
    assert residency["offloads"] >= 1 and residency["wakes"] >= 1
    events = stats["summary"]["overall"]["residency_events"]
    assert [e["kind"] for e in events if e["llm"] == "llm-2"][:2] == ["offload", "wake"]
    assert "[residency]" in proc.stdout
    assert "residency" not in stats["summary"]["per_model"]["llm-0"]


def waves(setup, tmp_path, gap_s: float = 4.0):
    """The setup's workload, stretched 2x, with llm-2's later half ``gap_s`` later: llm-2 is idle in between.
    Returns the file and its requests in file order."""
    idxs = sorted(r.idx for r in setup.requests if r.llm == "llm-2")
    late = set(idxs[len(idxs) // 2:])
    requests = [WorkloadRequest(r.idx, r.llm, r.arrival * 2 + (gap_s if r.idx in late else 0.0), r.prompt_token_ids,
                                r.output_len) for r in setup.requests]
    path = tmp_path / "waves.json"
    write_workload(path, {}, requests)
    return path, sorted(requests, key=lambda r: (r.arrival, r.idx))


@pytest.mark.parametrize("victim", ["runtime", "flexstore"])
def test_kill_during_a_wake_leaves_nothing_behind(setup, tmp_path, victim):
    import os
    import signal

    from processes import assert_nothing_left, descendants, flexstore_pid, runtime_pid

    from .test_faults import check_tokens, start_launch

    workload, order = waves(setup, tmp_path)
    config = elastic_config(setup, f"elastic-{victim}.yaml", kv_cache_bytes=8 << 20)
    run = start_launch(config, workload, tmp_path, "--offload-idle-s", "0.5")
    run.wait_for("offloaded llm-2")
    children = descendants(run.proc.pid)
    pid = runtime_pid(run.proc.pid, "llm-2", "decode") if victim == "runtime" else flexstore_pid(run.proc.pid)
    os.kill(pid, signal.SIGSTOP)  # it stops as the wake begins: killed with the wake under way
    run.wait_for("waking llm-2")
    os.kill(pid, signal.SIGKILL)
    if victim == "runtime":  # restarted, its requests recomputed: every token as offline
        assert run.proc.wait(300) == 0, run.stderr[-3000:]
        assert "runtime llm-2/decode is back (restart 1)" in run.stderr
        check_tokens(setup, run.stats(), order=order)
    else:
        assert run.proc.wait(120) == 1, run.stderr[-3000:]
        assert f"error: FlexStore (pid {pid}), which holds the weights and the KV pool of every LLM" in run.stderr
    assert_nothing_left(run.proc.pid, children)


def test_a_runtime_restarted_while_its_llm_is_offloaded_serves_after_the_wake(setup, tmp_path):
    import os
    import signal

    from muxserve.instance.supervisor import RuntimeState
    from muxserve.ipc.runtime import Phase

    config = load_config(elastic_config(setup, "elastic-restart.yaml", kv_cache_bytes=8 << 20))
    options = InstanceOptions(policy=get_policy("adbs"), device="cpu", log_dir=tmp_path / "logs", page_bytes=PAGE,
                              granule_bytes=GRANULE, reserve_granules=1)
    instance = Instance(config, options)
    try:
        instance.start()
        instance.offload("llm-2")
        group = instance.supervisor.groups[("llm-2", Phase.DECODE)]
        os.kill(group.children[0].proc.pid, signal.SIGKILL)
        poll_until(instance, lambda: group.starts == 2 and group.state is RuntimeState.READY)  # attached offloaded
        reqs = submit(instance, setup, "llm-2") + submit(instance, setup, "llm-0")
        instance.run_until_done()
    finally:
        instance.stop()
    for req in reqs:
        assert req.output_token_ids == setup.expected[req.idx], f"request {req.idx} of {req.llm}"
