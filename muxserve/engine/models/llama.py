"""One decoder for the Llama family: Llama 2/3, Mistral, Qwen2 (q/k/v bias), Qwen3 (q/k norm).

With a ``TensorParallel`` of world size > 1 the model is one rank's shard (see
``muxserve.engine.parallel``): q/k/v and gate/up hold the rank's rows, o_proj and down_proj its
columns and are followed by an all-reduce; ``spec`` stays the whole model's.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from muxserve.engine.attention import AttentionMetadata
from muxserve.engine.model_config import ModelSpec
from muxserve.engine.models.rotary import RotaryEmbedding
from muxserve.engine.parallel import SINGLE, TensorParallel, shard_spec


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class RowParallelLinear(nn.Linear):
    """``nn.Linear`` over this rank's input columns, summed over the group (plain Linear at tp 1)."""

    def __init__(self, in_features: int, out_features: int, parallel: TensorParallel, bias: bool = False):
        super().__init__(in_features, out_features, bias=bias)
        self.parallel = parallel

    def forward(self, x: torch.Tensor, gemm=F.linear) -> torch.Tensor:
        """``gemm(x, weight, bias)``: ``F.linear`` or another product of the same meaning."""
        if self.parallel.world_size == 1:
            return gemm(x, self.weight, self.bias)
        # The (replicated) bias is added once, after the partial sums are reduced.
        out = self.parallel.all_reduce(gemm(x, self.weight, None))
        return out if self.bias is None else out + self.bias


class Attention(nn.Module):
    """``spec`` is the rank's shard: its own q heads and kv heads."""

    def __init__(self, spec: ModelSpec, layer: int, parallel: TensorParallel = SINGLE):
        super().__init__()
        self.layer = layer
        self.spec = spec
        self.qkv_proj = nn.Linear(spec.hidden_size, spec.q_size + 2 * spec.kv_size, bias=spec.attention_bias)
        self.o_proj = RowParallelLinear(spec.q_size, spec.hidden_size, parallel, bias=spec.o_proj_bias)
        if spec.qk_norm:
            self.q_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps)
            self.k_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps)

    def forward(self, x, positions, rotary, attn, meta: AttentionMetadata, gemm=None):
        """``gemm``: ``skinny_gemm.linear`` or alike for the projections, instead of the layers' own."""
        s = self.spec
        qkv = self.qkv_proj(x) if gemm is None else gemm(x, self.qkv_proj.weight, self.qkv_proj.bias, kind="qkv")
        q, k, v = qkv.split([s.q_size, s.kv_size, s.kv_size], dim=-1)
        q = q.view(-1, s.num_heads, s.head_dim)  # (N, Hq, D)
        k = k.view(-1, s.num_kv_heads, s.head_dim)  # (N, H, D)
        v = v.view(-1, s.num_kv_heads, s.head_dim)
        if s.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if attn.fuses_rotary:  # rotary runs inside the backend's page-write kernel
            out = attn.forward_rotary(self.layer, q, k, v, positions, rotary, meta)  # (N, Hq, D)
        else:
            q, k = rotary(positions, q, k)
            out = attn.forward(self.layer, q, k, v, meta)  # (N, Hq, D)
        return self.o_proj(out.reshape(-1, s.q_size), F.linear if gemm is None else partial(gemm, kind="o"))


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec, parallel: TensorParallel = SINGLE):
        super().__init__()
        self.gate_up_proj = nn.Linear(spec.hidden_size, 2 * spec.intermediate_size, bias=False)
        self.down_proj = RowParallelLinear(spec.intermediate_size, spec.hidden_size, parallel)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int, parallel: TensorParallel = SINGLE):
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.self_attn = Attention(spec, layer, parallel)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.mlp = MLP(spec, parallel)

    def forward(self, x, positions, rotary, attn, meta):
        x = x + self.self_attn(self.input_layernorm(x), positions, rotary, attn, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaForCausalLM(nn.Module):
    """Token ids of a flat batch (N,) -> hidden states (N, hidden); logits only where asked.

    ``fused_ops`` (set by the runner with the Triton backend, CUDA only) runs RMSNorm with the
    residual add and SiLU*mul as Triton kernels, and the qkv, o and down projections of small
    batches through ``skinny_gemm``; the arithmetic and its roundings are the same, up to the order
    of the GEMMs' sums.
    """

    def __init__(self, spec: ModelSpec, parallel: TensorParallel | None = None):
        super().__init__()
        self.spec = spec  # the whole model
        self.parallel = parallel or SINGLE
        self.shard = shard_spec(spec, self.parallel.world_size)  # this rank's heads and MLP rows
        self.fused_ops = False
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(self.shard, i, self.parallel) for i in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        if spec.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(spec.rope, spec.head_dim, spec.max_position_embeddings)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn, meta: AttentionMetadata) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        if self.fused_ops:
            return self._forward_fused(x, positions, attn, meta)
        for layer in self.layers:
            x = layer(x, positions, self.rotary, attn, meta)
        return self.norm(x)

    def _forward_fused(self, x, positions, attn, meta) -> torch.Tensor:
        from muxserve.engine import skinny_gemm
        from muxserve.engine.attention.triton_kernels import rmsnorm, silu_mul

        layers = self.layers
        norms = [layer.input_layernorm for layer in layers[1:]] + [self.norm]
        residual = x
        h = rmsnorm(x, layers[0].input_layernorm.weight, layers[0].input_layernorm.eps)
        down = partial(skinny_gemm.linear, kind="down")
        for layer, next_norm in zip(layers, norms):
            a = layer.self_attn(h, positions, self.rotary, attn, meta, skinny_gemm.linear)
            post = layer.post_attention_layernorm
            h, residual = rmsnorm(a, post.weight, post.eps, residual)  # residual += a; h = norm(residual)
            m = layer.mlp.down_proj(silu_mul(layer.mlp.gate_up_proj(h)), down)
            h, residual = rmsnorm(m, next_norm.weight, next_norm.eps, residual)
        return h

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, weight).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy Hugging Face-named tensors in, fusing q/k/v and gate/up as they arrive.

        Under tensor parallelism each whole checkpoint tensor is sliced for this rank: rows of
        q/k/v/gate/up (weights and biases), input columns of o_proj/down_proj.
        """
        params = dict(self.named_parameters())
        loaded: set[tuple[str, int | None]] = set()
        s = self.shard
        tp, rank = self.parallel.world_size, self.parallel.rank
        fused = {  # HF suffix -> (our suffix, row offset, rows)
            "q_proj": ("qkv_proj", 0, s.q_size),
            "k_proj": ("qkv_proj", s.q_size, s.kv_size),
            "v_proj": ("qkv_proj", s.q_size + s.kv_size, s.kv_size),
            "gate_proj": ("gate_up_proj", 0, s.intermediate_size),
            "up_proj": ("gate_up_proj", s.intermediate_size, s.intermediate_size),
        }
        for hf_name, tensor in weights:
            name = hf_name.removeprefix("model.")
            if "rotary_emb" in name or (name == "lm_head.weight" and self.lm_head is None):
                continue
            parts = name.split(".")
            target, rows = name, None
            if len(parts) >= 2 and parts[-2] in fused:
                ours, start, count = fused[parts[-2]]
                target = ".".join(parts[:-2] + [ours, parts[-1]])
                rows = (start, count)
            if target not in params:
                raise ValueError(f"checkpoint tensor {hf_name!r} has no place in {s.architecture}")
            param = params[target]
            dest = param.data if rows is None else param.data.narrow(0, *rows)
            row_parallel = parts[-2:] in (["o_proj", "weight"], ["down_proj", "weight"])  # o_proj.bias is whole
            split_dim = 0 if rows is not None else (1 if row_parallel else None)
            if tp > 1 and split_dim is not None:  # the whole tensor's shape, then this rank's slice
                whole = list(dest.shape)
                whole[split_dim] *= tp
                if list(tensor.shape) != whole:
                    raise ValueError(f"checkpoint tensor {hf_name!r} has shape {tuple(tensor.shape)}, "
                                     f"expected {tuple(whole)}")
                size = dest.shape[split_dim]
                tensor = tensor.narrow(split_dim, rank * size, size)
            if dest.shape != tensor.shape:
                raise ValueError(f"checkpoint tensor {hf_name!r} has shape {tuple(tensor.shape)}, "
                                 f"expected {tuple(dest.shape)}")
            dest.copy_(tensor)
            loaded.add((target, None if rows is None else rows[0]))
        missing = sorted(f"{n}@{o}" if o is not None else n for n, o in _expected_slots(params, fused) - loaded)
        if missing:
            raise ValueError(f"checkpoint lacks tensors for {s.architecture}: {missing[:8]}")


def _expected_slots(params: dict[str, nn.Parameter], fused) -> set[tuple[str, int | None]]:
    """Every (parameter, fused row offset) that a complete checkpoint fills."""
    offsets: dict[str, list[int]] = {}
    for ours, start, _ in fused.values():
        offsets.setdefault(ours, []).append(start)
    slots: set[tuple[str, int | None]] = set()
    for name in params:
        kind = name.split(".")[-2] if "." in name else ""
        if kind in offsets:
            slots.update((name, o) for o in offsets[kind])
        else:
            slots.add((name, None))
    return slots
