"""The engine on CUDA: tiny-Llama parity with transformers in float32, and a bf16 check."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_KV_BYTES, assert_near_argmax, hf_greedy, load_hf, random_prompts

from muxserve.engine import LLM, SamplingParams, sampler
from muxserve.engine.sampler import candidate_probs, sample, step_seed

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
    # Seeded variates come from a hash in integer ops, equal on either device, so a seed draws the
    # same tokens as long as the probabilities agree (fp32 on both; top_k keeps the draw away from the tail).
    folder = tiny_model("llama-gqa-hd64")
    prompts = random_prompts(PROMPT_LENS)
    params = SamplingParams(max_tokens=16, temperature=0.8, top_k=5, seed=11, ignore_eos=True)
    cpu = LLM(str(folder), kv_cache_bytes=TINY_KV_BYTES).generate(prompts, params)
    cuda = LLM(str(folder), device="cuda", kv_cache_bytes=TINY_KV_BYTES).generate(prompts, params)
    assert [o.token_ids for o in cuda] == [o.token_ids for o in cpu]


@pytest.mark.parametrize("scale, candidates", [(10, 1024), (3, 151_936)], ids=["topk", "sort-fallback"])
def test_batched_sampling_is_equal_on_cpu_and_cuda(scale, candidates):
    # Peaked logits: every top-p nucleus within the 1024 candidates; flatter ones: some reach
    # past them and the batch sorts the whole vocabulary.
    vocab = 151_936
    logits = torch.randn(6, vocab, generator=torch.Generator().manual_seed(0)) * scale
    params = [SamplingParams(temperature=0.7, top_p=0.9, seed=1), SamplingParams(top_k=40, seed=2),
              SamplingParams(temperature=0), SamplingParams(temperature=1.3, top_k=100, top_p=0.5, seed=3),
              SamplingParams(temperature=1.0, seed=4), SamplingParams(top_p=0.95, seed=5)]
    keys = [step_seed(p.seed, 9) for p in params]
    top_k = torch.tensor([float(sampler._top_k(p, vocab)) for p in params], dtype=torch.float64)
    top_p = torch.tensor([p.top_p for p in params], dtype=torch.float64)
    cpu_probs, cpu_ids = candidate_probs(logits, params, top_k, top_p)
    cuda_probs, cuda_ids = candidate_probs(logits.cuda(), params, top_k.cuda(), top_p.cuda())
    assert cpu_ids.shape == (6, candidates) and torch.equal(cuda_ids.cpu(), cpu_ids)
    torch.testing.assert_close(cuda_probs.cpu(), cpu_probs)
    assert sample(logits.cuda(), params, keys) == sample(logits, params, keys)
