"""Logical SM accounting in 10 % units, with a bounded oversubscription allowance.

Each runtime process runs under a fixed MPS percentage; a job of that process needs
``percentage // 10`` units. The scheduler starts jobs side by side while their units fit in
the 10 units of the GPU plus ``overload_threshold`` units that may be used twice.
"""

from __future__ import annotations

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
