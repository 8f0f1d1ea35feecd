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

Tensor parallelism (an ESTIMATE, used only for mesh sizes the table lacks and only when asked,
``--estimate-tp``): the profiler measures one GPU, so the latencies of an LLM on ``n`` GPUs (TP = n)
are derived from those on ``m`` GPUs, the largest profiled size that divides ``n`` (:class:`TPEstimate`)::

    t_n = t_m * (s + (1 - s) * m / n) + c_n - c_m
    c_n = 2 * layers * (alpha + 2 (n - 1) / n * tokens * hidden * dtype_bytes / bus_bandwidth)   (c_1 = 0)

the work of one step split evenly over the ranks (weights, heads and MLP rows are sharded; ``s`` is
the part that does not shrink: replicated embeddings, norms, kernel launches), plus two ring
all-reduces per layer (after o_proj and down_proj) of the step's activations (``tokens`` = batch x
prompt length for a prefill, batch for a decode step). The defaults are NVLink-class numbers
(H100 SXM: 10 us per all-reduce, 300 GB/s bus bandwidth); they are not measured on our engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from muxserve import files
from muxserve.errors import InputError

LEVELS = ("num_gpus", "sm_percent", "batch_size", "seq_len")


def models_of(table: dict) -> list[str]:
    """The model keys of a cost table (top-level keys starting with ``_`` are notes, e.g. ``_meta``)."""
    return sorted(k for k in table if not k.startswith("_"))


def _check_levels(node: Any, path: list[str], source: str, levels: tuple[str, ...]) -> None:
    where = f"cost table {source}: {'/'.join(path)}"
    if not levels:
        ok = isinstance(node, dict) and all(isinstance(node.get(k), (int, float)) and not isinstance(node.get(k), bool)
                                            for k in ("prefill", "decoding"))
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
        if model.startswith("_"):
            continue  # a note about the table (e.g. "_meta": how it was made), not a model
        _check_levels(by_ngpu, [model], source, LEVELS)
    if not models_of(table):
        raise InputError(f"cost table {source} has no model (only notes: {sorted(table)})")
    return table


def load_cost_table(path: str | Path) -> dict:
    table = files.load(path, "cost table")
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


class TPEstimate(msgspec.Struct, frozen=True):
    """Step latencies on ``n`` GPUs (TP = n) from those measured on ``m`` GPUs: an estimate (see the
    module docstring), used only for mesh sizes that the cost table lacks."""

    serial_fraction: float = 0.05  # the part of a step that TP does not shrink
    allreduce_latency_us: float = 10.0  # fixed cost of one all-reduce
    allreduce_bus_gbps: float = 300.0  # ring all-reduce bus bandwidth, GB/s

    def __post_init__(self):
        if not 0 <= self.serial_fraction <= 1:
            raise InputError(f"TP serial fraction must be in [0, 1], got {self.serial_fraction}")
        if self.allreduce_latency_us < 0 or not self.allreduce_bus_gbps > 0:
            raise InputError(f"all-reduce latency must be >= 0 and bandwidth > 0, got {self.allreduce_latency_us} us "
                             f"and {self.allreduce_bus_gbps} GB/s")

    def comm_ms(self, n: int, tokens: int, layers: int, hidden: int, dtype_bytes: int) -> float:
        """Two all-reduces per layer of ``tokens`` activations on ``n`` GPUs, in ms."""
        if n <= 1:
            return 0.0
        nbytes = tokens * hidden * dtype_bytes
        one = self.allreduce_latency_us * 1e-3 + 2 * (n - 1) / n * nbytes / (self.allreduce_bus_gbps * 1e9) * 1e3
        return 2 * layers * one

    def step_ms(self, t_m: float, m: int, n: int, tokens: int, layers: int, hidden: int, dtype_bytes: int) -> float:
        """The latency on ``n`` GPUs of a step that takes ``t_m`` ms on ``m`` GPUs (``m`` divides ``n``)."""
        s = self.serial_fraction
        comm = (self.comm_ms(n, tokens, layers, hidden, dtype_bytes)
                - self.comm_ms(m, tokens, layers, hidden, dtype_bytes))
        return max(t_m * m / n, t_m * (s + (1 - s) * m / n) + comm)

    def derive(self, by_sm: dict, m: int, n: int, layers: int, hidden: int, dtype_bytes: int) -> dict:
        """The ``{sm: {bs: {seq_len: cell}}}`` level of ``n`` GPUs from that of ``m`` GPUs (-1 stays -1)."""
        out: dict = {}
        for sm, rows in by_sm.items():
            for bs, cells in rows.items():
                for sl, c in cells.items():
                    pre = (-1 if c["prefill"] < 0 else
                           self.step_ms(c["prefill"], m, n, int(bs) * int(sl), layers, hidden, dtype_bytes))
                    dec = (-1 if c["decoding"] < 0 else
                           self.step_ms(c["decoding"], m, n, int(bs), layers, hidden, dtype_bytes))
                    out.setdefault(sm, {}).setdefault(bs, {})[sl] = {"prefill": round(pre, 4) if pre >= 0 else -1,
                                                                     "decoding": round(dec, 4) if dec >= 0 else -1}
        return out


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
        self.table = self._loaded = table
        self.avg_prompt_len = float(avg_prompt_len)
        self.avg_output_len = float(avg_output_len)
        self.decode_overhead_s = decode_overhead_s  # scheduling cost per sequence and decode step
        self.estimated: dict[str, dict[int, int]] = {}  # model -> {estimated mesh size: profiled size it came from}
        self.latencies = lru_cache(maxsize=None)(self._latencies)

    def add_tp_estimates(self, key: str, sizes, tp: TPEstimate, layers: int, hidden: int,
                         dtype_bytes: int) -> list[int]:
        """Add estimated entries for the mesh sizes in ``sizes`` that the table lacks for ``key``, each
        from the largest profiled size that divides it; returns the sizes added. Call before any lookup."""
        profiled = self.mesh_sizes(key)
        if not profiled:
            return []
        if self.table is self._loaded:
            self.table = dict(self.table)  # never change the caller's table
        added = []
        for n in sorted(set(sizes)):
            if str(n) in self.table[key]:
                continue
            bases = [m for m in profiled if m < n and n % m == 0]
            if not bases:
                continue
            m = max(bases)
            self.table[key] = dict(self.table[key])
            self.table[key][str(n)] = tp.derive(self.table[key][str(m)], m, n, layers, hidden, dtype_bytes)
            self.estimated.setdefault(key, {})[n] = m
            added.append(n)
        self.latencies.cache_clear()
        return added

    def wake_s(self, key: str, ngpu: int) -> float | None:
        """Measured seconds to wake the model on ``ngpu`` GPUs (weights host -> device, every rank at
        once), from the table's note ``"_wake_s": {model: {num_gpus: seconds}}``; None where absent."""
        value = self.table.get("_wake_s", {}).get(key, {}).get(str(ngpu))
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
            raise InputError(f"cost table: _wake_s/{key}/{ngpu} must be seconds >= 0, got {value!r}")
        return None if value is None else float(value)

    def is_estimated(self, key: str, ngpu: int) -> bool:
        return ngpu in self.estimated.get(key, {})

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
