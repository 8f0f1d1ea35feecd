"""Per-LLM KV quotas for ADBS: an initial split by rate, then periodic moves to hungry LLMs.

The pool is shared, so a quota limits only admission (running + executing sequences); going
past it physically is handled by preemption in the allocator. Quotas are kept in pages and
expressed to the scheduler in sequences of the average request length.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

HUNGRY_UTIL = 0.9  # an LLM using this much of its quota wants more
DONOR_UTIL = 0.95  # a donor keeps enough pages for this utilization
HISTORY = 500  # decode batch sizes remembered per LLM


@dataclass
class QuotaModel:
    """What the quota needs to know about one LLM."""

    name: str
    rate: float  # requests/s
    pages_per_block: int  # pages of one token block over all layers and kv-heads
    page_tokens: int

    def pages_per_seq(self, avg_seq_len: int) -> int:
        return math.ceil(avg_seq_len / self.page_tokens) * self.pages_per_block


@dataclass
class _State:
    model: QuotaModel
    pages: int
    batch_sizes: deque = field(default_factory=lambda: deque(maxlen=HISTORY))


class QuotaManager:
    def __init__(self, models: list[QuotaModel], total_pages: int, avg_seq_len: int, by_rate: bool = True):
        if not models:
            raise ValueError("QuotaManager needs at least one model")
        if avg_seq_len < 1:
            raise ValueError(f"avg_seq_len must be >= 1, got {avg_seq_len}")
        self.avg_seq_len = avg_seq_len
        # Share ∝ rate × pages per token (fixed quotas ignore rates: ∝ pages per token only).
        weights = [(m.rate if by_rate else 1.0) * m.pages_per_block / m.page_tokens for m in models]
        if sum(weights) <= 0:
            weights = [m.pages_per_block / m.page_tokens for m in models]
        total_weight = sum(weights)
        self._states = {
            m.name: _State(m, int(total_pages * w / total_weight)) for m, w in zip(models, weights)
        }

    def max_num_seqs(self, name: str) -> int:
        s = self._states[name]
        return max(1, s.pages // s.model.pages_per_seq(self.avg_seq_len))

    def pages(self, name: str) -> int:
        return self._states[name].pages

    def all_max_num_seqs(self) -> dict[str, int]:
        return {name: self.max_num_seqs(name) for name in self._states}

    def record_decode_batch(self, name: str, batch_size: int) -> None:
        self._states[name].batch_sizes.append(batch_size)

    def adapt(self, demand: dict[str, int]) -> dict[str, int]:
        """Move pages from under-used LLMs to hungry ones; ``demand`` = waiting + running per LLM.

        Returns the pages each LLM received (negative: gave away).
        """
        util, avg_bs = {}, {}
        for name, s in self._states.items():
            avg_bs[name] = sum(s.batch_sizes) / len(s.batch_sizes) if s.batch_sizes else 0.0
            util[name] = avg_bs[name] / self.max_num_seqs(name)
        hungry = sorted(
            (n for n in self._states if util[n] >= HUNGRY_UTIL and demand.get(n, 0) >= 1.1 * avg_bs[n]),
            key=lambda n: -util[n],
        )
        spare = {}
        for n, s in self._states.items():
            if util[n] < HUNGRY_UTIL:
                keep_seqs = math.ceil(DONOR_UTIL * avg_bs[n] / HUNGRY_UTIL) if avg_bs[n] else 1
                spare[n] = max(0, s.pages - max(1, keep_seqs) * s.model.pages_per_seq(self.avg_seq_len))
        moved = {n: 0 for n in self._states}
        for n in hungry:
            total_spare = sum(spare.values())
            if total_spare <= 0:
                break
            want_seqs = max(1, int(0.1 * avg_bs[n]), int(demand[n] - avg_bs[n]) // 2)
            want = min(total_spare, want_seqs * self._states[n].model.pages_per_seq(self.avg_seq_len))
            for donor in list(spare):
                give = min(spare[donor], math.ceil(want * spare[donor] / total_spare))
                spare[donor] -= give
                self._states[donor].pages -= give
                self._states[n].pages += give
                moved[donor] -= give
                moved[n] += give
        return moved
