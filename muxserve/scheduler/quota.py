"""What each LLM may take: its KV quota (ADBS: an initial split by rate, then periodic moves to
hungry LLMs) and SM units of the GPU.

The pool is shared, so a quota limits only admission (running + executing sequences); going
past it physically is handled by preemption in the allocator. Quotas are kept in pages and
expressed to the scheduler in sequences of the average request length.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

HUNGRY_UTIL = 0.9  # an LLM using this much of its quota wants more
DONOR_UTIL = 0.95  # a donor gives away what lies between its use and 95 % of its quota
HISTORY = 500  # decode batch sizes remembered per LLM
DEFAULT_AVG_BS = 30  # assumed decode batch size of an LLM without history (as the original)


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

    def adapt(self, demand: dict[str, int], saturated: set[str] | frozenset[str] = frozenset()) -> dict[str, int]:
        """Move pages from under-used LLMs to hungry ones, as the original every 8 s.

        ``demand`` = waiting + running requests per LLM. With ``avg_bs`` the mean of the last
        decode batch sizes (DEFAULT_AVG_BS without history) and ``util = avg_bs / quota``:
        an LLM with util >= 0.9 and demand >= 1.1 avg_bs is hungry and asks for
        ``min(max(1, int(0.1 avg_bs)), int(demand - avg_bs))`` sequences; an LLM with util < 0.9
        can give ``int(max(1, (0.95 - util) quota))`` sequences (keeping at least one), shared
        out in proportion to what each donor can give. Returns the pages each LLM received.

        ``saturated`` (not in the paper): LLMs whose admission is at their quota with requests
        waiting. Their decode batches can stay under 90 % of the quota (the mean is over the last
        500 batches, and requests inside prefill jobs are not in a decode batch), so under the
        paper's rule they may never be hungry, or even donate, while their queues grow. Each one
        is hungry (first, most waiting first), gives nothing, and asks for all it misses,
        ``demand - quota`` sequences, within what the donors can give.
        """
        util, avg_bs, quota = {}, {}, {}
        for name, s in self._states.items():
            avg_bs[name] = sum(s.batch_sizes) / len(s.batch_sizes) if s.batch_sizes else DEFAULT_AVG_BS
            quota[name] = self.max_num_seqs(name)
            util[name] = avg_bs[name] / quota[name]
        spare = {}
        for n, s in self._states.items():
            if util[n] < HUNGRY_UTIL and n not in saturated:
                pps = s.model.pages_per_seq(self.avg_seq_len)
                can_give = int(max(1, (DONOR_UTIL - util[n]) * quota[n])) * pps
                spare[n] = max(0, min(can_give, s.pages - pps))
        hungry = sorted((n for n in self._states if util[n] >= HUNGRY_UTIL and demand.get(n, 0) >= 1.1 * avg_bs[n]
                         and n not in saturated), key=lambda n: -util[n])
        starved = sorted((n for n in saturated if demand.get(n, 0) > quota[n]), key=lambda n: quota[n] - demand[n])
        excess = {n: demand[n] - quota[n] for n in starved}
        moved = {n: 0 for n in self._states}
        for n in starved + hungry:
            total_spare = sum(spare.values())
            if total_spare <= 0:
                break
            want_seqs = excess[n] if n in excess else min(max(1, int(0.1 * avg_bs[n])), int(demand[n] - avg_bs[n]))
            want = min(total_spare, want_seqs * self._states[n].model.pages_per_seq(self.avg_seq_len))
            shares = {d: want * spare[d] // total_spare for d in spare}
            # Whole pages: the remainder of the proportional split comes from the largest donor.
            shares[max(spare, key=spare.get)] += want - sum(shares.values())
            for donor, give in shares.items():
                spare[donor] -= give
                self._states[donor].pages -= give
                self._states[n].pages += give
                moved[donor] -= give
                moved[n] += give
        return moved


# -- SM units ---------------------------------------------------------------------------------
# Logical SM accounting in 10 % units, with a bounded oversubscription allowance.
#
# Each runtime process runs under a fixed MPS percentage; a job of that process needs
# ``percentage // 10`` units. The scheduler starts jobs side by side while their units fit in
# the 10 units of the GPU plus ``overload_threshold`` units that may be used twice.

NUM_UNITS = 10


def units_for(percentage: int) -> int:
    """Units a job at this MPS percentage holds (at least one)."""
    return max(1, percentage // 10)


class SMResource:
    def __init__(self, overload_threshold: int):
        if overload_threshold < 0:
            raise ValueError(f"overload_threshold must be >= 0, got {overload_threshold}")
        self.overload_threshold = overload_threshold
        self.refs = [0] * NUM_UNITS  # jobs using each unit: 0 free, 1 busy, 2 overloaded

    @property
    def num_free(self) -> int:
        return self.refs.count(0)

    @property
    def num_overloaded(self) -> int:
        return sum(1 for r in self.refs if r >= 2)

    def can_allocate(self, units: int) -> bool:
        shareable = min(self.overload_threshold - self.num_overloaded, self.refs.count(1))
        return units <= self.num_free + max(0, shareable)

    def allocate(self, units: int) -> list[int]:
        """Take free units first, then share busy ones; returns the unit indices held."""
        if not self.can_allocate(units):
            raise RuntimeError(f"cannot allocate {units} SM units (free {self.num_free}, "
                               f"overloaded {self.num_overloaded}/{self.overload_threshold})")
        taken = [i for i, r in enumerate(self.refs) if r == 0][:units]
        taken += [i for i, r in enumerate(self.refs) if r == 1][: units - len(taken)]
        for i in taken:
            self.refs[i] += 1
        return taken

    def release(self, units: list[int]) -> None:
        for i in units:
            if self.refs[i] <= 0:
                raise RuntimeError(f"SM unit {i} released more often than allocated")
            self.refs[i] -= 1
