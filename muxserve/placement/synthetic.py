"""Made-up placement inputs for tests and experiments: model shapes (config.json only) and an
A100-like cost table, plus the random small instances on which the greedy meets the exact ILP."""

from __future__ import annotations

import json
import random
from pathlib import Path

from muxserve.workload.models_file import LLMEntry

# name: hidden, intermediate, layers, heads, kv heads, vocab  (about 1.1 B, 8 B and 13 B parameters)
SHAPES = {"small": (2048, 8192, 16, 32, 8, 32000), "medium": (4096, 14336, 32, 32, 8, 128256),
          "big": (5120, 13824, 40, 40, 40, 32000)}
SCALES = {"small": 0.3, "medium": 1.0, "big": 1.8}  # relative step latency in the synthetic table


def write_shape(folder: str | Path, shape: str) -> str:
    """A folder with only the config.json of ``shape`` (enough for placement and random weights)."""
    h, i, layers, heads, kv, vocab = SHAPES[shape]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "vocab_size": vocab, "hidden_size": h, "intermediate_size": i,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}))
    return str(folder)


def synthetic_table(scales: dict[str, float], ngpus=(1, 2, 4), sms=tuple(range(30, 101, 10)),
                    bss=(1, 2, 4, 8, 16, 32, 64, 128, 256), sls=(32, 64, 128, 256, 512)) -> dict:
    """A cost table whose prefill grows with the tokens and slows as SMs shrink, while decode barely does."""
    table: dict = {}
    for key, s in scales.items():
        for n in ngpus:
            for sm in sms:
                for bs in bss:
                    row = (table.setdefault(key, {}).setdefault(str(n), {}).setdefault(str(sm), {})
                           .setdefault(str(bs), {}))
                    for sl in sls:
                        pre = s * (1.5 + 0.012 * bs * sl) * (100 / sm) ** 0.8 / n ** 0.75
                        dec = s * (6 + 0.04 * bs + 0.00004 * bs * sl) * (1 + 0.5 * (100 - sm) / 100) / n ** 0.6
                        row[str(sl)] = {"prefill": round(pre, 4), "decoding": round(dec, 4)}
    return table


def random_instance(seed: int, folders: dict[str, str]) -> tuple[int, int, list[LLMEntry], float]:
    """(nnodes, GPUs per node, LLMs, GB per GPU): 2-6 LLMs of random shapes and rates on 2-8 GPUs."""
    rnd = random.Random(seed)
    nnodes, ngpus = rnd.choice([(1, 2), (1, 4), (2, 2), (1, 8)])
    entries = [LLMEntry(f"llm-{i}", folders[rnd.choice(["small", "small", "medium", "big"])],
                        round(rnd.uniform(0.2, 20), 2)) for i in range(rnd.randint(2, 6))]
    return nnodes, ngpus, entries, rnd.choice([40, 80])
