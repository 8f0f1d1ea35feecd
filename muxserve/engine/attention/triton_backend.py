"""The GPU attention backend: Triton kernels over head-wise pages (see ``triton_kernels``).

It reads the runner's slot page tables (``meta.slot_tables``/``meta.slot_ids``) instead of the
per-step (B, max_blocks, L, H) tables that the torch reference gathers, fuses the rotary
embedding with the page write, and runs flash-decoding for decode steps and a varlen causal
kernel for prefill steps.
"""

from __future__ import annotations

import torch

from muxserve.engine.attention import triton_kernels as K
from muxserve.engine.attention.base import AttentionBackend
from muxserve.engine.attention.metadata import AttentionMetadata


class TritonAttention(AttentionBackend):
    """Attention of one model over its view of the KV pool, on CUDA."""

    name = "triton"
    needs_block_tables = False  # the runner may skip building meta.block_tables / write_pages
    fuses_rotary = True  # the model hands q, k, v before rotary: forward_rotary does both
    supports_cuda_graphs = True

    def __init__(self, kv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int):
        if not kv.is_cuda:
            raise ValueError("the triton attention backend needs the KV pool on a CUDA device")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
        if head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {head_dim}")
        super().__init__(kv, num_heads, num_kv_heads, head_dim)
        self.num_sms = torch.cuda.get_device_properties(kv.device).multi_processor_count

    def num_splits(self, batch: int) -> int:
        return K.decode_policy(batch, self.num_kv_heads, self.num_sms)[0]

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """q: (N, Hq, D); k, v: (N, H, D), already rotated -> (N, Hq, D)."""
        return self._run(layer, q, k, v, None, None, meta)

    def forward_rotary(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       positions: torch.Tensor, rotary, meta: AttentionMetadata) -> torch.Tensor:
        """Like ``forward`` but q, k are not rotated yet: rotary runs fused with the page write."""
        return self._run(layer, q, k, v, rotary.cos, rotary.sin, meta)

    def _run(self, layer, q, k, v, cos, sin, meta: AttentionMetadata) -> torch.Tensor:
        if meta.slot_tables is None:
            raise ValueError("the triton backend needs slot page tables in the attention metadata")
        q, k = K.rope_write(q, k, v, self.kv, meta.slot_tables, meta.token_slots, meta.positions, layer, cos, sin)
        if meta.is_prefill:
            return K.prefill_attention(q, k, v, meta.cu_query_lens, meta.max_query_len, self.scale)
        splits, launch = K.decode_policy(q.shape[0], self.num_kv_heads, self.num_sms)
        return K.decode_attention(q, self.kv, meta.slot_tables, meta.slot_ids, meta.seq_lens, layer,
                                  self.num_kv_heads, self.scale, meta.num_splits or splits, launch=launch)
