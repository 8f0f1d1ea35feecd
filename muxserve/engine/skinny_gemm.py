"""A Triton GEMM for decode batches: ``x (M, K) @ W (N, K)^T`` with few rows M (<= 64).

Such a product is bound by reading W once; the kernel gives each program a narrow block of
output columns (``BLOCK_N``) and the whole of K, so even N = 4096 spreads over a few hundred
programs, and streams W through a deep software pipeline. x is padded to 16 rows for
``tl.dot``. Accumulation is float32, one rounding at the end (as cuBLAS), after the optional bias.
(SiLU*mul is not fused in front of the down projection: every program would recompute it for
all 16 padded rows and the whole K, about 29 M exponentials per GEMM of the Llama-3-8B shape by
estimate, more than the separate kernel's 2 us.)

``linear`` is what the model calls: the kernel where ``pick`` has a configuration (M <= 16 on the
layers where it beat cuBLAS on an H200), ``F.linear`` otherwise. ``MUXSERVE_SKINNY_GEMM=0`` (or
``ENABLED = False``) turns the kernel off, for comparisons.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

ENABLED = os.environ.get("MUXSERVE_SKINNY_GEMM", "1") != "0"


class Config(NamedTuple):
    block_n: int
    block_k: int
    num_stages: int
    num_warps: int = 4

    def __str__(self) -> str:
        return f"n{self.block_n}k{self.block_k}s{self.num_stages}w{self.num_warps}"


@triton.jit
def _skinny_gemm_kernel(x_ptr, w_ptr, b_ptr, y_ptr, M, N, stride_xm, stride_wn, stride_ym, K: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        HAS_BIAS: tl.constexpr):
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :]
    m_mask = offs_m[:, None] < M
    n_mask = offs_n[:, None] < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(K // BLOCK_K):  # K % BLOCK_K == 0 (checked by the caller)
        a = tl.load(x_ptrs, mask=m_mask, other=0.0)
        b = tl.load(w_ptrs, mask=n_mask, other=0.0)
        acc = tl.dot(a, tl.trans(b), acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    y = acc.to(y_ptr.dtype.element_ty)
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, y, mask=m_mask & (offs_n[None, :] < N))


def gemm(x: torch.Tensor, weight: torch.Tensor, config: Config, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for 2-D ``x`` of at most 64 rows, contiguous rows of ``weight``,
    the kernel run with ``config``."""
    m, kx = x.shape
    n, k = weight.shape
    if (m > 64 or kx != k or k % config.block_k or weight.stride(1) != 1 or x.stride(1) != 1
            or (bias is not None and not bias.is_contiguous())):
        raise ValueError(f"skinny_gemm: unsupported x {tuple(x.shape)} / weight {tuple(weight.shape)} / {config}")
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    block_m = max(16, triton.next_power_of_2(m))
    grid = (triton.cdiv(n, config.block_n),)
    _skinny_gemm_kernel[grid](x, weight, weight if bias is None else bias, y, m, n,
                              x.stride(0), weight.stride(0), y.stride(0), K=k,
                              BLOCK_M=block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
                              HAS_BIAS=bias is not None,
                              num_stages=config.num_stages, num_warps=config.num_warps)
    return y


# Best configuration per layer kind for M <= 16 (bf16, Llama-3-8B shapes, H200, in CUDA graphs):
# qkv about even with cuBLAS, o and down 5-10% faster (cuBLAS also adds a split-K reduce there);
# gate_up and every M > 16 were faster with cuBLAS.
POLICY = {"qkv": Config(64, 128, 6), "o": Config(32, 256, 6), "down": Config(32, 256, 6)}
MAX_M = 16


def pick(m: int, k: int, kind: str, dtype: torch.dtype, device: torch.device | str) -> Config | None:
    """The kernel's configuration for ``x (m, .) @ W (., k)^T`` of a layer ``kind`` ("qkv", "o",
    "down", ...), or None where ``F.linear`` should run."""
    config = POLICY.get(kind)
    if (not ENABLED or config is None or not 0 < m <= MAX_M or k % config.block_k
            or dtype not in (torch.bfloat16, torch.float16) or torch.device(device).type != "cuda"):
        return None
    return config


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, kind: str = "") -> torch.Tensor:
    """``F.linear(x, weight, bias)``, through the kernel where ``pick`` says so."""
    config = pick(x.shape[0], weight.shape[1], kind, x.dtype, x.device)
    if config is not None and x.stride(1) == 1 and weight.stride(1) == 1:
        return gemm(x, weight, config, bias)
    return F.linear(x, weight, bias)


def candidate_configs(m: int, n: int, k: int) -> list[Config]:
    """Configurations worth timing for one shape (K must be a multiple of block_k)."""
    out = []
    for block_n in (16, 32, 64):
        for block_k in (128, 256):
            for stages in (4, 6):
                if k % block_k == 0 and not (block_n == 64 and block_k == 256 and m > 32):
                    out.append(Config(block_n, block_k, stages))
    return out
