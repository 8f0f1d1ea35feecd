"""Tensor parallelism on GPUs (NCCL): TP=2 gives TP=1's greedy tokens, with and without CUDA graphs.

Skipped unless two CUDA devices are visible. Ranks run in spawned processes, rank r on GPU r.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_KV_BYTES, engine_generate, random_prompts

from muxserve.engine import SamplingParams
from muxserve.engine.llm_engine import EngineConfig, LLMEngine

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                       reason="needs two CUDA devices"),
]

ARCHS = ("llama-gqa-hd64", "qwen2", "llama-hd128-tied")
PROMPTS = random_prompts((1, 9, 40, 70), seed=5)
GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


def _generate(engine: LLMEngine) -> list[list[int]]:
    return engine_generate(engine, PROMPTS, GREEDY)


def _rank_main(rank: int, port: int, folders: dict[str, str], out_dir: str) -> None:
    from muxserve.engine.parallel import join_group, leave_group

    parallel = join_group(2, rank, f"tcp://127.0.0.1:{port}", torch.device("cuda", rank))
    try:
        result = {}
        for arch, folder in folders.items():
            for eager in (False, True):
                config = EngineConfig(model=folder, device=f"cuda:{rank}", kv_cache_bytes=TINY_KV_BYTES,
                                      tensor_parallel_size=2, enforce_eager=eager)
                engine = LLMEngine(config, parallel=parallel)
                result[f"{arch}/{'eager' if eager else 'graphs'}"] = {
                    "tokens": _generate(engine), "graphs": engine.runner.graphs is not None,
                    "captured": engine.runner.graphs.captured if engine.runner.graphs is not None else [],
                }
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump(result, f)
    finally:
        leave_group()


@pytest.fixture(scope="module")
def tp2(tiny_model, tmp_path_factory):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    folders = {arch: str(tiny_model(arch)) for arch in ARCHS}
    out = tmp_path_factory.mktemp("tp2-gpu")
    mp.spawn(_rank_main, args=(port, folders, str(out)), nprocs=2, join=True)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("mode", ["graphs", "eager"])
@pytest.mark.parametrize("arch", ARCHS)
def test_nccl_tp2_greedy_tokens_equal_tp1(arch, mode, tiny_model, tp2):
    reference = LLMEngine(EngineConfig(model=str(tiny_model(arch)), device="cuda:0", kv_cache_bytes=TINY_KV_BYTES))
    expected = _generate(reference)
    for rank in tp2:
        got = rank[f"{arch}/{mode}"]
        assert got["tokens"] == expected
        assert got["graphs"] == (mode == "graphs")
    if mode == "graphs":
        assert tp2[0][f"{arch}/graphs"]["captured"], "no decode graph was captured"
