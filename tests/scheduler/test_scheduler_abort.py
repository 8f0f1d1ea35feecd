"""MuxScheduler.abort and the on_token hook (what the HTTP server streams from), step by step."""

from __future__ import annotations

from muxserve.ipc.runtime import Phase

from .test_scheduler import Harness, ids, llm, seq

P, D = Phase.PREFILL, Phase.DECODE


def test_on_token_sees_every_token_in_order_with_the_final_state():
    h = Harness([llm("a")])
    seen = []
    h.sched.on_token = lambda req, tok: seen.append((req.req_id, tok, list(req.output_token_ids), req.finish_reason))
    h.add("a", [1, 2, 3], max_tokens=2)
    h.add("a", [4], max_tokens=3)
    [(_, _, job)] = h.step()
    h.finish(job, [10, 20])
    [(_, _, job)] = h.step()
    h.finish(job, [11, 21])
    [(_, _, job)] = h.step()
    h.finish(job, [22])
    assert seen == [("r0", 10, [10], None), ("r1", 20, [20], None),
                    ("r0", 11, [10, 11], "length"), ("r1", 21, [20, 21], None),
                    ("r1", 22, [20, 21, 22], "length")]


def test_abort_waiting_request_leaves_the_queue():
    h = Harness([llm("a", max_num_seqs=1)])
    r0 = h.add("a", [1, 2])
    r1 = h.add("a", [3, 4])
    [(_, _, job)] = h.step()  # only r0 fits the cap of 1 sequence
    assert ids(job) == ["r0"] and h.waiting("a") == ["r1"]
    h.clock.t = 0.5
    assert h.sched.abort("r1") is True
    assert h.waiting("a") == []
    assert (r1.finish_reason, r1.end) == ("abort", 0.5)
    assert h.sched.abort("r1") is False  # gone
    assert h.sched.abort("nope") is False
    h.finish(job, [9])
    assert h.sched.llms["a"].release[P] == []  # r1 never reached a runtime
    assert r0.finish_reason is None and h.finished == []


def test_abort_running_request_frees_its_pages_and_runtimes_drop_it():
    h = Harness([llm("a")])
    r0 = h.add("a", [1, 2, 3, 4, 5], max_tokens=8)  # pages 0, 1
    h.add("a", [6, 7], max_tokens=8)  # page 2
    [(_, _, job)] = h.step()
    h.finish(job, [10, 20])
    assert h.running("a") == ["r0", "r1"] and h.allocator.num_free == 61
    assert h.sched.abort("r0") is True
    assert not h.allocator.owns("a", "r0") and h.allocator.num_free == 63
    assert h.running("a") == ["r1"] and r0.finish_reason == "abort"
    [(_, phase, job)] = h.step()
    assert phase is D and job.release == ["r0"] and ids(job) == ["r1"]
    assert h.sched.llms["a"].release[P] == ["r0"]  # goes out with the next prefill job
    assert h.finished == []
    # its pages serve the next request
    h.finish(job, [21])
    h.add("a", [8, 9, 10, 11, 12, 13])
    [(_, _, job), *_] = h.step()
    assert job.seqs[0] == seq("r2", [8, 9, 10, 11, 12, 13], 6, 0, [0, 1], 0)
    assert job.release == ["r0"]


def test_abort_inside_an_inflight_job_takes_effect_when_its_result_comes_back():
    h = Harness([llm("a")])
    seen = []
    h.sched.on_token = lambda req, tok: seen.append((req.req_id, tok))
    r0 = h.add("a", [1, 2, 3], max_tokens=1)
    r1 = h.add("a", [4, 5], max_tokens=4)
    [(_, _, job)] = h.step()
    assert h.sched.abort("r1") is True  # in flight: nothing happens yet
    assert h.allocator.owns("a", "r1") and r1.finish_reason is None
    assert h.sched.abort("r1") is True
    h.clock.t = 2.0
    assert h.finish(job, [10, 20]) == [r0]  # r0 finished, r1 aborted: neither runs again
    assert seen == [("r0", 10)]  # the aborted request's token is dropped
    assert r1.output_token_ids == [] and (r1.finish_reason, r1.end) == ("abort", 2.0)
    assert h.finished == [r0]
    assert h.allocator.num_free == 64
    assert not h.sched.has_work() and h.step() == []
    assert h.sched.llms["a"].release[D] == ["r0", "r1"]
    assert h.sched.llms["a"].executing == 0 and h.sched.sm.refs == [0] * 10


def test_abort_frees_room_for_a_request_waiting_for_pages():
    h = Harness([llm("a")], num_pages=3)
    h.add("a", [1] * 8, max_tokens=8)  # 2 pages
    h.add("a", [2] * 8, max_tokens=8)  # 2 more: does not fit
    [(_, _, job)] = h.step()
    assert ids(job) == ["r0"] and h.waiting("a") == ["r1"]
    h.finish(job, [5])
    h.sched.abort("r0")
    [(_, phase, job)] = h.step()
    assert phase is P and ids(job) == ["r1"]
    assert h.allocator.pages_of("a", "r1") == [0, 1]  # r0's pages
