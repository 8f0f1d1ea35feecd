"""The engine on CUDA: tiny-Llama parity with transformers in float32, and a bf16 check."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_KV_BYTES, assert_near_argmax, hf_greedy, load_hf, random_prompts
from muxserve.engine import LLM, SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

ARCHS = ("llama-gqa-hd64", "llama-hd128-tied", "qwen3")
NUM_NEW = 32
PROMPT_LENS = (1, 7, 33, 50)
GREEDY = SamplingParams(max_tokens=NUM_NEW, temperature=0, ignore_eos=True)


@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_float32_greedy_matches_transformers(tiny_model, arch):
    folder = tiny_model(arch)
    prompts = random_prompts(PROMPT_LENS)
    expected = hf_greedy(load_hf(folder, device="cuda"), prompts, NUM_NEW)
    llm = LLM(str(folder), device="cuda", kv_cache_bytes=TINY_KV_BYTES)
    assert llm.engine.pool.buffer.is_cuda
    outputs = llm.generate(prompts, GREEDY)
    assert [o.token_ids for o in outputs] == expected
    assert llm.engine.allocator.num_free == llm.engine.allocator.num_pages


@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_bfloat16_tokens_are_near_argmax_of_float32_reference(tiny_model, arch):
    folder = tiny_model(arch)
    prompts = random_prompts(PROMPT_LENS)
    llm = LLM(str(folder), device="cuda", dtype="bfloat16", kv_cache_bytes=TINY_KV_BYTES)
    assert llm.engine.model.embed_tokens.weight.dtype == torch.bfloat16
    outputs = llm.generate(prompts, GREEDY)
    assert_near_argmax(load_hf(folder, device="cuda"), prompts, [o.token_ids for o in outputs], NUM_NEW)


def test_cuda_seeded_sampling_matches_cpu(tiny_model):
    # Per-request generators live on the CPU, so a seed draws the same tokens on either device
    # as long as the probabilities agree (fp32 on both; top_k keeps the draw away from the tail).
    folder = tiny_model("llama-gqa-hd64")
    prompts = random_prompts(PROMPT_LENS)
    params = SamplingParams(max_tokens=16, temperature=0.8, top_k=5, seed=11, ignore_eos=True)
    cpu = LLM(str(folder), kv_cache_bytes=TINY_KV_BYTES).generate(prompts, params)
    cuda = LLM(str(folder), device="cuda", kv_cache_bytes=TINY_KV_BYTES).generate(prompts, params)
    assert [o.token_ids for o in cuda] == [o.token_ids for o in cpu]
