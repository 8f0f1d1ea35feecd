"""The residency policies on a fake clock: exact decisions, then invariants over random event sequences."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from muxserve.scheduler.quota import QuotaManager, QuotaModel
from muxserve.scheduler.residency_policy import (
    DeferReason,
    LLMActivity,
    LRUPolicy,
    MemoryView,
    Offload,
    OffloadReason,
    RefusalReason,
    ResidencyTracker,
    SwapPolicy,
    Wake,
    WeightState,
    held_bytes,
    kv_quota_inputs,
    make_policy,
)

R, O = WeightState.RESIDENT, WeightState.OFFLOADED  # noqa: E741
GB = 1 << 30


def act(name, gb, state=R, waiting=0, running=0, last=0.0, since=0.0, oldest=None, pinned=False):
    if waiting and oldest is None:
        oldest = last
    return LLMActivity(name, int(gb * GB), state, waiting, running, last, since, oldest, pinned)


def mem(budget_gb, llms, kv_gb=0.0, demand_gb=0.0):
    free = int(budget_gb * GB) - held_bytes(llms) - int(kv_gb * GB)
    return MemoryView(int(budget_gb * GB), free, int(demand_gb * GB))


# -- LRU policy: exact decisions -------------------------------------------------------------

def test_first_request_of_an_offloaded_llm_wakes_it_from_free_memory():
    llms = [act("a", 16, R, running=2), act("b", 16, O, waiting=1, last=5.0)]
    d = LRUPolicy().decide(5.0, llms, mem(80, llms))
    assert d.wake == (Wake("b", 16 * GB),) and d.offload == () and d.refused == ()


def test_a_wake_offloads_the_least_recently_used_idle_llms_first():
    llms = [act("a", 30, last=10.0), act("b", 30, last=3.0), act("c", 30, last=7.0),
            act("d", 45, O, waiting=1, last=100.0)]
    # 100 GB budget: 90 held, 10 free; d needs 45 -> b (idle since 3) then c (since 7); a stays
    d = LRUPolicy(idle_timeout_s=1000, min_resident_s=10).decide(100.0, llms, mem(100, llms))
    assert d.offload == (Offload("b", 30 * GB, OffloadReason.WAKE, "d"), Offload("c", 30 * GB, OffloadReason.WAKE, "d"))
    assert d.wake == (Wake("d", 45 * GB),)


def test_no_offload_of_an_llm_with_requests_in_flight_or_waiting():
    llms = [act("a", 40, running=1, last=0.0), act("b", 40, waiting=3, last=1.0),
            act("c", 40, O, waiting=1, last=50.0)]
    d = LRUPolicy(idle_timeout_s=5, min_resident_s=0).decide(50.0, llms, mem(100, llms))
    assert d.offload == () and d.wake == ()
    (w,) = d.deferred
    assert (w.llm, w.reason, w.blocked_by) == ("c", DeferReason.NO_ROOM, ("a", "b"))
    assert w.available_bytes == 20 * GB and w.retry_at is None  # only events (finishes) can help


def test_no_thrash_a_woken_llm_stays_resident_for_min_resident_s():
    policy = LRUPolicy(idle_timeout_s=1, min_resident_s=30)
    # a woke at t=100 and went idle at once; c wants its memory at t=110
    llms = [act("a", 60, last=101.0, since=100.0), act("c", 60, O, waiting=1, last=110.0)]
    d = policy.decide(110.0, llms, mem(100, llms))
    assert d.offload == () and d.wake == ()
    assert d.deferred[0].retry_at == 130.0 and d.next_check == 130.0
    d = policy.decide(130.0, llms, mem(100, llms))
    assert d.offload == (Offload("a", 60 * GB, OffloadReason.WAKE, "c"),) and d.wake == (Wake("c", 60 * GB),)


def test_idle_timeout_offloads_without_memory_pressure_and_names_candidates():
    policy = LRUPolicy(idle_timeout_s=60, min_resident_s=10)
    llms = [act("a", 10, last=0.0), act("b", 10, last=30.0), act("p", 10, last=0.0, pinned=True),
            act("z", 10, O, last=0.0)]
    d = policy.decide(59.0, llms, mem(100, llms))
    assert d.offload == () and d.next_check == 60.0
    d = policy.decide(60.0, llms, mem(100, llms))
    assert d.offload == (Offload("a", 10 * GB, OffloadReason.IDLE_TIMEOUT),)
    assert d.candidates == ("a", "z") and d.next_check == 90.0  # b's timeout; pinned p never
    assert LRUPolicy(idle_timeout_s=60, offload_on_timeout=False).decide(60.0, llms, mem(100, llms)).offload == ()


def test_refusal_of_an_llm_too_big_even_alone():
    llms = [act("p", 20, pinned=True), act("huge", 70, O, waiting=2, last=1.0), act("ok", 50, O, waiting=1, last=2.0)]
    d = LRUPolicy().decide(3.0, llms, mem(80, llms))
    (r,) = d.refused
    assert (r.llm, r.reason, r.needed_bytes, r.budget_bytes, r.pinned_bytes) == (
        "huge", RefusalReason.TOO_BIG, 70 * GB, 80 * GB, 20 * GB)
    assert "'huge'" in r.message and str(70 * GB) in r.message and "60.0" not in r.message
    assert "61,440.0 MiB" in r.message  # 80 - 20 GB left, in MiB
    assert d.wake == (Wake("ok", 50 * GB),)  # the refusal does not hold the others back


def test_wakes_go_by_oldest_waiting_request_and_younger_ones_wait_behind_a_blocked_one():
    policy = LRUPolicy(idle_timeout_s=1000, min_resident_s=100)
    llms = [act("busy", 50, running=1), act("big", 40, O, waiting=1, oldest=1.0, last=1.0),
            act("small", 10, O, waiting=1, oldest=2.0, last=2.0), act("tiny", 5, O, waiting=1, oldest=3.0, last=3.0)]
    # 100 GB, 50 free: big (oldest) first, then small; tiny does not fit and busy cannot go
    d = policy.decide(10.0, llms, mem(100, llms))
    assert [w.llm for w in d.wake] == ["big", "small"]
    assert [(w.llm, w.reason, w.blocked_by) for w in d.deferred] == [("tiny", DeferReason.NO_ROOM, ("busy",))]
    # 38 free: big cannot wake; small and tiny would fit but wait behind it
    llms[0] = act("busy", 62, running=1)
    d = policy.decide(10.0, llms, mem(100, llms))
    assert d.wake == ()
    assert [(w.llm, w.reason) for w in d.deferred] == [("big", DeferReason.NO_ROOM), ("small", DeferReason.BEHIND),
                                                       ("tiny", DeferReason.BEHIND)]


def test_kv_demand_of_busy_llms_offloads_idle_ones_lru_first():
    llms = [act("busy", 40, running=8, last=50.0), act("a", 20, last=5.0), act("b", 20, last=1.0),
            act("c", 10, last=9.0)]
    # 100 GB: 90 weights, 5 KV, 5 free; busy wants 30 GB more KV -> b (20), then a (20)
    d = LRUPolicy(idle_timeout_s=1000, min_resident_s=0).decide(50.0, llms, mem(100, llms, kv_gb=5, demand_gb=30))
    assert d.offload == (Offload("b", 20 * GB, OffloadReason.KV), Offload("a", 20 * GB, OffloadReason.KV))


def test_two_wakes_each_keep_room_for_their_first_request():
    llms = [LLMActivity(n, 4 * GB, O, waiting=1, last_active=t, oldest_wait=t, wake_kv_bytes=2 * GB)
            for n, t in (("a", 1.0), ("b", 2.0))]
    d = LRUPolicy().decide(3.0, llms, MemoryView(10 * GB, 10 * GB))  # 4 + 2 + 4 + 2 > 10
    assert [w.llm for w in d.wake] == ["a"] and [(w.llm, w.reason) for w in d.deferred] == [("b", DeferReason.NO_ROOM)]


def test_bytes_of_offloads_in_progress_count_for_a_wake():
    llms = [act("a", 50, WeightState.OFFLOADING), act("b", 60, O, waiting=1, last=1.0), act("c", 40, running=1)]
    d = LRUPolicy().decide(1.0, llms, mem(100, llms))
    assert d.wake == (Wake("b", 60 * GB),) and d.offload == ()


def test_policies_by_name():
    assert make_policy("lru", idle_timeout_s=5, min_resident_s=2) == LRUPolicy(idle_timeout_s=5, min_resident_s=2)
    assert make_policy("swap", min_hold_s=3) == SwapPolicy(min_hold_s=3)
    with pytest.raises(ValueError, match="choose from lru, swap"):
        make_policy("fifo")


def test_policy_knobs_are_checked():
    with pytest.raises(ValueError, match="min_resident_s"):
        LRUPolicy(min_resident_s=-1)
    with pytest.raises(ValueError, match="min_hold_s"):
        SwapPolicy(min_hold_s=-1)


# -- swap baseline ---------------------------------------------------------------------------

def test_swap_hands_the_device_to_the_oldest_waiting_request():
    policy = SwapPolicy(min_hold_s=5)
    llms = [act("a", 60, R, since=0.0, last=2.0), act("b", 60, O, waiting=1, oldest=3.0, last=3.0),
            act("c", 60, O, waiting=1, oldest=1.0, last=4.0)]
    d = policy.decide(10.0, llms, mem(100, llms))
    assert d.offload == (Offload("a", 60 * GB, OffloadReason.SWAP, "c"),) and d.wake == (Wake("c", 60 * GB),)


def test_swap_waits_for_requests_in_flight_and_drains_the_resident_llm():
    policy = SwapPolicy(min_hold_s=5)
    llms = [act("a", 60, R, running=2, waiting=4, oldest=9.0, since=0.0, last=9.0),
            act("b", 60, O, waiting=1, oldest=3.0, last=3.0)]
    d = policy.decide(10.0, llms, mem(100, llms))
    assert d.offload == () and d.wake == () and d.drain == ("a",)
    assert (d.deferred[0].llm, d.deferred[0].reason, d.deferred[0].retry_at) == ("b", DeferReason.HOLD, None)
    llms[0] = act("a", 60, R, waiting=4, oldest=9.0, since=0.0, last=11.0)  # in-flight ones done; a's own wait
    d = policy.decide(11.0, llms, mem(100, llms))
    assert d.offload == (Offload("a", 60 * GB, OffloadReason.SWAP, "b"),) and d.wake == (Wake("b", 60 * GB),)


def test_swap_keeps_a_new_resident_for_min_hold_s():
    policy = SwapPolicy(min_hold_s=5)
    llms = [act("b", 60, R, since=10.0, last=10.5), act("a", 60, O, waiting=1, oldest=10.2, last=10.2)]
    d = policy.decide(11.0, llms, mem(100, llms))
    assert d.wake == () and d.offload == () and d.next_check == 15.0 and d.deferred[0].retry_at == 15.0
    d = policy.decide(15.0, llms, mem(100, llms))
    assert [o.llm for o in d.offload] == ["b"] and [w.llm for w in d.wake] == ["a"]


def test_swap_order_over_a_sequence_of_requests():
    """a, b, a, c arrive 1 s apart, each served in 2 s: the device goes a -> b -> a -> c, each after
    the previous one finished and held it for min_hold_s."""
    policy, t = SwapPolicy(min_hold_s=1), ResidencyTracker()
    for n in "abc":
        t.register(n, 60 * GB, O)
    arrivals = {0.0: "a", 1.0: "b", 2.0: "a", 3.0: "c"}
    done: dict[str, float] = {}
    order, now = [], 0.0
    while now < 30:
        if now in arrivals:
            t.arrive(arrivals[now], now)
        for n, end in list(done.items()):
            if end <= now:
                t.finish(n, now)
                del done[n]
        d = policy.decide(now, t.snapshot(), MemoryView(100 * GB, 100 * GB - held_bytes(t.snapshot())))
        for o in d.offload:
            t.set_state(o.llm, O, now)
        for w in d.wake:
            t.set_state(w.llm, R, now)
            order.append(w.llm)
        for m in t.snapshot():
            if m.state is R and m.waiting and m.name not in d.drain and m.name not in done:
                t.admit(m.name, now)
                done[m.name] = now + 2
        now += 0.5
    assert order == ["a", "b", "a", "c"]


def test_swap_refuses_an_llm_bigger_than_the_budget():
    llms = [act("big", 120, O, waiting=1, last=1.0)]
    d = SwapPolicy().decide(1.0, llms, mem(100, llms))
    assert d.refused[0].reason is RefusalReason.TOO_BIG and d.wake == ()


# -- tracker and quota inputs ----------------------------------------------------------------

def test_tracker_counts_and_min_resident_clock():
    t = ResidencyTracker()
    t.register("a", 10, O, now=0.0)
    t.arrive("a", 1.0, 2)
    t.arrive("a", 2.0)
    assert (t.get("a").waiting, t.get("a").oldest_wait) == (3, 1.0)
    t.set_state("a", WeightState.WAKING, 2.5)
    t.set_state("a", R, 3.0)
    t.admit("a", 3.5, 2)
    assert (t.get("a").waiting, t.get("a").running, t.get("a").oldest_wait, t.get("a").resident_since) == (1, 2, 2.0,
                                                                                                           3.0)
    with pytest.raises(ValueError, match="in flight"):
        t.set_state("a", WeightState.OFFLOADING, 4.0)
    t.requeue("a", [(1.0, 0)])
    assert (t.get("a").waiting, t.get("a").running, t.get("a").oldest_wait) == (2, 1, 1.0)
    t.finish("a", 5.0)
    assert t.get("a").last_active == 5.0 and not t.get("a").running


def test_kv_quota_inputs_count_weights_and_kv_in_one_budget():
    page = 2 * 1024 * 1024
    llms = [act("p", 10, pinned=True), act("a", 20), act("b", 30, O), act("c", 15, WeightState.WAKING)]
    q = kv_quota_inputs(80 * GB, page, llms)
    assert q.weight_bytes == 45 * GB and q.total_pages == 35 * GB // page
    assert q.members == ("p", "a") and q.excluded == ("b", "c")
    quota = QuotaManager([QuotaModel(n, 1.0, 4, 16) for n in q.members], q.total_pages, 512)
    assert quota.pages("p") + quota.pages("a") == q.total_pages
    with pytest.raises(ValueError, match="exceed"):
        kv_quota_inputs(40 * GB, page, llms)


# -- invariants over random event sequences ---------------------------------------------------

BUDGET, KV = 100, 2  # units: budget, KV of one request


class Sim:
    """A device of ``BUDGET`` units under a policy: weights of held LLMs + KV of running requests."""

    def __init__(self, policy, weights: list[int], pinned: int):
        self.policy, self.t, self.now = policy, ResidencyTracker(), 0.0
        self.weights = {f"m{i}": w for i, w in enumerate(weights)}
        for n, w in self.weights.items():
            self.t.register(n, w, O)
        if pinned:
            self.t.register("pin", pinned, R, pinned=True)
        self.pinned, self.refused, self.drain = pinned, set(), ()

    def kv(self) -> int:
        return KV * sum(m.running for m in self.t.snapshot())

    def used(self) -> int:
        return held_bytes(self.t.snapshot()) + self.kv()

    def step(self) -> None:
        snap = self.t.snapshot()
        demand = KV * sum(m.waiting for m in snap if m.state is R)
        d = self.policy.decide(self.now, snap, MemoryView(BUDGET, BUDGET - self.used(), max(0, demand)))
        by = {m.name: m for m in snap}
        for o in d.offload:
            m = by[o.llm]
            assert m.running == 0, f"offload of {o.llm} with {m.running} in flight"
            if isinstance(self.policy, LRUPolicy):
                assert m.waiting == 0, f"offload of {o.llm} with {m.waiting} waiting"
                assert self.now >= m.resident_since + self.policy.min_resident_s, f"{o.llm} offloaded too soon"
            assert not m.pinned and m.state is R
            self.t.set_state(o.llm, O, self.now)
        for w in d.wake:
            assert by[w.llm].state is O and by[w.llm].waiting > 0
            self.t.set_state(w.llm, R, self.now)
        # every LLM woken here can admit its first request (the KV of each is kept free)
        assert self.used() + KV * len(d.wake) <= BUDGET, f"wakes {d.wake} leave no room for their requests"
        self.refused |= {r.llm for r in d.refused}
        for r in d.refused:
            assert self.weights[r.llm] > BUDGET - self.pinned
        self.drain = d.drain
        assert self.used() <= BUDGET

    def admit(self) -> None:
        for m in self.t.snapshot():
            if m.state is R and m.name not in self.drain:
                room = (BUDGET - self.used()) // KV
                if room > 0 and m.waiting:
                    self.t.admit(m.name, self.now, min(room, m.waiting))

    def event(self, kind: str, k: int, dt: float) -> None:
        names = sorted(self.weights)
        name = names[k % len(names)]
        if kind == "arrive":
            w = self.weights[name]
            if not (w <= BUDGET - self.pinned < w + KV):  # the engine refuses what even alone has no KV room
                self.t.arrive(name, self.now, kv_bytes=KV)
        elif kind == "finish" and self.t.get(name).running:
            self.t.finish(name, self.now)
        elif kind == "advance":
            self.now += dt
        self.step()
        if kind == "admit":
            self.admit()
            self.step()


events = st.lists(st.tuples(st.sampled_from(["arrive", "arrive", "finish", "admit", "advance"]),
                            st.integers(0, 20), st.floats(0.0, 40.0)), max_size=60)
sizes = st.lists(st.integers(5, 110), min_size=1, max_size=6)


def _drain_and_check(sim: Sim, hold: float) -> None:
    """No more arrivals: requests finish, the clock moves on; every LLM that fits alone is served."""
    waiting = sum(m.waiting for m in sim.t.snapshot())
    for _ in range(4 * len(sim.weights) + waiting + 4):  # each round serves an LLM's queue, or a request at least
        for m in sim.t.snapshot():
            if m.running:
                sim.t.finish(m.name, sim.now, m.running)
        sim.now += hold + 1
        sim.step()
        sim.admit()
        sim.step()
    for n, w in sim.weights.items():
        m = sim.t.get(n)
        if w + KV <= BUDGET - sim.pinned:
            assert m.waiting == 0, f"{n} ({w} units) still has {m.waiting} waiting: {sim.t.snapshot()}"
        elif w > BUDGET - sim.pinned and m.waiting:
            assert n in sim.refused


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sizes, st.sampled_from([0, 20]), events, st.floats(0, 30), st.floats(0, 30))
def test_lru_policy_invariants(weights, pinned, evs, idle, hold):
    sim = Sim(LRUPolicy(idle_timeout_s=idle, min_resident_s=hold), weights, pinned)
    for kind, k, dt in evs:
        sim.event(kind, k, dt)
    _drain_and_check(sim, max(idle, hold))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sizes, st.sampled_from([0, 20]), events, st.floats(0, 30))
def test_swap_policy_invariants(weights, pinned, evs, hold):
    sim = Sim(SwapPolicy(min_hold_s=hold), weights, pinned)
    for kind, k, dt in evs:
        sim.event(kind, k, dt)
        assert sum(1 for m in sim.t.snapshot() if m.state is R and not m.pinned) <= 1
    _drain_and_check(sim, hold)


def test_a_wake_needs_room_for_its_first_request_too():
    llms = [act("a", 10, running=1), LLMActivity("b", 85 * GB, O, waiting=1, last_active=1.0, oldest_wait=1.0,
                                                  wake_kv_bytes=2 * GB)]
    d = LRUPolicy().decide(1.0, llms, mem(100, llms, kv_gb=4))  # 86 free: the weights fit, weights + KV do not
    assert d.wake == () and d.deferred[0].needed_bytes == 87 * GB
    d = LRUPolicy().decide(1.0, llms[1:], mem(86, llms[1:]))
    assert d.refused[0].needed_bytes == 87 * GB and "2147483648 B of KV" in d.refused[0].message
