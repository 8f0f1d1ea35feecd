"""FlexStore with an elastic LLM (in process, through the protocol): one memory budget for weights
and KV, offload and wake with their refusals, the figures of Info and Stats, cleanup of every name."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

from muxserve.flexstore import FlexStoreConfig, FlexStoreManager, ModelEntry
from muxserve.flexstore import protocol as P
from muxserve.flexstore.segments import list_shm

from .helpers import PAGE_BYTES

GRANULE = 16 * PAGE_BYTES


def elastic_config(tiny_models, prefix: str, kv_granules: int = 8, elastic=("llama-c",), **kw) -> FlexStoreConfig:
    models = tuple(ModelEntry(n, str(tiny_models[n]), residency="elastic" if n in elastic else "pinned")
                   for n in ("llama-a", "llama-c"))
    return FlexStoreConfig(models=models, address="inproc://unused", kv_cache_bytes=kv_granules * GRANULE,
                           page_bytes=PAGE_BYTES, granule_bytes=GRANULE, reserve_granules=1, shm_prefix=prefix, **kw)


@pytest.fixture
def prefix():
    p = f"mux-elastic-store-{uuid.uuid4().hex[:6]}"
    yield p
    assert list_shm(p) == set()


@pytest.fixture
def manager(tiny_models, prefix):
    m = FlexStoreManager(elastic_config(tiny_models, prefix))
    yield m
    m.close()


def call(manager, request):
    return manager.handle(request)


def test_config_refuses_bad_residency(tiny_models):
    with pytest.raises(ValueError, match="residency"):
        ModelEntry("x", "y", residency="sometimes")
    with pytest.raises(ValueError, match="tensor parallelism"):
        ModelEntry("x", "y", residency="elastic", tensor_parallel_size=2, devices=(0, 1))


def test_info_and_attach_describe_the_budget(manager, prefix):
    info = call(manager, P.GetInfo())
    states = {m.name: (m.residency, m.state) for m in info.models}
    assert states == {"llama-a": ("pinned", "resident"), "llama-c": ("elastic", "resident")}
    attach = call(manager, P.Attach("llama-c"))
    assert attach.pool is None and attach.weights is None
    assert attach.weights_range.name.startswith(prefix) and attach.pool_range.name.startswith(prefix)
    assert attach.num_pages == attach.pool_range.nbytes // PAGE_BYTES
    pinned = call(manager, P.Attach("llama-a"))
    assert pinned.weights is not None and pinned.weights_range is None
    assert list_shm(prefix) == set(manager.segment_names())


def test_offload_and_wake_give_memory_to_kv_and_back(manager):
    budget = manager.elastic.budget
    stats = call(manager, P.GetStats())
    weights = budget.weight_granules("llama-c")
    room = stats.budget.free_granules
    got = call(manager, P.Allocate("llama-c", [("c1", 10)]))
    assert isinstance(got, P.Allocated) and got.kv_epoch == manager.kv_epoch > 0
    refused = call(manager, P.Offload("llama-c"))
    assert refused.code == "refused" and refused.numbers == {"requests": 1, "pages": budget.used_by("llama-c")}
    call(manager, P.Free("llama-c", ["c1"]))
    free_before = call(manager, P.GetStats()).budget.free_granules
    off = call(manager, P.Offload("llama-c"))
    assert isinstance(off, P.Offloaded) and off.freed_bytes == weights * GRANULE
    assert manager.elastic.weights["llama-c"].allocated_bytes() == 0
    stats = call(manager, P.GetStats())
    assert stats.budget.free_granules == free_before + weights and stats.budget.elastic_granules == 0
    assert {m.name: (m.state, m.offloads) for m in stats.models}["llama-c"] == ("offloaded", 1)
    bad = call(manager, P.Allocate("llama-c", [("c2", 4)]))
    assert bad.code == "invalid" and "offloaded" in bad.message
    assert call(manager, P.CanAllocate("llama-c", [("c2", 4)])).value == 0
    # llama-a grows into the granules llama-c gave back, then the wake takes them back from its newest requests
    ids = [f"a{i}" for i in range(40)]
    for rid in ids:
        got = call(manager, P.Allocate("llama-a", [(rid, 24)]))
        if got.preempted:
            break
    held = [rid for rid in ids if budget.used_by("llama-a") and rid in budget._model("llama-a").owned]
    assert budget.kv_granules > room  # past what it could hold with llama-c resident
    refused = call(manager, P.Wake("llama-c", [("llama-a", r) for r in held]))
    assert refused.code == "refused" and refused.numbers["needed"] == weights
    woken = call(manager, P.Wake("llama-c", [("llama-a", held[0])]))
    assert isinstance(woken, P.Woken) and woken.nbytes == manager.elastic.hosts["llama-c"].nbytes
    victims = woken.preempted["llama-a"]
    assert victims == held[len(held) - len(victims):] and held[0] not in victims  # newest first, never protected
    assert all(rid not in budget._model("llama-a").owned for rid in victims)
    assert call(manager, P.GetStats()).models[0].preemptions >= len(victims)
    assert manager.elastic.weights["llama-c"].allocated_bytes() == weights * GRANULE
    host = manager.elastic.hosts["llama-c"].tensor
    assert bool((manager.elastic.weights["llama-c"].tensor[: host.numel()] == host).all())
    assert call(manager, P.Allocate("llama-c", [("c3", 4)])).new_pages["c3"]


def test_pinned_llms_refuse_residency_changes(manager):
    assert call(manager, P.Offload("llama-a")).code == "invalid"
    assert call(manager, P.Wake("llama-c")).code == "invalid"  # resident already
    assert call(manager, P.Offload("nobody")).code == "unknown_model"


def test_idle_trim_unmaps_free_granules_beyond_the_reserve(manager):
    rids = [(f"a{i}", 24) for i in range(6)]
    call(manager, P.Allocate("llama-a", rids))
    mapped = manager.elastic.kv.mapped_bytes
    call(manager, P.Free("llama-a", [r for r, _ in rids]))
    before = manager.kv_epoch
    manager.idle()
    assert manager.elastic.kv.mapped_bytes <= mapped and manager.elastic.budget.kv_granules <= 2
    assert manager.kv_epoch >= before


class ElasticStoreMachine(RuleBasedStateMachine):
    """Random allocate / free / offload / wake / idle sequences through FlexStore's protocol (the budget's
    own machine is ``test_budget_props``): the budget's invariants hold, and the ranges FlexStore maps
    follow the budget (KV chunks = mapped granules, an elastic LLM's weights mapped iff resident,
    memory backed = what is mapped)."""

    tiny_models: dict = {}

    @initialize()
    def start(self):
        self.prefix = f"mux-elastic-props-{uuid.uuid4().hex[:6]}"
        self.manager = FlexStoreManager(elastic_config(self.tiny_models, self.prefix, kv_granules=6))
        self.held: dict[str, set[str]] = {"llama-a": set(), "llama-c": set()}
        self.next_id = 0
        self.preempting_wakes = 0

    def teardown(self):
        manager = getattr(self, "manager", None)
        if manager is not None:
            manager.close()
            assert list_shm(self.prefix) == set()

    @rule(model=st.sampled_from(["llama-a", "llama-c"]), data=st.data())
    def allocate(self, model, data):
        grow = data.draw(st.lists(st.sampled_from(sorted(self.held[model])), unique=True)) if self.held[model] else []
        budget = self.manager.elastic.budget
        batch = [(rid, len(budget.pages_of(model, rid)) // budget._model(model).pages_per_block
                  * budget._model(model).page_tokens + data.draw(st.integers(1, 20))) for rid in grow]
        for _ in range(data.draw(st.integers(0, 4))):
            self.next_id += 1
            batch.append((f"r{self.next_id}", data.draw(st.integers(1, 120))))
        reply = self.manager.handle(P.Allocate(model, batch))
        if self.manager.elastic.state(model).value != "resident":
            assert reply.code == "invalid"
            return
        assert isinstance(reply, P.Allocated), reply
        for rid in reply.preempted:
            self.held[model].discard(rid)
        for rid, pages in reply.new_pages.items():
            if pages:
                self.held[model].add(rid)

    @rule()
    def fill(self):
        """llama-a admits requests until the budget runs out (into llama-c's room when it is offloaded)."""
        while True:
            self.next_id += 1
            reply = self.manager.handle(P.Allocate("llama-a", [(f"r{self.next_id}", 100)]))
            if reply.preempted:
                return
            self.held["llama-a"].add(f"r{self.next_id}")

    @rule(model=st.sampled_from(["llama-a", "llama-c"]), data=st.data())
    def free(self, model, data):
        if not self.held[model]:
            return
        done = data.draw(st.lists(st.sampled_from(sorted(self.held[model])), unique=True, min_size=1))
        assert isinstance(self.manager.handle(P.Free(model, done)), P.Answer)
        self.held[model] -= set(done)

    @rule(idle_first=st.booleans())
    def offload(self, idle_first):
        if idle_first and self.held["llama-c"]:  # its requests finish: it turns idle
            self.manager.handle(P.Free("llama-c", sorted(self.held["llama-c"])))
            self.held["llama-c"] = set()
        reply = self.manager.handle(P.Offload("llama-c"))
        if self.held["llama-c"]:
            assert reply.code == "refused" and reply.numbers["requests"] == len(self.held["llama-c"])
        elif self.manager.elastic.state("llama-c").value == "offloaded":
            assert isinstance(reply, P.Offloaded) or reply.code == "invalid"
        else:
            assert isinstance(reply, P.Offloaded)

    @rule(data=st.data())
    def wake(self, data):
        held = sorted(self.held["llama-a"])
        protected = data.draw(st.lists(st.sampled_from(held), unique=True)) if held else []
        resident = self.manager.elastic.state("llama-c").value == "resident"
        reply = self.manager.handle(P.Wake("llama-c", [("llama-a", r) for r in protected]))
        if resident:
            assert reply.code == "invalid"
        elif isinstance(reply, P.Woken):
            victims = reply.preempted.get("llama-a", [])
            event("wake preempted" if victims else "wake without preemption")
            if victims:
                self.preempting_wakes += 1
            assert not set(victims) & set(protected)
            self.held["llama-a"] -= set(victims)
        else:
            event("wake refused")
            assert reply.code == "refused" and reply.numbers["needed"] > 0

    @rule()
    def idle(self):
        self.manager.idle()

    @invariant()
    def budget_and_ranges_agree(self):
        if not hasattr(self, "manager"):
            return
        e = self.manager.elastic
        f = e.budget.figures()
        assert f.pinned_granules + f.elastic_granules + f.kv_granules <= f.num_granules  # weights + KV <= budget
        owned = [p for m, rids in self.held.items() for rid in rids for p in e.budget.pages_of(m, rid)]
        assert len(owned) == len(set(owned))  # no page owned twice
        ppg = e.budget.pages_per_granule
        assert all(e.kv.is_mapped(p // ppg) for p in owned)  # every owned page lies in mapped memory
        assert sorted(c.start for c in e.kv.chunks()) == e.budget.mapped_granules()
        state = e.state("llama-c").value
        weights = e.weights["llama-c"]
        if state == "offloaded":
            assert not self.held["llama-c"] and e.budget.used_by("llama-c") == 0  # an offloaded LLM owns no page
            assert weights.chunks() == [] and weights.allocated_bytes() == 0
        else:
            assert weights.mapped_bytes == weights.nbytes
        assert e.kv.allocated_bytes() == e.kv.mapped_bytes


def test_elastic_store_state_machine(tiny_models):
    ElasticStoreMachine.tiny_models = tiny_models
    run_state_machine_as_test(ElasticStoreMachine, settings=settings(
        max_examples=40, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]))
