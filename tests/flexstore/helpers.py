"""Helpers of the FlexStore tests: tiny checkpoints, configs, worker processes, /dev/shm listings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import torch

from muxserve.flexstore import FlexStoreConfig, FlexStoreProcess, ModelEntry
from muxserve.flexstore.auth import SECRET_ENV

REPO = Path(__file__).resolve().parents[2]
WORKERS = Path(__file__).parent / "workers.py"
PAGE_BYTES = 1024  # small pages: tiny models cross page boundaries and run out of pool quickly
# One intra-op thread per process (several processes share two cores here); the repo importable.
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
             "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}

# Three shapes that differ in layers, kv-heads and head size, so in page geometry:
# with 1 KiB fp32 pages they hold 8, 4 and 2 tokens per page and 4, 3 and 2 pages per token block.
TINY = {
    "llama-a": dict(arch="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16),
    "qwen-b": dict(arch="qwen2", vocab_size=300, hidden_size=96, intermediate_size=160, num_hidden_layers=3,
                   num_attention_heads=3, num_key_value_heads=1, head_dim=32),
    "llama-c": dict(arch="llama", vocab_size=200, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True),
}


def write_tiny_model(folder: Path, name: str, seed: int = 0) -> Path:
    """Save the tiny model ``name`` (a key of TINY) as a Hugging Face folder; return the folder.

    A large init scale and randomized 1-D parameters give varied greedy outputs (the default
    init makes a tiny model repeat one token).
    """
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    shape = dict(TINY[name])
    arch = shape.pop("arch")
    config_cls, model_cls = (LlamaConfig, LlamaForCausalLM) if arch == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    config = config_cls(max_position_embeddings=512, rms_norm_eps=1e-5, initializer_range=0.2, bos_token_id=None,
                        eos_token_id=None, pad_token_id=None, **shape)
    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32)
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if param.dim() == 1:
                noise = torch.randn_like(param)
                param.copy_(1 + 0.3 * noise if pname.endswith("norm.weight") else noise)
    model.save_pretrained(folder)
    return folder


def ipc_address(tmp_path: Path) -> str:
    return f"ipc://{tmp_path}/fs-{uuid.uuid4().hex[:8]}.sock"


def make_config(models: dict[str, Path], address: str, names=None, kv_cache_bytes: int = 256 * PAGE_BYTES,
                **kw) -> FlexStoreConfig:
    names = names or list(TINY)
    return FlexStoreConfig(models=tuple(ModelEntry(n, str(models[n])) for n in names), address=address,
                           kv_cache_bytes=kv_cache_bytes, page_bytes=PAGE_BYTES, **kw)


def start_flexstore(config: FlexStoreConfig, log_file: Path) -> FlexStoreProcess:
    return FlexStoreProcess(config, log_file=log_file, env=CHILD_ENV).start()


def worker_cmd(*args) -> list[str]:
    return [sys.executable, str(WORKERS), *map(str, args)]


def worker_env(store: FlexStoreProcess) -> dict[str, str]:
    """A worker's environment: it presents ``store``'s secret, which never goes on a command line."""
    return {**CHILD_ENV, SECRET_ENV: store.secret}


def run_worker(store: FlexStoreProcess, *args, timeout: float = 60) -> dict:
    """Run a workers.py command against ``store`` to completion; return its JSON line."""
    out = subprocess.run(worker_cmd(*args), capture_output=True, text=True, timeout=timeout, env=worker_env(store))
    if out.returncode != 0:
        raise AssertionError(f"worker {args[0]} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    # An attaching process must leave the segments to their owner: no resource_tracker warning at exit.
    assert "resource_tracker" not in out.stderr, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def kv_pattern(num_pages: int, layout, seed: float, device="cpu") -> torch.Tensor:
    """Distinct, exactly representable K/V values for ``num_pages`` pages: (P, 2, page_tokens, head_dim)."""
    shape = (num_pages, 2, layout.page_tokens, layout.head_dim)
    values = torch.arange(num_pages * 2 * layout.page_tokens * layout.head_dim, dtype=torch.float32) % 4093
    return (values.view(shape) * 0.25 + seed).to(device=device, dtype=layout.dtype)
