"""Triton kernels against the torch reference, and the triton backend against the torch backend.

Runs on CUDA; skipped elsewhere. With ``TRITON_INTERPRET=1`` and triton installed, the kernel
tests (not the engine ones) also run on the CPU through Triton's interpreter (slow, small sizes).
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_KV_BYTES, assert_near_argmax, load_hf, random_prompts

from muxserve.engine.kv_cache import KVLayout, KVPool

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not HAS_TRITON or not (CUDA or INTERPRET), reason="needs CUDA and triton"),
]
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


def _dt(dtype: torch.dtype) -> torch.dtype:
    """Triton's interpreter computes bf16 wrongly (numpy has no bf16): use fp16 there."""
    return torch.float16 if dtype == torch.bfloat16 and not CUDA else dtype


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def make_pool(num_pages, head_dim, dtype, gen, page_bytes=16384):
    """A random pool seen as the engine sees it: ``KVPool.view``, strided by ``page_bytes`` (wider
    than its K+V when the head size does not divide the page)."""
    pool = KVPool(torch.zeros(num_pages * page_bytes, dtype=torch.uint8, device=DEVICE), page_bytes)
    kv = pool.view(KVLayout(1, 1, head_dim, dtype, page_bytes))
    kv.copy_(torch.randn(kv.shape, generator=gen).to(dtype))
    return kv


def page_tokens(head_dim, dtype, page_bytes=16384):
    return KVLayout(1, 1, head_dim, dtype, page_bytes).page_tokens


def make_tables(seq_lens, layers, heads, page_tokens, num_pages, gen, num_slots=None, max_blocks=None):
    """Random distinct page ids per (sequence, block, layer, head) in slot tables; returns tables, slots."""
    blocks = [-(-n // page_tokens) for n in seq_lens]
    num_slots = num_slots or len(seq_lens) + 2
    max_blocks = max_blocks or max(blocks) + 1
    need = sum(blocks) * layers * heads
    assert need <= num_pages
    perm = torch.randperm(num_pages, generator=gen)[:need].tolist()
    tables = torch.zeros(num_slots, max_blocks, layers * heads, dtype=torch.int32)
    slots = torch.randperm(num_slots, generator=gen)[: len(seq_lens)]
    i = 0
    for s, nb in zip(slots.tolist(), blocks):
        n = nb * layers * heads
        tables[s, :nb] = torch.tensor(perm[i: i + n], dtype=torch.int32).view(nb, layers * heads)
        i += n
    return tables.to(DEVICE), slots.to(DEVICE)


def ref_decode(q, kv, tables, slots, seq_lens, layer, heads, scale):
    """fp64 attention of one query per sequence over its pages."""
    b, hq, d = q.shape
    t = kv.shape[2]
    group = hq // heads
    out = torch.zeros(b, hq, d, dtype=torch.float64)
    for i in range(b):
        n = int(seq_lens[i])
        nb = -(-n // t)
        pages = tables[int(slots[i]), :nb].view(nb, -1, heads)[:, layer].long().cpu()  # (nb, H)
        for h in range(heads):
            kvh = kv.cpu()[pages[:, h]].double()  # (nb, 2, T, D)
            k = kvh[:, 0].reshape(-1, d)[:n]
            v = kvh[:, 1].reshape(-1, d)[:n]
            qs = q[i, h * group:(h + 1) * group].cpu().double()
            p = (qs @ k.T * scale).softmax(-1)
            out[i, h * group:(h + 1) * group] = p @ v
    return out


DECODE_CASES = [  # (head_dim, Hq, H, dtype, seq_lens, splits)
    (128, 32, 8, torch.bfloat16, [1, 31, 32, 33, 200, 517], 1),
    (128, 28, 4, torch.bfloat16, [5, 64, 300, 1000], 4),
    (64, 4, 2, torch.float16, [1, 63, 64, 65, 129], 3),
    (64, 9, 3, torch.bfloat16, [17, 250], 16),
    (128, 8, 8, torch.float32, [3, 40, 77], 2),
    # head sizes that leave the end of each 16 KiB page unused (page stride > 2 * T * D)
    (80, 8, 2, torch.bfloat16, [1, 50, 51, 52, 300], 1),
    (100, 4, 2, torch.bfloat16, [39, 40, 41, 170], 3),
    (96, 6, 2, torch.float32, [20, 21, 22, 90], 2),
    (48, 4, 1, torch.float32, [41, 42, 43, 130], 1),
]


@pytest.mark.parametrize("case", range(len(DECODE_CASES)))
def test_decode_attention_matches_reference(case):
    from muxserve.engine.attention import triton_kernels as K

    d, hq, h, dtype, lens, splits = DECODE_CASES[case]
    dtype = _dt(dtype)
    gen = torch.Generator().manual_seed(case)
    t = page_tokens(d, dtype)
    layers, layer = 3, 1
    if INTERPRET and not CUDA:
        lens = [min(n, 2 * t + 3) for n in lens]
    blocks = sum(-(-n // t) for n in lens)
    kv = make_pool(blocks * layers * h + 7, d, dtype, gen)
    assert kv.shape[2] == t
    tables, slots = make_tables(lens, layers, h, t, kv.shape[0], gen)
    q = torch.randn(len(lens), hq, d, generator=gen).to(dtype).to(DEVICE)
    seq_lens = torch.tensor(lens, device=DEVICE)
    out = torch.full_like(q, float("nan"))
    K.decode_attention(q, kv, tables, slots, seq_lens, layer, h, d**-0.5, splits, out=out)
    ref = ref_decode(q, kv, tables, slots, lens, layer, h, d**-0.5)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel_err(out.cpu(), ref) < tol


def test_decode_padding_rows_are_zero_and_write_nothing():
    from muxserve.engine.attention import triton_kernels as K

    gen = torch.Generator().manual_seed(5)
    kv = make_pool(64, 64, torch.float16, gen)
    tables, slots = make_tables([70], 2, 2, 64, 64, gen)
    q = torch.randn(3, 4, 64, generator=gen).half().to(DEVICE)
    slots3 = torch.tensor([int(slots[0]), -1, -1], device=DEVICE)
    lens = torch.tensor([70, 0, 0], device=DEVICE)
    out = K.decode_attention(q, kv, tables, slots3, lens, 0, 2, 0.125, 2)
    assert out[1:].abs().max().item() == 0
    before = kv.clone()
    k = torch.randn(3, 2, 64, generator=gen).half().to(DEVICE)
    K.rope_write(q, k, k, kv, tables, slots3, torch.tensor([69, 0, 0], device=DEVICE), 0, None, None)
    changed = (kv != before).flatten(1).any(1).nonzero().flatten().tolist()
    pages = tables[int(slots[0]), 1, :2].long().tolist()  # block 1 of layer 0, both heads
    assert sorted(changed) == sorted(pages)


@pytest.mark.parametrize("d,hq,h,dtype", [(128, 8, 2, torch.bfloat16), (64, 4, 2, torch.float32),
                                          (64, 6, 3, torch.float16), (80, 4, 2, torch.bfloat16),
                                          (100, 4, 2, torch.float32), (48, 2, 1, torch.float32)])
def test_rope_write_matches_reference(d, hq, h, dtype):
    dtype = _dt(dtype)
    from muxserve.engine.attention import triton_kernels as K
    from muxserve.engine.attention.metadata import AttentionMetadata
    from muxserve.engine.attention.torch_ref import write_kv
    from muxserve.engine.model_config import RopeSpec
    from muxserve.engine.models.rotary import RotaryEmbedding

    gen = torch.Generator().manual_seed(d + hq)
    t = page_tokens(d, dtype)
    layers, layer = 2, 1
    lens = [t + 5, 3, 2 * t]
    kv = make_pool(40 * layers * h, d, dtype, gen)
    tables, slots = make_tables(lens, layers, h, t, kv.shape[0], gen)
    positions = torch.cat([torch.arange(n) for n in lens])
    token_slots = torch.repeat_interleave(slots.cpu(), torch.tensor(lens))
    n = positions.numel()
    qkv = torch.randn(n, (hq + 2 * h) * d, generator=gen).to(dtype).to(DEVICE)
    q, k, v = qkv.split([hq * d, h * d, h * d], dim=-1)
    q, k, v = q.view(n, hq, d), k.view(n, h, d), v.view(n, h, d)
    rope = RotaryEmbedding(RopeSpec(rope_type="default", theta=10000.0), d, 512).to(DEVICE)
    expect_kv = kv.clone()
    q_out, k_out = K.rope_write(q, k, v, kv, tables, token_slots.to(DEVICE), positions.to(DEVICE), layer,
                                rope.cos, rope.sin)
    rq, rk = rope(positions.to(DEVICE), q, k)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert rel_err(q_out.cpu(), rq.cpu()) < tol and rel_err(k_out.cpu(), rk.cpu()) < tol
    # reference write through block tables built from the slot tables
    bt = tables.long()[token_slots.to(DEVICE)].view(n, -1, layers, h)  # (N, MB, L, H)
    write_pages = bt[torch.arange(n, device=DEVICE), (positions // t).to(DEVICE)].permute(1, 0, 2)  # (L, N, H)
    meta = AttentionMetadata(False, None, [], None, None, write_pages.contiguous(), (positions % t).to(DEVICE), t)
    write_kv(expect_kv, layer, k_out, v, meta)
    assert rel_err(kv.cpu(), expect_kv.cpu()) < 1e-7
    # Nothing is written past a page's K+V: the unused end of every page stays zero.
    pages = torch.empty(0, dtype=torch.uint8, device=DEVICE).set_(kv.untyped_storage()).view(-1, 16384)
    assert pages[:, 2 * t * d * kv.element_size():].eq(0).all()


@pytest.mark.parametrize("d,hq,h,dtype,lens", [(128, 8, 2, torch.bfloat16, [1, 100, 257, 64]),
                                               (64, 4, 4, torch.float32, [5, 70]),
                                               (64, 14, 2, torch.float16, [130, 3]),
                                               (80, 4, 2, torch.bfloat16, [60, 7]),
                                               (100, 6, 3, torch.float32, [33, 2])])
def test_prefill_attention_matches_sdpa(d, hq, h, dtype, lens):
    dtype = _dt(dtype)
    from muxserve.engine.attention import triton_kernels as K

    gen = torch.Generator().manual_seed(len(lens) + d)
    n = sum(lens)
    q = torch.randn(n, hq, d, generator=gen).to(dtype).to(DEVICE)
    kv = torch.randn(n, 2 * h, d, generator=gen).to(dtype).to(DEVICE)
    k, v = kv[:, :h], kv[:, h:]  # strided views, as the model hands them over
    cu = torch.tensor([0] + lens, device=DEVICE).cumsum(0)
    out = K.prefill_attention(q, k, v, cu, max(lens), d**-0.5)
    ref = torch.empty(n, hq, d, dtype=torch.float64)
    starts = cu.tolist()
    for i in range(len(lens)):
        s, e = starts[i], starts[i + 1]
        qs = q[s:e].cpu().double().transpose(0, 1)
        ks = k[s:e].cpu().double().transpose(0, 1).repeat_interleave(hq // h, 0)
        vs = v[s:e].cpu().double().transpose(0, 1).repeat_interleave(hq // h, 0)
        ref[s:e] = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=d**-0.5).transpose(0, 1)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel_err(out.cpu(), ref) < tol


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rmsnorm_and_silu_mul_match_the_model_ops(dtype):
    dtype = _dt(dtype)
    from muxserve.engine.attention import triton_kernels as K
    from muxserve.engine.models.llama import RMSNorm

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 576, generator=gen).to(dtype).to(DEVICE)
    r = torch.randn(5, 576, generator=gen).to(dtype).to(DEVICE)
    norm = RMSNorm(576, 1e-5).to(DEVICE).to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 8e-3  # reduction order: at most an ulp here and there
    with torch.no_grad():
        norm.weight.copy_(torch.rand(576, generator=gen) + 0.5)
        assert rel_err(K.rmsnorm(x, norm.weight, 1e-5).cpu(), norm(x).cpu()) < tol
        h, res = K.rmsnorm(x, norm.weight, 1e-5, residual=r)
        assert torch.equal(res, x + r)
        assert rel_err(h.cpu(), norm(x + r).cpu()) < tol
        gu = torch.randn(3, 2 * 300, generator=gen).to(dtype).to(DEVICE)
        gate, up = gu.chunk(2, dim=-1)
        assert rel_err(K.silu_mul(gu).cpu(), (F.silu(gate) * up).cpu()) < tol


@pytest.mark.parametrize("variant", ["plain", "bias"])
@pytest.mark.parametrize("n,k,config", [(48, 256, (32, 128, 2)), (40, 512, (16, 256, 3))])
@pytest.mark.parametrize("m", [1, 5, 16])
def test_skinny_gemm_matches_reference(m, n, k, config, variant):
    from muxserve.engine import skinny_gemm

    dtype = _dt(torch.bfloat16)
    gen = torch.Generator().manual_seed(m * n + k)
    x = torch.randn(m, k, generator=gen).to(dtype).to(DEVICE)
    w = (torch.randn(n, k, generator=gen) * 0.05).to(dtype).to(DEVICE)  # N not a multiple of block_n
    bias = torch.randn(n, generator=gen).to(dtype).to(DEVICE) if variant == "bias" else None
    out = skinny_gemm.gemm(x, w, skinny_gemm.Config(*config), bias)
    ref = F.linear(x.double(), w.double(), None if bias is None else bias.double())
    assert out.shape == (m, n) and out.dtype == dtype
    assert rel_err(out.cpu(), ref.cpu()) < (1e-2 if dtype == torch.bfloat16 else 2e-3)


def test_skinny_gemm_policy(monkeypatch):
    from muxserve.engine import skinny_gemm

    bf16, Config = torch.bfloat16, skinny_gemm.Config
    monkeypatch.setattr(skinny_gemm, "ENABLED", True)
    assert skinny_gemm.pick(1, 4096, "qkv", bf16, "cuda") == Config(64, 128, 6)
    assert skinny_gemm.pick(16, 4096, "o", torch.float16, "cuda") == Config(32, 256, 6)
    assert skinny_gemm.pick(8, 14336, "down", bf16, torch.device("cuda", 0)) == Config(32, 256, 6)
    assert skinny_gemm.pick(17, 4096, "o", bf16, "cuda") is None  # M > 16: cuBLAS
    assert skinny_gemm.pick(8, 4096 + 128, "o", bf16, "cuda") is None  # K not a multiple of block_k
    assert skinny_gemm.pick(8, 4096, "gate_up", bf16, "cuda") is None
    assert skinny_gemm.pick(8, 4096, "o", torch.float32, "cuda") is None
    assert skinny_gemm.pick(8, 4096, "o", bf16, "cpu") is None
    monkeypatch.setattr(skinny_gemm, "ENABLED", False)
    assert skinny_gemm.pick(1, 4096, "qkv", bf16, "cuda") is None
    # where pick says no, linear is F.linear
    x = torch.randn(3, 256).to(_dt(bf16)).to(DEVICE)
    w = torch.randn(64, 256).to(x.dtype).to(DEVICE)
    assert torch.equal(skinny_gemm.linear(x, w, kind="o"), F.linear(x, w))


def test_decode_split_policy():
    from muxserve.engine.attention import triton_kernels as K
    from muxserve.engine.attention.triton_backend import TritonAttention

    small = K.SMALL_BATCH_LAUNCH
    # (batch, kv heads, SMs) -> (splits, launch): below one program per SM, fill 4 and up to 32 splits
    cases = {(1, 8, 132): (32, small), (4, 8, 132): (17, small), (16, 8, 132): (5, small), (2, 2, 108): (32, small),
             (17, 8, 132): (2, None), (64, 8, 132): (1, None), (132, 1, 132): (2, None)}
    backend = TritonAttention.__new__(TritonAttention)  # no CUDA pool needed for the policy
    for (batch, heads, sms), expected in cases.items():
        assert K.decode_policy(batch, heads, sms) == expected
        backend.num_kv_heads, backend.num_sms = heads, sms
        assert backend.num_splits(batch) == expected[0]
    assert K.decode_splits(1, 8, 132) == 16 and K.decode_splits(64, 8, 132) == 1  # the defaults stay


# -- the engine with the triton backend -----------------------------------------------------------
ARCHS = ("llama-gqa-hd64", "llama-hd128-tied", "qwen3", "qwen2", "llama-hd80", "llama-hd100")
PROMPT_LENS = (1, 7, 33, 50, 130)


@needs_cuda
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("eager", [True, False])
def test_triton_backend_float32_greedy_equals_torch_backend(tiny_model, arch, eager):
    from muxserve.engine import LLM, SamplingParams

    folder = tiny_model(arch)
    prompts = random_prompts(PROMPT_LENS)
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    ref = LLM(str(folder), device="cuda", kv_cache_bytes=TINY_KV_BYTES, attention_backend="torch")
    fast = LLM(str(folder), device="cuda", kv_cache_bytes=TINY_KV_BYTES, enforce_eager=eager)
    assert fast.engine.backend == "triton" and ref.engine.backend == "torch"
    expected = [o.token_ids for o in ref.generate(prompts, params)]
    assert [o.token_ids for o in fast.generate(prompts, params)] == expected
    assert (fast.engine.runner.graphs is None) == eager
    if not eager:
        assert fast.engine.runner.graphs.captured  # decode steps replayed graphs
    assert fast.engine.allocator.num_free == fast.engine.allocator.num_pages


@needs_cuda
@pytest.mark.parametrize("arch", ("llama-gqa-hd64", "llama-hd128-tied", "llama-hd80", "llama-hd96"))
def test_triton_backend_bfloat16_tokens_are_near_argmax(tiny_model, arch):
    from muxserve.engine import LLM, SamplingParams

    folder = tiny_model(arch)
    prompts = random_prompts(PROMPT_LENS[:4])
    llm = LLM(str(folder), device="cuda", dtype="bfloat16", kv_cache_bytes=TINY_KV_BYTES)
    outs = llm.generate(prompts, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))
    assert_near_argmax(load_hf(folder, device="cuda"), prompts, [o.token_ids for o in outs], 32)


@needs_cuda
def test_graphs_survive_preemption_and_table_growth(tiny_model):
    # A pool too small for the batch forces preemptions and recompute; a tiny initial slot table
    # forces reallocation (graphs dropped and recaptured). Tokens must equal the torch backend.
    from muxserve.engine import LLM, SamplingParams
    from muxserve.engine.attention.page_table import PageTables

    folder = tiny_model("llama-gqa-hd64")
    prompts = random_prompts((40, 90, 20, 60, 75, 10, 33, 50))
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    kv_bytes = 96 * 16384  # 96 pages: 4 pages per 64-token block of this model -> preemption
    ref = LLM(str(folder), device="cuda", kv_cache_bytes=kv_bytes, attention_backend="torch")
    fast = LLM(str(folder), device="cuda", kv_cache_bytes=kv_bytes)
    runner = fast.engine.runner
    runner.tables = runner.graphs.tables = PageTables(runner.layout, runner.device, num_slots=1, max_blocks=1)
    expected = [o.token_ids for o in ref.generate(prompts, params)]
    assert [o.token_ids for o in fast.generate(prompts, params)] == expected
    assert fast.engine.scheduler.num_preemptions > 0
