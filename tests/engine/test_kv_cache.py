"""The head-wise paged KV pool: page size arithmetic, the allocator's exact page ids, and the
pool invariants while the engine runs (one owner per page, owned + free = total, all freed at the end)."""

from __future__ import annotations

import pytest
import torch
from conftest import random_prompts

from muxserve.engine import LLM, SamplingParams
from muxserve.engine.kv_cache import KVLayout, KVPool, PageAllocator

KiB = 1024


# -- KVLayout / KVPool -------------------------------------------------------------------------
@pytest.mark.parametrize("head_dim, dtype, page_tokens", [
    (64, torch.float32, 32),
    (128, torch.bfloat16, 32),
    (64, torch.bfloat16, 64),
    (128, torch.float32, 16),
    # head sizes whose K+V do not divide 16 KiB: whole tokens, the rest of the page unused
    (80, torch.bfloat16, 51),
    (96, torch.bfloat16, 42),
    (100, torch.bfloat16, 40),
    (48, torch.float32, 42),
    (80, torch.float32, 25),
    (100, torch.float32, 20),
])
def test_page_tokens_of_16kib_pages(head_dim, dtype, page_tokens):
    layout = KVLayout(num_layers=30, num_kv_heads=3, head_dim=head_dim, dtype=dtype, page_bytes=16 * KiB)
    assert layout.page_tokens == page_tokens
    assert layout.pages_per_block == 90
    assert layout.num_blocks(page_tokens) == 1
    assert layout.num_blocks(page_tokens + 1) == 2
    assert layout.pages_for(page_tokens + 1) == 180
    assert layout.pages_for(0) == 0
    assert layout.page_elements * layout.dtype_bytes == 16 * KiB


def test_page_size_must_hold_a_token_and_whole_elements():
    with pytest.raises(ValueError, match=r"page size 448 B holds no token of K\+V \(512 B for head_dim 64, "
                                         r"torch.float32\)"):
        KVLayout(1, 1, 64, torch.float32, page_bytes=448)
    with pytest.raises(ValueError, match=r"page size 1001 B is not a multiple of the 4-byte elements of "
                                         r"torch.float32"):
        KVLayout(1, 1, 64, torch.float32, page_bytes=1001)
    assert KVLayout(1, 1, 64, torch.float32, page_bytes=1000).page_tokens == 1


def test_pool_views_pages_per_layout():
    pool = KVPool.allocate(10 * 16 * KiB + 5)  # the odd bytes are not a page
    assert pool.num_pages == 10
    fp32 = pool.view(KVLayout(2, 2, 64, torch.float32))
    bf16 = pool.view(KVLayout(1, 1, 128, torch.bfloat16))
    assert fp32.shape == (10, 2, 32, 64) and fp32.dtype == torch.float32
    assert bf16.shape == (10, 2, 32, 128) and bf16.dtype == torch.bfloat16
    fp32[3].fill_(1.1)  # both views share the same bytes, page for page (1.1 has no zero bf16 half)
    assert bf16[3].ne(0).all() and bf16[2].eq(0).all() and bf16[4].eq(0).all()
    with pytest.raises(ValueError, match="holds no page"):
        KVPool.allocate(100)


@pytest.mark.parametrize("head_dim, dtype", [(80, torch.bfloat16), (100, torch.bfloat16), (48, torch.float32)])
def test_a_head_size_that_does_not_divide_the_page_is_a_strided_view(head_dim, dtype):
    """Page p of the view is bytes [p * 16 KiB, p * 16 KiB + 2 * T * D * size): K of T tokens, then V;
    the end of the page is never part of the view."""
    pool = KVPool.allocate(6 * 16 * KiB)
    layout = KVLayout(1, 1, head_dim, dtype)
    t, size = layout.page_tokens, dtype.itemsize
    kv = pool.view(layout)
    assert kv.shape == (6, 2, t, head_dim)
    assert kv.stride() == (16 * KiB // size, t * head_dim, head_dim, 1)
    kv[4, 1, t - 1].fill_(3.0)  # V of the page's last token: its last bytes are the last used ones
    kv[2].fill_(1.0)
    pages = pool.buffer.view(6, 16 * KiB)
    used = 2 * t * head_dim * size
    assert 0 < 16 * KiB - used < 2 * head_dim * size  # less than one more token is left over
    assert pages[:, used:].eq(0).all()
    assert pages.ne(0).any(1).nonzero().flatten().tolist() == [2, 4]
    assert pages[4, : used - head_dim * size].eq(0).all()
    assert torch.equal(pages[4, used - head_dim * size: used].view(dtype), torch.full((head_dim,), 3.0, dtype=dtype))
    assert torch.equal(pages[2, :used].view(dtype), torch.ones(2 * t * head_dim, dtype=dtype))


def test_views_of_two_head_sizes_share_pages_byte_for_byte():
    """An 80-dim fp32 view and a 64-dim fp32 view of one pool address page p at the same byte."""
    pool = KVPool.allocate(4 * 16 * KiB)
    wide = pool.view(KVLayout(1, 1, 80, torch.float32))  # 25 tokens, 384 B unused per page
    narrow = pool.view(KVLayout(1, 1, 64, torch.float32))  # 32 tokens, the whole page
    wide[2, 0, 0, 0] = 7.0
    wide[3, 1, 24, 79] = 9.0  # the last used element of page 3
    assert narrow[2, 0, 0, 0].item() == 7.0
    assert narrow[3].flatten()[(2 * 25 * 80) - 1].item() == 9.0
    assert narrow[1].eq(0).all() and narrow[3].count_nonzero().item() == 1


# -- PageAllocator -----------------------------------------------------------------------------
@pytest.fixture
def alloc() -> PageAllocator:
    """16 pages; model "m": 2 layers x 2 KV heads = 4 pages per block of 32 tokens."""
    allocator = PageAllocator(16)
    allocator.register_model("m", KVLayout(2, 2, 64, torch.float32))
    return allocator


def test_fresh_allocator_hands_out_pages_in_order(alloc):
    result = alloc.allocate("m", [("r0", 10), ("r1", 33)])
    assert result.new_pages == {"r0": [0, 1, 2, 3], "r1": [4, 5, 6, 7, 8, 9, 10, 11]}
    assert result.preempted == []
    assert alloc.num_free == 4
    assert alloc.used_by("m") == 12
    assert alloc.pages_of("m", "r1") == [4, 5, 6, 7, 8, 9, 10, 11]


def test_owner_gets_only_missing_pages(alloc):
    alloc.allocate("m", [("r0", 10), ("r1", 10)])
    result = alloc.allocate("m", [("r0", 32), ("r1", 33)])  # r0 still fits its block; r1 needs one more
    assert result.new_pages == {"r0": [], "r1": [8, 9, 10, 11]}
    assert alloc.pages_of("m", "r0") == [0, 1, 2, 3]
    assert alloc.pages_of("m", "r1") == [4, 5, 6, 7, 8, 9, 10, 11]
    assert alloc.num_free == 4


def test_tail_preemption_frees_exactly_the_tail(alloc):
    alloc.allocate("m", [("r0", 1), ("r1", 1), ("r2", 1)])  # 0-3, 4-7, 8-11; free 12-15
    # Each wants a second block (12 pages) but only 4 are free: r2 is dropped, its pages reused.
    result = alloc.allocate("m", [("r0", 40), ("r1", 40), ("r2", 40)])
    assert result.preempted == ["r2"]
    assert result.new_pages == {"r0": [8, 9, 10, 11], "r1": [12, 13, 14, 15]}
    assert not alloc.owns("m", "r2")
    assert alloc.pages_of("m", "r0") == [0, 1, 2, 3, 8, 9, 10, 11]
    assert alloc.num_free == 0


def test_tail_preemption_reports_the_tail_in_batch_order(alloc):
    alloc.allocate("m", [("r0", 1), ("r1", 1), ("r2", 1)])  # 0-3, 4-7, 8-11; free 12-15
    result = alloc.allocate("m", [("r0", 97), ("r1", 1), ("r2", 1)])  # r0 wants 12 more, 4 are free
    assert result.preempted == ["r1", "r2"]
    # The free list is LIFO: r2's pages (freed last) are reused first, then r1's, then the old free ones.
    assert result.new_pages == {"r0": [8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15]}
    assert alloc.pages_of("m", "r0") == [0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15]
    assert not alloc.owns("m", "r1") and not alloc.owns("m", "r2")
    assert alloc.num_free == 0


def test_allocation_that_fits_preempts_nothing(alloc):
    alloc.allocate("m", [("r0", 1), ("r1", 1)])
    assert alloc.can_allocate("m", [("r0", 64), ("r1", 64)])  # 8 missing, 8 free
    assert not alloc.can_allocate("m", [("r0", 65), ("r1", 64)])
    result = alloc.allocate("m", [("r0", 64), ("r1", 64)])
    assert result.preempted == []
    assert alloc.num_free == 0


def test_free_returns_every_page_and_rejects_unknown_ids(alloc):
    alloc.allocate("m", [("r0", 33), ("r1", 1)])
    assert alloc.free("m", ["r0"]) == 8
    assert alloc.num_free == 12
    with pytest.raises(KeyError, match="'r0'"):  # already freed
        alloc.free("m", ["r0"])
    with pytest.raises(KeyError, match="'ghost'"):
        alloc.free("m", ["r1", "ghost"])
    assert alloc.owns("m", "r1")  # a rejected free frees nothing
    assert alloc.free("m", ["r1"]) == 4
    assert alloc.num_free == 16
    # The pages freed last (r1's) are handed out first, each request's first page first.
    assert alloc.allocate("m", [("r2", 1)]).new_pages == {"r2": [8, 9, 10, 11]}


def test_models_share_one_pool_without_collisions(alloc):
    alloc.register_model("big", KVLayout(1, 1, 128, torch.bfloat16))  # 1 page per 32-token block
    assert alloc.allocate("m", [("a", 1)]).new_pages == {"a": [0, 1, 2, 3]}
    assert alloc.allocate("big", [("a", 70)]).new_pages == {"a": [4, 5, 6]}  # same id, other model
    assert alloc.used_by("m") == 4 and alloc.used_by("big") == 3
    assert alloc.max_tokens("m") == 16 // 4 * 32 and alloc.max_tokens("big") == 16 * 32
    alloc.free("m", ["a"])
    assert alloc.pages_of("big", "a") == [4, 5, 6]
    assert alloc.num_free == 13


def test_allocator_errors_name_the_culprit(alloc):
    with pytest.raises(KeyError, match="unknown model 'nope'"):
        alloc.allocate("nope", [("r", 1)])
    with pytest.raises(ValueError, match="model 'm' is already registered"):
        alloc.register_model("m", KVLayout(1, 1, 64, torch.float32))
    with pytest.raises(ValueError, match="duplicate request ids"):
        alloc.allocate("m", [("r", 1), ("r", 2)])
    with pytest.raises(ValueError, match="negative token count"):
        alloc.allocate("m", [("r", -1)])
    with pytest.raises(KeyError, match="request 'r' of model 'm' owns no pages"):
        alloc.pages_of("m", "r")
    with pytest.raises(ValueError, match="num_pages must be >= 1, got 0"):
        PageAllocator(0)
    assert alloc.num_free == 16


# -- the pool while the engine runs ----------------------------------------------------------
GREEDY = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
PROMPTS = random_prompts((30, 5, 25, 40, 12, 33), seed=21)


def run_checking_pool(llm: LLM, prompts, params) -> tuple[list[list[int]], int]:
    """Drive the engine step by step, asserting the pool invariants after every step."""
    engine, allocator, model = llm.engine, llm.engine.allocator, llm.engine.MODEL_NAME
    seqs = [engine.add_request(p, params) for p in prompts]
    steps = 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
        live = [s for s in seqs if allocator.owns(model, s.req_id)]
        assert {s.req_id for s in live} == {s.req_id for s in engine.scheduler.running}
        owned = [page for s in live for page in allocator.pages_of(model, s.req_id)]
        assert len(owned) == len(set(owned)), "a page has two owners"
        assert all(0 <= page < allocator.num_pages for page in owned)
        assert len(owned) + allocator.num_free == allocator.num_pages
        assert allocator.used_by(model) == len(owned)
        for s in live:
            assert s.pages == allocator.pages_of(model, s.req_id)
            # Pages for every token whose K/V is in the pool: all but the newest sampled one.
            assert len(s.pages) == engine.layout.pages_for(s.num_tokens - 1)
        for s in seqs:
            if not allocator.owns(model, s.req_id):
                assert s.pages == []
    assert allocator.num_free == allocator.num_pages
    return [s.output_token_ids for s in seqs], steps


@pytest.fixture(scope="module")
def big_pool_outputs(tiny_llm):
    outputs = tiny_llm.generate(PROMPTS, GREEDY)
    assert tiny_llm.engine.allocator.num_free == tiny_llm.engine.allocator.num_pages
    return [o.token_ids for o in outputs]


def test_every_page_is_free_after_generate(tiny_llm, big_pool_outputs):
    allocator = tiny_llm.engine.allocator
    assert allocator.num_pages == 256
    assert allocator.num_free == 256
    assert allocator.used_by(tiny_llm.engine.MODEL_NAME) == 0
    assert all(len(t) == 40 for t in big_pool_outputs)


def test_pool_invariants_hold_at_every_step(tiny_llm, big_pool_outputs):
    outputs, steps = run_checking_pool(tiny_llm, PROMPTS, GREEDY)
    assert outputs == big_pool_outputs
    assert steps == 40  # one prefill of all six, then 39 decode steps


def test_preemption_under_a_tiny_pool_gives_the_same_tokens(tiny_model, tiny_llm, big_pool_outputs):
    # 24 pages = 6 blocks of 32 tokens; the six requests need up to 3 blocks each at the end.
    llm = LLM(str(tiny_model("llama-gqa-hd64")), kv_cache_bytes=24 * 16 * KiB)
    assert llm.engine.allocator.num_pages == 24
    outputs, _ = run_checking_pool(llm, PROMPTS, GREEDY)
    assert llm.engine.scheduler.num_preemptions > 0
    assert outputs == big_pool_outputs
    again = llm.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in again] == big_pool_outputs
    assert sum(o.num_preemptions for o in again) > 0
    assert [o.finish_reason for o in again] == ["length"] * len(PROMPTS)
    assert llm.engine.allocator.num_free == 24
