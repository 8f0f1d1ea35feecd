"""The elastic building blocks under real engines (CPU, one process): an LLM offloaded and woken
while another decodes gives the tokens of an always-resident run, and the wake that takes memory
back preempts the other LLM's newest requests, which are recomputed: nothing is lost.

What FlexStore, the runtimes and the scheduler will do after integration is done by hand here:
the KV range is mapped as the budget grows it, weights are unmapped and copied back in from the
host copy, and the requests a wake preempts go back to the head of their scheduler's queue.
"""

from __future__ import annotations

import uuid

import pytest
import torch

from muxserve.engine.kv_cache import KVPool
from muxserve.engine.llm_engine import EngineConfig, LLMEngine
from muxserve.engine.model_config import ModelSpec
from muxserve.engine.sampling_params import SamplingParams
from muxserve.flexstore.budget import MemoryBudget, WeightState
from muxserve.flexstore.config import ModelEntry
from muxserve.flexstore.device_memory import ShmRange
from muxserve.flexstore.host_copy import HostCopy, map_and_copy_in
from muxserve.flexstore.segments import list_shm
from muxserve.flexstore.weights import attach_model, load_shared

from .helpers import PAGE_BYTES

GRANULE = 16 * PAGE_BYTES
CPU = torch.device("cpu")
PARAMS = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


class MappedBudget(MemoryBudget):
    """The budget plus what FlexStore will do with its answers: map the KV granules it grows into."""

    kv: ShmRange

    def allocate_sparse(self, model, requests):
        result = super().allocate_sparse(model, requests)
        self.kv.map_granules(result.mapped)
        return result


def prompts(seed: int, count: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(8, 40, (count,), generator=gen)
    return [torch.randint(0, 200, (int(n),), generator=gen).tolist() for n in lengths]


def run(engine: LLMEngine, batch: list[list[int]]) -> list[list[int]]:
    seqs = [engine.add_request(p, PARAMS) for p in batch]
    while engine.has_unfinished():
        engine.step()
    return [s.output_token_ids for s in seqs]


def requeue(engine: LLMEngine, preempted: list[str]) -> None:
    """The scheduler hook to come: requests preempted outside the engine's own allocation go back
    to the head of its queue and are recomputed (as its own preemptions are)."""
    sched = engine.scheduler
    by_id = {s.req_id: s for s in sched.running}
    for seq_id in reversed(preempted):
        seq = by_id[seq_id]
        sched.running.remove(seq)
        seq.reset_for_recompute()
        sched.waiting.appendleft(seq)


@pytest.fixture
def tag():
    prefix = f"mux-elastic-e2e-{uuid.uuid4().hex[:6]}"
    yield prefix
    assert list_shm(prefix) == set()


def test_offload_and_wake_while_another_llm_decodes(tiny_models, tag):
    a, b = "llama-a", "llama-c"  # a pinned, b elastic
    stored = {n: load_shared(ModelEntry(n, str(tiny_models[n])), tiny_models[n], CPU, f"{tag}-{n}") for n in (a, b)}
    host = HostCopy(stored[b].segment)  # b's checkpoint, read once: its host copy
    grains = {n: -(-s.segment.nbytes // GRANULE) for n, s in stored.items()}
    room = 6  # KV granules while both are resident
    budget = MappedBudget(GRANULE * (grains[a] + grains[b] + room), PAGE_BYTES, GRANULE, reserve_granules=2)
    budget.kv = kv = ShmRange.create(f"{tag}-kv", budget.num_pages * PAGE_BYTES, GRANULE)
    weights = ShmRange.create(f"{tag}-w", grains[b] * GRANULE, GRANULE)
    try:
        pool = KVPool(kv.tensor, PAGE_BYTES)
        map_and_copy_in(weights, host.tensor)
        models = {a: attach_model(ModelSpec.from_folder(tiny_models[a]), torch.float32, CPU, stored[a].segment.tensor,
                                  stored[a].tensors),
                  b: attach_model(ModelSpec.from_folder(tiny_models[b]), torch.float32, CPU, weights.tensor,
                                  stored[b].tensors)}
        engines = {}
        for name, residency in ((a, "pinned"), (b, "elastic")):
            engine_layout = LLMEngine(EngineConfig(model=str(tiny_models[name]), kv_cache_bytes=64 * PAGE_BYTES,
                                                   page_bytes=PAGE_BYTES))
            budget.register_model(name, engine_layout.layout, stored[name].segment.nbytes, residency)
            engines[name] = LLMEngine(EngineConfig(model=str(tiny_models[name]), page_bytes=PAGE_BYTES),
                                      model=models[name], pool=pool, allocator=budget, model_name=name)
        alone = {n: LLMEngine(EngineConfig(model=str(tiny_models[n]), kv_cache_bytes=512 * PAGE_BYTES,
                                           page_bytes=PAGE_BYTES)) for n in (a, b)}
        work = {a: prompts(1, 16), b: prompts(2, 4)}
        reference = {n: run(alone[n], work[n]) for n in (a, b)}
        b_weight = dict(models[b].named_parameters())["layers.0.self_attn.qkv_proj.weight"]
        address = b_weight.data_ptr()

        assert run(engines[b], work[b]) == reference[b]
        budget.offload(b)
        assert weights.unmap_all() == grains[b] * GRANULE and weights.allocated_bytes() == 0
        budget.finish_offload(b)

        # a decodes into the granules b gave back, far past what it could hold while b was resident.
        seqs = [engines[a].add_request(p, PARAMS) for p in work[a]]
        while engines[a].has_unfinished() and budget.kv_granules < room + grains[b] // 2:
            engines[a].step()
        assert budget.kv_granules >= room + grains[b] // 2 and engines[a].scheduler.running
        assert budget.state_of(b) is WeightState.OFFLOADED

        plan = budget.wake(b)  # between a's steps: no job in flight, nothing protected
        assert plan.preempted and list(plan.preempted) == [a]
        newest = [s.req_id for s in engines[a].scheduler.running][-len(plan.preempted[a]):]
        assert plan.preempted[a] == newest  # a's newest requests, oldest of them first
        requeue(engines[a], plan.preempted[a])
        kv.unmap_granules(plan.unmap)
        map_and_copy_in(weights, host.tensor)
        budget.finish_wake(b)
        assert set(kv.chunks()) and {c.start for c in kv.chunks()} == set(budget.mapped_granules())

        while engines[a].has_unfinished():
            engines[a].step()
        assert [s.output_token_ids for s in seqs] == reference[a]  # preempted, recomputed, same tokens
        assert b_weight.data_ptr() == address  # the same parameter tensors, nothing rebuilt
        assert run(engines[b], work[b]) == reference[b]  # woken weights compute as before
        assert budget.used_by(a) == budget.used_by(b) == 0
    finally:
        weights.close()
        kv.close()
        for s in stored.values():
            s.segment.release()
