"""Elastic residency on a GPU (skipped without CUDA): CUDA virtual memory ranges shared with the
runtimes over the fd socket, decode CUDA graphs captured at start and replayed after each wake over
the re-mapped weights, token for token as the offline engine on the same GPU."""

from __future__ import annotations

import time

import pytest
import torch

from muxserve.config import load_config
from muxserve.engine import LLM, SamplingParams
from muxserve.instance.instance import Instance
from muxserve.instance.options import InstanceOptions
from muxserve.scheduler.policy import get_policy

from .test_elastic import elastic_config, poll_until, submit

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(900),
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def gpu_tokens(setup, llm: str) -> dict[int, list[int]]:
    engine = LLM(str(setup.models[llm]), device="cuda", kv_cache_bytes=8 << 20).engine
    params = {r.idx: SamplingParams(max_tokens=r.output_len, temperature=0, ignore_eos=True)
              for r in setup.requests if r.llm == llm}
    seqs = {r.idx: engine.add_request(r.prompt_token_ids, params[r.idx]) for r in setup.requests if r.llm == llm}
    while engine.has_unfinished():
        engine.step()
    return {idx: list(s.output_token_ids) for idx, s in seqs.items()}


def test_graphs_replay_after_wakes_with_offline_tokens(setup, tmp_path):
    expected = {**gpu_tokens(setup, "llm-0"), **gpu_tokens(setup, "llm-2")}
    config = load_config(elastic_config(setup, "elastic-gpu.yaml", kv_cache_bytes=8 << 20))
    options = InstanceOptions(policy=get_policy("adbs"), device="cuda", log_dir=tmp_path / "logs",
                              reserve_granules=2)
    instance = Instance(config, options)
    try:
        instance.start()
        for cycle in range(2):  # two offload / wake cycles: the graphs outlive both
            torch.cuda.synchronize()
            free_before = torch.cuda.mem_get_info()[0]
            event = instance.offload("llm-2")
            assert event.nbytes > 0
            # Every runtime unmapped the weights once it acknowledged the notice: the memory is back.
            poll_until(instance, lambda: not instance.residency.unacknowledged, 60)
            assert torch.cuda.mem_get_info()[0] - free_before >= event.nbytes - (64 << 20)
            reqs = submit(instance, setup, "llm-0") + submit(instance, setup, "llm-2")
            started = time.monotonic()
            instance.run_until_done()
            assert time.monotonic() - started < 300
            for req in reqs:
                assert req.output_token_ids == expected[req.idx], f"cycle {cycle}: request {req.idx} of {req.llm}"
            assert instance.residency.elastic["llm-2"].resident
        log = (tmp_path / "logs").glob("*llm-2*decode*")
        assert any("captured decode graphs" in p.read_text(errors="replace") for p in log)
    finally:
        instance.stop()
