"""CUDA graphs of decode steps: the whole forward pass, the logits and their argmax, per padded batch size.

A decode step of B sequences replays the graph of the smallest captured size >= B. The runner
writes the step's integers straight into a pinned (4, size) int64 host buffer through its numpy
view (``stage``): rows [token ids, positions, slots, seq_lens], no tensor built per step; one
host-to-device copy moves it into the graph's static input. Columns past B are padding (slot
-1, length 0), for which the kernels write no KV and attend to nothing. The page tables are the
runner's slot tables; when they are reallocated (growth) every graph is dropped and recaptured
on next use. Graphs are captured lazily, the first time a size is needed, and share one memory
pool.

Each graph ends with the float32 logits and their row-wise argmax (``greedy_tokens``, the op
``sample`` uses). A step whose sequences are all greedy copies only the B token ids back into a
pinned buffer and synchronizes once (``run(..., greedy=True)``); any other step samples from the
graph's logits.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from muxserve.engine.attention import AttentionMetadata
from muxserve.engine.attention.page_table import PageTables
from muxserve.engine.sampler import greedy_tokens

BATCH_SIZES = (1, 2, 4, 8, 12, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256)


def graph_sizes(max_batch: int) -> list[int]:
    sizes = [s for s in BATCH_SIZES if s < max_batch]
    if max_batch <= BATCH_SIZES[-1]:
        sizes.append(max_batch)
    return sizes


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    static: torch.Tensor  # (4, size) int64 on the device: the graph's input
    logits: torch.Tensor  # (size, vocab) float32
    tokens: torch.Tensor  # (size,) int64: argmax of each row of logits


@dataclass
class _Staging:
    """Pinned host buffers of one padded size, with numpy views for cheap writes and reads."""

    inputs: torch.Tensor  # (4, size) int64, pinned
    inputs_np: np.ndarray
    tokens: torch.Tensor  # (size,) int64, pinned: the graph's argmax ids come back here
    tokens_np: np.ndarray
    copied: torch.cuda.Event
    pending: bool = False  # ``copied`` marks a copy out of ``inputs`` that nobody waited for yet

    @classmethod
    def allocate(cls, size: int) -> _Staging:
        inputs = torch.zeros(4, size, dtype=torch.int64).pin_memory()
        tokens = torch.zeros(size, dtype=torch.int64).pin_memory()
        return cls(inputs, inputs.numpy(), tokens, tokens.numpy(), torch.cuda.Event())


class DecodeGraphs:
    """Captured decode steps of one model (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, attention, tables: PageTables, device: torch.device, max_batch: int):
        self.model = model
        self.attention = attention
        self.tables = tables
        self.device = device
        self.sizes = graph_sizes(max_batch)
        top = self.sizes[-1] if self.sizes else 0
        self._padded = [next((s for s in self.sizes if s >= b), 0) for b in range(top + 1)]  # batch -> size
        self._graphs: dict[int, _Graph] = {}
        self._staging: dict[int, _Staging] = {}
        self._pool = None
        self._version = tables.version

    def can_run(self, batch: int) -> bool:
        return bool(self.sizes) and 0 < batch <= self.sizes[-1]

    def padded(self, batch: int) -> int:
        return self._padded[batch]

    @property
    def captured(self) -> list[int]:
        return sorted(self._graphs)

    def capture_all(self) -> None:
        """Capture every size now (largest first, so smaller graphs reuse its pool memory)."""
        self._check_tables()
        for size in reversed(self.sizes):
            if size not in self._graphs:
                self._graphs[size] = self._capture(size)

    def stage(self, batch: int) -> np.ndarray:
        """The host inputs of the next step of ``batch`` sequences: a (4, padded size) int64 view.

        The caller fills columns ``[:batch]`` (rows: token ids, positions, slots, seq_lens), then
        calls ``run(batch, ...)``; the padding columns are set here.
        """
        size = self.padded(batch)
        staging = self._staging.get(size)
        if staging is None:
            staging = self._staging[size] = self._new_staging(size)
        elif staging.pending:  # the previous step's copy out of this buffer must be done
            staging.copied.synchronize()
            staging.pending = False
        inputs = staging.inputs_np
        if size > batch:
            inputs[:, batch:] = 0
            inputs[2, batch:] = -1
        return inputs

    def run(self, batch: int, greedy: bool, timer: StepTimer | None = None) -> list[int] | torch.Tensor:
        """Replay the graph on the inputs staged for ``batch`` sequences.

        greedy: the argmax token id of each of the ``batch`` rows, as Python ints (the step is
        synchronized). Otherwise: the logits (batch, vocab) float32, still being computed.
        """
        self._check_tables()
        size = self.padded(batch)
        entry = self._graphs.get(size)
        if entry is None:
            entry = self._graphs[size] = self._capture(size)
        staging = self._staging[size]
        entry.static.copy_(staging.inputs, non_blocking=True)
        if timer is None:
            entry.graph.replay()
        else:
            timer.replay(entry.graph, self.device)
        if not greedy:
            staging.copied.record(self._stream())
            staging.pending = True
            return entry.logits[:batch]
        staging.tokens.copy_(entry.tokens, non_blocking=True)
        self._stream().synchronize()
        return staging.tokens_np[:batch].tolist()

    def _check_tables(self) -> None:
        if self.tables.version != self._version:  # the slot tables moved: graphs hold stale addresses
            self._graphs.clear()
            self._version = self.tables.version

    def _capture(self, size: int) -> _Graph:
        static, meta = self._graph_inputs(size)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):  # warm up (Triton compiles here, not during capture)
            self._forward(static, meta)
            self._forward(static, meta)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits, tokens = self._forward(static, meta)
        if self._pool is None:
            self._pool = graph.pool()
        torch.cuda.synchronize(self.device)
        return _Graph(graph, static, logits, tokens)

    def _graph_inputs(self, size: int) -> tuple[torch.Tensor, AttentionMetadata]:
        """The static (4, size) input of a graph, all padding, and the metadata viewing it."""
        static = torch.zeros(4, size, dtype=torch.int64, device=self.device)
        static[2] = -1  # all padding while warming up and capturing: no KV is written
        meta = AttentionMetadata(
            is_prefill=False, seq_lens=static[3], seq_lens_list=[0] * size,
            cu_query_lens=torch.arange(size + 1, dtype=torch.int64, device=self.device),
            block_tables=None, write_pages=None, write_offsets=None, page_tokens=self.tables.layout.page_tokens,
            slot_tables=self.tables.table, slot_ids=static[2], token_slots=static[2], positions=static[1],
            max_query_len=1, num_splits=self.attention.num_splits(size),
        )
        return static, meta

    def _forward(self, static: torch.Tensor, meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """What a graph runs: (logits (size, vocab) float32, their argmax (size,) int64)."""
        hidden = self.model(static[0], static[1], self.attention, meta)
        logits = self.model.compute_logits(hidden)
        return logits, greedy_tokens(logits)

    def _new_staging(self, size: int) -> _Staging:
        return _Staging.allocate(size)

    def _stream(self) -> torch.cuda.Stream:
        return torch.cuda.current_stream(self.device)


@dataclass
class StepTimer:
    """Splits the decode steps that replay a graph into host preparation, graph and the rest.

    Set as ``ModelRunner.step_timer`` (CUDA only); every such step appends one record (seconds):

    - ``prep_s``: from the start of ``ModelRunner.step`` to just before ``graph.replay()``: page
      table update, staging the inputs, launching their copy (the GPU idles meanwhile);
    - ``replay_gpu_s``: GPU time of ``graph.replay()`` alone (CUDA events right around it);
    - ``launch_s``: host time of the ``replay()`` call (overlaps the graph);
    - ``sample_s``: ``wall_s - prep_s - replay_gpu_s``: what the step adds after the graph,
      i.e. copying the token ids back (or sampling from the logits), the synchronization, the
      Python ints, plus any gap before the graph starts on the GPU;
    - ``wall_s``: the whole ``ModelRunner.step`` call.

    The events add a few microseconds to a step; time the plain wall clock without a timer.
    """

    records: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._before = torch.cuda.Event(enable_timing=True)
        self._after = torch.cuda.Event(enable_timing=True)
        self._t0 = self._t1 = self._t2 = 0.0

    def begin(self) -> None:
        self._t0 = time.perf_counter()

    def replay(self, graph: torch.cuda.CUDAGraph, device: torch.device) -> None:
        self._t1 = time.perf_counter()
        stream = torch.cuda.current_stream(device)
        self._before.record(stream)
        graph.replay()
        self._after.record(stream)
        self._t2 = time.perf_counter()

    def end(self, batch: int) -> None:
        t3 = time.perf_counter()
        self._after.synchronize()  # a no-op after a greedy step; sampling's .tolist() waited too
        gpu = self._before.elapsed_time(self._after) / 1e3
        wall = t3 - self._t0
        prep = self._t1 - self._t0
        self.records.append({"batch": batch, "prep_s": prep, "replay_gpu_s": gpu, "launch_s": self._t2 - self._t1,
                             "sample_s": wall - prep - gpu, "wall_s": wall})
