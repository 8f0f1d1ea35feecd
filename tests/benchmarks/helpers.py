"""Helpers of the benchmark smoke tests: tiny config-only model shapes, a tiny ShareGPT file, running a module."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Llama shapes small enough for a CPU; vocab of the smollm2-135m tokenizer that the workload
# generator falls back to for config-only folders. They load with random weights.
TINY_SHAPES = {
    "tiny-a": {"num_hidden_layers": 2, "num_key_value_heads": 2, "intermediate_size": 256},
    "tiny-b": {"num_hidden_layers": 3, "num_key_value_heads": 4, "intermediate_size": 384},
    "tiny-c": {"num_hidden_layers": 2, "num_key_value_heads": 1, "intermediate_size": 192},
}
WORDS = ("alpha beta gamma delta kernel page batch decode prefill model cache token quota mesh share server "
         "engine").split()


def write_shape(folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 49152, "hidden_size": 128,
              "num_attention_heads": 4, "head_dim": 32, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
              "tie_word_embeddings": True, "rope_theta": 10000.0, "bos_token_id": 1, "eos_token_id": 2,
              **TINY_SHAPES[name]}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def write_sharegpt(path: Path, n: int = 40, seed: int = 0) -> Path:
    rng = random.Random(seed)
    recs = []
    for i in range(n):
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 50)))
        reply = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 30)))
        recs.append({"id": str(i), "conversations": [{"from": "human", "value": prompt},
                                                      {"from": "gpt", "value": reply}]})
    path.write_text(json.dumps(recs))
    return path


def run_module(module: str, *args: str, timeout: float = 300, cwd: Path = REPO,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m benchmark.MODULE ARGS`` (``module``: e.g. ``end_to_end.run_end_to_end``), the
    repository on the path as when run from its root."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path, **(env or {})}
    return subprocess.run([sys.executable, "-m", f"benchmark.{module}", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
