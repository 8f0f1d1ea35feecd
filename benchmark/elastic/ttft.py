"""Time to first token after a wake: one elastic LLM in a real instance (FlexStore and its runtimes).

The LLM (random weights of a shape folder) serves a request while resident, then, ``repeats``
times, is offloaded and gets the same request, whose arrival wakes it: TTFT after the wake is
``prefill_end - arrival`` of that request (the wake, the runtimes following the ranges and the
prefill). Every answer must have the tokens of the resident one: on a GPU the decode steps replay
the CUDA graphs captured at start over the re-mapped weights.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from muxserve.config import LLMConfig, MuxServeConfig, check_config
from muxserve.engine.sampling_params import SamplingParams
from muxserve.instance.instance import Instance
from muxserve.instance.options import InstanceOptions
from muxserve.scheduler.policy import get_policy

TINY = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 4096, "max_position_embeddings": 2048}


def tiny_shape(root: Path, base: Path) -> Path:
    """A small Llama config (CPU runs) derived from ``base``'s config.json."""
    cfg = json.loads((base / "config.json").read_text())
    cfg.update(TINY)
    folder = root / "tiny-llama"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def measure(folder: Path, device: str, dtype: str, prompt_len: int, output_len: int, repeats: int,
            kv_cache_bytes: int) -> dict:
    config = MuxServeConfig(num_gpus=1, kv_cache_bytes=kv_cache_bytes, models=[LLMConfig(
        name="elastic", model=str(folder), model_dtype={"bfloat16": "bf16", "float16": "fp16"}.get(dtype, "fp32"),
        load_format="random", residency="elastic", max_num_seqs=8)])  # few decode graphs to capture at start
    check_config(config, "bench_elastic")
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    prompt = torch.randint(0, vocab, (prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    with tempfile.TemporaryDirectory(prefix="bench-elastic-ttft-") as logs:
        instance = Instance(config, InstanceOptions(policy=get_policy("adbs"), device=device, log_dir=Path(logs)))
        began = time.perf_counter()
        instance.start()
        start_s = time.perf_counter() - began
        try:
            def once():
                req = instance.submit("elastic", prompt, params, time.monotonic())
                instance.run_until_done()
                return req

            first = once()  # warm-up, resident
            resident = [once() for _ in range(repeats)]
            woken, offloads, wakes = [], [], []
            for _ in range(repeats):
                offloads.append(instance.offload("elastic"))
                woken.append(once())  # its arrival wakes the LLM
                wakes.append(instance.residency.events[-1])
        finally:
            instance.stop()
    ttft_resident = [r.prefill_end - r.arrival for r in resident]
    ttft_woken = [r.prefill_end - r.arrival for r in woken]
    return {"shape": folder.name, "dtype": dtype, "prompt_len": prompt_len, "output_len": output_len,
            "instance_start_s": start_s,
            "ttft_resident_s": ttft_resident, "ttft_after_wake_s": ttft_woken,
            "ttft_after_wake_median_s": statistics.median(ttft_woken),
            "wake_s": [e.seconds for e in wakes], "wake_copy_s": [e.copy_seconds for e in wakes],
            "wake_bytes": wakes[0].nbytes if wakes else 0, "offload_s": [e.seconds for e in offloads],
            "tokens_equal": all(r.output_token_ids == first.output_token_ids for r in resident + woken)}
