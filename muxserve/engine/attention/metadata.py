"""Per-step attention inputs built by the runner from sequences and their page tables."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """Everything attention needs for one prefill or decode step of one model.

    Prefill runs on whole prompts (no cached prefix): ``query_lens == seq_lens``.
    Decode runs one new token per sequence: ``query_lens`` are all 1.

    Two views of the page tables: the torch reference reads ``block_tables``/``write_pages``
    (built only for backends that ask for them); the Triton kernels read the runner's slot
    tables (``slot_tables`` indexed by ``slot_ids``/``token_slots``), which stay on the device
    and grow incrementally. A negative slot marks batch padding (CUDA graphs): nothing is
    written for it and its ``seq_lens`` entry is 0.
    """

    is_prefill: bool
    seq_lens: torch.Tensor  # (B,) int64: tokens of each sequence after this step
    seq_lens_list: list[int]  # the same on the host, for per-sequence loops
    cu_query_lens: torch.Tensor  # (B + 1,) int64: prefix sums of new tokens per sequence
    block_tables: torch.Tensor | None  # (B, max_blocks, L, H) int64: page ids, padded with 0
    write_pages: torch.Tensor | None  # (L, N, H) int64: page that receives each new token's K/V
    write_offsets: torch.Tensor | None  # (N,) int64: slot of each new token inside its page
    page_tokens: int
    slot_tables: torch.Tensor | None = None  # (S, max_blocks, L*H) int32: page ids per slot
    slot_ids: torch.Tensor | None = None  # (B,) int64: the slot of each sequence
    token_slots: torch.Tensor | None = None  # (N,) int64: the slot of each new token
    positions: torch.Tensor | None = None  # (N,) int64: position of each new token
    max_query_len: int = 0
    num_splits: int = 0  # decode: context splits per sequence (0: the backend chooses)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_list)
