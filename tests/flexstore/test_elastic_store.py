"""FlexStore with an elastic LLM (in process, through the protocol): one memory budget for weights
and KV, offload and wake with their refusals, the figures of Info and Stats, cleanup of every name."""

from __future__ import annotations

import uuid

import pytest

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
