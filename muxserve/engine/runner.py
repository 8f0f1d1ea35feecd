"""Turns a batch of sequences into tensors, runs one prefill or decode step, samples."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from muxserve.engine.attention import AttentionBackend, AttentionMetadata
from muxserve.engine.attention.page_table import PageTables
from muxserve.engine.kv_cache import KVLayout
from muxserve.engine.logprobs import TokenLogprobs, logits_rows, prompt_logprobs, token_logprobs
from muxserve.engine.parallel import SINGLE, TensorParallel
from muxserve.engine.sampler import sample
from muxserve.engine.sampling_params import SamplingParams
from muxserve.engine.structured import GuidedMatcher, fill_bitmask
from muxserve.ipc.runtime import Phase


def _spans(sizes: list[int]) -> list[tuple[int, int]]:
    """(start, length) of each part in a packed int64 buffer, every part at an even index
    (16-byte aligned)."""
    spans, start = [], 0
    for n in sizes:
        spans.append((start, n))
        start += n + (n & 1)
    return spans


class StepSequence(Protocol):
    """What a step reads of a sequence: an engine ``Sequence``, or a runtime's entry of a job."""

    req_id: str  # keys the sequence's device page table
    pages: list[int]
    params: SamplingParams

    @property
    def token_ids(self) -> list[int]: ...  # a prefill computes all of them

    @property
    def last_token_id(self) -> int: ...  # a decode step feeds this one

    @property
    def num_tokens(self) -> int: ...  # context length after this step

    @property
    def step_seed(self) -> int | None: ...

    @property
    def num_output_tokens(self) -> int: ...  # generated so far (0: a prefill scores the prompt for echo)

    # Optional: ``matcher`` (a ``structured.GuidedMatcher`` at the tokens generated so far), read
    # with getattr; absent or None: the sequence is not constrained.


@dataclass
class StepOutput:
    """What one step gives each sequence: its token and, where asked, the rest (else None).

    ``logprobs[i]``: the log-probability of token i and its alternatives; ``prompt_logprobs[i]``:
    a prefill's scores of the prompt (``echo``); ``grammar_done[i]``: sequence i's grammar is
    complete once it took token i (structured output: it ends with ``stop``).
    """

    tokens: list[int]
    logprobs: list[TokenLogprobs | None] | None = None
    prompt_logprobs: list[list[TokenLogprobs | None] | None] | None = None
    grammar_done: list[bool] | None = None


def _wants_prompt_logprobs(s) -> bool:
    return s.params.prompt_logprobs is not None and s.num_output_tokens == 0


def apply_logit_bias(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """``logits`` plus each row's ``logit_bias`` (a new tensor; the same one when no row has any)."""
    rows, cols, values = [], [], []
    vocab = logits.shape[1]
    for i, p in enumerate(params):
        for token, bias in (p.logit_bias or {}).items():
            if token < vocab:
                rows.append(i)
                cols.append(token)
                values.append(float(bias))
    if not rows:
        return logits
    index = torch.tensor([rows, cols], dtype=torch.int64).to(logits.device, non_blocking=True)
    bias = torch.tensor(values, dtype=logits.dtype).to(logits.device, non_blocking=True)
    return logits.index_put((index[0], index[1]), bias, accumulate=True)


class ModelRunner:
    """Owns the device tensors of one model: its weights and its view of the KV pool.

    Page tables live on the device (``PageTables``) and grow by the pages each step adds. With
    ``cuda_graphs`` (CUDA and a backend that supports it), decode steps of up to
    ``max_num_seqs`` sequences replay captured graphs padded to a few batch sizes.

    Under tensor parallelism (``parallel``) every rank steps the same batch; rank 0's sampled
    tokens are broadcast so the ranks never diverge.

    A graph decode step whose sequences are all greedy takes the argmax computed inside the graph
    (``graph_argmax``; off: ``sample`` on the graph's logits, the same tokens). ``step_timer``
    (a ``cuda_graph.StepTimer``) splits graph decode steps into host preparation, replay and
    sampling.
    """

    def __init__(self, model: torch.nn.Module, layout: KVLayout, attention: AttentionBackend, device: torch.device, *,
                 max_num_seqs: int = 256, max_model_len: int | None = None, cuda_graphs: bool = False,
                 parallel: TensorParallel | None = None):
        self.model = model
        self.parallel = parallel or SINGLE
        self.layout = layout
        self._page_tokens = layout.page_tokens  # a computed property: read it once
        self.attention = attention
        self.device = torch.device(device)
        if attention.name == "triton" and hasattr(model, "fused_ops"):
            model.fused_ops = True  # Triton RMSNorm, residual add, SiLU*mul and small-batch GEMMs
        max_tokens = max_model_len or getattr(getattr(model, "spec", None), "max_position_embeddings", 4096)
        self.tables = PageTables.for_limits(layout, self.device, max_num_seqs, max_tokens)
        self._needs_block_tables = attention.needs_block_tables
        self.graphs = None
        self.graph_argmax = True
        self.step_timer = None
        if cuda_graphs and self.device.type == "cuda" and attention.supports_cuda_graphs:
            from muxserve.engine.cuda_graph import DecodeGraphs

            self.graphs = DecodeGraphs(model, attention, self.tables, self.device, max_num_seqs)

    def release(self, req_ids) -> None:
        """Drop the page tables of finished or aborted sequences."""
        self.tables.release(req_ids)

    def step(self, seqs: list[StepSequence], phase: Phase) -> list[int]:
        """Run one prefill or decode step over ``seqs`` (their pages already allocated); one token each."""
        return self.execute(seqs, phase).tokens

    @torch.inference_mode()
    def execute(self, seqs: list[StepSequence], phase: Phase) -> StepOutput:
        """``step`` with everything a request may ask for besides its token: log-probabilities
        (of the raw logits, before bias, temperature and masks), its prompt's (a first prefill),
        a logit bias and a grammar (each constrained row's mask is applied before sampling, and
        the sampled token is taken by its matcher)."""
        is_prefill = phase is Phase.PREFILL
        params = [s.params for s in seqs]
        matchers: list[GuidedMatcher | None] = [getattr(s, "matcher", None) for s in seqs]
        constrained = any(m is not None for m in matchers)
        plain = not constrained and all(p.logprobs is None and not p.logit_bias for p in params)
        prompt = None
        if not is_prefill and self.graphs is not None and self.graphs.can_run(len(seqs)):
            if plain:
                return StepOutput(self._broadcast(self._graph_decode(seqs)))
            logits = self._graph_logits(seqs)  # no argmax shortcut: rows need logits or a mask
        else:
            input_ids, positions, meta, last_index = self._prepare(seqs, is_prefill)
            hidden = self.model(input_ids, positions, self.attention, meta)  # (N, hidden)
            wants = [is_prefill and _wants_prompt_logprobs(s) for s in seqs]
            if any(wants):
                indices, spans = logits_rows(meta.seq_lens_list, wants)
                rows = self.model.compute_logits(hidden[torch.tensor(indices, device=hidden.device)])
                last = torch.tensor([a + n - 1 for a, n in spans], device=rows.device)
                logits = rows.index_select(0, last)
                prompt = [prompt_logprobs(rows[a:a + n], s.token_ids, s.params.prompt_logprobs) if w else None
                          for s, w, (a, n) in zip(seqs, wants, spans)]
            else:
                logits = self.model.compute_logits(hidden[last_index])  # (B, vocab)
        seeds = [s.step_seed for s in seqs]
        if plain:
            return StepOutput(self._broadcast(sample(logits, params, seeds)), prompt_logprobs=prompt)
        bitmask = fill_bitmask(matchers, logits.shape[1]) if constrained else None
        tokens = self._broadcast(sample(apply_logit_bias(logits, params), params, seeds, bitmask=bitmask))
        out = StepOutput(tokens, prompt_logprobs=prompt)
        if any(p.logprobs is not None for p in params):
            out.logprobs = token_logprobs(logits, tokens, [p.logprobs for p in params])
        if constrained:
            for m, t in zip(matchers, tokens):
                if m is not None:
                    m.accept(t)
            out.grammar_done = [m is not None and m.finished for m in matchers]
        return out

    def _broadcast(self, tokens: list[int]) -> list[int]:
        return self.parallel.broadcast_tokens(tokens) if self.parallel.enabled else tokens

    def _graph_logits(self, seqs) -> torch.Tensor:
        """A graph decode step's logits (B, vocab), without the in-graph argmax."""
        self._stage_decode(seqs, self.graphs.stage(len(seqs)))
        return self.graphs.run(len(seqs), False)

    def _graph_decode(self, seqs) -> list[int]:
        timer = self.step_timer
        if timer is not None:
            timer.begin()
        batch = len(seqs)
        self._stage_decode(seqs, self.graphs.stage(batch))
        greedy = self.graph_argmax and all(s.params.greedy for s in seqs)
        out = self.graphs.run(batch, greedy, timer)
        tokens = out if greedy else sample(out, [s.params for s in seqs], [s.step_seed for s in seqs])
        if timer is not None:
            timer.end(batch)
        return tokens

    def _stage_decode(self, seqs, out: np.ndarray) -> None:
        """Update the page tables; write a decode step's integers into ``out[:, :B]`` (int64).

        Rows: [last token ids, positions, slots, seq_lens]; straight from Python lists into the
        array, no tensor built.
        """
        b = len(seqs)
        T = self._page_tokens
        seq_lens = [s.num_tokens for s in seqs]
        out[2, :b] = self.tables.update([s.req_id for s in seqs], [s.pages for s in seqs],
                                        [-(-n // T) for n in seq_lens])
        out[3, :b] = seq_lens
        np.subtract(out[3, :b], 1, out=out[1, :b])
        out[0, :b] = [s.last_token_id for s in seqs]

    def _host_inputs(self, seqs, is_prefill: bool):
        """Update the page tables; pack the step's integers into one host tensor.

        Returns (host, spans). Rows of ``host`` (int64): for decode a (4, B) block
        [token ids, positions, slots, seq_lens] (B rounded up to even; spans None); for prefill
        the flat concatenation [tokens (N), positions (N), token slots (N), seq_lens (B),
        slots (B), cu (B+1), last (B)], each part starting at an even index, at ``spans``
        ((start, length) per part).

        Every part starts 16 bytes aligned whatever N and B are: Triton specializes its kernels
        on the alignment of each pointer, and a part at an odd offset compiled a second variant of
        the prefill kernels during the first requests of a fresh machine (about a second each).
        """
        if not is_prefill:
            b = len(seqs)
            host = np.zeros((4, b + (b & 1)), dtype=np.int64)
            self._stage_decode(seqs, host)
            return torch.from_numpy(host), None
        T = self._page_tokens
        seq_lens = [s.num_tokens for s in seqs]
        num_blocks = [-(-n // T) for n in seq_lens]
        slots = self.tables.update([s.req_id for s in seqs], [s.pages for s in seqs], num_blocks)
        lens = torch.tensor(seq_lens, dtype=torch.int64)
        slot_t = torch.tensor(slots, dtype=torch.int64)
        tokens: list[int] = []
        for s in seqs:
            tokens.extend(s.token_ids)
        cu = torch.zeros(len(seqs) + 1, dtype=torch.int64)
        torch.cumsum(lens, 0, out=cu[1:])
        positions = torch.arange(len(tokens), dtype=torch.int64) - torch.repeat_interleave(cu[:-1], lens)
        token_slots = torch.repeat_interleave(slot_t, lens)
        parts = [torch.from_numpy(np.array(tokens, dtype=np.int64)), positions, token_slots, lens, slot_t, cu,
                 cu[1:] - 1]
        spans = _spans([p.numel() for p in parts])
        host = torch.zeros(sum(spans[-1]), dtype=torch.int64)  # up to the end of the last part
        for part, (start, n) in zip(parts, spans):
            host[start:start + n] = part
        return host, spans

    def _to_device(self, host: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cpu":
            return host
        return host.pin_memory().to(self.device, non_blocking=True)

    def _prepare(self, seqs: list[StepSequence], is_prefill: bool):
        T = self._page_tokens
        B = len(seqs)
        host, spans = self._host_inputs(seqs, is_prefill)
        dev = self._to_device(host)
        seq_lens_list = [s.num_tokens for s in seqs]
        if is_prefill:
            input_ids, positions, token_slots, seq_lens, slot_ids, cu, last_index = (
                dev[start:start + n] for start, n in spans)
            query_lens = seq_lens_list
            host_positions, host_slots = (host[start:start + n] for start, n in (spans[1], spans[4]))
        else:
            input_ids, positions, slot_ids, seq_lens = dev[0, :B], dev[1, :B], dev[2, :B], dev[3, :B]
            token_slots = slot_ids
            cu = torch.arange(B + 1, dtype=torch.int64, device=self.device)
            last_index = cu[:-1]
            query_lens = [1] * B
            host_positions, host_slots = host[1, :B], host[2, :B]
        block_tables = write_pages = write_offsets = None
        if self._needs_block_tables:
            slots = host_slots.tolist()
            block_tables = self.tables.gather(slots, -(-max(seq_lens_list) // T))  # (B, MB, L, H)
            seq_index = torch.repeat_interleave(torch.arange(B), torch.tensor(query_lens)).to(self.device)
            blocks = (host_positions // T).to(self.device)
            write_pages = block_tables[seq_index, blocks].permute(1, 0, 2).contiguous()  # (L, N, H)
            write_offsets = positions % T
        meta = AttentionMetadata(
            is_prefill=is_prefill,
            seq_lens=seq_lens,
            seq_lens_list=seq_lens_list,
            cu_query_lens=cu,
            block_tables=block_tables,
            write_pages=write_pages,
            write_offsets=write_offsets,
            page_tokens=T,
            slot_tables=self.tables.table,
            slot_ids=slot_ids,
            token_slots=token_slots,
            positions=positions,
            max_query_len=max(query_lens, default=0),
        )
        return input_ids, positions, meta, last_index
