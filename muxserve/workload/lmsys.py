"""LMSYS-Chat-style traces (records of ``{conversation, model, tstamp}``) translated into workloads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from muxserve.errors import InputError
from muxserve.progress import Progress
from muxserve.workload.datasets import LengthFilter, Sample, TokenizedDialogs, dialog_of
from muxserve.workload.generator import capped_output_len, length_info
from muxserve.workload.workload_file import WorkloadRequest


def translate_lmsys(records: list[Any], tokenizer, *, source: str, start_day: float = 0.0,
                    end_day: float | None = None, condense: float = 1.0, length_filter: LengthFilter = LengthFilter(),
                    max_output_len: int | None = None) -> tuple[dict, list[WorkloadRequest]]:
    """Requests of a trace window: arrival = (tstamp - first tstamp of the window) / condense.

    Days count from the trace's first timestamp. Each model of the trace becomes ``llm-k`` in the
    order of its first request that passes the filter.
    """
    if not condense > 0:
        raise InputError(f"condense must be > 0, got {condense}")
    if end_day is not None and end_day <= start_day:
        raise InputError(f"end day {end_day} must be after start day {start_day}")
    rows = []
    for i, rec in enumerate(records):
        where = f"trace {source}: record {i}"
        if not isinstance(rec, dict) or not {"conversation", "model", "tstamp"} <= rec.keys():
            keys = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
            raise InputError(f"{where} needs 'conversation', 'model' and 'tstamp' (it has {keys})")
        stamp = rec["tstamp"]
        if isinstance(stamp, bool) or not isinstance(stamp, (int, float)):
            raise InputError(f"{where}: tstamp must be a number of seconds, got {stamp!r}")
        rows.append((float(stamp), i, str(rec["model"]), dialog_of(rec["conversation"], where, "conversation")))
    if not rows:
        raise InputError(f"trace {source} has no records")
    rows.sort(key=lambda r: (r[0], r[1]))
    first = rows[0][0]
    lo = first + start_day * 86400
    hi = float("inf") if end_day is None else first + end_day * 86400
    window = [r for r in rows if lo <= r[0] < hi and r[3].num_turns >= length_filter.min_turns]
    dialogs = TokenizedDialogs([r[3] for r in window], tokenizer, length_filter)
    samples: list[Sample | None] = []
    with Progress(len(window), "tokenizing trace", "record") as bar:
        for start in range(0, len(window), 256):
            chunk = list(range(start, min(start + 256, len(window))))
            samples.extend(dialogs.get(chunk))
            bar.update(len(chunk))
    kept = [(r, s) for r, s in zip(window, samples) if s is not None]
    if not kept:
        raise InputError(f"trace {source}: no request in days [{start_day}, {end_day}) passes the filters")
    t0 = kept[0][0][0]
    mapping: dict[str, str] = {}
    requests = []
    for (stamp, _, model, _), s in kept:
        llm = mapping.setdefault(model, f"llm-{len(mapping)}")
        arrival = round((stamp - t0) / condense, 6)
        output_len = capped_output_len(s, max_output_len)
        requests.append(WorkloadRequest(len(requests), llm, arrival, s.prompt_token_ids, output_len))
    names = list(mapping.values())
    rates, counts = [], []
    for llm in names:
        times = [r.arrival for r in requests if r.llm == llm]
        span = times[-1] - times[0]
        rates.append([llm, round(len(times) / span if span > 0 else float(len(times)), 6)])
        counts.append(len(times))
    info = {
        "rates": rates, "start": 0.0, "duration": requests[-1].arrival, "num_requests": counts,
        "distribution": "chatlmsys", "chatlmsys_map": mapping, "condense": condense,
        "window_days": [start_day, end_day], "trace": Path(source).name, "use_share_gpt": False,
        "filter": length_filter.as_dict(), "max_output_len": max_output_len, **length_info(requests),
    }
    return info, requests
