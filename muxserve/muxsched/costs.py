"""The placement's cost model: latencies from a profiled cost table and the throughput estimates.

Cost table (``python -m muxserve.muxsched.profile`` writes it; the original's format)::

    {model: {num_gpus: {sm_percent: {batch_size: {seq_len: {"prefill": ms, "decoding": ms}}}}}}

For an LLM on ``n`` GPUs at a given SM share, :meth:`CostModel.latencies` gives per integer batch
size ``bs`` the latency of one prefill of ``bs`` prompts of the average prompt length and of one
decode step of ``bs`` sequences at the average context (prompt + half the output), both linear
interpolations of the table (over sequence length, then over batch size). An LLM that runs batches
of ``bs`` then serves (reference §5.2)::

    tpt(bs) = bs / (t_decode(bs) * avg_output_len + t_prefill(bs))        requests/s

and colocated LLMs share the prefill time: ``t_prefill`` becomes the sum over the mesh.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from muxserve.muxsched.models_file import InputError

LEVELS = ("num_gpus", "sm_percent", "batch_size", "seq_len")


def _check_levels(node: Any, path: list[str], source: str, levels: tuple[str, ...]) -> None:
    where = f"cost table {source}: {'/'.join(path)}"
    if not levels:
        ok = isinstance(node, dict) and all(
            isinstance(node.get(k), (int, float)) and not isinstance(node.get(k), bool) for k in ("prefill", "decoding"))
        if not ok:
            raise InputError(f"{where} must be {{\"prefill\": ms, \"decoding\": ms}}, got {node!r}")
        return
    if not isinstance(node, dict) or not node:
        raise InputError(f"{where} must be a non-empty object keyed by {levels[0]}")
    for key, child in node.items():
        if not key.isdigit() or int(key) < 1:
            raise InputError(f"{where}: {levels[0]} key {key!r} is not a positive integer")
        _check_levels(child, path + [key], source, levels[1:])


def validate_cost_table(table: Any, source: str) -> dict:
    """Check the nesting model -> num_gpus -> sm_percent -> batch_size -> seq_len -> cell."""
    if not isinstance(table, dict) or not table:
        raise InputError(f"cost table {source} must be a non-empty JSON object {{model: {{num_gpus: ...}}}}")
    for model, by_ngpu in table.items():
        _check_levels(by_ngpu, [model], source, LEVELS)
    return table


def load_cost_table(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"cost table {path} does not exist")
    try:
        table = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"cost table {path} is not valid JSON: {e}") from None
    return validate_cost_table(table, str(path))


def _interp_extrapolate(x: float, xs: list[float], ys: list[float], proportional: bool) -> float:
    """Linear interpolation; below the first point the first value; above the last the line through
    the last two points (never decreasing), or with one point: ``y * x / x0`` if ``proportional``
    (prefill: time grows with the tokens), else ``y``."""
    if x <= xs[-1]:
        return float(np.interp(x, xs, ys))
    if len(xs) == 1:
        return ys[0] * x / xs[0] if proportional else ys[0]
    slope = max(0.0, (ys[-1] - ys[-2]) / (xs[-1] - xs[-2]))
    return ys[-1] + slope * (x - xs[-1])


@dataclass(frozen=True)
class Latencies:
    """Seconds per step, indexed by batch size (index 0 unused), for batch sizes 1..max_bs."""

    prefill: np.ndarray
    decode: np.ndarray

    @property
    def max_bs(self) -> int:
        return len(self.prefill) - 1


@dataclass(frozen=True)
class BatchEstimate:
    batch_size: int
    throughput: float  # requests/s at that batch size
    satisfied: bool  # throughput >= rate


class CostModel:
    def __init__(self, table: dict, avg_prompt_len: float, avg_output_len: float, decode_overhead_s: float = 0.0):
        if not avg_prompt_len >= 1 or not avg_output_len >= 1:
            raise InputError(f"average lengths must be >= 1, got prompt {avg_prompt_len} and output {avg_output_len}")
        self.table = table
        self.avg_prompt_len = float(avg_prompt_len)
        self.avg_output_len = float(avg_output_len)
        self.decode_overhead_s = decode_overhead_s  # scheduling cost per sequence and decode step
        self.latencies = lru_cache(maxsize=None)(self._latencies)

    @property
    def avg_context_len(self) -> float:
        return self.avg_prompt_len + self.avg_output_len / 2

    def mesh_sizes(self, key: str) -> list[int]:
        return sorted(int(n) for n in self.table.get(key, {}))

    def sm_values(self, key: str, ngpu: int) -> list[int]:
        return sorted(int(s) for s in self.table.get(key, {}).get(str(ngpu), {}))

    def nearest_sm(self, key: str, ngpu: int, want: int) -> int:
        """The smallest profiled SM share >= ``want``, else the largest."""
        values = self.sm_values(key, ngpu)
        return next((v for v in values if v >= want), values[-1])

    def _latencies(self, key: str, ngpu: int, sm: int) -> Latencies | None:
        rows = self.table[key][str(ngpu)][str(sm)]
        bs_points, pre_points, dec_points = [], [], []
        for bs in sorted(rows, key=int):
            cells = sorted(((int(sl), c) for sl, c in rows[bs].items()), key=lambda t: t[0])
            pre = [(sl, c["prefill"] / 1000) for sl, c in cells if c["prefill"] >= 0]
            dec = [(sl, c["decoding"] / 1000) for sl, c in cells if c["decoding"] >= 0]
            if not pre or not dec:
                break  # larger batches were not measured (out of memory): stop here
            bs_points.append(int(bs))
            pre_points.append(_interp_extrapolate(self.avg_prompt_len, *map(list, zip(*pre)), proportional=True))
            dec_points.append(_interp_extrapolate(self.avg_context_len, *map(list, zip(*dec)), proportional=False))
        if not bs_points:
            return None
        sizes = np.arange(0, bs_points[-1] + 1, dtype=np.float64)
        prefill = np.interp(sizes, bs_points, pre_points)
        decode = np.interp(sizes, bs_points, dec_points) + self.decode_overhead_s * sizes
        return Latencies(prefill, decode)

    def pair(self, key: str, ngpu: int, prefill_sm: int, decode_sm: int) -> Latencies | None:
        """Prefill latencies at ``prefill_sm`` and decode latencies at ``decode_sm``."""
        pre, dec = self.latencies(key, ngpu, prefill_sm), self.latencies(key, ngpu, decode_sm)
        if pre is None or dec is None:
            return None
        top = min(pre.max_bs, dec.max_bs) + 1
        return Latencies(pre.prefill[:top], dec.decode[:top])

    def best_batch(self, lat: Latencies, rate: float, max_bs: int, extra_prefill_s: float = 0.0) -> BatchEstimate:
        """The smallest batch size (<= max_bs) whose throughput meets ``rate``, else the best one."""
        limit = min(max_bs, lat.max_bs)
        if limit < 1:
            return BatchEstimate(0, 0.0, rate <= 0)
        bs = np.arange(1, limit + 1)
        tpt = bs / (lat.decode[1:limit + 1] * self.avg_output_len + lat.prefill[1:limit + 1] + extra_prefill_s)
        meets = np.nonzero(tpt >= rate)[0]
        i = int(meets[0]) if len(meets) else int(np.argmax(tpt))
        return BatchEstimate(int(bs[i]), float(tpt[i]), bool(len(meets)))

    def throughput(self, lat: Latencies, bs: int, prefill_sum_s: float) -> float:
        """Requests/s of an LLM at batch size ``bs`` when the mesh's prefills take ``prefill_sum_s``."""
        return bs / (lat.decode[bs] * self.avg_output_len + prefill_sum_s)
