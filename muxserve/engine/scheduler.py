"""Continuous batching for one model in one process: prefill first, then decode everything running."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from muxserve.engine.kv_cache import PageAllocator
from muxserve.engine.sequence import Sequence, SequenceStatus
from muxserve.ipc.runtime import Phase


@dataclass
class ScheduledStep:
    seqs: list[Sequence]
    phase: Phase


class Scheduler:
    """Admits waiting requests while pages and the token budget allow; preempts the newest on shortage."""

    def __init__(self, allocator: PageAllocator, model: str, max_num_seqs: int, max_num_batched_tokens: int):
        self.allocator = allocator
        self.model = model
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # oldest first, so preemption takes the newest
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledStep | None:
        prefill = self._schedule_prefill()
        if prefill:
            return ScheduledStep(prefill, Phase.PREFILL)
        if self.running:
            decode = self._schedule_decode()
            if decode:
                return ScheduledStep(decode, Phase.DECODE)
        return None  # nothing to run, or every running sequence was preempted: skip the step

    def _schedule_prefill(self) -> list[Sequence]:
        batch: list[Sequence] = []
        budget = self.max_num_batched_tokens
        while self.waiting and len(self.running) + len(batch) < self.max_num_seqs:
            seq = self.waiting[0]
            if batch and seq.num_tokens > budget:
                break
            request = [(seq.req_id, seq.num_tokens)]
            if not self.allocator.can_allocate(self.model, request):
                break
            seq.pages.extend(self.allocator.allocate(self.model, request).new_pages[seq.req_id])
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            batch.append(seq)
            budget -= seq.num_tokens
        self.running.extend(batch)
        return batch

    def _schedule_decode(self) -> list[Sequence]:
        # Each running sequence needs room for the token it feeds back in this step.
        result = self.allocator.allocate(self.model, [(s.req_id, s.num_tokens) for s in self.running])
        by_id = {s.req_id: s for s in self.running}
        for req_id in reversed(result.preempted):  # back to the head of the queue, in order
            seq = by_id[req_id]
            self.running.remove(seq)
            seq.reset_for_recompute()
            self.waiting.appendleft(seq)
            self.num_preemptions += 1
        for req_id, pages in result.new_pages.items():
            by_id[req_id].pages.extend(pages)
        return list(self.running)

    def finish_step(self, step: ScheduledStep, tokens: list[int],
                    grammar_done: list[bool] | None = None) -> list[Sequence]:
        """Apply sampled tokens; free and return the sequences that finished."""
        finished = []
        for i, (seq, token) in enumerate(zip(step.seqs, tokens)):
            seq.append_token(token, bool(grammar_done and grammar_done[i]))
            if seq.is_finished:
                finished.append(seq)
        if finished:
            self.allocator.free(self.model, [s.req_id for s in finished])
            done = {id(s) for s in finished}
            self.running = [s for s in self.running if id(s) not in done]
            for s in finished:
                s.pages = []
        return finished
