"""A Triton GEMM for decode batches: ``x (M, K) @ W (N, K)^T`` with few rows M (<= 64).

Such a product is bound by reading W once; the kernel gives each program a narrow block of
output columns (``BLOCK_N``) and the whole of K, so even N = 4096 spreads over a few hundred
programs, and streams W through a deep software pipeline. x is padded to 16 rows for
``tl.dot``. Accumulation is float32, one rounding at the end (as cuBLAS), after the optional bias.
(SiLU*mul is not fused in front of the down projection: every program would recompute it for
all 16 padded rows and the whole K, about 29 M exponentials per GEMM of the Llama-3-8B shape by
estimate, more than the separate kernel's 2 us.)

``linear`` is what the model calls: the kernel where ``pick`` has a configuration, ``F.linear``
otherwise. Which is faster depends on the GPU, the shape and M (on one H100 the kernel reads
Qwen2.5-7B's gate_up weights 9 % faster than cuBLAS at M = 16, Llama-3-8B's 2 % slower at M = 32),
so ``tune`` times both on the model's own weights when a runner starts on a GPU and ``pick`` follows
what it measured; shapes it did not time follow ``POLICY`` (measured on an H200).
``MUXSERVE_SKINNY_GEMM=0`` (or ``ENABLED = False``) turns the kernel off, ``=static`` skips the
timing, for comparisons.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from muxserve.engine.gpu_timing import graph_time_us

ENABLED = os.environ.get("MUXSERVE_SKINNY_GEMM", "1") != "0"
TUNING = os.environ.get("MUXSERVE_SKINNY_GEMM", "1") != "static"

logger = logging.getLogger(__name__)


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

# What ``tune`` measured: (N, K, M bucket) -> the faster configuration, or None for cuBLAS.
BUCKETS = (1, 8, 16, 32, 64)
TUNED: dict[tuple[int, int, int], Config | None] = {}
# Configurations ``tune`` tries, by the kernel's padded row block (16 rows up to M = 16).
TUNE_CONFIGS = {16: (Config(64, 128, 6), Config(32, 256, 6)), 32: (Config(32, 128, 6), Config(64, 128, 4)),
                64: (Config(32, 128, 6), Config(64, 128, 6))}
# The kernel replaces cuBLAS only where it is at least this much faster (timings vary by ~1 %).
MARGIN = 0.98


def bucket(m: int) -> int | None:
    """The smallest tuned batch size >= m (None past the largest)."""
    return next((b for b in BUCKETS if m <= b), None)


def pick(m: int, n: int, k: int, kind: str, dtype: torch.dtype, device: torch.device | str) -> Config | None:
    """The kernel's configuration for ``x (m, k) @ W (n, k)^T`` of a layer ``kind`` ("qkv", "o",
    "gate_up", "down"), or None where ``F.linear`` should run."""
    if (not ENABLED or m <= 0 or dtype not in (torch.bfloat16, torch.float16)
            or torch.device(device).type != "cuda"):
        return None
    key = (n, k, bucket(m))
    config = TUNED[key] if key in TUNED else (POLICY.get(kind) if m <= MAX_M else None)
    if config is None or k % config.block_k:
        return None
    return config


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, kind: str = "") -> torch.Tensor:
    """``F.linear(x, weight, bias)``, through the kernel where ``pick`` says so."""
    config = pick(x.shape[0], weight.shape[0], weight.shape[1], kind, x.dtype, x.device)
    if config is not None and x.stride(1) == 1 and weight.stride(1) == 1:
        return gemm(x, weight, config, bias)
    return F.linear(x, weight, bias)


def tune(weights: dict[str, list[torch.Tensor]], max_m: int = BUCKETS[-1],
         time_us: Callable[[Callable[[], object]], float] = graph_time_us) -> dict[tuple[int, int, int], Config | None]:
    """Time cuBLAS and ``TUNE_CONFIGS`` for every layer kind's weights (all layers in turn, as a
    decode step reads them, so none is served from L2) at each bucket up to ``max_m``; record the
    faster in ``TUNED`` and return what was recorded. A configuration the GPU cannot run is skipped.
    """
    chosen = {}
    for kind, ws in weights.items():
        n, k = ws[0].shape
        for m in BUCKETS[: BUCKETS.index(bucket(min(max(max_m, 1), BUCKETS[-1]))) + 1]:
            x = torch.randn(m, k, device=ws[0].device, dtype=ws[0].dtype)
            best, best_us = None, time_us(lambda: [F.linear(x, w) for w in ws]) * MARGIN
            for config in TUNE_CONFIGS[max(16, triton.next_power_of_2(m))]:
                if k % config.block_k:
                    continue
                try:
                    us = time_us(lambda: [gemm(x, w, config) for w in ws])
                except Exception as e:  # e.g. more shared memory than the GPU has
                    logger.debug("skinny GEMM %s on %s (%d x %d, M %d) skipped: %s", config, kind, n, k, m, e)
                    continue
                if us < best_us:
                    best, best_us = config, us
            chosen[(n, k, m)] = best
    TUNED.update(chosen)
    logger.info("decode GEMMs: %s", ", ".join(
        f"{kind} M<={m}: {chosen[(ws[0].shape[0], ws[0].shape[1], m)] or 'cuBLAS'}"
        for kind, ws in weights.items() for m in BUCKETS if (ws[0].shape[0], ws[0].shape[1], m) in chosen))
    return chosen


def candidate_configs(m: int, n: int, k: int) -> list[Config]:
    """Configurations worth timing for one shape (K must be a multiple of block_k)."""
    out = []
    for block_n in (16, 32, 64):
        for block_k in (128, 256):
            for stages in (4, 6):
                if k % block_k == 0 and not (block_n == 64 and block_k == 256 and m > 32):
                    out.append(Config(block_n, block_k, stages))
    return out
