"""Workload files: which LLM gets which prompt when (JSON, compatible with the original).

    {
      "info": {"rates": [["llm-0", 12.0], ...], "distribution": "poisson", ...},
      "arrivals": [0.012, 0.051, ...],                 # seconds from the start, ascending
      "requests": [{"model_name": "llm-1", "idx": 0,
                    "data": [[1, 3148, ...], 17, 233]},  # prompt token ids, prompt_len, output_len
                   ...]
    }

``requests[i]`` arrives at ``arrivals[i]`` and generates exactly ``output_len`` tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from muxserve import files
from muxserve.errors import WorkloadError


class _FileRequest(msgspec.Struct):
    model_name: str
    idx: int
    data: tuple[list[int], int, int]


class _File(msgspec.Struct):
    arrivals: list[float]
    requests: list[_FileRequest]
    info: dict[str, Any] = {}


@dataclass(frozen=True)
class WorkloadRequest:
    idx: int
    llm: str
    arrival: float  # seconds from the start of replay
    prompt_token_ids: list[int]
    output_len: int


@dataclass
class Workload:
    info: dict[str, Any]
    requests: list[WorkloadRequest]  # sorted by arrival

    @property
    def llms(self) -> list[str]:
        return sorted({r.llm for r in self.requests})

    def rates(self) -> dict[str, float]:
        """Per-LLM rates from ``info.rates`` when present, else measured from the arrivals."""
        given = {name: float(rate) for name, rate in self.info.get("rates", [])}
        if given:
            return given
        out = {}
        for llm in self.llms:
            times = [r.arrival for r in self.requests if r.llm == llm]
            span = max(times) - min(times)
            out[llm] = len(times) / span if span > 0 else float(len(times))
        return out

    def only(self, llms: set[str]) -> Workload:
        return Workload(self.info, [r for r in self.requests if r.llm in llms])


def load_workload(path: str | Path) -> Workload:
    raw = files.load(path, "workload file", _File, WorkloadError)
    if len(raw.arrivals) != len(raw.requests):
        raise WorkloadError(f"{path}: {len(raw.arrivals)} arrivals for {len(raw.requests)} requests")
    requests = []
    for i, (t, r) in enumerate(zip(raw.arrivals, raw.requests)):
        ids, prompt_len, output_len = r.data
        where = f"{path}: requests[{i}] (idx {r.idx}, {r.model_name})"
        if not ids or len(ids) != prompt_len:
            raise WorkloadError(f"{where}: prompt_len {prompt_len} but {len(ids)} prompt token ids")
        if output_len < 1:
            raise WorkloadError(f"{where}: output_len must be >= 1, got {output_len}")
        if t < 0:
            raise WorkloadError(f"{where}: negative arrival time {t}")
        requests.append(WorkloadRequest(r.idx, r.model_name, t, ids, output_len))
    requests.sort(key=lambda r: (r.arrival, r.idx))
    return Workload(raw.info, requests)


def write_workload(path: str | Path, info: dict[str, Any], requests: list[WorkloadRequest]) -> None:
    """Write requests (sorted by arrival, idx renumbered in that order) in the file format above,
    atomically (a crash leaves no half-written file); gzip-compressed when the name ends in ``.gz``."""
    ordered = sorted(requests, key=lambda r: (r.arrival, r.idx))
    doc = {
        "info": info,
        "arrivals": [r.arrival for r in ordered],
        "requests": [{"model_name": r.llm, "idx": i,
                      "data": [r.prompt_token_ids, len(r.prompt_token_ids), r.output_len]}
                     for i, r in enumerate(ordered)],
    }
    files.write_json(path, doc)
