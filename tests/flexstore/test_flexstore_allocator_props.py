"""Property tests of the page allocator that FlexStore owns, alone and through the protocol.

A hypothesis state machine runs random interleavings of scheduler steps (requests that grow,
new and re-admitted requests, random batch order), finishes and double frees for three models
with different layers, kv-heads and head sizes on one small pool, and checks after every step:

* one owner per page, and free + owned = total (the free list and every page table partition
  the pool exactly);
* each admitted request owns exactly ``pages_for(tokens)`` pages, in the order they were given;
* preemption drops a suffix of the batch, the longest prefix that fits is admitted, and the
  pages returned are exactly those the reported tail held;
* a finished request holds nothing, and freeing it again is an error with an exact message.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from muxserve.engine.kv_cache import KVLayout, PageAllocator
from muxserve.flexstore import FlexStoreClient, FlexStoreConfig, FlexStoreError, FlexStoreManager, ModelEntry
from muxserve.flexstore import protocol as P

from .helpers import PAGE_BYTES, TINY

NUM_PAGES = 48
LAYOUTS = {name: KVLayout(s["num_hidden_layers"], s["num_key_value_heads"], s["head_dim"], torch.float32, PAGE_BYTES)
           for name, s in TINY.items()}  # 8, 4, 2 tokens per page; 4, 3, 2 pages per block
MODELS = sorted(LAYOUTS)


class AllocatorMachine(RuleBasedStateMachine):
    """Drives a PageAllocator and keeps the expected page tables alongside."""

    def __init__(self):
        super().__init__()
        self.alloc = self.make_allocator()
        self.tokens: dict[str, dict[str, int]] = {m: {} for m in MODELS}  # live request -> tokens
        self.pages: dict[str, dict[str, list[int]]] = {m: {} for m in MODELS}  # live request -> its pages
        self.preempted: dict[str, set[str]] = {m: set() for m in MODELS}  # may come back (recompute)
        self.finished: dict[str, set[str]] = {m: set() for m in MODELS}
        self.next_id = 0

    # -- backend hooks ----------------------------------------------------------------------
    def make_allocator(self):
        alloc = PageAllocator(NUM_PAGES)
        for name in MODELS:
            alloc.register_model(name, LAYOUTS[name])
        return alloc

    def free_list(self) -> list[int]:
        return self.alloc._free

    def unknown_request_error(self):
        return pytest.raises(KeyError)

    @staticmethod
    def error_message(excinfo) -> str:
        return excinfo.value.args[0]

    # -- rules ------------------------------------------------------------------------------
    @rule(model=st.sampled_from(MODELS), data=st.data())
    def step(self, model, data):
        """One scheduler step: running requests grow, new or preempted ones (re)arrive, any order."""
        live = sorted(self.tokens[model])
        grow = data.draw(st.lists(st.sampled_from(live), unique=True), label="grow") if live else []
        batch = [(rid, self.tokens[model][rid] + data.draw(st.integers(0, 12), label="growth")) for rid in grow]
        back = sorted(self.preempted[model])
        for rid in data.draw(st.lists(st.sampled_from(back), unique=True, max_size=2), label="back") if back else []:
            batch.append((rid, data.draw(st.integers(0, 30), label="tokens")))
        for _ in range(data.draw(st.integers(0, 3), label="new")):
            self.next_id += 1
            batch.append((f"r{self.next_id}", data.draw(st.integers(0, 30), label="tokens")))
        batch = data.draw(st.permutations(batch), label="order")
        self._allocate(model, batch)

    def _allocate(self, model: str, batch: list[tuple[str, int]]):
        layout, owned = LAYOUTS[model], self.pages[model]
        held = [len(owned.get(rid, [])) for rid, _ in batch]
        need = [max(0, layout.pages_for(t) - h) for (_, t), h in zip(batch, held)]
        free_before = self.alloc.num_free
        result = self.alloc.allocate(model, batch)

        ids = [rid for rid, _ in batch]
        k = len(ids) - len(result.preempted)
        assert result.preempted == ids[k:]  # a suffix of the batch, in batch order
        assert list(result.new_pages) == ids[:k]  # every admitted id, in batch order
        assert sum(need[:k]) <= free_before + sum(held[k:])  # the admitted prefix fits ...
        if k < len(ids):  # ... and is the longest that does
            assert sum(need[: k + 1]) > free_before + sum(held[k + 1:])
        for (rid, t), n in zip(batch[:k], need[:k]):
            assert len(result.new_pages[rid]) == n
            owned[rid] = owned.get(rid, []) + result.new_pages[rid]
            assert len(owned[rid]) == max(held[ids.index(rid)], layout.pages_for(t))
            self.tokens[model][rid] = max(self.tokens[model].get(rid, 0), t)
            self.preempted[model].discard(rid)
        given = {p for pages in result.new_pages.values() for p in pages}
        free_after = set(self.free_list())
        for rid in result.preempted:
            # Exactly the tail's pages came back: free now, or handed to the admitted prefix.
            assert set(owned.get(rid, [])) <= free_after | given
            owned.pop(rid, None)
            self.tokens[model].pop(rid, None)
            self.preempted[model].add(rid)
            assert not self.alloc.owns(model, rid)
        assert self.alloc.num_free == free_before + sum(held[k:]) - sum(need[:k])

    @precondition(lambda self: any(self.tokens.values()))
    @rule(data=st.data())
    def finish(self, data):
        model = data.draw(st.sampled_from([m for m in MODELS if self.tokens[m]]))
        done = data.draw(st.lists(st.sampled_from(sorted(self.tokens[model])), unique=True, min_size=1))
        assert self.alloc.free(model, done) == sum(len(self.pages[model][rid]) for rid in done)
        for rid in done:
            del self.pages[model][rid], self.tokens[model][rid]
            self.finished[model].add(rid)
            assert not self.alloc.owns(model, rid)

    @precondition(lambda self: any(self.finished.values()))
    @rule(data=st.data())
    def free_again(self, data):
        model = data.draw(st.sampled_from([m for m in MODELS if self.finished[m]]))
        rid = data.draw(st.sampled_from(sorted(self.finished[model])))
        with self.unknown_request_error() as excinfo:
            self.alloc.free(model, [rid])
        assert self.error_message(excinfo) == (f"requests [{rid!r}] of model {model!r} own no pages "
                                               "(unknown or already freed)")

    # -- invariants -------------------------------------------------------------------------
    @invariant()
    def pages_partition_the_pool(self):
        owned = [p for m in MODELS for rid in self.pages[m] for p in self.alloc.pages_of(m, rid)]
        assert len(owned) == len(set(owned))  # one owner per page
        assert sorted(owned + self.free_list()) == list(range(NUM_PAGES))  # free + owned = total
        assert self.alloc.num_free + len(owned) == NUM_PAGES

    @invariant()
    def page_tables_match(self):
        for m in MODELS:
            for rid, pages in self.pages[m].items():
                assert self.alloc.pages_of(m, rid) == pages
            for rid in self.finished[m] | self.preempted[m]:
                assert not self.alloc.owns(m, rid)


class FlexStoreMachine(AllocatorMachine):
    """The same machine through FlexStore: protocol encoding, manager, sparse replies, client."""

    models: dict = {}

    def make_allocator(self):
        config = FlexStoreConfig(models=tuple(ModelEntry(n, str(self.models[n])) for n in MODELS),
                                 address="inproc://unused", kv_cache_bytes=NUM_PAGES * PAGE_BYTES,
                                 page_bytes=PAGE_BYTES)
        self.manager = FlexStoreManager(config)
        return LoopbackClient(self.manager)

    def free_list(self) -> list[int]:
        return self.manager.allocator._free

    def unknown_request_error(self):
        return pytest.raises(FlexStoreError)

    @staticmethod
    def error_message(excinfo) -> str:
        assert excinfo.value.code == "unknown_request"
        return excinfo.value.message

    def teardown(self):
        self.manager.close()


class LoopbackClient(FlexStoreClient):
    """FlexStoreClient whose transport is a direct call of FlexStoreManager.handle_bytes."""

    def __init__(self, manager: FlexStoreManager):
        self.manager = manager
        self.address = "loopback"
        self._info = None

    def call_raw(self, data: bytes) -> P.Reply:
        return P.decode_reply(self.manager.handle_bytes(data)[1])

    def close(self) -> None:
        pass


def test_page_allocator_state_machine():
    run_state_machine_as_test(AllocatorMachine, settings=settings(
        max_examples=100, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]))


def test_flexstore_protocol_state_machine(tiny_models):
    FlexStoreMachine.models = tiny_models
    run_state_machine_as_test(FlexStoreMachine, settings=settings(
        max_examples=30, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]))
