"""Attention backends over the head-wise paged KV pool."""

from __future__ import annotations

import torch

from muxserve.engine.attention.metadata import AttentionMetadata
from muxserve.engine.attention.torch_ref import TorchAttention

BACKENDS = ("torch",)


def select_backend(name: str, device: torch.device) -> str:
    """Resolve ``auto`` to the best backend for the device; validate explicit names."""
    if name == "auto":
        return "torch"
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose from auto, {', '.join(BACKENDS)}")
    return name


def make_attention(name: str, kv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int):
    if name == "torch":
        return TorchAttention(kv, num_heads, num_kv_heads, head_dim)
    raise ValueError(f"unknown attention backend {name!r}")


__all__ = ["AttentionMetadata", "TorchAttention", "select_backend", "make_attention", "BACKENDS"]
