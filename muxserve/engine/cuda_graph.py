"""CUDA graphs of decode steps: the whole forward pass plus the logits, per padded batch size.

A decode step of B sequences replays the graph of the smallest captured size >= B. Its inputs
live in one static (4, size) int64 tensor per size, [token ids, positions, slots, seq_lens],
filled by a single host-to-device copy; rows past B are padding (slot -1, length 0), for which
the kernels write no KV and attend to nothing. The page tables are the runner's slot tables;
when they are reallocated (growth) every graph is dropped and recaptured on next use. Graphs
are captured lazily, the first time a size is needed, and share one memory pool.
"""

from __future__ import annotations

import torch

from muxserve.engine.attention import AttentionMetadata
from muxserve.engine.attention.page_table import PageTables

BATCH_SIZES = (1, 2, 4, 8, 12, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256)


def graph_sizes(max_batch: int) -> list[int]:
    sizes = [s for s in BATCH_SIZES if s < max_batch]
    if max_batch <= BATCH_SIZES[-1]:
        sizes.append(max_batch)
    return sizes


class DecodeGraphs:
    """Captured decode steps of one model (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, attention, tables: PageTables, device: torch.device, max_batch: int):
        self.model = model
        self.attention = attention
        self.tables = tables
        self.device = device
        self.sizes = graph_sizes(max_batch)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._pool = None
        self._version = tables.version

    def can_run(self, batch: int) -> bool:
        return bool(self.sizes) and 0 < batch <= self.sizes[-1]

    def padded(self, batch: int) -> int:
        return next(s for s in self.sizes if s >= batch)

    @property
    def captured(self) -> list[int]:
        return sorted(self._graphs)

    def capture_all(self) -> None:
        """Capture every size now (largest first, so smaller graphs reuse its pool memory)."""
        self._check_tables()
        for size in reversed(self.sizes):
            if size not in self._graphs:
                self._graphs[size] = self._capture(size)

    def run(self, host: torch.Tensor) -> torch.Tensor:
        """host: (4, B) int64 [ids, positions, slots, seq_lens] -> logits (B, vocab) float32."""
        b = host.shape[1]
        self._check_tables()
        size = self.padded(b)
        entry = self._graphs.get(size)
        if entry is None:
            entry = self._capture(size)
            self._graphs[size] = entry
        graph, static, logits, buf = entry
        buf[:, :b] = host
        if size > b:
            buf[:, b:] = 0
            buf[2, b:] = -1
        static.copy_(buf, non_blocking=True)
        graph.replay()
        return logits[:b]

    def _check_tables(self) -> None:
        if self.tables.version != self._version:  # the slot tables moved: graphs hold stale addresses
            self._graphs.clear()
            self._version = self.tables.version

    def _capture(self, size: int):
        static = torch.zeros(4, size, dtype=torch.int64, device=self.device)
        static[2] = -1  # all padding while warming up and capturing: no KV is written
        meta = AttentionMetadata(
            is_prefill=False, seq_lens=static[3], seq_lens_list=[0] * size,
            cu_query_lens=torch.arange(size + 1, dtype=torch.int64, device=self.device),
            block_tables=None, write_pages=None, write_offsets=None, page_tokens=self.tables.layout.page_tokens,
            slot_tables=self.tables.table, slot_ids=static[2], token_slots=static[2], positions=static[1],
            max_query_len=1, num_splits=self.attention.num_splits(size),
        )

        def forward() -> torch.Tensor:
            hidden = self.model(static[0], static[1], self.attention, meta)
            return self.model.compute_logits(hidden)

        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):  # warm up (Triton compiles here, not during capture)
            forward()
            forward()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = forward()
        if self._pool is None:
            self._pool = graph.pool()
        torch.cuda.synchronize(self.device)
        return graph, static, logits, torch.empty(4, size, dtype=torch.int64).pin_memory()
