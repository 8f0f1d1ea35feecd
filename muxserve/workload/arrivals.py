"""Arrival processes (as in the original, after AlpaServe): gaps between requests are i.i.d.

* ``poisson``: exponential gaps of mean 1/rate (a Gamma process with cv 1);
* ``gamma``: Gamma gaps with shape 1/cv² and scale cv²/rate (mean 1/rate, coefficient of variation cv);
* ``uniform``: every gap is exactly 1/rate.

The first request arrives one gap after ``start``.
"""

from __future__ import annotations

import msgspec
import numpy as np

DISTRIBUTIONS = ("poisson", "gamma", "uniform")


class ArrivalProcess(msgspec.Struct, frozen=True):
    distribution: str
    rate: float  # requests/s
    cv: float = 1.0

    def __post_init__(self) -> None:
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(f"unknown arrival distribution {self.distribution!r}; choose from {DISTRIBUTIONS}")
        if not self.rate > 0:
            raise ValueError(f"arrival rate must be > 0, got {self.rate!r}")
        if not self.cv > 0:
            raise ValueError(f"cv must be > 0, got {self.cv!r}")

    def gaps(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if self.distribution == "uniform":
            return np.full(n, 1.0 / self.rate)
        if self.distribution == "poisson":
            return rng.exponential(1.0 / self.rate, n)
        shape = 1.0 / self.cv**2
        return rng.gamma(shape, self.cv**2 / self.rate, n)

    def by_count(self, rng: np.random.Generator, n: int, start: float = 0.0) -> np.ndarray:
        """Exactly ``n`` arrival times."""
        return start + np.cumsum(self.gaps(rng, n))

    def by_duration(self, rng: np.random.Generator, duration: float, start: float = 0.0) -> np.ndarray:
        """Every arrival in ``[start, start + duration)``."""
        chunks, last, end = [], start, start + duration
        chunk = max(16, int(self.rate * duration * 1.2) + 16)
        while last < end:
            times = last + np.cumsum(self.gaps(rng, chunk))
            chunks.append(times)
            last = float(times[-1])
        times = np.concatenate(chunks) if chunks else np.empty(0)
        return times[times < end]
