"""The instance's residency control against a fake FlexStore: waking on demand, deferring and retrying,
the idle-timeout policy with its minimum residency, notices to the runtimes and their answers."""

from __future__ import annotations

import pytest

from muxserve.engine.sampling_params import SamplingParams
from muxserve.flexstore import FlexStoreError
from muxserve.flexstore import protocol as P
from muxserve.instance.residency import IdleTimeout, LLMActivity, ResidencyControl, WakeDeferred
from muxserve.ipc import runtime as M
from muxserve.ipc.runtime import Phase
from muxserve.scheduler.policy import get_policy
from muxserve.scheduler.scheduler import LLMInfo, MuxScheduler
from muxserve.scheduler.state import Request


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def llm(name) -> LLMInfo:
    return LLMInfo(name=name, prefill_units=10, decode_units=3, max_num_seqs=16, eos_ids=frozenset(),
                   max_model_len=256, vocab_size=128)


class FakeStore:
    def __init__(self):
        self.calls = []
        self.refuse = None  # the FlexStoreError the next wake raises

    def offload(self, model):
        self.calls.append(("offload", model))
        return P.Offloaded(model, 4 << 20, 0.002, 3)

    def wake(self, model, protected):
        self.calls.append(("wake", model, list(protected)))
        if self.refuse is not None:
            raise self.refuse
        return P.Woken(model, 0.05, 0.04, 4 << 20, {}, 9, 4)

    def free(self, model, ids):
        return 0


class Links(dict):
    def __init__(self, llms):
        super().__init__({(n, ph): self._Link(self, (n, ph)) for n in llms for ph in Phase})
        self.sent = []

    class _Link:
        def __init__(self, owner, key):
            self.owner, self.key = owner, key

        def send(self, msg):
            self.owner.sent.append((self.key, msg))


@pytest.fixture
def world():
    clock = FakeClock()
    store = FakeStore()
    links = Links(["a", "b"])
    sched = MuxScheduler([llm("a"), llm("b")], store, links, get_policy("roundrobin"), 2048, 10, clock=clock)
    control = ResidencyControl(["b"], sched, store, links, IdleTimeout(idle_s=5, min_resident_s=10), clock)
    return clock, store, links, sched, control


def request(rid, name):
    return Request(rid, [1, 2, 3], SamplingParams(max_tokens=2), idx=int(rid), llm=name, arrival=0.0)


def test_idle_timeout_respects_the_minimum_residency_and_idleness(world):
    clock, store, links, sched, control = world
    clock.t = 6.0
    control.tick()
    assert store.calls == []  # idle 6 s but resident only 6 s of the 10 required
    clock.t = 11.0
    control.tick()
    assert store.calls == [("offload", "b")] and not sched.is_resident("b")
    notices = [(key, msg) for key, msg in links.sent if isinstance(msg, M.Sync)]
    assert {key for key, _ in notices} == {("b", Phase.PREFILL), ("b", Phase.DECODE)}
    assert all(msg.weights_epoch == 3 and msg.kv_epoch == 0 for _, msg in notices)
    notice = notices[0][1].notice_id
    control.on_synced(M.Synced(notice, "b/prefill", 0.001))
    control.on_synced(M.Synced(notice, "b/decode", 0.001))
    assert control.unacknowledged == {}


def test_a_request_wakes_its_llm_and_a_refusal_defers_it(world):
    clock, store, links, sched, control = world
    control.offload("b")
    sched.add(request("1", "b"))
    store.refuse = FlexStoreError("refused", "no room", {"needed": 2, "free": 0, "whole_free": 0, "reclaimable": 1})
    with pytest.raises(WakeDeferred) as err:
        control.wake("b")
    assert err.value.numbers["needed"] == 2
    control.tick()  # deferred again, quietly
    assert control.deferred == 2 and not sched.is_resident("b")
    store.refuse = FlexStoreError("internal", "MemoryError: out of device memory")
    control.tick()  # a failed wake: not again within a second
    control.tick()
    assert sum(c[0] == "wake" for c in store.calls) == 3
    store.refuse = None
    clock.t += 1.5
    control.tick()
    assert sched.is_resident("b") and sched.weights_epochs["b"] == 4
    [wake] = [e for e in control.events if e.kind == "wake"]
    assert (wake.llm, wake.nbytes, wake.preempted) == ("b", 4 << 20, 0)
    kv_notices = [msg for key, msg in links.sent if isinstance(msg, M.Sync) and key[0] == "a"]
    assert kv_notices and kv_notices[-1].kv_epoch == 9 and kv_notices[-1].weights_epoch == 0
    summary = control.summary()["b"]
    assert (summary["offloads"], summary["wakes"]) == (1, 1)


def test_only_idle_elastic_llms_move(world):
    clock, store, links, sched, control = world
    with pytest.raises(ValueError, match="not an elastic LLM"):
        control.offload("a")
    sched.add(request("1", "b"))
    with pytest.raises(ValueError, match="not offloaded"):
        control.offload("b")
    with pytest.raises(ValueError, match="resident already"):
        control.wake("b")
    assert IdleTimeout(1.0).to_offload([LLMActivity("x", True, False, 0.0, 99.0)], 0.0) == []


class BudgetStore(FakeStore):
    """A fake FlexStore with a budget: ``free`` granules free; ``refusals`` wakes refused first."""

    def __init__(self, free: int, refusals: int = 0):
        super().__init__()
        self.free_granules, self.refusals = free, refusals

    def stats(self):
        from types import SimpleNamespace

        return SimpleNamespace(budget=P.BudgetInfo(64, 2 << 20, 0, 30, 0, self.free_granules, 0))

    def offload(self, model):
        self.free_granules += 10
        return super().offload(model)

    def wake(self, model, protected):
        if self.refusals:
            self.refusals -= 1
            self.calls.append(("wake", model, list(protected)))
            raise FlexStoreError("refused", "no room", {"needed": 10, "free": 0, "whole_free": 0, "reclaimable": 0})
        self.free_granules -= 10
        return super().wake(model, protected)


def lru_world(free: int, refusals: int = 0):
    clock = FakeClock()
    store = BudgetStore(free, refusals)
    names = ["a", "b", "c", "d", "e"]
    links = Links(names)
    sched = MuxScheduler([llm(n) for n in names], store, links, get_policy("roundrobin"), 2048, 10, clock=clock)
    control = ResidencyControl(["b", "c", "d", "e"], sched, store, links, None, clock, offloaded=["d"],
                               weight_granules={n: 10 for n in names}, min_resident_s=10)
    sched.set_offloaded("d")
    clock.t = 20.0
    for name, busy in (("b", 5.0), ("c", 2.0), ("e", 8.0)):
        control.elastic[name].last_busy = busy
    control.elastic["e"].since = 15.0  # woken 5 s ago: below min_resident_s
    return clock, store, sched, control


def test_a_wake_short_of_room_offloads_idle_llms_least_recently_used_first():
    clock, store, sched, control = lru_world(free=3)
    assert not control.elastic["d"].resident and not sched.is_resident("d")
    sched.add(request("1", "c"))  # c is the least recently used, but it has a request: it stays
    assert control.lru_idle(exclude="d") == ["b"]
    sched.add(request("2", "d"))
    control.tick()
    assert [c[:2] for c in store.calls] == [("offload", "b"), ("wake", "d")]  # one offload was enough
    assert control.elastic["d"].resident and not control.elastic["b"].resident
    assert sched.is_resident("d") and not sched.is_resident("b")
    assert [(e.kind, e.llm) for e in control.events] == [("offload", "b"), ("wake", "d")]


def test_a_wake_asked_for_makes_room_as_a_request_does():
    clock, store, sched, control = lru_world(free=3)
    with pytest.raises(ValueError, match="'b' is resident already"):
        control.wake_making_room("b")
    assert store.calls == []
    control.wake_making_room("d")  # no request waits: an operator's wake
    assert [c[:2] for c in store.calls] == [("offload", "c"), ("wake", "d")]  # c: least recently used
    assert control.elastic["d"].resident and not control.elastic["c"].resident


def test_a_refused_wake_offloads_the_next_idle_llm_and_is_retried():
    clock, store, sched, control = lru_world(free=10, refusals=1)  # the figures say it fits; FlexStore refuses
    clock.t = 30.0  # e has now been resident long enough; b (busy at 5) is older than e (busy at 8)
    control.elastic["c"].last_busy = 9.0
    sched.add(request("2", "d"))
    control.tick()
    assert [c[:2] for c in store.calls] == [("wake", "d"), ("offload", "b"), ("wake", "d")]
    assert control.elastic["d"].resident and control.deferred == 1


def test_a_wake_with_nothing_idle_to_offload_waits():
    clock, store, sched, control = lru_world(free=0, refusals=5)
    for i, name in enumerate(["b", "c", "e"]):
        sched.add(request(str(10 + i), name))
    sched.add(request("2", "d"))
    control.tick()
    assert [c[:2] for c in store.calls] == [("wake", "d")] and not control.elastic["d"].resident
    assert all(control.elastic[n].resident for n in ("b", "c", "e"))


class HeldStore(BudgetStore):
    """BudgetStore whose figures follow the weights held: 35 granules, b, c and e resident (10 each)."""

    def __init__(self):
        super().__init__(free=5)
        self.held = 30

    def stats(self):
        from types import SimpleNamespace

        return SimpleNamespace(budget=P.BudgetInfo(35, 2 << 20, 0, self.held, 0, self.free_granules, 0))

    def offload(self, model):
        self.held -= 10
        return super().offload(model)

    def wake(self, model, protected):
        self.held += 10
        return super().wake(model, protected)


def test_a_wake_that_would_leave_no_kv_waits_until_an_llm_goes_idle():
    clock = FakeClock()
    store = HeldStore()
    names = ["b", "c", "d", "e"]
    links = Links(names)
    sched = MuxScheduler([llm(n) for n in names], store, links, get_policy("roundrobin"), 2048, 10, clock=clock)
    control = ResidencyControl(names, sched, store, links, None, clock, offloaded=["d"],
                               weight_granules={n: 10 for n in names}, kv_headroom=1)
    sched.set_offloaded("d")
    for i, name in enumerate(["b", "c", "e"]):
        sched.add(request(str(10 + i), name))
    sched.add(request("2", "d"))
    control.tick()  # 5 granules hold no weights: d's 10 plus 1 of KV do not fit, and nobody is idle
    assert store.calls == [] and control.deferred == 1 and not control.elastic["d"].resident
    sched.llms["c"].waiting.clear()  # c's request went away: c is idle
    control.tick()
    assert [c[:2] for c in store.calls] == [("offload", "c"), ("wake", "d")]
    assert control.elastic["d"].resident and not control.elastic["c"].resident
