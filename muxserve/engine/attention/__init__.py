"""Attention backends over the head-wise paged KV pool.

``torch``: the readable reference (CPU and GPU; the oracle in tests). ``triton``: Triton kernels
on CUDA (fused rotary + page write, flash-decoding, varlen prefill). ``auto`` picks triton on a
CUDA device where Triton imports, torch otherwise.
"""

from __future__ import annotations

import importlib.util

import torch

from muxserve.engine.attention.base import AttentionBackend
from muxserve.engine.attention.metadata import AttentionMetadata
from muxserve.engine.attention.torch_ref import TorchAttention

BACKENDS = ("torch", "triton")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None and torch.cuda.is_available()


def select_backend(name: str, device: torch.device) -> str:
    """Resolve ``auto`` to the best backend for the device; validate explicit names."""
    device = torch.device(device)
    if name == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose from auto, {', '.join(BACKENDS)}")
    if name == "triton" and (device.type != "cuda" or not triton_available()):
        raise ValueError(f"attention backend 'triton' needs a CUDA device with triton installed, got {device}")
    return name


def make_attention(name: str, kv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int) -> AttentionBackend:
    if name == "torch":
        return TorchAttention(kv, num_heads, num_kv_heads, head_dim)
    if name == "triton":
        from muxserve.engine.attention.triton_backend import TritonAttention

        return TritonAttention(kv, num_heads, num_kv_heads, head_dim)
    raise ValueError(f"unknown attention backend {name!r}")


__all__ = ["BACKENDS", "AttentionBackend", "AttentionMetadata", "TorchAttention", "make_attention", "select_backend",
           "triton_available"]
