"""Device page tables (PageTables) and the runner's step metadata, on the CPU."""

from __future__ import annotations

import random

import pytest
import torch

from muxserve.engine.attention import TorchAttention, select_backend
from muxserve.engine.attention.page_table import PageTables
from muxserve.engine.cuda_graph import graph_sizes
from muxserve.engine.kv_cache import KVLayout
from muxserve.engine.runner import ModelRunner

LAYOUT = KVLayout(num_layers=2, num_kv_heads=3, head_dim=64, dtype=torch.float32)  # 32 tokens/page, 6 pages/block
UNUSED_ATTENTION = TorchAttention(torch.empty(0), 3, 3, 64)  # building metadata never attends


def expected_table(pages: list[int], blocks: int) -> torch.Tensor:
    return torch.tensor(pages[: blocks * 6], dtype=torch.int32).view(blocks, 6)


def test_incremental_growth_equals_a_full_rebuild():
    tables = PageTables(LAYOUT, "cpu", num_slots=2, max_blocks=1)
    rng = random.Random(0)
    pages = {k: [] for k in "abc"}
    lens = {k: rng.randrange(1, 40) for k in pages}
    for _ in range(60):
        keys = sorted(pages)
        for k in keys:
            lens[k] += rng.randrange(0, 9)
            while len(pages[k]) < LAYOUT.pages_for(lens[k]):
                pages[k].append(rng.randrange(10_000))
        nb = [LAYOUT.num_blocks(lens[k]) for k in keys]
        slots = tables.update(keys, [pages[k] for k in keys], nb)
        assert len(set(slots)) == 3
        for k, s, b in zip(keys, slots, nb):
            assert torch.equal(tables.table[s, :b], expected_table(pages[k], b))
            assert not tables.table[s, b:].any()  # zero past the request's blocks
    assert tables.num_slots >= 3 and tables.max_blocks >= max(nb) and tables.version > 0


def test_a_new_list_or_a_rewritten_tail_resets_the_row():
    tables = PageTables(LAYOUT, "cpu", num_slots=4, max_blocks=4)
    first = list(range(100, 118))  # 3 blocks
    (slot,) = tables.update(["r"], [first], [3])
    second = list(range(500, 506))  # preempted and recomputed: a fresh list of 1 block
    assert tables.update(["r"], [second], [1]) == [slot]
    assert torch.equal(tables.table[slot, 0], torch.arange(500, 506, dtype=torch.int32))
    assert not tables.table[slot, 1:].any()
    second[5] = 7  # the same object, its last converted page rewritten in place
    tables.update(["r"], [second], [1])
    assert tables.table[slot, 0, 5].item() == 7


def test_release_reuses_slots_and_stale_rows_are_reclaimed():
    tables = PageTables(LAYOUT, "cpu", num_slots=2, max_blocks=2)
    a, b, c = [1] * 6, [2] * 6, [3] * 6
    sa, sb = tables.update(["a", "b"], [a, b], [1, 1])
    tables.release(["a"])
    assert tables.slot_of("a") is None
    (sc,) = tables.update(["c"], [c], [1])
    assert sc == sa and torch.equal(tables.table[sc, 0], torch.full((6,), 3, dtype=torch.int32))
    # no free slot left: "b" and "c" are not in this batch, so their rows are taken back
    (sd,) = tables.update(["d"], [[4] * 6], [1])
    assert tables.num_slots == 2 and sd in (sb, sc) and tables.slot_of("b") is tables.slot_of("c") is None
    assert torch.equal(tables.table[sd, 0], torch.full((6,), 4, dtype=torch.int32))


def test_missing_pages_and_duplicates_are_errors():
    tables = PageTables(LAYOUT, "cpu")
    with pytest.raises(RuntimeError, match="holds 5 pages, needs 6"):
        tables.update(["x"], [[1] * 5], [1])
    with pytest.raises(ValueError, match="duplicate"):
        tables.update(["x", "x"], [[1] * 6, [1] * 6], [1, 1])


def test_for_limits_stays_within_its_byte_budget():
    t = PageTables.for_limits(LAYOUT, "cpu", max_seqs=256, max_tokens=8192)
    assert (t.num_slots, t.max_blocks) == (256, 256) and t.table.numel() * 4 <= 64 << 20
    small = PageTables.for_limits(LAYOUT, "cpu", max_seqs=256, max_tokens=131072, max_table_bytes=1 << 20)
    assert small.num_slots == 256 and small.table.numel() * 4 <= 1 << 20


class _Seq:
    def __init__(self, req_id, tokens, pages):
        self.req_id, self.token_ids, self.pages = req_id, tokens, pages
        self.num_tokens = len(tokens)

    @property
    def last_token_id(self):
        return self.token_ids[-1]


def _old_prepare(layout, seqs, is_prefill):
    """The runner's former metadata construction (Python lists -> tables each step)."""
    T, L, H = layout.page_tokens, layout.num_layers, layout.num_kv_heads
    positions, query_lens, tokens = [], [], []
    for s in seqs:
        if is_prefill:
            tokens += s.token_ids
            positions += range(s.num_tokens)
            query_lens.append(s.num_tokens)
        else:
            tokens.append(s.token_ids[-1])
            positions.append(s.num_tokens - 1)
            query_lens.append(1)
    nbs = [layout.num_blocks(s.num_tokens) for s in seqs]
    tables = torch.zeros(len(seqs), max(nbs), L, H, dtype=torch.int64)
    for i, (s, nb) in enumerate(zip(seqs, nbs)):
        tables[i, :nb] = torch.tensor(s.pages[: nb * L * H]).view(nb, L, H)
    pos = torch.tensor(positions)
    seq_index = torch.repeat_interleave(torch.arange(len(seqs)), torch.tensor(query_lens))
    cu = torch.zeros(len(seqs) + 1, dtype=torch.int64)
    cu[1:] = torch.tensor(query_lens).cumsum(0)
    return torch.tensor(tokens), pos, tables, tables[seq_index, pos // T].permute(1, 0, 2), pos % T, cu


@pytest.mark.parametrize("is_prefill", [True, False])
def test_runner_metadata_equals_the_former_construction(is_prefill):
    runner = ModelRunner(torch.nn.Identity(), LAYOUT, UNUSED_ATTENTION, torch.device("cpu"), max_num_seqs=4,
                         max_model_len=512)
    rng = random.Random(1)
    seqs = []
    for i in range(5):
        n = rng.randrange(1, 150)
        seqs.append(_Seq(str(i), [rng.randrange(1000) for _ in range(n)],
                         [rng.randrange(5000) for _ in range(LAYOUT.pages_for(n))]))
    for _ in range(3):  # later steps extend the same sequences
        ids, pos, meta, last = runner._prepare(seqs, is_prefill)
        tokens, pos_ref, tables, write_pages, offsets, cu = _old_prepare(LAYOUT, seqs, is_prefill)
        assert torch.equal(ids, tokens) and torch.equal(pos, pos_ref)
        assert torch.equal(meta.block_tables, tables) and torch.equal(meta.write_pages, write_pages)
        assert torch.equal(meta.write_offsets, offsets) and torch.equal(meta.cu_query_lens, cu)
        assert torch.equal(meta.seq_lens, torch.tensor([s.num_tokens for s in seqs]))
        assert torch.equal(last, cu[1:] - 1) and meta.max_query_len == max(cu.diff().tolist())
        for s in seqs:
            grow = rng.randrange(0, 40)
            s.token_ids = s.token_ids + [rng.randrange(1000) for _ in range(grow)]
            s.num_tokens = len(s.token_ids)
            s.pages.extend(rng.randrange(5000) for _ in range(LAYOUT.pages_for(s.num_tokens) - len(s.pages)))


def test_backend_selection():
    assert select_backend("auto", torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match="needs a CUDA device"):
        select_backend("triton", torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        select_backend("flash", torch.device("cpu"))


def test_graph_sizes_cover_every_batch_up_to_the_limit():
    assert graph_sizes(1) == [1]
    assert graph_sizes(20) == [1, 2, 4, 8, 12, 16, 20]
    assert graph_sizes(256)[-1] == 256 and graph_sizes(300)[-1] == 256
