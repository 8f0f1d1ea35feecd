"""Shared fixtures: tiny random-weight models of every supported architecture, and the real SmolLM2.

Tiny models are built with transformers' own config classes and ``save_pretrained`` (safetensors)
from a fixed torch seed, so the engine and transformers read the very same checkpoint. Weights use
a large init scale and every 1-D parameter (norm weights, biases) is randomized: the default init
(norms = 1, biases = 0) would let a loader that skips them pass the parity tests.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

# One intra-op thread: on a small shared machine, OpenMP threads spin-waiting against another busy
# process made the suite ~10x slower; one thread costs ~30 % when the machine is idle.
torch.set_num_threads(int(os.environ.get("MUXSERVE_TEST_THREADS", "1")))

TINY_VOCAB = 512
TINY_MAX_POS = 256
TINY_KV_BYTES = 4 * 1024 * 1024  # 256 pages of 16 KiB: plenty for the tiny models, quick to allocate


def _tiny_config(arch: str):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=TINY_VOCAB, intermediate_size=256, num_hidden_layers=2,
                  max_position_embeddings=TINY_MAX_POS, initializer_range=0.2, rms_norm_eps=1e-6,
                  bos_token_id=None, eos_token_id=None, pad_token_id=None, tie_word_embeddings=False)
    if arch == "llama-gqa-hd64":
        return LlamaConfig(**common, hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    if arch == "llama-hd128-tied":
        return LlamaConfig(**{**common, "tie_word_embeddings": True}, hidden_size=256, num_attention_heads=2,
                           num_key_value_heads=2, head_dim=128)
    if arch == "llama3-rope":
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
        return LlamaConfig(**common, hidden_size=128, num_attention_heads=4, num_key_value_heads=1, head_dim=64,
                           rope_parameters=rope)
    if arch == "llama-attn-bias":  # q/k/v and o_proj biases
        return LlamaConfig(**common, hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                           attention_bias=True)
    if arch == "mistral":
        return MistralConfig(**common, hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                             sliding_window=None)
    if arch == "qwen2":  # q/k/v projections carry a bias
        return Qwen2Config(**common, hidden_size=128, num_attention_heads=4, num_key_value_heads=2)
    if arch == "qwen3":  # q/k RMSNorm per head; head_dim 64 != hidden / heads = 32
        return Qwen3Config(**common, hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    if arch.startswith("llama-hd"):  # head sizes whose K+V need not divide a 16 KiB page
        head_dim = int(arch.removeprefix("llama-hd"))
        return LlamaConfig(**common, hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=head_dim)
    raise KeyError(arch)


TINY_ARCHS = ("llama-gqa-hd64", "llama-hd128-tied", "llama3-rope", "llama-attn-bias", "mistral", "qwen2", "qwen3")
# Llama with 4 heads over 2 KV heads of these sizes (``llama-hd80`` ...): in 16 KiB pages, 80 and
# 96 (bf16 and fp32), 100 (both) and 48 (fp32) leave part of every page unused.
ODD_HEAD_DIMS = (48, 80, 96, 100)


def build_tiny_model(arch: str, folder: Path, seed: int = 0, max_shard_size: str | None = None) -> Path:
    """Write a random-weight Hugging Face checkpoint of ``arch`` into ``folder`` and return it."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_tiny_config(arch), dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1:  # norm weights around 1, biases around 0, both far from the default
                noise = torch.randn_like(param)
                param.copy_(1 + 0.3 * noise if name.endswith("norm.weight") else noise)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(folder, **kwargs)
    return folder


def copy_with_config(src: Path, dest: Path, config: dict | None = None,
                     generation_config: dict | None = None) -> Path:
    """Copy a model folder, updating top-level keys of its config.json / generation_config.json."""
    shutil.copytree(src, dest)
    for name, changes in (("config.json", config), ("generation_config.json", generation_config)):
        if changes:
            path = dest / name
            data = json.loads(path.read_text()) if path.is_file() else {}
            data.update(changes)
            path.write_text(json.dumps(data))
    return dest


def random_prompts(lengths, seed: int = 1234, vocab: int = TINY_VOCAB) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]


def engine_generate(engine, prompts, params) -> list[list[int]]:
    """Run ``prompts`` through an ``LLMEngine`` in one batch, each with its own ``SamplingParams``
    (one for all when ``params`` is not a list); the output token ids in prompt order."""
    if not isinstance(params, list):
        params = [params] * len(prompts)
    seqs = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    while engine.has_unfinished():
        engine.step()
    return [list(s.output_token_ids) for s in seqs]


def load_hf(folder, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """transformers' model for ``folder`` with EOS disabled, so generate() always runs to max_new_tokens."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype).to(device).eval()
    model.generation_config.eos_token_id = None
    return model


@torch.inference_mode()
def hf_greedy(model, prompts: list[list[int]], max_new_tokens: int, **generate_kwargs) -> list[list[int]]:
    """Greedy continuation of each prompt, run alone (batch of one) through ``model.generate``."""
    results = []
    for prompt in prompts:
        ids = torch.tensor([prompt], device=model.device)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=0, **generate_kwargs)
        results.append(out[0, len(prompt):].tolist())
    return results


def assert_near_argmax(hf_model, prompts, continuations, num_new, max_gap=1.5, min_exact=0.8) -> None:
    """Teacher-force ``hf_model`` on each continuation: every chosen token is within ``max_gap`` of
    the argmax logit and at least ``min_exact`` of them are the argmax (a check that bf16 allows)."""
    gaps = []
    with torch.inference_mode():
        for prompt, tokens in zip(prompts, continuations):
            assert len(tokens) == num_new
            ids = torch.tensor([prompt + tokens], device=hf_model.device)
            logits = hf_model(ids).logits[0, len(prompt) - 1:-1].float().cpu()  # (num_new, vocab)
            chosen = logits.gather(1, torch.tensor(tokens).unsqueeze(1)).squeeze(1)
            gaps.append(logits.max(dim=-1).values - chosen)
    gaps = torch.cat(gaps)
    assert gaps.max().item() < max_gap, f"a token {gaps.max().item():.3f} below the fp32 argmax"
    exact = (gaps == 0).float().mean().item()
    assert exact >= min_exact, f"only {exact:.0%} of the tokens are the fp32 argmax"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Callable[[str], Path]:
    """``tiny_model(arch)`` -> folder of that tiny checkpoint, built once per session."""
    built: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in built:
            built[arch] = build_tiny_model(arch, tmp_path_factory.mktemp(arch))
        return built[arch]

    return get


@pytest.fixture(scope="session")
def tiny_llm(tiny_model):
    """One engine on the tiny GQA Llama, shared by the generation and pool tests."""
    from muxserve.engine import LLM

    return LLM(str(tiny_model("llama-gqa-hd64")), kv_cache_bytes=TINY_KV_BYTES)


# -- the real SmolLM2-135M-Instruct ----------------------------------------------------------------
SMOLLM2_KV_BYTES = 64 * 1024 * 1024


@pytest.fixture(scope="session")
def smollm2_folder() -> Path:
    from muxserve.engine.model_hub import embedded_gguf, resolve_model

    try:
        embedded_gguf("smollm2-135m")
    except FileNotFoundError as err:  # the GPU machine has no room for the 98 MB package
        pytest.skip(str(err))
    return resolve_model("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_llm(smollm2_folder):
    from muxserve.engine import LLM

    return LLM("smollm2-135m", kv_cache_bytes=SMOLLM2_KV_BYTES)


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_folder):
    return load_hf(smollm2_folder)
