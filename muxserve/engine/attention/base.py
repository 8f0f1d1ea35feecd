"""The attention backend interface: what every backend does, and what it asks of the runner and the model."""

from __future__ import annotations

import abc

import torch

from muxserve.engine.attention.metadata import AttentionMetadata


class AttentionBackend(abc.ABC):
    """Attention of one model over its view of the KV pool (kv: (num_pages, 2, page_tokens, head_dim)).

    A backend writes the K/V of a step's new tokens into their pages and attends over every cached
    token. Its class attributes tell the others what it needs:

    * ``needs_block_tables``: the runner builds ``meta.block_tables``/``write_pages`` (per-step
      (B, max_blocks, L, H) tables); without, the backend reads the runner's slot tables.
    * ``fuses_rotary``: the model hands q and k before rotary; ``forward_rotary`` applies it
      together with the page write.
    * ``supports_cuda_graphs``: decode steps may be captured and replayed (``cuda_graph``).
    """

    name: str = ""
    needs_block_tables: bool = True
    fuses_rotary: bool = False
    supports_cuda_graphs: bool = False

    def __init__(self, kv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int):
        self.kv = kv
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5

    @abc.abstractmethod
    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """q: (N, Hq, D); k, v: (N, H, D), already rotated -> (N, Hq, D)."""

    def forward_rotary(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       positions: torch.Tensor, rotary, meta: AttentionMetadata) -> torch.Tensor:
        """Like ``forward`` with q, k not rotated yet (backends with ``fuses_rotary``)."""
        raise NotImplementedError(f"the {self.name} attention backend does not fuse rotary embeddings")

    def num_splits(self, batch: int) -> int:
        """Context splits per sequence of a decode step of ``batch`` sequences (0: not split)."""
        return 0
