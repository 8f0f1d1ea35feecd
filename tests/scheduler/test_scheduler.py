"""The scheduler against fake runtimes: exact jobs, page ids and queue states, step by step.

Every model here reads the pool with 4-token pages, one page per token block (one layer, one
kv-head), so a request of t tokens owns ceil(t / 4) pages. A fresh PageAllocator hands out
0, 1, 2, ...; freed pages are reused last-freed-first.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from muxserve.engine.kv_cache import KVLayout, PageAllocator
from muxserve.engine.sampling_params import SamplingParams
from muxserve.ipc.runtime import Job, JobResult, Phase, SeqInput
from muxserve.scheduler.policy import get_policy
from muxserve.scheduler.quota import QuotaManager, QuotaModel, units_for
from muxserve.scheduler.scheduler import LLMInfo, MuxScheduler
from muxserve.scheduler.state import Request

PAGE_TOKENS = 4
LAYOUT = KVLayout(num_layers=1, num_kv_heads=1, head_dim=8, dtype=torch.float32, page_bytes=256)
assert (LAYOUT.page_tokens, LAYOUT.pages_per_block) == (PAGE_TOKENS, 1)

P, D = Phase.PREFILL, Phase.DECODE


def llm(name, prefill=100, decode=30, max_num_seqs=256, eos=(), max_model_len=1024) -> LLMInfo:
    return LLMInfo(name=name, prefill_units=units_for(prefill), decode_units=units_for(decode),
                   max_num_seqs=max_num_seqs, eos_ids=frozenset(eos), max_model_len=max_model_len, vocab_size=128)


def seq(rid, tokens, num_tokens, offset, pages, num_out) -> SeqInput:
    return SeqInput(rid, tokens, num_tokens, offset, pages, 0.0, 1.0, -1, None, num_out)


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class RecordingLink:
    def __init__(self, key, log):
        self.key, self.log = key, log

    def send(self, job: Job) -> None:
        self.log.append((self.key[0], self.key[1], job))


class Harness:
    def __init__(self, llms, num_pages=64, policy="roundrobin", threshold=2, budget=2048, quota=None,
                 adapt_interval=8.0):
        self.clock = FakeClock()
        self.allocator = PageAllocator(num_pages)
        for info in llms:
            self.allocator.register_model(info.name, LAYOUT)
        self.log: list[tuple[str, Phase, Job]] = []
        links = {(i.name, ph): RecordingLink((i.name, ph), self.log) for i in llms for ph in Phase}
        self.sched = MuxScheduler(llms, self.allocator, links, get_policy(policy), budget, threshold,
                                  quota=quota, clock=self.clock, adapt_interval=adapt_interval)
        self.requests: dict[str, Request] = {}
        self.finished: list[Request] = []  # what the results returned as finished, in order

    def add(self, name, prompt, max_tokens=16, **params) -> Request:
        n = len(self.requests)
        req = Request(f"r{n}", list(prompt), SamplingParams(max_tokens=max_tokens, temperature=0, **params),
                      idx=n, llm=name, arrival=self.clock())
        self.requests[req.req_id] = req
        self.sched.add(req)
        return req

    def step(self) -> list[tuple[str, Phase, Job]]:
        """Schedule once; the (llm, phase, job) sent, in order."""
        before = len(self.log)
        sent = self.sched.schedule()
        new = self.log[before:]
        assert sent == len(new)
        return new

    def finish(self, job: Job, tokens: list[int]) -> list[Request]:
        done = self.sched.on_result(JobResult(job.job_id, "fake", tokens, 0.0))
        self.finished.extend(done)
        return done

    def waiting(self, name) -> list[str]:
        return [r.req_id for r in self.sched.llms[name].waiting]

    def running(self, name) -> list[str]:
        return [r.req_id for r in self.sched.llms[name].running]


def kinds(sent) -> list[tuple[str, Phase]]:
    return [(name, phase) for name, phase, _ in sent]


def ids(job: Job) -> list[str]:
    return [s.req_id for s in job.seqs]


def quota_for(names, total_pages, avg_seq_len, rates=None) -> QuotaManager:
    rates = rates or {}
    return QuotaManager([QuotaModel(n, rates.get(n, 1.0), 1, PAGE_TOKENS) for n in names], total_pages, avg_seq_len)


# -- one LLM, step by step ---------------------------------------------------------------------
def test_prefill_then_decode_with_exact_page_deltas():
    h = Harness([llm("a")])
    r0 = h.add("a", [1, 2, 3, 4, 5], max_tokens=3)
    r1 = h.add("a", [6, 7, 8], max_tokens=5)

    [(name, phase, job0)] = h.step()
    assert (name, phase, job0.phase) == ("a", P, "prefill")
    assert job0.seqs == [seq("r0", [1, 2, 3, 4, 5], 5, 0, [0, 1], 0), seq("r1", [6, 7, 8], 3, 0, [2], 0)]
    assert job0.release == []
    assert h.allocator.num_free == 61
    assert h.step() == []  # the prefill runtime is busy and nothing else is there
    assert (r0.submit, r0.prefill_end) == (0.0, None)

    h.clock.t = 1.0
    assert h.finish(job0, [10, 20]) == []
    assert (r0.prefill_end, r1.prefill_end) == (1.0, 1.0)
    assert h.running("a") == ["r0", "r1"]

    # the decode runtime sees each request for the first time: whole page list at offset 0
    [(_, phase, job1)] = h.step()
    assert (phase, job1.phase) == (D, "decode")
    assert job1.seqs == [seq("r0", [10], 6, 0, [0, 1], 1), seq("r1", [20], 4, 0, [2], 1)]
    assert h.allocator.num_free == 61
    assert h.finish(job1, [11, 21]) == []

    # later only the pages added since: r1 reaches 5 tokens and gets page 3 at offset 1
    [(_, _, job2)] = h.step()
    assert job2.seqs == [seq("r0", [11], 7, 2, [], 2), seq("r1", [21], 5, 1, [3], 2)]
    assert h.allocator.pages_of("a", "r1") == [2, 3]
    assert h.allocator.num_free == 60

    h.clock.t = 2.0
    assert h.finish(job2, [12, 22]) == [r0]  # max_tokens = 3
    assert (r0.output_token_ids, r0.finish_reason, r0.end) == ([10, 11, 12], "length", 2.0)
    assert not h.allocator.owns("a", "r0")
    assert h.allocator.num_free == 62
    assert h.finished == [r0]

    [(_, _, job3)] = h.step()
    assert job3.release == ["r0"]  # the decode runtime may drop r0's page list
    assert job3.seqs == [seq("r1", [22], 6, 2, [], 3)]
    h.finish(job3, [23])
    [(_, _, job4)] = h.step()
    assert job4.seqs == [seq("r1", [23], 7, 2, [], 4)] and job4.release == []
    assert h.finish(job4, [24]) == [r1]
    assert r1.output_token_ids == [20, 21, 22, 23, 24]
    assert h.allocator.num_free == 64
    assert h.sched.llms["a"].release[P] == ["r0", "r1"]  # goes out with the next prefill job
    assert not h.sched.has_work()
    assert h.step() == []
    assert h.sched.sm.refs == [0] * 10
    rec = r1.record()
    assert (rec.prompt_len, rec.output_len, rec.submit, rec.prefill_end, rec.end) == (3, 5, 0.0, 1.0, 2.0)


@pytest.mark.parametrize("prefill_pct, overlap", [(100, False), (80, True)])
def test_prefill_goes_first_and_decode_overlaps_only_within_sm_units(prefill_pct, overlap):
    h = Harness([llm("a", prefill=prefill_pct, decode=30)], threshold=2)
    h.add("a", [1, 2])
    [(_, _, job)] = h.step()
    h.finish(job, [5])
    h.add("a", [3, 4])
    sent = h.step()
    # 100 % + 30 % > 120 %: the decode waits; 80 % + 30 % fits
    assert kinds(sent) == ([("a", P), ("a", D)] if overlap else [("a", P)])
    assert ids(sent[0][2]) == ["r1"]


# -- prefill priority, round-robin, FCFS, token budget, quota ---------------------------------
def test_no_decode_starts_while_a_prefill_waits_for_sm_units():
    h = Harness([llm("a"), llm("b")], threshold=0)  # prefill 10 units, decode 3, no overload
    ra = h.add("a", [1])
    rb = h.add("b", [2])
    [(_, _, pa)] = h.step()
    assert kinds(h.log) == [("a", P)]  # b's prefill has no units left
    h.finish(pa, [7])
    [(_, _, pb)] = h.step()  # b's prefill; a's decode (3 units) does not fit next to it
    assert kinds(h.log[1:]) == [("b", P)]
    h.finish(pb, [7])
    sent = h.step()
    assert kinds(sent) == [("a", D), ("b", D)]
    (_, _, da), (_, _, db) = sent

    ra2 = h.add("a", [3])
    assert h.step() == []  # 4 units free: a's prefill waits
    h.finish(db, [8])
    assert h.running("b") == ["r1"]
    # 7 units free: still not enough for a's prefill, and b's decode (3 units) must not take them
    assert h.step() == []
    assert h.running("b") == ["r1"] and h.waiting("a") == ["r2"]
    h.finish(da, [8])
    sent = h.step()
    assert kinds(sent) == [("a", P)]  # all 10 units to the prefill; no decode fits beside it
    assert ids(sent[0][2]) == ["r2"]
    assert (ra.output_token_ids, rb.output_token_ids, ra2.output_token_ids) == ([7, 8], [7, 8], [])


def test_round_robin_over_llms():
    # prefill 6 units, decode 5, no overload: one prefill at a time, two decodes at most
    h = Harness([llm(n, prefill=60, decode=50) for n in "abc"], threshold=0)
    for n in "abc":
        h.add(n, [1, 2])
    order = []
    for _ in range(3):
        [(name, phase, job)] = h.step()
        order.append((name, phase))
        h.finish(job, [9])
    assert order == [("a", P), ("b", P), ("c", P)]

    (_, _, dec_a), (_, _, dec_b) = sent = h.step()
    assert kinds(sent) == [("a", D), ("b", D)]  # c's decode has no units left
    h.finish(dec_a, [9])
    [(name, phase, dec_c)] = h.step()
    assert (name, phase) == ("c", D)  # the decode turn goes on at c, not back to a
    h.finish(dec_b, [9])
    [(name, phase, dec_a)] = h.step()
    assert (name, phase) == ("a", D)

    # new requests for c, then a: the prefill turn is at a (after c), whatever the arrival order
    h.add("c", [3])
    h.add("a", [4])
    h.finish(dec_c, [9])
    assert h.step() == []  # 5 units free: neither prefill (6) fits, and no decode may start
    h.finish(dec_a, [9])
    assert kinds(h.step()) == [("a", P)]  # then c's prefill has 4 units: no_sm


def test_fcfs_within_an_llm_and_the_token_budget():
    h = Harness([llm("a")], budget=10)
    for prompt_len in (4, 8, 1, 2, 12):
        h.add("a", list(range(1, prompt_len + 1)), max_tokens=1)  # done at prefill: no decodes
    batches = []
    while h.waiting("a"):
        [(_, phase, job)] = h.step()
        assert phase == P
        batches.append(ids(job))
        assert len(h.finish(job, [50] * len(job.seqs))) == len(job.seqs)
    # 4 + 8 > 10 ends the first batch (the 1-token prompt behind does not jump the queue);
    # 8 + 1 fits, + 2 does not; 2 + 12 does not; a prompt over the budget still runs alone
    assert batches == [["r0"], ["r1", "r2"], ["r3"], ["r4"]]


def test_budget_counts_recomputed_output_tokens():
    h = Harness([llm("a")], budget=6)
    r0 = h.add("a", [1, 2, 3])
    r0.output_token_ids = [7, 7]  # as after a preemption: 5 tokens to recompute
    h.add("a", [4, 5])
    [(_, _, job)] = h.step()
    assert ids(job) == ["r0"]
    assert job.seqs == [seq("r0", [1, 2, 3, 7, 7], 5, 0, [0, 1], 2)]


def test_quota_caps_admission():
    quota = quota_for(["a"], total_pages=16, avg_seq_len=32)  # 8 pages per sequence: 2 sequences
    h = Harness([llm("a", prefill=50, decode=30)], num_pages=64, policy="adbs", quota=quota)
    assert h.sched.quota_of("a") == 2
    h.add("a", [1], max_tokens=2)
    h.add("a", [2])
    h.add("a", [3])
    [(_, _, job)] = h.step()
    assert ids(job) == ["r0", "r1"]
    h.finish(job, [9, 9])
    [(_, phase, dec)] = h.step()  # quota full: r2 waits, the decode goes
    assert phase == D and ids(dec) == ["r0", "r1"]
    assert h.waiting("a") == ["r2"]
    h.finish(dec, [9, 9])  # r0 done
    sent = h.step()
    assert kinds(sent) == [("a", P), ("a", D)]
    assert ids(sent[0][2]) == ["r2"] and ids(sent[1][2]) == ["r1"]


def test_config_cap_and_quota_take_the_smaller():
    quota = quota_for(["a", "b"], total_pages=32, avg_seq_len=4)  # 16 sequences each
    h = Harness([llm("a", max_num_seqs=3), llm("b")], policy="fix-adbs", quota=quota)
    assert (h.sched.quota_of("a"), h.sched.quota_of("b")) == (3, 16)
    h2 = Harness([llm("a", max_num_seqs=3)])  # no QuotaManager: the config's cap
    assert h2.sched.quota_of("a") == 3


def test_quota_adapts_on_the_clock():
    quota = quota_for(["a", "b"], total_pages=32, avg_seq_len=8)  # 2 pages per sequence, 8 each
    h = Harness([llm("a", prefill=50), llm("b", prefill=50)], policy="adbs", quota=quota, adapt_interval=8.0)
    quota.record_decode_batch("a", 8)  # a is full
    quota.record_decode_batch("b", 1)  # b is nearly idle: a donor
    for i in range(9):
        h.add("a", [i + 1])
    [(_, _, job)] = h.step()
    assert len(job.seqs) == 8
    h.clock.t = 7.9
    h.step()
    assert h.sched.quota_of("a") == 8
    h.clock.t = 8.0
    h.step()  # demand 9 >= 1.1 x 8: one more sequence (2 pages) moves from b to a
    assert (quota.pages("a"), quota.pages("b")) == (18, 14)
    assert (h.sched.quota_of("a"), h.sched.quota_of("b")) == (9, 7)
    h.finish(job, [5] * 8)
    sent = h.step()
    assert kinds(sent)[0] == ("a", P) and ids(sent[0][2]) == ["r8"]


# -- preemption -----------------------------------------------------------------------------
def test_decode_out_of_pages_preempts_the_newest_and_recomputes_them():
    h = Harness([llm("a", prefill=50, decode=30)], num_pages=4)
    prompts = [[10, 11, 12, 13], [20, 21, 22, 23], [30, 31, 32, 33], [40, 41, 42, 43]]
    r0, r1, r2, r3 = [h.add("a", p, max_tokens=2 if i == 0 else 16) for i, p in enumerate(prompts)]
    [(_, _, job0)] = h.step()
    assert [s.new_pages for s in job0.seqs] == [[0], [1], [2], [3]]
    assert h.allocator.num_free == 0
    r4 = h.add("a", [50, 51])
    h.clock.t = 1.0
    h.finish(job0, [100, 101, 102, 103])

    # r4 finds no page (waits for cache); the decode needs 4 pages with none free: r3 and r2
    # (newest) give theirs to r0 and r1
    sent = h.step()
    assert kinds(sent) == [("a", D)]
    job1 = sent[0][2]
    assert job1.seqs == [seq("r0", [100], 5, 0, [0, 3], 1), seq("r1", [101], 5, 0, [1, 2], 1)]
    assert job1.release == ["r2", "r3"]
    assert h.waiting("a") == ["r2", "r3", "r4"]  # back at the head, oldest first
    assert h.running("a") == []
    assert (r2.pages, r3.pages, r2.num_preemptions, r3.num_preemptions) == ([], [], 1, 1)
    assert not h.allocator.owns("a", "r2") and not h.allocator.owns("a", "r3")
    assert h.allocator.num_free == 0
    assert h.sched.num_preemptions == 2
    assert h.sched.llms["a"].release[P] == ["r2", "r3"]

    h.clock.t = 5.0
    assert h.finish(job1, [200, 201]) == [r0]  # frees pages 0 and 3
    assert h.allocator.num_free == 2
    sent = h.step()
    assert kinds(sent) == [("a", P), ("a", D)]
    (_, _, job2), (_, _, job3) = sent
    # r2 recomputes prompt + its output token into fresh pages; r3 (2 pages) and r4 wait for cache
    assert job2.seqs == [seq("r2", [30, 31, 32, 33, 102], 5, 0, [0, 3], 1)]
    assert job2.release == ["r2", "r3", "r0"]
    assert job3.seqs == [seq("r1", [201], 6, 2, [], 2)]
    assert job3.release == ["r0"]
    assert h.waiting("a") == ["r3", "r4"]
    assert h.allocator.num_free == 0

    h.finish(job2, [300])
    assert r2.output_token_ids == [102, 300]
    assert r2.prefill_end == 1.0  # TTFT counts the first prefill
    assert h.step() == []  # decode runtime busy with r1
    h.finish(job3, [202])
    [(_, _, job4)] = h.step()
    # the decode runtime dropped r2's pages (release), so it gets the whole new list again
    assert job4.seqs == [seq("r1", [202], 7, 2, [], 3), seq("r2", [300], 6, 0, [0, 3], 2)]
    assert job4.release == []
    assert r4.pages == [] and r3.num_preemptions == 1


def test_preempted_request_completes_with_the_same_tokens():
    # next token = function of (context length, last token): recompute must not change it
    h = Harness([llm("a", prefill=50, decode=30)], num_pages=5)
    reqs = [h.add("a", [i + 1] * 4, max_tokens=6) for i in range(3)]
    run_to_completion(h)
    assert h.sched.num_preemptions > 0
    for r in reqs:
        assert r.output_token_ids == fake_model_alone(r.prompt_token_ids, 6)


# -- stopping --------------------------------------------------------------------------------
def test_stop_on_eos_stop_ids_max_tokens_and_context():
    h = Harness([llm("a", eos=[99], max_model_len=8)])
    r0 = h.add("a", [1])  # EOS
    r1 = h.add("a", [2], ignore_eos=True)  # EOS ignored
    r2 = h.add("a", [3], stop_token_ids=[7])  # a stop id
    r3 = h.add("a", [4, 5, 6, 7, 8, 9, 10])  # 7 + 1 tokens = max_model_len
    r4 = h.add("a", [5], max_tokens=1)
    r5 = h.add("a", [6], ignore_eos=True, stop_token_ids=[99])  # stop ids hold even with ignore_eos
    [(_, _, job)] = h.step()
    assert h.allocator.num_free == 64 - 7
    done = h.finish(job, [99, 99, 7, 42, 42, 99])
    assert done == [r0, r2, r3, r4, r5]
    assert [r.finish_reason for r in done] == ["stop", "stop", "length", "length", "stop"]
    assert r1.finish_reason is None and h.running("a") == ["r1"]
    assert h.allocator.num_free == 63  # only r1's page is held
    assert h.sched.llms["a"].release == {P: ["r0", "r2", "r3", "r4", "r5"], D: ["r0", "r2", "r3", "r4", "r5"]}
    [(_, _, dec)] = h.step()
    assert dec.release == ["r0", "r2", "r3", "r4", "r5"]
    assert h.finish(dec, [99]) == []
    assert r1.output_token_ids == [99, 99]


# -- the other approaches ---------------------------------------------------------------------
def test_fcfs_picks_the_llm_of_the_oldest_waiting_request():
    h = Harness([llm(n, prefill=100, decode=100) for n in "abc"], policy="fcfs", threshold=0)
    h.add("b", [1])  # r0
    h.add("a", [2])  # r1
    h.add("c", [3])  # r2
    order = []
    for _ in range(3):
        [(name, phase, job)] = h.step()
        order.append((name, phase))
        h.finish(job, [9])
    assert order == [("b", P), ("a", P), ("c", P)]
    # decodes in order of each LLM's oldest running request; one 100 % job at a time
    assert kinds(h.step()) == [("b", D)]


def test_fcfs_decodes_while_the_oldest_llm_is_at_its_cap():
    """The oldest waiting request's LLM is full: its running requests must decode (no deadlock),
    and a younger request of another LLM does not overtake it."""
    h = Harness([llm("a", max_num_seqs=1), llm("b")], policy="fcfs", threshold=0)
    h.add("a", [1], max_tokens=2)
    h.add("a", [2])
    h.add("b", [3])
    [(_, _, job)] = h.step()
    assert ids(job) == ["r0"]
    h.finish(job, [9])
    sent = h.step()
    assert kinds(sent) == [("a", D)]
    assert h.waiting("b") == ["r2"]
    h.finish(sent[0][2], [9])  # r0 done
    sent = h.step()
    assert kinds(sent) == [("a", P)] and ids(sent[0][2]) == ["r1"]


@pytest.mark.parametrize("policy, both", [("fix-adbs", True), ("fix", False)])
def test_fix_never_overlaps_prefill_and_decode_of_one_llm(policy, both):
    quota = quota_for(["a"], total_pages=64, avg_seq_len=4)
    h = Harness([llm("a", prefill=50, decode=30)], policy=policy, quota=quota)
    h.add("a", [1])
    [(_, _, job)] = h.step()
    h.finish(job, [9])
    h.add("a", [2])
    sent = h.step()
    assert kinds(sent) == ([("a", P), ("a", D)] if both else [("a", P)])
    if both:
        return
    h.finish(sent[0][2], [9])
    [(_, phase, dec)] = h.step()
    assert phase == D and ids(dec) == ["r0", "r1"]
    h.add("a", [3])
    assert h.step() == []  # the decode runs: the prefill waits
    h.finish(dec, [9, 9])
    sent = h.step()
    assert kinds(sent) == [("a", P)]  # and now the decode waits
    assert h.running("a") == ["r0", "r1"]


def _three_prefills(policy):
    names_pcts = {"a": 50, "b": 80, "c": 30}
    quota = quota_for(list(names_pcts), total_pages=300, avg_seq_len=4)
    h = Harness([llm(n, prefill=p, decode=10) for n, p in names_pcts.items()], num_pages=300,
                policy=policy, threshold=0, quota=quota)
    for n in names_pcts:
        h.add(n, [1])
    return h


def test_roundrobin_ends_the_prefill_round_on_an_sm_blocked_prefill():
    assert kinds(_three_prefills("roundrobin").step()) == [("a", P)]  # b blocked: c not tried
    assert kinds(_three_prefills("adbs").step()) == [("a", P), ("c", P)]  # adbs goes on to c


# -- invariants over whole runs ----------------------------------------------------------------
def fake_next_token(num_tokens: int, last: int) -> int:
    return (num_tokens * 7 + last * 3) % 97 + 1


def fake_model_alone(prompt, max_tokens):
    tokens = list(prompt)
    out = []
    for _ in range(max_tokens):
        out.append(fake_next_token(len(tokens), tokens[-1]))
        tokens.append(out[-1])
    return out


class FakeRuntimes:
    """Runtimes that keep page tables from the jobs' deltas (as flexserver does) and answer with
    ``fake_next_token``; every job is checked against the allocator and the request when sent."""

    def __init__(self, h: Harness, seed: int = 0):
        self.h, self.rng = h, random.Random(seed)
        self.tables: dict[tuple[str, Phase], dict[str, list[int]]] = {}
        self.jobs: dict[int, Job] = {}

    def schedule(self) -> None:
        h = self.h
        for name, phase, job in h.step():
            table = self.tables.setdefault((name, phase), {})
            for rid in job.release:
                table.pop(rid, None)
            for s in job.seqs:
                pages = table.setdefault(s.req_id, [])
                assert s.page_offset <= len(pages)
                del pages[s.page_offset:]
                pages.extend(s.new_pages)
                assert pages == h.allocator.pages_of(name, s.req_id)
                assert len(pages) == math.ceil(s.num_tokens / PAGE_TOKENS)
                req = h.requests[s.req_id]
                assert s.num_tokens == req.num_tokens
                assert s.token_ids == (req.token_ids if phase is P else req.token_ids[-1:])
            self.jobs[job.job_id] = job
        assert sorted(h.sched.inflight) == sorted(self.jobs)

    def answer_one(self) -> None:
        job = self.jobs.pop(self.rng.choice(sorted(self.jobs)))
        self.h.finish(job, [fake_next_token(s.num_tokens, s.token_ids[-1]) for s in job.seqs])

    def run_to_completion(self, max_steps: int = 10_000) -> None:
        for _ in range(max_steps):
            if not self.h.sched.has_work():
                return
            self.schedule()
            assert self.jobs, "deadlock: work left, nothing in flight, nothing scheduled"
            self.answer_one()
        raise AssertionError("did not finish")


def run_to_completion(h: Harness, seed: int = 0) -> None:
    FakeRuntimes(h, seed).run_to_completion()


@pytest.mark.parametrize("policy", ["adbs", "adbs-paper", "fix-adbs", "fix", "roundrobin", "fcfs"])
@pytest.mark.parametrize("num_pages, threshold", [(5, 2), (12, 3), (200, 0)])
def test_every_request_completes_under_every_policy(policy, num_pages, threshold):
    names = ["llm-0", "llm-1", "llm-2"]
    quota = quota_for(names, total_pages=num_pages, avg_seq_len=8, rates={"llm-0": 3.0, "llm-1": 2.0})
    infos = [llm("llm-0", 100, 30, max_num_seqs=4), llm("llm-1", 60, 40), llm("llm-2", 30, 20, max_num_seqs=2)]
    h = Harness(infos, num_pages=num_pages, policy=policy, threshold=threshold, budget=12, quota=quota,
                adapt_interval=0.0)
    rng = random.Random(7)
    runtimes = FakeRuntimes(h, seed=num_pages)
    reqs = []
    for i in range(24):
        h.clock.t = i * 0.1
        prompt = [rng.randrange(1, 90) for _ in range(rng.randrange(1, 7))]
        reqs.append(h.add(names[i % 3], prompt, max_tokens=rng.randrange(1, 9)))
        if i % 4 == 3:
            runtimes.schedule()
    runtimes.run_to_completion()
    assert len(h.finished) == 24
    for r in reqs:
        assert r.output_token_ids == fake_model_alone(r.prompt_token_ids, r.params.max_tokens)
        assert r.finish_reason == "length"
    assert h.allocator.num_free == num_pages
    assert h.sched.sm.refs == [0] * 10
    assert all(s.executing == 0 and not s.waiting and not s.running for s in h.sched.llms.values())
    if num_pages == 5:
        assert h.sched.num_preemptions > 0


# -- errors ----------------------------------------------------------------------------------
def test_quota_policies_need_a_quota_manager():
    with pytest.raises(ValueError, match="schedule approach 'adbs' needs a QuotaManager"):
        Harness([llm("a")], policy="adbs")


def test_wrong_token_count_is_an_error():
    h = Harness([llm("a")])
    h.add("a", [1])
    h.add("a", [2])
    [(_, _, job)] = h.step()
    with pytest.raises(RuntimeError, match="runtime fake returned 1 tokens for 2 requests"):
        h.finish(job, [5])


def test_decode_wait_measures_how_long_a_decodable_batch_was_held():
    # b's prefill holds all 10 units: a's request, prefilled at t=1, cannot decode until t=4.
    h = Harness([llm("a"), llm("b")], threshold=0)
    h.add("a", [1])
    [(_, _, pa)] = h.step()
    h.clock.t = 0.5
    h.add("b", [2])
    h.clock.t = 1.0
    h.finish(pa, [7])  # a decodable from t=1; b's prefill goes first (prefill priority)
    [(_, _, pb)] = h.step()
    assert pb.phase == "prefill" and ids(pb) == ["r1"]
    h.clock.t = 4.0
    h.finish(pb, [7])  # b decodable from t=4
    sent = h.step()
    assert kinds(sent) == [("a", D), ("b", D)]
    h.clock.t = 4.5
    for _, _, job in sent:
        h.finish(job, [8])  # both decodable again at 4.5, decoded at once
    assert kinds(h.step()) == [("a", D), ("b", D)]
    waits = h.sched.decode_waits()
    assert waits["a"] == {"decode_jobs": 2, "decode_wait_ms_mean": 1500.0}  # (3 s + 0 s) / 2
    assert waits["b"] == {"decode_jobs": 2, "decode_wait_ms_mean": 0.0}
