"""A runtime that dies: its job is recomputed, the new process gets whole page lists, only its LLM can fail."""

from __future__ import annotations

import random

import pytest

from muxserve.ipc.runtime import Phase
from muxserve.scheduler.scheduler import LLMUnavailable

from .test_scheduler import FakeRuntimes, Harness, fake_model_alone, ids, kinds, llm, quota_for, seq

P, D = Phase.PREFILL, Phase.DECODE


def test_lost_decode_job_is_recomputed_and_the_new_runtime_gets_whole_page_lists():
    h = Harness([llm("a")])
    r0 = h.add("a", [1, 2, 3, 4, 5], max_tokens=8)  # pages 0, 1
    r1 = h.add("a", [6, 7], max_tokens=8)  # page 2
    [(_, _, job)] = h.step()
    h.finish(job, [10, 20])
    [(_, phase, lost)] = h.step()
    assert phase is D and ids(lost) == ["r0", "r1"]
    h.add("a", [8, 9, 11], max_tokens=8)

    assert h.sched.runtime_lost("a", D) == [r0, r1]
    assert h.allocator.num_free == 64  # their pages are back
    assert h.waiting("a") == ["r0", "r1", "r2"]  # at the head of the queue, in order
    assert (r0.num_preemptions, r0.pages, r0.pages_sent) == (1, [], {})
    assert h.finish(lost, [11, 21]) == []  # a late answer of the dead process changes nothing
    assert r0.output_token_ids == [10]

    # The prefill runtime recomputes prompt + output so far; no decode goes to the dead one.
    [(_, phase, job)] = h.step()
    assert phase is P and job.seqs == [seq("r0", [1, 2, 3, 4, 5, 10], 6, 0, [2, 0], 1),
                                       seq("r1", [6, 7, 20], 3, 0, [1], 1),
                                       seq("r2", [8, 9, 11], 3, 0, [3], 0)]
    h.finish(job, [12, 22, 30])
    assert h.step() == [] and h.running("a") == ["r0", "r1", "r2"]

    h.sched.runtime_ready("a", D)
    [(_, phase, job)] = h.step()  # the new process knows no page: every list is whole (offset 0)
    assert phase is D and job.seqs == [seq("r0", [12], 7, 0, [2, 0], 2), seq("r1", [22], 4, 0, [1], 2),
                                       seq("r2", [30], 4, 0, [3], 1)]


def test_running_requests_keep_their_pages_and_the_restarted_runtime_gets_them_whole():
    h = Harness([llm("a")])
    h.add("a", [1, 2, 3, 4, 5], max_tokens=8)
    [(_, _, job)] = h.step()
    h.finish(job, [10])
    [(_, _, job)] = h.step()
    assert job.seqs == [seq("r0", [10], 6, 0, [0, 1], 1)]
    h.finish(job, [11])  # r0 is between decode steps: 7 tokens, still pages 0, 1
    [(_, _, job)] = h.step()
    assert job.seqs == [seq("r0", [11], 7, 2, [], 2)]  # a delta: the runtime knows pages 0, 1
    h.finish(job, [12])
    assert h.sched.runtime_lost("a", D) == []  # nothing of it was in flight
    assert h.allocator.pages_of("a", "r0") == [0, 1] and h.running("a") == ["r0"]
    h.sched.runtime_ready("a", D)
    [(_, _, job)] = h.step()
    assert job.seqs == [seq("r0", [12], 8, 0, [0, 1], 3)]  # the whole list for the new process


@pytest.mark.parametrize("policy", ["adbs", "fcfs"])
def test_other_llms_go_on_while_a_prefill_runtime_restarts(policy):
    quota = quota_for(["a", "b"], total_pages=64, avg_seq_len=8) if policy == "adbs" else None
    h = Harness([llm("a"), llm("b")], policy=policy, quota=quota)
    h.sched.runtime_lost("a", P)
    h.add("a", [1, 2], max_tokens=2)  # the oldest request, of the LLM that cannot prefill now
    h.add("b", [3, 4], max_tokens=2)
    [(name, phase, job)] = h.step()
    assert (name, phase) == ("b", P)
    h.finish(job, [5])
    # a's waiting prefill does not hold b's decode back (prefill priority, fcfs order)
    [(name, phase, job)] = h.step()
    assert (name, phase) == ("b", D)
    h.finish(job, [6])
    h.sched.runtime_ready("a", P)
    assert kinds(h.step()) == [("a", P)]


def test_a_failed_llm_ends_its_requests_with_the_message_and_refuses_new_ones():
    h = Harness([llm("a", prefill=50), llm("b", prefill=50)])
    errors = []
    h.sched.on_error = errors.append
    inflight = h.add("a", [1, 2, 3], max_tokens=4)
    b0 = h.add("b", [4, 5], max_tokens=3)
    assert kinds(h.step()) == [("a", P), ("b", P)]
    waiting = h.add("a", [6], max_tokens=4)
    h.clock.t = 3.0
    message = "LLM 'a' failed: runtime a/decode exited with code -9 (SIGKILL); 3 restarts did not bring it back"
    assert h.sched.fail_llm("a", message) == [inflight, waiting]
    assert errors == [inflight, waiting]
    assert [(r.finish_reason, r.error, r.end) for r in errors] == [("error", message, 3.0)] * 2
    assert h.allocator.used_by("a") == 0 and not h.waiting("a") and not h.sched.llms["a"].executing
    with pytest.raises(LLMUnavailable, match="^LLM 'a' failed: runtime a/decode"):
        h.add("a", [7])
    h.sched.runtime_ready("a", P)  # a failed LLM stays down
    # b is untouched: its prefill result still counts, and it runs to the end
    [b_job] = [job for name, _, job in h.log if name == "b"]
    h.finish(b_job, [9])
    FakeRuntimes(h).run_to_completion()
    assert b0.finish_reason == "length" and len(b0.output_token_ids) == 3
    assert h.allocator.num_free == 64 and h.sched.sm.refs == [0] * 10


@pytest.mark.parametrize("seed", range(4))
def test_every_request_completes_through_random_runtime_deaths(seed):
    names = ["llm-0", "llm-1", "llm-2"]
    h = Harness([llm(n, max_num_seqs=3) for n in names], num_pages=12, threshold=3, budget=12)
    rng = random.Random(seed)
    runtimes = FakeRuntimes(h, seed=seed)
    reqs = [h.add(names[i % 3], [rng.randrange(1, 90) for _ in range(rng.randrange(1, 6))],
                  max_tokens=rng.randrange(1, 12)) for i in range(48)]
    down: set = set()
    deaths = 0
    for _ in range(10_000):
        if not h.sched.has_work():
            break
        if rng.random() < 0.15:  # a runtime dies: its jobs and its page tables are gone
            key = (rng.choice(names), rng.choice(list(Phase)))
            for job_id, job in list(h.sched.inflight.items()):
                if (job.llm, job.phase) == key:
                    del runtimes.jobs[job_id]
            h.sched.runtime_lost(*key)
            runtimes.tables.pop(key, None)
            down.add(key)
            deaths += 1
        elif down and rng.random() < 0.3:
            h.sched.runtime_ready(*down.pop())
        runtimes.schedule()  # checks every page list a runtime keeps against the allocator
        if runtimes.jobs:
            runtimes.answer_one()
        elif down:
            h.sched.runtime_ready(*down.pop())
    assert deaths > 10
    assert len(h.finished) == 48
    for r in reqs:
        assert r.output_token_ids == fake_model_alone(r.prompt_token_ids, r.params.max_tokens)
    assert h.allocator.num_free == 12 and h.sched.sm.refs == [0] * 10
    assert sum(r.num_preemptions for r in reqs) > h.sched.num_preemptions  # recomputed after deaths
