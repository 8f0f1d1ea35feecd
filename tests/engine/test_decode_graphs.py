"""The host side of graph decode steps, on the CPU.

``DecodeGraphs`` is exercised without CUDA: a subclass "replays" a graph by running the same
forward pass eagerly on the static inputs, over an attention that reads the slot tables like the
Triton backend (here the torch reference underneath). Staging, padding, the in-graph argmax and
sampling from the graph's logits must then give exactly the tokens of the plain CPU engine.
"""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
import torch
from conftest import TINY_KV_BYTES, engine_generate, random_prompts

from muxserve.engine import LLM, SamplingParams
from muxserve.engine.attention import AttentionBackend, TorchAttention
from muxserve.engine.attention.page_table import PageTables
from muxserve.engine.cuda_graph import DecodeGraphs, _Graph, _Staging
from muxserve.engine.kv_cache import KVLayout
from muxserve.engine.runner import ModelRunner
from muxserve.engine.sampler import greedy_tokens, sample

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, dtype=torch.float32, page_bytes=2048)  # 16 tokens a page
UNUSED_ATTENTION = TorchAttention(torch.empty(0), 2, 2, 16)  # staging steps never attend


# -- greedy token selection ---------------------------------------------------------------------
def test_greedy_tokens_take_the_first_maximum_and_agree_with_sample():
    logits = torch.tensor([[0.0, 3.0, 3.0, 1.0], [5.0, -1.0, 5.0, 5.0], [-2.0, -3.0, -1.0, -1.5]])
    assert greedy_tokens(logits).tolist() == [1, 0, 2]
    assert greedy_tokens(logits).dtype == torch.int64
    greedy = SamplingParams(temperature=0)
    assert sample(logits, [greedy] * 3, [None] * 3) == [1, 0, 2]
    mixed = sample(logits, [greedy, SamplingParams(temperature=1.0, seed=1), greedy], [None, 1, None])
    assert mixed[0] == 1 and mixed[2] == 2


# -- page tables: unchanged rows cost no device work ---------------------------------------------
class _CountingTables(PageTables):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.writes = []

    def _write(self, changed):
        self.writes.append([(e.slot, nb, reset) for e, _, nb, reset in changed])
        super()._write(changed)


def _rows(tables: PageTables, slot: int, blocks: int) -> list[int]:
    return tables.table[slot, :blocks].flatten().tolist()


def test_page_table_update_skips_requests_whose_pages_did_not_grow():
    ppb = LAYOUT.pages_per_block  # 4
    tables = _CountingTables(LAYOUT, torch.device("cpu"), num_slots=4, max_blocks=4)
    a, b = list(range(100, 100 + 2 * ppb)), list(range(200, 200 + ppb))
    slots = tables.update(["a", "b"], [a, b], [2, 1])
    assert len(tables.writes) == 1 and {r for _, _, r in tables.writes[0]} == {True}
    assert _rows(tables, slots[0], 2) == a and _rows(tables, slots[1], 1) == b
    for _ in range(3):  # decode steps inside the same blocks: no device work at all
        assert tables.update(["a", "b"], [a, b], [2, 1]) == slots
    assert len(tables.writes) == 1
    b.extend(range(300, 300 + ppb))  # b needs a new block: only b's new rows are written
    assert tables.update(["a", "b"], [a, b], [2, 2]) == slots
    assert tables.writes[-1] == [(slots[1], 2, False)]
    assert _rows(tables, slots[1], 2) == b
    b[ppb:] = range(400, 400 + ppb)  # the same list rewritten in place (recompute): row rebuilt
    tables.update(["a", "b"], [a, b], [2, 2])
    assert tables.writes[-1] == [(slots[1], 2, True)]
    assert _rows(tables, slots[1], 2) == b
    a2 = list(a)  # a new list object (a re-sent table): row rebuilt even with equal contents
    tables.update(["a", "b"], [a2, b], [2, 2])
    assert tables.writes[-1] == [(slots[0], 2, True)]
    with pytest.raises(RuntimeError, match="needs"):
        tables.update(["a"], [a2], [3])


def test_page_table_update_equals_a_rebuild_from_the_lists():
    rng = random.Random(3)
    ppb = LAYOUT.pages_per_block
    tables = PageTables(LAYOUT, torch.device("cpu"), num_slots=2, max_blocks=1)  # grows both ways
    lists = {f"r{i}": [] for i in range(6)}
    blocks = {k: 0 for k in lists}
    for _ in range(40):
        keys = rng.sample(sorted(lists), rng.randrange(1, 5))
        for k in keys:
            if rng.random() < 0.1:  # a rewritten table
                lists[k] = [rng.randrange(1000) for _ in range(len(lists[k]))]
            if rng.random() < 0.4 or blocks[k] == 0:
                blocks[k] += 1
                lists[k].extend(rng.randrange(1000) for _ in range(ppb))
        slots = tables.update(keys, [lists[k] for k in keys], [blocks[k] for k in keys])
        for k, s in zip(keys, slots):
            assert _rows(tables, s, blocks[k]) == lists[k][: blocks[k] * ppb]


# -- staging a decode step ------------------------------------------------------------------------
class _Seq:
    def __init__(self, req_id, prompt, output, pages):
        self.req_id, self.prompt_token_ids, self.output_token_ids, self.pages = req_id, prompt, output, pages
        self.params = SamplingParams(temperature=0)

    @property
    def token_ids(self):
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self):
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def last_token_id(self):
        return self.token_ids[-1]


def test_stage_decode_writes_tokens_positions_slots_and_lengths():
    runner = ModelRunner(torch.nn.Identity(), LAYOUT, UNUSED_ATTENTION, torch.device("cpu"), max_num_seqs=4,
                         max_model_len=256)
    rng = random.Random(0)
    seqs = []
    for i, (n, out) in enumerate([(5, 0), (17, 3), (40, 1)]):
        prompt = [rng.randrange(1000) for _ in range(n)]
        output = [rng.randrange(1000) for _ in range(out)]
        seqs.append(_Seq(str(i), prompt, output, list(range(100 * i, 100 * i + LAYOUT.pages_for(n + out)))))
    staged = np.full((4, 8), 77, dtype=np.int64)
    runner._stage_decode(seqs, staged)
    slots = [runner.tables.slot_of(s.req_id) for s in seqs]
    assert staged[:, :3].tolist() == [[s.token_ids[-1] for s in seqs], [s.num_tokens - 1 for s in seqs], slots,
                                      [s.num_tokens for s in seqs]]
    assert (staged[:, 3:] == 77).all()  # columns past the batch are left to the caller
    host, _ = runner._host_inputs(seqs, False)  # the eager decode path packs the same block
    assert host.dtype == torch.int64 and host[:, :3].tolist() == staged[:, :3].tolist()
    assert host.shape == (4, 4) and (host[:, 3] == 0).all()  # rows padded to even: 16-byte aligned


def test_prefill_inputs_start_16_byte_aligned_whatever_the_lengths():
    """Triton specializes kernels on pointer alignment: every packed part must start aligned, or a
    batch of odd length compiles second variants of the kernels while requests wait."""
    runner = ModelRunner(torch.nn.Identity(), LAYOUT, UNUSED_ATTENTION, torch.device("cpu"), max_num_seqs=4,
                         max_model_len=256)
    rng = random.Random(1)
    seqs = [_Seq(str(i), [rng.randrange(1000) for _ in range(n)], [],
                 list(range(100 * i, 100 * i + LAYOUT.pages_for(n))))
            for i, n in enumerate([5, 16, 40])]  # 61 tokens, 3 sequences: odd sizes everywhere
    input_ids, positions, meta, last_index = runner._prepare(seqs, True)
    parts = {"input_ids": input_ids, "positions": positions, "token_slots": meta.token_slots,
             "seq_lens": meta.seq_lens, "slot_ids": meta.slot_ids, "cu_query_lens": meta.cu_query_lens,
             "last_index": last_index}
    assert {name: t.data_ptr() % 16 for name, t in parts.items()} == dict.fromkeys(parts, 0)
    assert input_ids.tolist() == [t for s in seqs for t in s.token_ids]
    assert positions.tolist() == list(range(5)) + list(range(16)) + list(range(40))
    assert meta.cu_query_lens.tolist() == [0, 5, 21, 61] and last_index.tolist() == [4, 20, 60]
    assert meta.seq_lens.tolist() == [5, 16, 40]
    slots = [runner.tables.slot_of(s.req_id) for s in seqs]
    assert meta.slot_ids.tolist() == slots and meta.token_slots.tolist() == [sl for sl, n in zip(slots, [5, 16, 40])
                                                                              for _ in range(n)]


# -- graph decode steps on the CPU -----------------------------------------------------------------
class _SlotTableAttention(AttentionBackend):
    """The torch reference attention fed from the slot tables, as the Triton kernels read them."""

    name = "slot-tables"
    needs_block_tables = False
    supports_cuda_graphs = True

    def __init__(self, inner, layout: KVLayout):
        self.inner, self.layout = inner, layout

    def num_splits(self, batch: int) -> int:
        return 1

    def forward(self, layer, q, k, v, meta):
        out = torch.zeros_like(q)
        real = (meta.slot_ids >= 0).nonzero().squeeze(1)  # padding columns: no write, no output
        if real.numel() == 0:
            return out
        T = meta.page_tokens
        slots, lens, pos = meta.slot_ids[real], meta.seq_lens[real], meta.positions[real]
        nb = int((lens.max() + T - 1) // T)
        tables = meta.slot_tables[slots, :nb].view(len(real), nb, self.layout.num_layers,
                                                   self.layout.num_kv_heads).long()
        sub = dataclasses.replace(meta, seq_lens=lens, seq_lens_list=lens.tolist(), block_tables=tables,
                                  write_pages=tables[torch.arange(len(real)), pos // T].permute(1, 0, 2),
                                  write_offsets=pos % T)
        out[real] = self.inner.forward(layer, q[real], k[real], v[real], sub)
        return out


class _Replay:
    def __init__(self, fn):
        self.fn = fn

    def replay(self):
        self.fn()


class _Event:
    def record(self, stream=None):
        pass

    def synchronize(self):
        pass


class _CpuGraphs(DecodeGraphs):
    """``DecodeGraphs`` whose "graphs" rerun the captured forward pass eagerly into the same outputs."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.replays: list[int] = []

    def _capture(self, size):
        static, meta = self._graph_inputs(size)
        logits, tokens = self._forward(static, meta)

        def replay():
            self.replays.append(size)
            new_logits, new_tokens = self._forward(static, meta)
            logits.copy_(new_logits)
            tokens.copy_(new_tokens)

        return _Graph(_Replay(replay), static, logits, tokens)

    def _new_staging(self, size):
        inputs, tokens = torch.zeros(4, size, dtype=torch.int64), torch.zeros(size, dtype=torch.int64)
        return _Staging(inputs, inputs.numpy(), tokens, tokens.numpy(), _Event())

    def _stream(self):
        return _Event()  # has synchronize()


def _with_cpu_graphs(llm: LLM, max_batch: int) -> _CpuGraphs:
    runner = llm.engine.runner
    attention = _SlotTableAttention(runner.attention, runner.layout)
    runner.graphs = _CpuGraphs(runner.model, attention, runner.tables, runner.device, max_batch)
    return runner.graphs


PROMPT_LENS = (1, 7, 33, 50, 20)


def _generate(llm: LLM, prompts, params: list[SamplingParams]) -> list[list[int]]:
    """Each prompt with its own sampling settings, all in one engine run (mixed batches)."""
    return engine_generate(llm.engine, prompts, params)


@pytest.mark.parametrize("graph_argmax", [True, False])
def test_graph_decode_steps_on_cpu_equal_the_eager_engine(tiny_model, graph_argmax):
    folder = tiny_model("llama-gqa-hd64")
    prompts = random_prompts(PROMPT_LENS)
    greedy = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    seeded = [SamplingParams(max_tokens=n, temperature=0.9, top_k=8, seed=i, ignore_eos=True)
              for i, n in enumerate((24, 10))]
    mixed = [greedy, seeded[0], dataclasses.replace(greedy, max_tokens=30), seeded[1],
             dataclasses.replace(greedy, max_tokens=16)]
    ref = LLM(str(folder), kv_cache_bytes=TINY_KV_BYTES)
    fast = LLM(str(folder), kv_cache_bytes=TINY_KV_BYTES, max_num_seqs=8)
    graphs = _with_cpu_graphs(fast, 8)
    fast.engine.runner.graph_argmax = graph_argmax
    for params in ([greedy] * len(prompts), mixed):
        expected = _generate(ref, prompts, params)
        assert _generate(fast, prompts, params) == expected
    # Batches of 5 down to 1 as requests finish: padded sizes 8, 4, 2 and 1 were replayed.
    assert set(graphs.replays) == set(graphs.captured) == {1, 2, 4, 8}
    assert fast.engine.allocator.num_free == fast.engine.allocator.num_pages


def test_graph_decode_steps_on_cpu_survive_table_growth_and_preemption(tiny_model):
    folder = tiny_model("llama-gqa-hd64")
    prompts = random_prompts((40, 90, 20, 60, 75, 10, 33, 50))
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    kv_bytes = 96 * 16384  # a pool too small for the batch: preemption and recompute
    ref = LLM(str(folder), kv_cache_bytes=kv_bytes)
    fast = LLM(str(folder), kv_cache_bytes=kv_bytes)
    runner = fast.engine.runner
    runner.tables = PageTables(runner.layout, runner.device, num_slots=1, max_blocks=1)  # grows: recapture
    graphs = _with_cpu_graphs(fast, 8)
    expected = [o.token_ids for o in ref.generate(prompts, params)]
    assert [o.token_ids for o in fast.generate(prompts, params)] == expected
    assert fast.engine.scheduler.num_preemptions > 0 and runner.tables.version > 0 and graphs.replays
