"""Turns a batch of sequences into tensors, runs one prefill or decode step, samples."""

from __future__ import annotations

import torch

from muxserve.engine.attention import AttentionMetadata
from muxserve.engine.kv_cache import KVLayout
from muxserve.engine.sampler import sample
from muxserve.engine.sequence import Sequence


class ModelRunner:
    """Owns the device tensors of one model: its weights and its view of the KV pool."""

    def __init__(self, model: torch.nn.Module, layout: KVLayout, attention, device: torch.device):
        self.model = model
        self.layout = layout
        self.attention = attention
        self.device = device

    @torch.inference_mode()
    def step(self, seqs: list[Sequence], is_prefill: bool) -> list[int]:
        """Run one step over ``seqs`` (their pages already allocated) and return one token each."""
        input_ids, positions, meta, last_index = self._prepare(seqs, is_prefill)
        hidden = self.model(input_ids, positions, self.attention, meta)  # (N, hidden)
        logits = self.model.compute_logits(hidden[last_index])  # (B, vocab)
        return sample(logits, [s.params for s in seqs], [s.generator for s in seqs])

    def _prepare(self, seqs: list[Sequence], is_prefill: bool):
        layout = self.layout
        T, L, H = layout.page_tokens, layout.num_layers, layout.num_kv_heads
        tokens: list[int] = []
        positions: list[int] = []
        query_lens: list[int] = []
        seq_lens = [s.num_tokens for s in seqs]
        for s in seqs:
            if is_prefill:
                tokens.extend(s.token_ids)
                positions.extend(range(s.num_tokens))
                query_lens.append(s.num_tokens)
            else:
                tokens.append(s.token_ids[-1])
                positions.append(s.num_tokens - 1)
                query_lens.append(1)
        num_blocks = [layout.num_blocks(n) for n in seq_lens]
        for s, nb in zip(seqs, num_blocks):
            if len(s.pages) < nb * layout.pages_per_block:
                raise RuntimeError(f"sequence {s.seq_id} holds {len(s.pages)} pages, needs {nb * layout.pages_per_block}")
        tables = torch.zeros(len(seqs), max(num_blocks), L, H, dtype=torch.int64)  # (B, MB, L, H)
        for i, (s, nb) in enumerate(zip(seqs, num_blocks)):
            tables[i, :nb] = torch.tensor(s.pages[: nb * L * H], dtype=torch.int64).view(nb, L, H)
        pos = torch.tensor(positions, dtype=torch.int64)
        seq_index = torch.repeat_interleave(torch.arange(len(seqs)), torch.tensor(query_lens))
        write_pages = tables[seq_index, pos // T].permute(1, 0, 2)  # (L, N, H)
        cu = torch.zeros(len(seqs) + 1, dtype=torch.int64)
        cu[1:] = torch.tensor(query_lens).cumsum(0)
        dev = self.device
        meta = AttentionMetadata(
            is_prefill=is_prefill,
            seq_lens=torch.tensor(seq_lens, dtype=torch.int64, device=dev),
            seq_lens_list=seq_lens,
            cu_query_lens=cu.to(dev),
            block_tables=tables.to(dev),
            write_pages=write_pages.contiguous().to(dev),
            write_offsets=(pos % T).to(dev),
            page_tokens=T,
        )
        last_index = (cu[1:] - 1).to(dev)
        return torch.tensor(tokens, dtype=torch.int64, device=dev), pos.to(dev), meta, last_index
