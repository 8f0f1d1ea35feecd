"""CUDA graph decode steps: the argmax taken inside the graph, mixed batches, the step timer."""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch
from conftest import TINY_KV_BYTES, engine_generate, random_prompts

from muxserve.engine import LLM, SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
                       reason="needs a CUDA device and triton"),
]

PROMPT_LENS = (1, 7, 33, 50, 130)
GREEDY = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)


def _generate(llm: LLM, prompts, params: list[SamplingParams]) -> list[list[int]]:
    """Each prompt with its own sampling settings, all in one engine run (mixed batches)."""
    return engine_generate(llm.engine, prompts, params)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("arch", ["llama-gqa-hd64", "qwen2"])
def test_in_graph_argmax_equals_sampling_the_graph_logits(tiny_model, arch, dtype):
    # Same graphs, same logits: the argmax inside the graph must pick exactly sample()'s tokens.
    folder = tiny_model(arch)
    prompts = random_prompts(PROMPT_LENS)
    runs = {}
    for graph_argmax in (True, False):
        llm = LLM(str(folder), device="cuda", dtype=dtype, kv_cache_bytes=TINY_KV_BYTES, max_num_seqs=8)
        llm.engine.runner.graph_argmax = graph_argmax
        runs[graph_argmax] = [o.token_ids for o in llm.generate(prompts, GREEDY)]
        assert llm.engine.runner.graphs.captured
    assert runs[True] == runs[False]


def test_in_graph_argmax_float32_equals_eager(tiny_model):
    folder = tiny_model("llama-gqa-hd64")
    prompts = random_prompts(PROMPT_LENS)
    eager = LLM(str(folder), device="cuda", kv_cache_bytes=TINY_KV_BYTES, enforce_eager=True)
    graphs = LLM(str(folder), device="cuda", kv_cache_bytes=TINY_KV_BYTES, max_num_seqs=8)
    expected = [o.token_ids for o in eager.generate(prompts, GREEDY)]
    assert [o.token_ids for o in graphs.generate(prompts, GREEDY)] == expected
    assert graphs.engine.runner.graphs.captured


def test_mixed_greedy_and_seeded_batches_replay_graphs_like_eager(tiny_model):
    # Seeded rows sample on the host from the graph's logits; greedy rows keep the argmax.
    folder = tiny_model("llama-gqa-hd64")
    prompts = random_prompts(PROMPT_LENS)
    seeded = SamplingParams(max_tokens=20, temperature=0.8, top_k=5, seed=7, ignore_eos=True)
    params = [GREEDY, seeded, dataclasses.replace(GREEDY, max_tokens=12), dataclasses.replace(seeded, seed=8),
              GREEDY]
    eager = LLM(str(folder), device="cuda", kv_cache_bytes=TINY_KV_BYTES, enforce_eager=True)
    graphs = LLM(str(folder), device="cuda", kv_cache_bytes=TINY_KV_BYTES, max_num_seqs=8)
    assert _generate(graphs, prompts, params) == _generate(eager, prompts, params)
    assert graphs.engine.runner.graphs.captured


def test_step_timer_splits_graph_decode_steps(tiny_model):
    from muxserve.engine.cuda_graph import StepTimer

    llm = LLM(str(tiny_model("llama-gqa-hd64")), device="cuda", kv_cache_bytes=TINY_KV_BYTES, max_num_seqs=8)
    runner = llm.engine.runner
    runner.step_timer = timer = StepTimer()
    outs = llm.generate(random_prompts((5, 9, 17)), SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    assert all(len(o.token_ids) == 6 for o in outs)
    assert len(timer.records) == 5  # one prefill step (not timed), then five graph decode steps
    for r in timer.records:
        assert r["batch"] == 3
        assert r["prep_s"] > 0 and r["replay_gpu_s"] > 0 and r["launch_s"] > 0 and r["wall_s"] > 0
        assert r["prep_s"] + r["replay_gpu_s"] + r["sample_s"] == pytest.approx(r["wall_s"])
