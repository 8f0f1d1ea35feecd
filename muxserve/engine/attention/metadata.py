"""Per-step attention inputs built by the runner from sequences and their page tables."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """Everything attention needs for one prefill or decode step of one model.

    Prefill runs on whole prompts (no cached prefix): ``query_lens == seq_lens``.
    Decode runs one new token per sequence: ``query_lens`` are all 1.
    """

    is_prefill: bool
    seq_lens: torch.Tensor  # (B,) int64: tokens of each sequence after this step
    seq_lens_list: list[int]  # the same on the host, for per-sequence loops
    cu_query_lens: torch.Tensor  # (B + 1,) int64: prefix sums of new tokens per sequence
    block_tables: torch.Tensor  # (B, max_blocks, L, H) int64: page ids, padded with 0
    write_pages: torch.Tensor  # (L, N, H) int64: page that receives each new token's K/V
    write_offsets: torch.Tensor  # (N,) int64: slot of each new token inside its page
    page_tokens: int

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_list)
