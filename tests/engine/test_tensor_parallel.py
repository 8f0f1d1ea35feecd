"""Tensor parallelism of the engine on CPU: two gloo ranks give the TP=1 engine's greedy tokens.

Both ranks run in spawned processes (one per rank); each builds an ``LLMEngine`` over its shard
for several tiny models in one process group, so the process start is paid once.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from conftest import TINY_KV_BYTES, random_prompts

from muxserve.engine import SamplingParams
from muxserve.engine.llm_engine import EngineConfig, LLMEngine
from muxserve.engine.model_config import ModelSpec
from muxserve.engine.parallel import TensorParallel, shard_spec

# GQA 4/2; q/k/v bias; MHA + tied; o_proj bias
ARCHS = ("llama-gqa-hd64", "qwen2", "llama-hd128-tied", "llama-attn-bias")
PROMPTS = random_prompts((5, 23, 70), seed=11)
MAX_TOKENS = 20
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
SAMPLED = SamplingParams(max_tokens=8, temperature=1.0, ignore_eos=True)  # unseeded: ranks must still agree


def _generate(engine: LLMEngine, params: SamplingParams, record_pages: list | None = None) -> list[list[int]]:
    if record_pages is not None:
        real_step = engine.runner.execute

        def step(seqs, is_prefill):
            record_pages.append([list(s.pages) for s in seqs])
            return real_step(seqs, is_prefill)

        engine.runner.execute = step
    seqs = [engine.add_request(p, params) for p in PROMPTS]
    while engine.has_unfinished():
        engine.step()
    if record_pages is not None:
        del engine.runner.execute
    return [s.output_token_ids for s in seqs]


def _rank_main(rank: int, world_size: int, folders: dict[str, str], out_dir: str) -> None:
    torch.set_num_threads(1)
    import torch.distributed as dist

    # a file rendezvous: a free port picked before the spawn can be taken by another process meanwhile
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=world_size)
    try:
        parallel = TensorParallel.from_group()
        result = {}
        for arch, folder in folders.items():
            config = EngineConfig(model=folder, kv_cache_bytes=TINY_KV_BYTES, tensor_parallel_size=world_size)
            engine = LLMEngine(config, parallel=parallel)
            pages: list = []
            result[arch] = {
                "greedy": _generate(engine, GREEDY, pages),
                "sampled": _generate(engine, SAMPLED),
                "pages": pages,
                "kv_heads": engine.layout.num_kv_heads,
                "qkv_rows": engine.model.layers[0].self_attn.qkv_proj.weight.shape[0],
                "free_after": engine.allocator.num_free == engine.allocator.num_pages,
            }
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()
    # Leave without interpreter finalization: there, after destroy_process_group, a rank now and then
    # died of std::terminate on a still-joinable thread (SIGABRT), failing a run whose results were in.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@pytest.fixture(scope="module")
def tp2_results(tiny_model, tmp_path_factory):
    import torch.multiprocessing as mp

    folders = {arch: str(tiny_model(arch)) for arch in ARCHS}
    out = tmp_path_factory.mktemp("tp2")
    mp.spawn(_rank_main, args=(2, folders, str(out)), nprocs=2, join=True)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("arch", ARCHS)
def test_tp2_greedy_tokens_equal_tp1(arch, tiny_model, tp2_results):
    reference = LLMEngine(EngineConfig(model=str(tiny_model(arch)), kv_cache_bytes=TINY_KV_BYTES))
    expected = _generate(reference, GREEDY)
    assert all(len(t) == MAX_TOKENS for t in expected)
    rank0, rank1 = (r[arch] for r in tp2_results)
    assert rank0["greedy"] == expected
    assert rank1["greedy"] == expected
    # Unseeded sampling differs per process RNG; rank 0's tokens are broadcast, so the ranks agree.
    assert rank0["sampled"] == rank1["sampled"]
    assert rank0["free_after"] and rank1["free_after"]


@pytest.mark.parametrize("arch", ARCHS)
def test_tp2_ranks_hold_their_own_heads_on_the_same_page_ids(arch, tiny_model, tp2_results):
    spec = ModelSpec.from_folder(tiny_model(arch))
    rank0, rank1 = (r[arch] for r in tp2_results)
    for rank in (rank0, rank1):
        assert rank["kv_heads"] == spec.num_kv_heads // 2
        assert rank["qkv_rows"] == (spec.q_size + 2 * spec.kv_size) // 2
    assert rank0["pages"] == rank1["pages"] and rank0["pages"]
    # A rank's request owns ceil(t / page_tokens) * layers * (kv_heads / 2) pages.
    first_prefill = rank0["pages"][0]
    assert len(first_prefill[0]) % (spec.num_layers * spec.num_kv_heads // 2) == 0


def test_tp1_engine_makes_no_collective_calls(tiny_model, monkeypatch):
    import torch.distributed as dist

    def forbidden(*args, **kwargs):
        raise AssertionError("a collective ran at tensor_parallel_size 1")

    monkeypatch.setattr(dist, "all_reduce", forbidden)
    monkeypatch.setattr(dist, "broadcast", forbidden)
    engine = LLMEngine(EngineConfig(model=str(tiny_model("llama-gqa-hd64")), kv_cache_bytes=TINY_KV_BYTES))
    assert len(_generate(engine, GREEDY)[0]) == MAX_TOKENS


def test_tp_must_divide_kv_heads(tiny_model):
    folder = tiny_model("llama-gqa-hd64")  # 4 heads, 2 kv heads
    spec = ModelSpec.from_folder(folder)
    message = ("tensor_parallel_size 3 does not divide num_key_value_heads 2 of LlamaForCausalLM; "
               "each rank must hold whole kv heads")
    with pytest.raises(ValueError) as err:
        shard_spec(spec, 3)
    assert str(err.value) == message
    # The engine refuses before loading anything or asking for a process group.
    with pytest.raises(ValueError) as err:
        LLMEngine(EngineConfig(model=str(folder), kv_cache_bytes=TINY_KV_BYTES, tensor_parallel_size=3))
    assert str(err.value) == message
    with pytest.raises(ValueError, match="tensor_parallel_size must be >= 1"):
        EngineConfig(model=str(folder), tensor_parallel_size=0)


def test_shard_spec_splits_heads_and_mlp(tiny_model):
    spec = ModelSpec.from_folder(tiny_model("llama-gqa-hd64"))
    assert shard_spec(spec, 1) is spec
    half = shard_spec(spec, 2)
    assert (half.num_heads, half.num_kv_heads, half.intermediate_size) == (2, 1, spec.intermediate_size // 2)
    assert (half.hidden_size, half.vocab_size, half.head_dim) == (spec.hidden_size, spec.vocab_size, spec.head_dim)


def test_tp2_without_a_process_group_is_refused(tiny_model):
    with pytest.raises(ValueError, match="initialized torch.distributed process group"):
        LLMEngine(EngineConfig(model=str(tiny_model("llama-gqa-hd64")), kv_cache_bytes=TINY_KV_BYTES,
                               tensor_parallel_size=2))
