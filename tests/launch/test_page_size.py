"""The KV page size an instance runs with: 16 KiB, or --block-size tokens of the widest LLM."""

from __future__ import annotations

import msgspec
import pytest
import torch

from muxserve.config import MuxServeConfig
from muxserve.engine.kv_cache import KVLayout
from muxserve.errors import ConfigError
from muxserve.instance.cli import page_bytes_for, planned_max_tokens


def _config(models: dict[str, tuple], kv_cache_bytes: int = 1 << 20) -> MuxServeConfig:
    return msgspec.convert({"num_gpus": 1, "kv_cache_bytes": kv_cache_bytes, "models": [
        {"name": name, "model": str(folder), "model_dtype": dtype, "mps_percentage": [100, 40]}
        for name, (folder, dtype) in models.items()]}, MuxServeConfig)


@pytest.fixture
def mixed(tiny_model) -> MuxServeConfig:
    """80-dim fp32 (640 B of K+V per token), 100-dim bf16 (400 B) and 64-dim fp32 (512 B); 2 layers
    and 2 kv heads each: 4 pages per block."""
    return _config({"hd80": (tiny_model("llama-hd80"), "fp32"), "hd100": (tiny_model("llama-hd100"), "bf16"),
                    "hd64": (tiny_model("llama-gqa-hd64"), "fp32")})


def test_default_pages_are_16_kib_for_any_head_size(mixed):
    assert page_bytes_for(mixed, None) == 16384
    # 64 pages of 16 KiB, 4 pages per block: 16 blocks of 25, 40 and 32 tokens
    assert planned_max_tokens(mixed, 16384, "cpu") == {"hd80": 16 * 25, "hd100": 16 * 40, "hd64": 16 * 32}


@pytest.mark.parametrize("block_size, page_bytes, tokens", [
    (16, 10240, {"hd80": 16, "hd100": 25, "hd64": 20}),  # 16 x 640 B
    (3, 1920, {"hd80": 3, "hd100": 4, "hd64": 3}),
    (1, 640, {"hd80": 1, "hd100": 1, "hd64": 1}),
])
def test_block_size_is_tokens_of_the_widest_llm(mixed, block_size, page_bytes, tokens):
    page = page_bytes_for(mixed, block_size)
    assert page == page_bytes
    shapes = {"hd80": (80, torch.float32), "hd100": (100, torch.bfloat16), "hd64": (64, torch.float32)}
    assert {name: KVLayout(2, 2, d, dtype, page).page_tokens for name, (d, dtype) in shapes.items()} == tokens
    pages = (1 << 20) // page  # the planner's figure: whole blocks of the pool, 4 pages each
    assert planned_max_tokens(mixed, page, "cpu") == {name: pages // 4 * t for name, t in tokens.items()}


def test_block_size_rounds_the_page_up_to_64_bytes(tiny_model):
    config = _config({"hd100": (tiny_model("llama-hd100"), "bf16")})  # 400 B per token
    assert page_bytes_for(config, 3) == 1216  # 1200 B rounded up; still 3 tokens, 16 B unused
    assert page_bytes_for(config, 16) == 6400  # a multiple of 64 already


def test_bad_block_sizes_are_refused(mixed):
    with pytest.raises(ConfigError, match=r"^--block-size must be >= 1, got 0$"):
        page_bytes_for(mixed, 0)
    with pytest.raises(ConfigError, match=r"^--block-size 2000 makes pages of 1280000 B, more than the whole KV "
                                          r"pool \(kv_cache_bytes 1048576\)$"):
        page_bytes_for(mixed, 2000)
