"""Head sizes whose K+V do not divide the 16 KiB page: a page holds a whole number of tokens and
the rest of it stays unused. The engine must still match transformers, alone and sharing one pool
with a model of another head size."""

from __future__ import annotations

import pytest
import torch
from conftest import ODD_HEAD_DIMS, TINY_KV_BYTES, assert_near_argmax, hf_greedy, load_hf, random_prompts

from muxserve.engine import LLM, SamplingParams
from muxserve.engine.kv_cache import DEFAULT_PAGE_BYTES, KVLayout, KVPool, PageAllocator
from muxserve.engine.llm_engine import EngineConfig, LLMEngine
from muxserve.engine.model_config import ModelSpec

NUM_NEW = 24
# Within the first page; past one page of every head size here (20 to 85 tokens per page); and
# one that crosses further page boundaries while decoding.
PROMPT_LENS = (1, 7, 44, 90)
GREEDY = SamplingParams(max_tokens=NUM_NEW, temperature=0, ignore_eos=True)


def _unused_bytes(layout: KVLayout) -> int:
    return layout.page_bytes - layout.page_tokens * layout.token_bytes


@pytest.mark.parametrize("head_dim", ODD_HEAD_DIMS)
def test_float32_greedy_matches_transformers(head_dim, tiny_model):
    folder = tiny_model(f"llama-hd{head_dim}")
    prompts = random_prompts(PROMPT_LENS)
    llm = LLM(str(folder), kv_cache_bytes=TINY_KV_BYTES)
    layout = llm.engine.layout
    assert (layout.head_dim, layout.page_bytes) == (head_dim, DEFAULT_PAGE_BYTES)
    assert _unused_bytes(layout) > 0  # the case at hand: the page is not a multiple of a token
    outputs = llm.generate(prompts, GREEDY)
    assert [o.token_ids for o in outputs] == hf_greedy(load_hf(folder), prompts, NUM_NEW)
    assert llm.engine.allocator.num_free == llm.engine.allocator.num_pages


@pytest.mark.parametrize("head_dim", ODD_HEAD_DIMS)
def test_bfloat16_tokens_equal_a_page_without_remainder_and_are_near_the_argmax(head_dim, tiny_model):
    """bf16 greedy tokens are not stable against transformers token for token (see test_parity), so
    bf16 is checked twice: token for token against the same engine on pages of exactly
    ``page_tokens`` tokens (same numerics, no unused bytes, a contiguous view), and near the argmax
    of transformers in fp32."""
    folder = tiny_model(f"llama-hd{head_dim}")
    prompts = random_prompts(PROMPT_LENS)
    llm = LLM(str(folder), dtype="bfloat16", kv_cache_bytes=TINY_KV_BYTES)
    layout = llm.engine.layout
    assert _unused_bytes(layout) > 0
    exact_page = layout.page_tokens * layout.token_bytes
    snug = LLM(str(folder), dtype="bfloat16", kv_cache_bytes=TINY_KV_BYTES, page_bytes=exact_page)
    assert snug.engine.layout.page_tokens == layout.page_tokens and _unused_bytes(snug.engine.layout) == 0
    assert snug.engine.pool.view(snug.engine.layout).is_contiguous()
    assert not llm.engine.pool.view(layout).is_contiguous()
    outputs = [o.token_ids for o in llm.generate(prompts, GREEDY)]
    assert outputs == [o.token_ids for o in snug.generate(prompts, GREEDY)]
    assert_near_argmax(load_hf(folder), prompts, outputs, NUM_NEW)


def _step_both(engines: dict[str, LLMEngine], allocator: PageAllocator, seqs: dict[str, list]) -> dict[str, set]:
    """Step the engines in turn until both are done; at every step no page has two owners. Returns
    every page each model held at some point."""
    held: dict[str, set] = {name: set() for name in engines}
    while any(e.has_unfinished() for e in engines.values()):
        for name, engine in engines.items():
            engine.step()
            owned = {name: [p for s in seqs[name] if allocator.owns(name, s.req_id)
                            for p in allocator.pages_of(name, s.req_id)] for name in engines}
            flat = [p for pages in owned.values() for p in pages]
            assert len(flat) == len(set(flat)), "a page has two owners"
            assert len(flat) + allocator.num_free == allocator.num_pages
            for n, pages in owned.items():
                held[n].update(pages)
    return held


def test_head_dim_80_and_64_models_share_one_pool(tiny_model):
    """An 80-dim model (25 fp32 tokens per page, 384 B unused) and a 64-dim one (32 tokens, no
    remainder) run in turn on one pool and one allocator; the 64-dim requests finish first and the
    80-dim ones decode on into the pages they freed. Both match transformers."""
    folders = {"hd80": tiny_model("llama-hd80"), "hd64": tiny_model("llama-gqa-hd64")}
    pool = KVPool.allocate(TINY_KV_BYTES)
    allocator = PageAllocator(pool.num_pages)
    engines, layouts = {}, {}
    for name, folder in folders.items():
        spec = ModelSpec.from_folder(folder)
        layouts[name] = KVLayout(spec.num_layers, spec.num_kv_heads, spec.head_dim, torch.float32)
        allocator.register_model(name, layouts[name])
        engines[name] = LLMEngine(EngineConfig(model=str(folder)), pool=pool, allocator=allocator, model_name=name)
    assert (layouts["hd80"].page_tokens, layouts["hd64"].page_tokens) == (25, 32)
    assert layouts["hd80"].pages_per_block == layouts["hd64"].pages_per_block == 4  # 2 layers x 2 kv heads

    prompts = {"hd80": random_prompts((7, 33, 50), seed=8), "hd64": random_prompts((20, 30), seed=9)}
    new = {"hd80": 40, "hd64": 6}
    seqs = {name: [engines[name].add_request(p, SamplingParams(max_tokens=new[name], temperature=0,
                                                               ignore_eos=True)) for p in prompts[name]]
            for name in engines}
    engines["hd80"].step()  # prefill: 1, 2 and 2 blocks of 25 tokens, 4 pages each, from a fresh pool
    assert [allocator.pages_of("hd80", s.req_id) for s in seqs["hd80"]] == [
        list(range(0, 4)), list(range(4, 12)), list(range(12, 20))]
    engines["hd64"].step()  # prefill: one 32-token block each, the next free pages
    assert [allocator.pages_of("hd64", s.req_id) for s in seqs["hd64"]] == [list(range(20, 24)),
                                                                            list(range(24, 28))]
    held = _step_both(engines, allocator, seqs)
    assert held["hd80"] & held["hd64"], "no page went from one head size to the other"
    assert allocator.num_free == allocator.num_pages
    for name, folder in folders.items():
        expected = hf_greedy(load_hf(folder), prompts[name], new[name])
        assert [s.output_token_ids for s in seqs[name]] == expected, name
