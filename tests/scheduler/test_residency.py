"""The scheduler under elastic residency: no job for an offloaded LLM, protected requests, and the
requests a wake preempted back at the head of their queue (recomputed, nothing lost)."""

from __future__ import annotations

import pytest

from muxserve.flexstore.budget import MemoryBudget, WakeRefused
from muxserve.ipc.runtime import JobResult, Phase
from muxserve.scheduler.policy import get_policy
from muxserve.scheduler.scheduler import MuxScheduler

from .test_scheduler import LAYOUT, FakeClock, RecordingLink, llm

P, D = Phase.PREFILL, Phase.DECODE
GRANULE = 4 * LAYOUT.page_bytes  # 4 pages


class EpochBudget(MemoryBudget):
    kv_epoch = 7  # what FlexStoreClient reports; jobs carry it


def make_harness(granules: int):
    """A scheduler over a budget of ``granules``: pinned LLM a, elastic LLM b of 8 granules of weights."""
    budget = EpochBudget(granules * GRANULE, LAYOUT.page_bytes, GRANULE, reserve_granules=0)
    budget.register_model("a", LAYOUT)
    budget.register_model("b", LAYOUT, weight_bytes=8 * GRANULE, residency="elastic")
    log = []
    infos = [llm("a"), llm("b")]
    links = {(i.name, ph): RecordingLink((i.name, ph), log) for i in infos for ph in Phase}
    sched = MuxScheduler(infos, budget, links, get_policy("roundrobin"), 2048, 10, clock=FakeClock())
    return sched, budget, log


@pytest.fixture
def harness():
    return make_harness(24)


def add(sched, name, rid, n=8, max_tokens=8):
    from muxserve.engine.sampling_params import SamplingParams
    from muxserve.scheduler.state import Request

    idx = int(rid[1:]) + (100 if name == "b" else 0)
    req = Request(rid, list(range(1, n + 1)), SamplingParams(max_tokens=max_tokens, temperature=0), idx=idx,
                  llm=name, arrival=0.0)
    sched.add(req)
    return req


def test_an_offloaded_llm_gets_no_job_until_it_is_resident(harness):
    sched, budget, log = harness
    budget.offload("b")
    budget.finish_offload("b")
    sched.set_offloaded("b")
    add(sched, "a", "a1")
    add(sched, "b", "b1")
    sched.schedule()
    assert [(llm_, ph) for llm_, ph, _ in log] == [("a", P)]
    assert sched.to_wake() == ["b"] and not sched.is_idle("b") and sched.has_work()
    budget.wake("b")
    budget.finish_wake("b")
    sched.set_resident("b", weights_epoch=3)
    sched.schedule()
    job = log[-1][2]
    assert log[-1][:2] == ("b", P) and (job.kv_epoch, job.weights_epoch) == (7, 3)
    assert sched.to_wake() == []


def test_offloading_an_llm_with_requests_is_refused(harness):
    sched, _, _ = harness
    add(sched, "b", "b1")
    sched.schedule()
    with pytest.raises(ValueError, match="in flight"):
        sched.set_offloaded("b")


def test_a_wake_preempts_the_newest_unprotected_requests_which_are_recomputed():
    sched, budget, log = make_harness(13)
    budget.offload("b")
    budget.finish_offload("b")
    sched.set_offloaded("b")
    reqs = [add(sched, "a", f"a{i}", n=32) for i in range(5)]  # 8 pages = 2 granules each: 10 of 13
    sched.schedule()
    prefill = log[-1][2]
    assert [s.req_id for s in prefill.seqs] == [r.req_id for r in reqs]
    assert sched.protected() == [("a", r.req_id) for r in reqs]  # inside the in-flight prefill
    with pytest.raises(WakeRefused):  # everything is in flight: nothing may be taken
        budget.wake("b", sched.protected())
    sched.on_result(JobResult(prefill.job_id, "a/prefill", [5] * 5, 0.0))
    assert sched.protected() == []
    plan = budget.wake("b", sched.protected())  # 3 granules free, 8 needed: the 3 newest go
    assert plan.preempted == {"a": ["a2", "a3", "a4"]}
    requeued = sched.requeue_preempted(plan.preempted)
    state = sched.llms["a"]
    assert [r.req_id for r in requeued] == ["a2", "a3", "a4"]
    assert [r.req_id for r in state.waiting] == ["a2", "a3", "a4"] and [r.req_id for r in state.running] == [
        "a0", "a1"]
    assert all(r.pages == [] and r.num_preemptions == 1 for r in requeued)
    assert all(r.req_id in state.release[D] and r.req_id in state.release[P] for r in requeued)
    assert sched.num_preemptions == 3
    again = state.waiting[0].seq_input("a/prefill", P)
    assert again.page_offset == 0 and again.token_ids == list(range(1, 33)) + [5]  # recomputed whole
    budget.finish_wake("b")
    sched.set_resident("b")
    assert budget.used_by("a") == 2 * 8


def test_requeue_refuses_requests_that_are_not_between_steps(harness):
    sched, _, _ = harness
    add(sched, "a", "a1")
    sched.schedule()  # a1 is inside the prefill job
    with pytest.raises(RuntimeError, match="not between steps"):
        sched.requeue_preempted({"a": ["a1"]})
