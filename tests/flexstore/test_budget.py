"""The memory budget of one device: granules for weights and KV, the page allocator inside it, residency.

Geometry of these tests: 1 KiB pages in 4 KiB granules (4 pages per granule, page p in granule
p // 4) and the three tiny layouts of the FlexStore tests: llama-a 8 tokens per page and 4 pages
per block, qwen-b 4 and 3, llama-c 2 and 2.
"""

from __future__ import annotations

import pytest
import torch

from muxserve.engine.kv_cache import KVLayout
from muxserve.flexstore.budget import (
    BudgetError,
    MemoryBudget,
    OffloadRefused,
    Residency,
    WakePlan,
    WakeRefused,
    WeightState,
)

from .helpers import PAGE_BYTES, TINY

GRANULE = 4 * PAGE_BYTES
A, B, C = "llama-a", "qwen-b", "llama-c"
LAYOUTS = {name: KVLayout(s["num_hidden_layers"], s["num_key_value_heads"], s["head_dim"], torch.float32, PAGE_BYTES)
           for name, s in TINY.items()}


def make_budget(granules: int = 16, reserve: int = 1, weights=((A, "pinned", 2), (B, "elastic", 3), (C, "pinned", 1)),
                offloaded=()) -> MemoryBudget:
    budget = MemoryBudget(granules * GRANULE, PAGE_BYTES, GRANULE, reserve_granules=reserve)
    for name, residency, count in weights:
        state = WeightState.OFFLOADED if name in offloaded else WeightState.RESIDENT
        budget.register_model(name, LAYOUTS[name], count * GRANULE - 100, residency, state)
    return budget


def snapshot(budget: MemoryBudget, requests) -> tuple:
    pages = {(m, r): budget.pages_of(m, r) for m, r in requests}
    return budget.figures(), pages, sorted(budget.free_page_ids()), budget.mapped_granules()


# -- geometry, registration --------------------------------------------------------------------
def test_registration_counts_weights_in_granules():
    budget = make_budget(weights=((A, "pinned", 2), (B, "elastic", 3), (C, "elastic", 5)), offloaded=(C,))
    f = budget.figures()
    assert (f.num_granules, f.pinned_granules, f.elastic_granules, f.kv_granules, f.free_granules) == (16, 2, 3, 0, 11)
    assert f.states == {A: WeightState.RESIDENT, B: WeightState.RESIDENT, C: WeightState.OFFLOADED}
    assert (budget.num_pages, budget.pages_per_granule, budget.num_free) == (64, 4, 44)
    assert [budget.weight_granules(n) for n in (A, B, C)] == [2, 3, 5]
    assert budget.residency_of(C) is Residency.ELASTIC
    # Every granule but the pinned weights (and the model's own, if elastic) could become its KV.
    assert budget.max_tokens(A) == 14 * 4 // 4 * 8
    assert budget.max_tokens(C) == 9 * 4 // 2 * 2


def test_registration_errors_name_the_bad_value():
    with pytest.raises(ValueError, match=r"^page size 1024 B must divide the granule of 1536 B$"):
        MemoryBudget(8192, 1024, 1536)
    with pytest.raises(ValueError, match=r"^a budget of 4000 B holds no granule of 4096 B$"):
        MemoryBudget(4000, 1024, 4096)
    budget = make_budget(granules=4, weights=((A, "pinned", 2),))
    with pytest.raises(ValueError) as e:
        budget.register_model(B, LAYOUTS[B], 3 * GRANULE)
    assert str(e.value) == "weights of 'qwen-b' need 3 granules of 4 KiB but only 2 of the budget's 4 are free"
    with pytest.raises(ValueError, match=r"^pinned LLM 'qwen-b' cannot start offloaded$"):
        budget.register_model(B, LAYOUTS[B], GRANULE, "pinned", WeightState.OFFLOADED)
    with pytest.raises(ValueError, match=r"^residency must be 'pinned' or 'elastic', got 'sticky'$"):
        budget.register_model(B, LAYOUTS[B], GRANULE, "sticky")
    with pytest.raises(ValueError, match=r"^model 'llama-a' is already registered$"):
        budget.register_model(A, LAYOUTS[A], 0)
    budget.register_model(C, LAYOUTS[C], 9 * GRANULE, "elastic", WeightState.OFFLOADED)  # offloaded: fits
    assert budget.free_granules == 2


# -- allocation over granules ------------------------------------------------------------------
def test_growth_maps_lowest_granules_plus_the_reserve():
    budget = make_budget()
    got = budget.allocate(A, [("a1", 9)])  # 2 blocks of 4 pages
    assert (got.new_pages, got.preempted, got.mapped) == ({"a1": list(range(8))}, [], [0, 1, 2])
    assert (budget.kv_granules, budget.num_mapped_free, budget.free_granules, budget.num_free) == (3, 4, 7, 32)
    got = budget.allocate_sparse(C, [("c1", 3)])  # 4 pages: the reserve granule, no growth
    assert (got.new_pages, got.mapped) == ({"c1": [8, 9, 10, 11]}, [])
    got = budget.allocate(C, [("c1", 4), ("c2", 1)])  # c1 has room; c2 needs 2 pages: grows 1 + 1
    assert (got.new_pages, got.mapped) == ({"c1": [], "c2": [12, 13]}, [3, 4])


def test_pages_come_from_the_fullest_granule_first():
    budget = make_budget()
    budget.allocate(A, [("a1", 9)])  # granules 0, 1 (and 2 mapped as the reserve)
    budget.allocate(C, [("c1", 3)])  # granule 2
    budget.allocate(C, [("c2", 1)])  # 12, 13 of granule 3; granule 4 mapped as the reserve
    budget.free(C, ["c1"])  # granule 2 whole free again
    # granule 3 has 2 free pages, granules 2 and 4 have 4: fill 3 first, then the lowest of 2 and 4.
    assert budget.allocate(B, [("b1", 4)]).new_pages == {"b1": [14, 15, 8]}
    assert budget.whole_free_granules() == [4]
    budget.free(B, ["b1"])
    budget.free(C, ["c2"])
    # Pages come back per granule; the lowest page of a granule goes out first.
    assert budget.allocate(A, [("a2", 1)]).new_pages == {"a2": [8, 9, 10, 11]}


def test_shortage_cuts_the_batch_as_the_engine_does():
    budget = make_budget(granules=9, reserve=0)  # 3 granules of KV room: 12 pages
    got = budget.allocate(A, [("a1", 8), ("a2", 16), ("a3", 8)])  # 4 + 8 + 4 pages
    assert (got.new_pages, got.preempted, got.mapped) == ({"a1": [0, 1, 2, 3], "a2": list(range(4, 12))}, ["a3"],
                                                          [0, 1, 2])
    # The tail's pages go to the head: a2 (8 pages) is preempted, a1 and a4 fit.
    got = budget.allocate(A, [("a1", 16), ("a4", 8), ("a2", 24)])
    assert (got.new_pages, got.preempted) == ({"a1": [4, 5, 6, 7], "a4": [8, 9, 10, 11]}, ["a2"])
    assert not budget.owns(A, "a2") and budget.num_free == 0


def test_failed_allocation_keeps_no_granule():
    budget = make_budget()
    with pytest.raises(ValueError, match=r"^duplicate request ids in one allocation for model 'llama-a'$"):
        budget.allocate(A, [("x", 4), ("x", 4)])
    assert budget.mapped_granules() == [] and budget.num_mapped_free == 0


def test_trim_unmaps_the_highest_whole_free_granules_beyond_the_reserve():
    budget = make_budget(reserve=1)
    budget.allocate(A, [("a1", 9)])  # granules 0, 1; reserve 2
    budget.allocate(C, [("c1", 7)])  # 8 pages: granules 2, 3; reserve 4
    assert budget.trim() == [] and budget.trim(force=True) == []  # one whole free granule: the reserve
    budget.free(A, ["a1"])  # whole free: 0, 1, 4
    assert budget.trim() == [1, 4]  # more than 2 x reserve: down to the reserve, keeping the lowest
    assert budget.mapped_granules() == [0, 2, 3]
    budget.free(C, ["c1"])  # whole free: 0, 2, 3 (3 > 2)
    assert budget.trim() == [2, 3]
    budget.allocate(C, [("c2", 1)])
    budget.free(C, ["c2"])
    assert budget.trim() == [] and budget.trim(force=True) == []


# -- residency ---------------------------------------------------------------------------------
def test_offload_then_wake_without_pressure():
    budget = make_budget(weights=((A, "pinned", 2), (B, "elastic", 3), (C, "elastic", 5)))
    assert budget.offload(B).granules == 3
    assert budget.state_of(B) is WeightState.OFFLOADING and budget.free_granules == 6  # still held
    assert budget.finish_offload(B) == 3
    assert budget.state_of(B) is WeightState.OFFLOADED and budget.free_granules == 9
    assert budget.wake(B) == WakePlan(B, 3, [], {})
    assert budget.state_of(B) is WeightState.WAKING and budget.free_granules == 6
    budget.finish_wake(B)
    assert budget.state_of(B) is WeightState.RESIDENT
    budget.offload(C)
    budget.finish_offload(C)
    budget.wake(C)
    assert budget.cancel_wake(C) == 5 and budget.state_of(C) is WeightState.OFFLOADED and budget.free_granules == 11


def test_wake_unmaps_whole_free_granules_first():
    budget = make_budget(weights=((A, "pinned", 2), (B, "elastic", 3), (C, "elastic", 6)), offloaded=(C,), reserve=2)
    budget.allocate(A, [("a1", 9), ("a2", 24)])  # 8 + 12 pages: granules 0-4, reserve 5, 6
    budget.free(A, ["a2"])  # granules 2, 3, 4 whole free too; budget: 16 - 5 - 7 = 4 free
    plan = budget.wake(C, protected=[(A, "a1")])
    assert plan == WakePlan(C, 6, unmap=[5, 6], preempted={})  # the highest whole free ones
    assert budget.mapped_granules() == [0, 1, 2, 3, 4] and budget.free_granules == 0
    assert budget.pages_of(A, "a1") == list(range(8))


def pressure_budget() -> MemoryBudget:
    """A: a1 (granules 0, 1), a2 (2, 3); B: b1 (4 and half of 5), b2 (the rest of 5, one page of 6);
    C (6 granules) offloaded; no reserve; 4 granules of the budget free."""
    budget = make_budget(weights=((A, "pinned", 2), (B, "elastic", 3), (C, "elastic", 6)), offloaded=(C,), reserve=0)
    assert budget.allocate(A, [("a1", 12)]).new_pages == {"a1": list(range(8))}
    assert budget.allocate(A, [("a2", 12)]).new_pages == {"a2": list(range(8, 16))}
    assert budget.allocate(B, [("b1", 8)]).new_pages == {"b1": list(range(16, 22))}
    assert budget.allocate(B, [("b2", 4)]).new_pages == {"b2": [22, 23, 24]}
    assert (budget.mapped_granules(), budget.free_granules, budget.whole_free_granules()) == (list(range(7)), 4, [])
    return budget


def test_wake_preempts_the_newest_requests_of_other_llms():
    budget = pressure_budget()
    plan = budget.wake(C)  # short by 2: b2 empties granule 6, b1 granules 4 and 5
    assert plan == WakePlan(C, 6, unmap=[5, 6], preempted={B: ["b1", "b2"]})
    assert not budget.owns(B, "b1") and not budget.owns(B, "b2") and budget.used_by(B) == 0
    assert budget.mapped_granules() == [0, 1, 2, 3, 4] and budget.whole_free_granules() == [4]
    assert budget.free_granules == 0 and budget.state_of(C) is WeightState.WAKING
    assert budget.pages_of(A, "a2") == list(range(8, 16))


def test_wake_never_preempts_a_protected_request():
    budget = pressure_budget()
    plan = budget.wake(C, protected=[(B, "b1")])  # b2 empties granule 6; then a2 empties 2 and 3
    assert plan == WakePlan(C, 6, unmap=[3, 6], preempted={A: ["a2"], B: ["b2"]})
    assert budget.pages_of(B, "b1") == list(range(16, 22)) and budget.pages_of(A, "a1") == list(range(8))
    assert budget.mapped_granules() == [0, 1, 2, 4, 5]


def test_wake_refused_changes_nothing_and_gives_the_numbers():
    budget = pressure_budget()
    live = [(A, "a1"), (A, "a2"), (B, "b1"), (B, "b2")]
    before = snapshot(budget, live)
    with pytest.raises(WakeRefused) as e:
        budget.wake(C, protected=[(A, "a1"), (A, "a2"), (B, "b1")])
    assert str(e.value) == ("cannot wake 'llama-c': its weights need 6 granules of 4 KiB; the budget has 4 free, "
                            "0 whole free KV granules, and preempting every request outside in-flight jobs would "
                            "empty 1 more (3 protected requests keep their pages): short by 1")
    assert (e.value.needed, e.value.free, e.value.whole_free, e.value.reclaimable) == (6, 4, 0, 1)
    assert snapshot(budget, live) == before and budget.state_of(C) is WeightState.OFFLOADED


def test_offload_refused_while_requests_hold_pages():
    budget = pressure_budget()
    with pytest.raises(OffloadRefused) as e:
        budget.offload(B)
    assert str(e.value) == ("cannot offload 'qwen-b': 2 of its requests hold 9 pages; an LLM with requests in "
                            "flight is never offloaded (free or preempt them first)")
    assert budget.state_of(B) is WeightState.RESIDENT
    budget.free(B, ["b1", "b2"])
    assert budget.offload(B).granules == 3


def test_transitions_in_the_wrong_state_are_refused_by_name():
    budget = make_budget(weights=((A, "pinned", 2), (B, "elastic", 3), (C, "elastic", 5)), offloaded=(C,))
    cases = [
        (lambda: budget.wake(B), "cannot wake 'qwen-b': it is resident, not offloaded"),
        (lambda: budget.offload(A), "cannot offload 'llama-a': it is pinned (residency: elastic lets it move)"),
        (lambda: budget.offload(C), "cannot offload 'llama-c': it is offloaded, not resident"),
        (lambda: budget.finish_offload(B), "cannot finish offloading 'qwen-b': it is resident, not offloading"),
        (lambda: budget.finish_wake(C), "cannot finish waking 'llama-c': it is offloaded, not waking"),
        (lambda: budget.cancel_wake(C), "cannot cancel the wake of 'llama-c': it is offloaded, not waking"),
        (lambda: budget.allocate(C, [("c1", 2)]),
         "cannot allocate pages for 'llama-c': it is offloaded; an LLM's requests are scheduled only while it is "
         "resident"),
    ]
    for call, message in cases:
        with pytest.raises(BudgetError) as e:
            call()
        assert str(e.value) == message
    assert budget.can_allocate(C, [("c1", 2)]) is False and budget.can_allocate(B, [("b1", 2)]) is True
    with pytest.raises(KeyError, match="unknown model 'nope'"):
        budget.wake("nope")
