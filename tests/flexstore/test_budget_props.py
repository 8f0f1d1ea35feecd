"""Property tests of the memory budget: hypothesis state machines over random sequences.

* The engine allocator's own machine (``test_flexstore_allocator_props``) on a budget with pinned
  LLMs only: the same admissions, preemptions and page counts as ``PageAllocator``.
* Random allocate / free / offload / wake / trim sequences with elastic LLMs, checking after every
  step: weights + mapped KV granules never exceed the budget; one owner per page; free + owned =
  the pages of the mapped granules (so every owned page lies in a mapped granule); the owner was
  told of every granule mapped or unmapped; an offloaded LLM owns no page and holds no granule;
  preempted and finished requests own nothing; every wake is predicted exactly (granules to
  unmap, requests preempted newest first, never a protected one) or refused without a change.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from muxserve.flexstore.budget import BudgetError, MemoryBudget, OffloadRefused, Residency, WakeRefused, WeightState

from .helpers import PAGE_BYTES
from .test_budget import GRANULE, LAYOUTS, A, B, C
from .test_flexstore_allocator_props import MODELS, NUM_PAGES, AllocatorMachine


class PinnedBudgetMachine(AllocatorMachine):
    """The engine allocator's own state machine, run on a budget with only pinned LLMs: the same
    admissions, preemptions and page counts. 'Free' pages are those of mapped granules plus the
    pages of the granules the budget can still map."""

    def make_allocator(self):
        budget = MemoryBudget(NUM_PAGES * PAGE_BYTES, PAGE_BYTES, GRANULE, reserve_granules=1)
        for name in MODELS:
            budget.register_model(name, LAYOUTS[name])
        return budget

    def free_list(self) -> list[int]:
        unmapped = set(range(NUM_PAGES // 4)) - set(self.alloc.mapped_granules())
        return self.alloc.free_page_ids() + [g * 4 + i for g in unmapped for i in range(4)]


def test_pinned_budget_allocates_as_the_engine_allocator():
    run_state_machine_as_test(PinnedBudgetMachine, settings=settings(
        max_examples=60, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]))


NUM_GRANULES = 14
WEIGHTS = {A: (Residency.PINNED, 2), B: (Residency.ELASTIC, 4), C: (Residency.ELASTIC, 6)}
ELASTIC = [B, C]


class ElasticBudgetMachine(RuleBasedStateMachine):
    """Random allocate / free / offload / wake / trim sequences against a model of the budget.

    The model keeps every request's pages, the admission order, each LLM's state and the mapped
    granules as the budget reported them (allocation ``mapped``, ``trim``, wake ``unmap``), and
    predicts each wake exactly: granules from the free budget, then the highest whole free KV
    granules, then the fewest newest unprotected requests of other LLMs that empty enough.
    """

    def __init__(self):
        super().__init__()
        self.tokens: dict[str, dict[str, int]] = {m: {} for m in WEIGHTS}  # admitted request -> tokens
        self.pages: dict[str, dict[str, list[int]]] = {m: {} for m in WEIGHTS}
        self.order: list[tuple[str, str]] = []  # requests holding pages, admission order
        self.gone: dict[str, set[str]] = {m: set() for m in WEIGHTS}  # preempted or finished
        self.mapped: set[int] = set()
        self.next_id = 0

    @initialize(offloaded=st.sets(st.sampled_from(ELASTIC)))
    def start(self, offloaded):
        """Elastic LLMs may start offloaded: the others' KV then grows into their room, so that a
        wake has to take granules back."""
        self.budget = MemoryBudget(NUM_GRANULES * GRANULE, PAGE_BYTES, GRANULE, reserve_granules=1)
        self.state = {}
        for name, (residency, granules) in WEIGHTS.items():
            self.state[name] = WeightState.OFFLOADED if name in offloaded else WeightState.RESIDENT
            self.budget.register_model(name, LAYOUTS[name], granules * GRANULE - 7, residency, self.state[name])

    # -- requests ---------------------------------------------------------------------------
    @rule(data=st.data())
    def step(self, data):
        """One scheduler step of a resident LLM (now and then of another: refused)."""
        resident = [m for m in sorted(WEIGHTS) if self.state[m] is WeightState.RESIDENT]
        model = data.draw(st.sampled_from(resident if data.draw(st.integers(0, 9)) else sorted(WEIGHTS)), label="llm")
        live = sorted(self.tokens[model])
        grow = data.draw(st.lists(st.sampled_from(live), unique=True), label="grow") if live else []
        batch = [(rid, self.tokens[model][rid] + data.draw(st.integers(0, 24), label="growth")) for rid in grow]
        for _ in range(data.draw(st.integers(0, 3), label="new")):
            self.next_id += 1
            batch.append((f"r{self.next_id}", data.draw(st.integers(0, 60), label="tokens")))
        batch = data.draw(st.permutations(batch), label="order")
        if self.state[model] is not WeightState.RESIDENT:
            with pytest.raises(BudgetError, match=f"^cannot allocate pages for {model!r}: it is "):
                self.budget.allocate(model, batch)
            return
        unmapped = sorted(set(range(NUM_GRANULES)) - self.mapped)
        result = self.budget.allocate(model, batch)
        assert result.mapped == unmapped[:len(result.mapped)]  # the lowest unmapped granules
        self.mapped.update(result.mapped)
        ids = [rid for rid, _ in batch]
        k = len(ids) - len(result.preempted)
        assert result.preempted == ids[k:] and list(result.new_pages) == ids[:k]
        for rid in result.preempted:
            self._gone(model, rid)
        for rid, t in batch[:k]:
            if result.new_pages[rid] and not self.pages[model].get(rid):
                self.order.append((model, rid))
            self.pages[model][rid] = self.pages[model].get(rid, []) + result.new_pages[rid]
            self.tokens[model][rid] = max(self.tokens[model].get(rid, 0), t)

    @precondition(lambda self: any(self.tokens.values()))
    @rule(data=st.data())
    def finish(self, data):
        model = data.draw(st.sampled_from([m for m in sorted(WEIGHTS) if self.tokens[m]]))
        done = data.draw(st.lists(st.sampled_from(sorted(self.tokens[model])), unique=True, min_size=1))
        assert self.budget.free(model, done) == sum(len(self.pages[model][rid]) for rid in done)
        for rid in done:
            self._gone(model, rid)

    def _gone(self, model: str, rid: str) -> None:
        self.tokens[model].pop(rid, None)
        if self.pages[model].pop(rid, None):
            self.order.remove((model, rid))
        self.gone[model].add(rid)

    @rule(force=st.booleans())
    def trim(self, force):
        whole = self._whole_free()
        keep = 1 if force else 2
        expected = sorted(whole)[1:] if len(whole) > keep else []
        assert self.budget.trim(force) == expected
        self.mapped -= set(expected)

    # -- residency --------------------------------------------------------------------------
    def _pick(self, data, state: WeightState) -> str:
        """Mostly an elastic LLM in ``state`` (a valid transition), sometimes any (an invalid one)."""
        valid = [m for m in ELASTIC if self.state[m] is state]
        return data.draw(st.sampled_from(valid if valid and data.draw(st.integers(0, 4)) else ELASTIC), label="llm")

    @rule(data=st.data())
    def offload(self, data):
        model = self._pick(data, WeightState.RESIDENT)
        if data.draw(st.booleans(), label="idle first") and self.tokens[model]:
            done = sorted(self.tokens[model])
            self.budget.free(model, done)  # its requests finish: it turns idle
            for rid in done:
                self._gone(model, rid)
        if self.state[model] is WeightState.RESIDENT and not self.tokens[model]:
            assert self.budget.offload(model).granules == WEIGHTS[model][1]
            self.state[model] = WeightState.OFFLOADING
        else:
            error = OffloadRefused if self.state[model] is WeightState.RESIDENT else BudgetError
            with pytest.raises(error, match=f"^cannot offload {model!r}: "):
                self.budget.offload(model)

    @rule(data=st.data())
    def finish_offload(self, data):
        model = self._pick(data, WeightState.OFFLOADING)
        self._finish(model, WeightState.OFFLOADING, WeightState.OFFLOADED, self.budget.finish_offload)

    @rule(data=st.data(), cancel=st.booleans())
    def finish_wake(self, data, cancel):
        model = self._pick(data, WeightState.WAKING)
        if cancel:
            self._finish(model, WeightState.WAKING, WeightState.OFFLOADED, self.budget.cancel_wake)
        else:
            self._finish(model, WeightState.WAKING, WeightState.RESIDENT, self.budget.finish_wake)

    def _finish(self, model, before, after, call):
        if self.state[model] is before:
            call(model)
            self.state[model] = after
        else:
            with pytest.raises(BudgetError, match=f"^cannot .* {model!r}: it is {self.state[model].value}, not "):
                call(model)

    @rule(data=st.data())
    def wake(self, data):
        self._wake(data)

    @precondition(lambda self: len(self.order) >= 2)
    @rule(data=st.data())
    def wake_under_pressure(self, data):
        """Wakes while requests hold pages (those that must take granules back) drawn more often."""
        self._wake(data)

    def _wake(self, data):
        model = self._pick(data, WeightState.OFFLOADED)
        others = [key for key in self.order if key[0] != model]
        protected = data.draw(st.lists(st.sampled_from(others), unique=True), label="protected") if others else []
        if self.state[model] is not WeightState.OFFLOADED:
            with pytest.raises(BudgetError, match=f"^cannot wake {model!r}: it is "):
                self.budget.wake(model, protected)
            return
        expected = self._expected_wake(model, set(protected))
        if expected is None:
            before = (self.budget.figures(), sorted(self.budget.free_page_ids()))
            with pytest.raises(WakeRefused, match=f"^cannot wake {model!r}: its weights need "):
                self.budget.wake(model, protected)
            assert (self.budget.figures(), sorted(self.budget.free_page_ids())) == before
            return
        plan = self.budget.wake(model, protected)
        assert (plan.llm, plan.granules) == (model, WEIGHTS[model][1])
        assert (plan.unmap, plan.preempted) == expected
        for victim, rids in plan.preempted.items():
            for rid in rids:
                assert (victim, rid) not in protected
                self._gone(victim, rid)
        self.mapped -= set(plan.unmap)
        self.state[model] = WeightState.WAKING

    def _expected_wake(self, model, protected):
        """(unmap, preempted) the budget must return, or None for a refusal."""
        short = WEIGHTS[model][1] - self._free_granules()
        if short <= 0:
            return [], {}
        victims = []
        candidates = [key for key in reversed(self.order) if key not in protected and key[0] != model]
        while len(self._whole_free(victims)) < short:
            if len(victims) == len(candidates):
                return None
            victims.append(candidates[len(victims)])
        preempted = {}
        for m, rid in self.order:  # admission order
            if (m, rid) in victims:
                preempted.setdefault(m, []).append(rid)
        return sorted(self._whole_free(victims))[-short:], preempted

    def _whole_free(self, without=()) -> set[int]:
        used = {p // 4 for m in WEIGHTS for rid, pages in self.pages[m].items() if (m, rid) not in without
                for p in pages}
        return self.mapped - used

    def _free_granules(self) -> int:
        held = sum(WEIGHTS[m][1] for m, s in self.state.items() if s is not WeightState.OFFLOADED)
        return NUM_GRANULES - held - len(self.mapped)

    # -- invariants -------------------------------------------------------------------------
    @invariant()
    def budget_holds(self):
        f = self.budget.figures()
        assert f.states == self.state
        assert set(self.budget.mapped_granules()) == self.mapped  # the caller was told of every change
        assert f.pinned_granules + f.elastic_granules + f.kv_granules <= NUM_GRANULES
        assert f.free_granules == self._free_granules() >= 0

    @invariant()
    def pages_partition_the_mapped_granules(self):
        owned = [p for m in WEIGHTS for rid in self.tokens[m] for p in self.budget.pages_of(m, rid)]
        free = self.budget.free_page_ids()
        assert len(owned) == len(set(owned))  # one owner per page
        assert sorted(owned + free) == [g * 4 + i for g in sorted(self.mapped) for i in range(4)]
        assert self.budget.num_free == len(free) + 4 * self._free_granules()

    @invariant()
    def page_tables_match(self):
        for m in WEIGHTS:
            for rid, pages in self.pages[m].items():
                assert self.budget.pages_of(m, rid) == pages
            for rid in self.gone[m]:
                assert not self.budget.owns(m, rid)
            if self.state[m] is WeightState.OFFLOADED:
                assert not self.tokens[m] and self.budget.used_by(m) == 0


def test_elastic_budget_state_machine():
    run_state_machine_as_test(ElasticBudgetMachine, settings=settings(
        max_examples=200, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]))
