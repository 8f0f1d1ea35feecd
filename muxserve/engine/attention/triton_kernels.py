"""Triton kernels over the head-wise paged KV pool (DESIGN.md §4).

Layout they read: ``kv`` is the model's view of the pool, (num_pages, 2, page_tokens, head_dim),
strided as ``KVPool.view`` makes it: token ``i`` of a page holds K at ``page * stride(0) + i *
stride(2)`` and V ``stride(1)`` after it, each a contiguous row of ``head_dim``. The page stride is
the page size, which can exceed ``2*T*D`` elements (a head size that does not divide the page
leaves the rest of the page unused), so the kernels take every stride and assume none.
Page tables are per slot: ``tables`` (S, max_blocks, L*H) int32, the page of token block ``blk``
of layer ``l`` and kv-head ``h`` being ``tables[slot, blk, l*H + h]`` (block-major, as the
allocator hands pages out). Each sequence of a batch names its slot (``slots``, (B,)).

Kernels:
* ``rope_write``: rotary embedding of q and k, and the store of k and v into their pages
  (one program per token; a token whose slot is negative, batch padding, writes nothing).
* ``decode_attention``: one query token per sequence, GQA, split over the context
  (flash-decoding) with a small combine kernel when more than one split runs.
* ``prefill_attention``: causal attention over packed prompts of different lengths (varlen),
  reading q/k/v from the step's own tensors (prompts have no cached prefix).
* ``fused_add_rmsnorm``, ``rmsnorm`` and ``silu_mul``: the small ops of a decoder layer.

Every kernel computes in float32 and rounds as the torch reference does where it can.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def _check_pool(kv: torch.Tensor, head_dim: int) -> int:
    """Tokens per page of the pool view ``kv``; its rows of ``head_dim`` must be contiguous."""
    if kv.dim() != 4 or kv.shape[1] != 2 or kv.shape[3] != head_dim or kv.stride(3) != 1:
        raise ValueError(f"KV pool view must be (pages, 2, page_tokens, {head_dim}) with contiguous rows, got "
                         f"shape {tuple(kv.shape)} strides {kv.stride()}")
    return kv.shape[2]


# --------------------------------------------------------------------------------------------
# rotary + page write
# --------------------------------------------------------------------------------------------
@triton.jit
def _rotate_halves(ptr, mask, HALF: tl.constexpr, c1, c2, s1, s2, ROTATE: tl.constexpr):
    """Load the two halves of rows at ``ptr`` (fp32) and rotate them (rotate_half convention)."""
    x1 = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptr + HALF, mask=mask, other=0.0).to(tl.float32)
    if ROTATE:
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    else:
        y1 = x1
        y2 = x2
    return y1, y2


@triton.jit
def _rope_write_kernel(q_ptr, k_ptr, v_ptr, q_out_ptr, k_out_ptr, kv_ptr, tables_ptr, slots_ptr, pos_ptr,
                       cos_ptr, sin_ptr, layer,
                       stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh,
                       stride_qon, stride_qoh, stride_kon, stride_koh,
                       stride_ts, stride_tb, stride_page, stride_kv, stride_tok, stride_cos,
                       HQ: tl.constexpr, H: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_H: tl.constexpr,
                       D: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, T: tl.constexpr,
                       ROTATE: tl.constexpr):
    n = tl.program_id(0)
    pos = tl.load(pos_ptr + n)
    slot = tl.load(slots_ptr + n)
    offs_j = tl.arange(0, BLOCK_HALF)
    mask_j = offs_j < HALF
    c1 = 0.0  # cos/sin halves: placeholders without ROTATE
    c2 = 0.0
    s1 = 0.0
    s2 = 0.0
    if ROTATE:
        # cos/sin rows hold cat(freqs, freqs); torch rounds them to the activation dtype first.
        c1 = tl.load(cos_ptr + pos * stride_cos + offs_j, mask=mask_j, other=0.0)
        c2 = tl.load(cos_ptr + pos * stride_cos + HALF + offs_j, mask=mask_j, other=0.0)
        s1 = tl.load(sin_ptr + pos * stride_cos + offs_j, mask=mask_j, other=0.0)
        s2 = tl.load(sin_ptr + pos * stride_cos + HALF + offs_j, mask=mask_j, other=0.0)
        dt = q_out_ptr.dtype.element_ty
        c1 = c1.to(dt).to(tl.float32)[None, :]
        c2 = c2.to(dt).to(tl.float32)[None, :]
        s1 = s1.to(dt).to(tl.float32)[None, :]
        s2 = s2.to(dt).to(tl.float32)[None, :]

    # q: (HQ, D) -> rotated into q_out
    offs_hq = tl.arange(0, BLOCK_HQ)
    mq = (offs_hq < HQ)[:, None] & mask_j[None, :]
    qp = q_ptr + n * stride_qn + offs_hq[:, None] * stride_qh + offs_j[None, :]
    y1, y2 = _rotate_halves(qp, mq, HALF, c1, c2, s1, s2, ROTATE)
    qo = q_out_ptr + n * stride_qon + offs_hq[:, None] * stride_qoh + offs_j[None, :]
    tl.store(qo, y1.to(q_out_ptr.dtype.element_ty), mask=mq)
    tl.store(qo + HALF, y2.to(q_out_ptr.dtype.element_ty), mask=mq)

    # k: (H, D) -> rotated into k_out and into the pages; v copied into the pages.
    offs_h = tl.arange(0, BLOCK_H)
    mk = (offs_h < H)[:, None] & mask_j[None, :]
    kp = k_ptr + n * stride_kn + offs_h[:, None] * stride_kh + offs_j[None, :]
    y1, y2 = _rotate_halves(kp, mk, HALF, c1, c2, s1, s2, ROTATE)
    ko = k_out_ptr + n * stride_kon + offs_h[:, None] * stride_koh + offs_j[None, :]
    k1 = y1.to(k_out_ptr.dtype.element_ty)
    k2 = y2.to(k_out_ptr.dtype.element_ty)
    tl.store(ko, k1, mask=mk)
    tl.store(ko + HALF, k2, mask=mk)
    vp = v_ptr + n * stride_vn + offs_h[:, None] * stride_vh + offs_j[None, :]
    v1 = tl.load(vp, mask=mk, other=0.0)
    v2 = tl.load(vp + HALF, mask=mk, other=0.0)
    if slot >= 0:
        blk = pos // T
        page = tl.load(tables_ptr + slot * stride_ts + blk * stride_tb + layer * H + offs_h, mask=offs_h < H, other=0)
        base = page.to(tl.int64) * stride_page + (pos % T) * stride_tok
        dst = kv_ptr + base[:, None] + offs_j[None, :]
        kvt = kv_ptr.dtype.element_ty
        tl.store(dst, k1.to(kvt), mask=mk)
        tl.store(dst + HALF, k2.to(kvt), mask=mk)
        tl.store(dst + stride_kv, v1.to(kvt), mask=mk)
        tl.store(dst + stride_kv + HALF, v2.to(kvt), mask=mk)


def rope_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv: torch.Tensor, tables: torch.Tensor,
               token_slots: torch.Tensor, positions: torch.Tensor, layer: int,
               cos: torch.Tensor | None, sin: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q, k (cos/sin None: no rotation) and store k, v into their pages.

    q: (N, Hq, D), k, v: (N, H, D), any row strides, last dim contiguous; kv: (P, 2, T, D), last
    dim contiguous (a ``KVPool.view``); tables: (S, MB, L*H) int32; token_slots, positions: (N,).
    Returns rotated q and k, contiguous.
    """
    n, hq, d = q.shape
    h = k.shape[1]
    t = _check_pool(kv, d)
    q_out = torch.empty((n, hq, d), dtype=q.dtype, device=q.device)
    k_out = torch.empty((n, h, d), dtype=k.dtype, device=k.device)
    if n == 0:
        return q_out, k_out
    rotate = cos is not None
    if not rotate:
        cos = sin = q  # never read
    half = d // 2
    _rope_write_kernel[(n,)](
        q, k, v, q_out, k_out, kv, tables, token_slots, positions, cos, sin, layer,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
        tables.stride(0), tables.stride(1), kv.stride(0), kv.stride(1), kv.stride(2), cos.stride(0),
        HQ=hq, H=h, BLOCK_HQ=_pow2(hq), BLOCK_H=_pow2(h), D=d, HALF=half, BLOCK_HALF=_pow2(half), T=t,
        ROTATE=rotate, num_warps=4 if hq * d >= 2048 else 2,
    )
    return q_out, k_out


# --------------------------------------------------------------------------------------------
# decode attention (flash-decoding over pages)
# --------------------------------------------------------------------------------------------
@triton.jit
def _decode_kernel(q_ptr, kv_ptr, tables_ptr, slots_ptr, seq_lens_ptr, out_ptr, part_o_ptr, part_lse_ptr,
                   layer, scale, num_splits,
                   stride_qb, stride_qh, stride_ob, stride_oh, stride_ts, stride_tb, stride_page, stride_kv,
                   stride_tok, H: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr,
                   D: tl.constexpr, BLOCK_D: tl.constexpr, T: tl.constexpr, BLOCK_N: tl.constexpr,
                   SPLIT: tl.constexpr, IEEE: tl.constexpr):
    # num_splits is a runtime value (one compiled kernel for every split count); SPLIT: it is > 1
    b = tl.program_id(0)
    h = tl.program_id(1)
    sp = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b).to(tl.int32)
    slot = tl.load(slots_ptr + b).to(tl.int64)
    n_pages = tl.cdiv(seq_len, T)
    per_split = tl.cdiv(n_pages, num_splits) * T
    start = sp * per_split
    end = tl.minimum(start + per_split, seq_len)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    mask_g = offs_g < GROUP
    mask_d = offs_d < D
    heads = h * GROUP + offs_g
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=mask_g[:, None] & mask_d[None, :], other=0.0)  # (G, D)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    row = tables_ptr + slot * stride_ts + layer * H + h
    for t0 in range(start, end, BLOCK_N):
        offs_n = t0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        page = tl.load(row + (offs_n // T) * stride_tb, mask=mask_n, other=0)
        base = page.to(tl.int64) * stride_page + (offs_n % T) * stride_tok  # (N,)
        mkv = mask_n[:, None] & mask_d[None, :]
        k = tl.load(kv_ptr + base[:, None] + offs_d[None, :], mask=mkv, other=0.0)  # (N, D)
        v = tl.load(kv_ptr + base[:, None] + stride_kv + offs_d[None, :], mask=mkv, other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(mask_n[None, :], s * scale, float("-inf"))  # (G, N)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    safe_l = tl.where(l_i > 0, l_i, 1.0)
    o = acc / safe_l[:, None]
    mo = mask_g[:, None] & mask_d[None, :]
    if not SPLIT:
        tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=mo)
    else:
        # partials: (B, Hq, S, D) and lse (B, Hq, S), contiguous
        hq_total = H * GROUP
        pidx = (b * hq_total + heads) * num_splits + sp  # (G,)
        tl.store(part_o_ptr + pidx[:, None] * D + offs_d[None, :], o, mask=mo)
        lse = tl.where(l_i > 0, m_i + tl.log(safe_l), float("-inf"))
        tl.store(part_lse_ptr + pidx, lse, mask=mask_g)


@triton.jit
def _decode_combine_kernel(part_o_ptr, part_lse_ptr, out_ptr, stride_ob, stride_oh, num_splits,
                           HQ: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    b = tl.program_id(0)
    hq = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    mask_s = offs_s < num_splits
    base = (b * HQ + hq) * num_splits
    lse = tl.load(part_lse_ptr + base + offs_s, mask=mask_s, other=float("-inf"))
    m = tl.max(lse, 0)
    m_safe = tl.where(m > float("-inf"), m, 0.0)
    w = tl.where(lse > float("-inf"), tl.exp(lse - m_safe), 0.0)  # (S,)
    total = tl.sum(w, 0)
    o = tl.load(part_o_ptr + (base + offs_s)[:, None] * D + offs_d[None, :],
                mask=mask_s[:, None] & (offs_d < D)[None, :], other=0.0)
    res = tl.sum(o * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + b * stride_ob + hq * stride_oh + offs_d, res.to(out_ptr.dtype.element_ty), mask=offs_d < D)


def decode_splits(batch: int, num_kv_heads: int, num_sms: int, max_splits: int = 16, fill: int = 2) -> int:
    """Context splits per (sequence, kv-head) so that the grid fills the GPU about ``fill`` times."""
    want = -(-fill * num_sms // max(batch * num_kv_heads, 1))
    return max(1, min(max_splits, want))


SMALL_BATCH_LAUNCH = (32, 4, 2)  # decode_attention's ``launch`` (block_n, warps, stages) for small batches


def decode_policy(batch: int, num_kv_heads: int, num_sms: int) -> tuple[int, tuple[int, int, int] | None]:
    """(splits, launch) of a decode step. With fewer (sequence, kv-head) pairs than SMs, more and
    shorter splits in lighter programs were 5-15% faster on an H200 (bf16); otherwise the defaults
    (launch None) were best. For float32 the small-batch launch is its default one."""
    if batch * num_kv_heads < num_sms:
        return decode_splits(batch, num_kv_heads, num_sms, max_splits=32, fill=4), SMALL_BATCH_LAUNCH
    return decode_splits(batch, num_kv_heads, num_sms), None


def decode_attention(q: torch.Tensor, kv: torch.Tensor, tables: torch.Tensor, slots: torch.Tensor,
                     seq_lens: torch.Tensor, layer: int, num_kv_heads: int, scale: float,
                     num_splits: int = 1, out: torch.Tensor | None = None,
                     launch: tuple[int, int, int] | None = None) -> torch.Tensor:
    """One query token per sequence over its cached tokens (its own K/V already in the pages).

    q: (B, Hq, D), last dim contiguous; seq_lens: (B,) tokens including the new one (0: padding,
    output 0); slots: (B,) rows of ``tables``. Returns (B, Hq, D) in q's dtype.
    ``launch``: (tokens per iteration, warps, pipeline stages) instead of the defaults.
    """
    b, hq, d = q.shape
    t = _check_pool(kv, d)
    group = hq // num_kv_heads
    if out is None:
        out = torch.empty((b, hq, d), dtype=q.dtype, device=q.device)
    if b == 0:
        return out
    ieee = q.dtype == torch.float32
    block_d = _pow2(d)
    block_n = 64 if block_d <= 128 else 32
    if ieee:
        block_n = 32
    warps, stages = 4, 2 if ieee else 3
    if launch is not None:
        block_n, warps, stages = launch
    if num_splits > 1:
        part_o = torch.empty((b, hq, num_splits, d), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((b, hq, num_splits), dtype=torch.float32, device=q.device)
    else:
        part_o = part_lse = out  # never touched
    _decode_kernel[(b, num_kv_heads, num_splits)](
        q, kv, tables, slots, seq_lens, out, part_o, part_lse, layer, scale, num_splits,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), tables.stride(0), tables.stride(1), kv.stride(0),
        kv.stride(1), kv.stride(2), H=num_kv_heads, GROUP=group, BLOCK_G=max(16, _pow2(group)), D=d, BLOCK_D=block_d,
        T=t, BLOCK_N=block_n, SPLIT=num_splits > 1, IEEE=ieee, num_warps=warps, num_stages=stages,
    )
    if num_splits > 1:
        _decode_combine_kernel[(b, hq)](
            part_o, part_lse, out, out.stride(0), out.stride(1), num_splits, HQ=hq, D=d, BLOCK_D=block_d,
            BLOCK_S=_pow2(num_splits), num_warps=4 if block_d >= 128 else 2,
        )
    return out


# --------------------------------------------------------------------------------------------
# prefill attention (varlen, causal, no cached prefix)
# --------------------------------------------------------------------------------------------
@triton.jit
def _prefill_kernel(q_ptr, k_ptr, v_ptr, out_ptr, cu_ptr, scale,
                    stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_on, stride_oh,
                    GROUP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
    mb = tl.program_id(0)
    b = tl.program_id(1)
    hq = tl.program_id(2)
    h = hq // GROUP
    start = tl.load(cu_ptr + b).to(tl.int32)
    length = tl.load(cu_ptr + b + 1).to(tl.int32) - start
    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < length
    mask_d = offs_d < D
    rows = (start + offs_m).to(tl.int64)
    q = tl.load(q_ptr + rows[:, None] * stride_qn + hq * stride_qh + offs_d[None, :],
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = tl.minimum((mb + 1) * BLOCK_M, length)
    hi = tl.where(mb * BLOCK_M < length, hi, 0)
    for n0 in range(0, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < length
        cols = (start + offs_n).to(tl.int64)
        mkv = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_ptr + cols[:, None] * stride_kn + h * stride_kh + offs_d[None, :], mask=mkv, other=0.0)
        v = tl.load(v_ptr + cols[:, None] * stride_vn + h * stride_vh + offs_d[None, :], mask=mkv, other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        keep = (offs_m[:, None] >= offs_n[None, :]) & mask_n[None, :]
        s = tl.where(keep, s * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + rows[:, None] * stride_on + hq * stride_oh + offs_d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                      max_len: int, scale: float) -> torch.Tensor:
    """Causal attention of packed prompts: q (N, Hq, D), k, v (N, H, D) -> (N, Hq, D)."""
    n, hq, d = q.shape
    h = k.shape[1]
    out = torch.empty((n, hq, d), dtype=q.dtype, device=q.device)
    b = cu_seqlens.numel() - 1
    if n == 0 or b == 0:
        return out
    ieee = q.dtype == torch.float32
    block_d = _pow2(d)
    if ieee or block_d > 128:
        block_m, block_n, warps, stages = 32, 32, 4, 2
    else:
        block_m, block_n, warps, stages = 128, 64, 8, 3
    grid = (triton.cdiv(max_len, block_m), b, hq)
    _prefill_kernel[grid](
        q, k, v, out, cu_seqlens, scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        GROUP=hq // h, D=d, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, IEEE=ieee,
        num_warps=warps, num_stages=stages,
    )
    return out


# --------------------------------------------------------------------------------------------
# RMSNorm (optionally with the residual add) and SiLU * mul
# --------------------------------------------------------------------------------------------
@triton.jit
def _rmsnorm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, eps, stride_x, stride_r, stride_o, stride_ro,
                    HIDDEN: tl.constexpr, BLOCK: tl.constexpr, HAS_RES: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < HIDDEN
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    dt = x.dtype
    if HAS_RES:
        r = tl.load(res_ptr + row * stride_r + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(dt)  # torch: x + residual in the activation dtype
        tl.store(res_out_ptr + row * stride_ro + offs, x, mask=mask)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, 0) / HIDDEN
    y = (xf * tl.math.rsqrt(var + eps)).to(dt)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    tl.store(out_ptr + row * stride_o + offs, (w.to(tl.float32) * y.to(tl.float32)).to(out_ptr.dtype.element_ty),
             mask=mask)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """``weight * norm(x)`` (x: (N, hidden)); with ``residual``: returns (norm(x + residual), x + residual)."""
    n, hidden = x.shape
    out = torch.empty_like(x)
    res_out = torch.empty_like(x) if residual is not None else out
    if n:
        block = _pow2(hidden)
        r = residual if residual is not None else x
        _rmsnorm_kernel[(n,)](x, r, weight, out, res_out, eps, x.stride(0), r.stride(0), out.stride(0),
                              res_out.stride(0), HIDDEN=hidden, BLOCK=block, HAS_RES=residual is not None,
                              num_warps=8 if block >= 4096 else 4)
    return out if residual is None else (out, res_out)


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, INTER: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = col < INTER
    g = tl.load(x_ptr + row * stride_x + col, mask=mask, other=0.0)
    u = tl.load(x_ptr + row * stride_x + INTER + col, mask=mask, other=0.0)
    gf = g.to(tl.float32)
    act = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)  # torch rounds silu(gate) before the product
    tl.store(out_ptr + row * stride_o + col, (act.to(tl.float32) * u.to(tl.float32)).to(out_ptr.dtype.element_ty),
             mask=mask)


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """x: (N, 2 * inter) = [gate | up] -> silu(gate) * up, (N, inter)."""
    n, two = x.shape
    inter = two // 2
    out = torch.empty((n, inter), dtype=x.dtype, device=x.device)
    if n:
        block = min(2048, _pow2(inter))
        _silu_mul_kernel[(n, triton.cdiv(inter, block))](x, out, x.stride(0), out.stride(0), INTER=inter,
                                                          BLOCK=block, num_warps=4)
    return out
