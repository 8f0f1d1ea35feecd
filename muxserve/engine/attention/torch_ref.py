"""Readable torch attention over head-wise pages: the CPU backend and the oracle for GPU kernels."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from muxserve.engine.attention.base import AttentionBackend
from muxserve.engine.attention.metadata import AttentionMetadata


def write_kv(kv: torch.Tensor, layer: int, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> None:
    """Store the new tokens' K/V of one layer into their pages.

    kv: (num_pages, 2, page_tokens, head_dim); k, v: (N, H, head_dim).
    """
    pages = meta.write_pages[layer]  # (N, H)
    slots = meta.write_offsets.unsqueeze(1)  # (N, 1), broadcast over heads
    kv[pages, 0, slots] = k
    kv[pages, 1, slots] = v


def gather_kv(kv: torch.Tensor, layer: int, meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of every cached token: two (B, H, max_blocks * page_tokens, head_dim) tensors."""
    table = meta.block_tables[:, :, layer, :]  # (B, MB, H)
    pages = kv[table]  # (B, MB, H, 2, T, D)
    b, mb, h, _, t, d = pages.shape
    pages = pages.permute(3, 0, 2, 1, 4, 5).reshape(2, b, h, mb * t, d)
    return pages[0], pages[1]


class TorchAttention(AttentionBackend):
    """Attention of one model over its view of the KV pool."""

    name = "torch"

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """q: (N, Hq, D); k, v: (N, H, D) -> (N, Hq, D)."""
        write_kv(self.kv, layer, k, v, meta)
        if meta.is_prefill:
            return self._prefill(q, k, v, meta)
        return self._decode(layer, q, meta)

    def _prefill(self, q, k, v, meta):
        group = self.num_heads // self.num_kv_heads
        out = torch.empty_like(q)
        starts = meta.cu_query_lens.tolist()
        for i in range(meta.num_seqs):
            s, e = starts[i], starts[i + 1]
            qs = q[s:e].transpose(0, 1)  # (Hq, n, D)
            ks = k[s:e].transpose(0, 1).repeat_interleave(group, dim=0)
            vs = v[s:e].transpose(0, 1).repeat_interleave(group, dim=0)
            o = F.scaled_dot_product_attention(qs.unsqueeze(0), ks.unsqueeze(0), vs.unsqueeze(0),
                                               is_causal=True, scale=self.scale)
            out[s:e] = o[0].transpose(0, 1)
        return out

    def _decode(self, layer, q, meta):
        keys, values = gather_kv(self.kv, layer, meta)  # (B, H, S, D)
        b, h, s, d = keys.shape
        group = self.num_heads // h
        qg = q.view(b, h, group, d).float()
        scores = torch.einsum("bhgd,bhsd->bhgs", qg, keys.float()) * self.scale
        positions = torch.arange(s, device=q.device)
        mask = positions.view(1, 1, 1, s) >= meta.seq_lens.view(b, 1, 1, 1)
        scores.masked_fill_(mask, float("-inf"))
        probs = scores.softmax(dim=-1)
        out = torch.einsum("bhgs,bhsd->bhgd", probs, values.float())
        return out.reshape(b, h * group, d).to(q.dtype)
