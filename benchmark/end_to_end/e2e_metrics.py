"""Metrics of the end-to-end runs, from the merged statistics files.

SLO attainment at scale s: the fraction of **all** requests of the workload (unfinished ones
count as misses) whose latency (end - arrival) is at most s x their base latency. The base
latency of a request is what the engine needs for it alone at batch 1: prefill of its prompt
(interpolated between measured lengths) + (output_len - 1) decode steps, with the per-LLM
figures that ``muxserve.launch`` measures at start (``muxserve.scheduler.stats.BaseLatency``).

By default every system is judged against the **same** base latencies: those of the ``alone``
runs (``e2e_common.BASE_RUN``: before a point's runs, each LLM measured alone on the whole GPU, no
MPS share, nothing else on the instance), pooled over all of them (median per prompt length and of
the decode step); they exist whichever systems were run. ``temporal`` pools the temporal
multiplexing runs' calibration instead (what older run folders have; also the whole GPU, but only
where temporal ran); ``own`` uses each run's own calibration (under MPS: the latency at the LLM's
SM share, a looser bar that favours the static split).

The highest rate a system sustains at a target attainment (99 %) at one SLO scale: over the
rates tested for one group (one alpha), the largest rate r such that every tested rate <= r
reaches the target; ``interpolated`` is where the attainment line between r and the next tested
rate crosses the target (None when no tested rate fails or none passes).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

from benchmark.end_to_end.e2e_common import SYSTEMS, read_json, stats_files
from benchmark.end_to_end.e2e_runs import to_bases, to_records
from muxserve.scheduler.stats import BaseLatency, RequestRecord, summarize

SLO_SCALES = tuple(range(1, 21))


@dataclass
class Run:
    tag: str
    system: str
    labels: dict
    offered_rates: dict[str, float]
    records: list[RequestRecord]
    bases: dict[str, BaseLatency]
    num_expected: int
    unfinished: list[int]
    doc: dict = field(repr=False, default_factory=dict)

    @property
    def offered_total_rate(self) -> float:
        return sum(self.offered_rates.values())


def load_run(path: Path) -> Run:
    doc = read_json(path)
    return Run(doc["tag"], doc["system"], doc.get("labels", {}), doc.get("offered_rates", {}),
               to_records(doc["requests"]), to_bases(doc.get("base_latency", {})), doc["num_requests_expected"],
               list(doc.get("unfinished", [])), doc)


def load_runs(runs_dir: Path, names: tuple[str, ...] = SYSTEMS) -> list[Run]:
    """Every merged statistics file under ``runs_dir/points/*/`` (``e2e_common.stats_files``) of
    ``names`` (default: the systems; ``(BASE_RUN,)``: the common SLO base's calibration runs)."""
    return [load_run(path) for _, path in stats_files(runs_dir, names)]


def pooled_bases(runs: list[Run], reference: str = "temporal") -> dict[str, BaseLatency]:
    """Per LLM, the median over the ``reference`` system's runs of each prefill point and of the decode step."""
    points: dict[str, dict[int, list[float]]] = {}
    decode: dict[str, list[float]] = {}
    for run in runs:
        if run.system != reference:
            continue
        for name, base in run.bases.items():
            for n, s in base.prefill_points:
                points.setdefault(name, {}).setdefault(n, []).append(s)
            decode.setdefault(name, []).append(base.decode_step)
    return {name: BaseLatency(tuple((n, statistics.median(v)) for n, v in sorted(points[name].items())),
                              statistics.median(decode[name])) for name in decode}


def bases_for(run: Run, pooled: dict[str, BaseLatency] | None) -> dict[str, BaseLatency]:
    """The pooled reference where it covers every LLM of the run, else the run's own."""
    if pooled and all(r.model in pooled for r in run.records):
        return pooled
    return run.bases


def slo_attainment(records: list[RequestRecord], bases: dict[str, BaseLatency], total: int,
                   scales=SLO_SCALES) -> dict[int, float]:
    """Fraction of ``total`` requests that finished within s x base latency, for each scale s."""
    done = [r for r in records if r.end is not None]
    limits = [bases[r.model].of(r.prompt_len, r.output_len) for r in done]
    lat = [r.latency for r in done]
    total = max(total, 1)
    return {s: sum(1 for x, lim in zip(lat, limits) if x <= s * lim) / total for s in scales}


def sustained_rate(points: list[tuple[float, float]], target: float = 0.99) -> dict:
    """Highest rate sustained at ``target`` attainment; ``points`` = (rate, attainment) of tested rates."""
    pts = sorted(points)
    if not pts:
        return {"rate": None, "interpolated": None, "all_pass": False, "none_pass": True}
    passing = None
    for i, (_rate, att) in enumerate(pts):
        if att + 1e-12 < target:
            break
        passing = i
    if passing is None:
        return {"rate": 0.0, "interpolated": None, "all_pass": False, "none_pass": True}
    rate, att = pts[passing]
    if passing == len(pts) - 1:
        return {"rate": rate, "interpolated": None, "all_pass": True, "none_pass": False}
    r2, a2 = pts[passing + 1]
    x = rate + (att - target) / (att - a2) * (r2 - rate) if att > a2 else rate
    return {"rate": rate, "interpolated": x, "all_pass": False, "none_pass": False}


def run_metrics(run: Run, bases: dict[str, BaseLatency], slo_scale: int) -> dict:
    """One row: offered and served rates, tokens/s, TTFT/TPOT p50/p99, SLO attainment."""
    s = summarize(run.records)
    curve = slo_attainment(run.records, bases, run.num_expected)
    finished = s.get("num_finished", 0)
    duration = run.labels.get("duration_s") or run.doc.get("duration_s")
    row = {"tag": run.tag, "system": run.system, **{k: v for k, v in run.labels.items() if k != "duration_s"},
           "offered_req_s": run.offered_total_rate, "num_requests": run.num_expected, "finished": finished,
           "arrived_req_s": run.num_expected / duration if duration else None,
           "unfinished": len(run.unfinished), "slo_curve": curve, "slo_at_scale": curve.get(slo_scale)}
    if finished:
        row.update({"throughput_req_s": s["throughput_req_s"], "throughput_tok_s": s["throughput_tok_s"],
                    "output_tok_s": s["output_tok_s"], "ttft_p50": s["ttft_s"]["p50"], "ttft_p99": s["ttft_s"]["p99"],
                    "tpot_p50": s["tpot_s"]["p50"], "tpot_p99": s["tpot_s"]["p99"],
                    "latency_p99": s["latency_s"]["p99"], "preemptions": s["num_preemptions"]})
    per_llm = {}
    waits = decode_waits(run.doc)
    window = s.get("elapsed_s")  # per-LLM throughput over the run's window, not the LLM's own
    for llm in sorted({r.model for r in run.records}, key=_natural):
        recs = [r for r in run.records if r.model == llm]
        ls = summarize(recs)
        att = slo_attainment(recs, bases, len(recs), (slo_scale,))[slo_scale] if llm in bases else None
        per_llm[llm] = {"offered_req_s": run.offered_rates.get(llm), "requests": len(recs),
                        "throughput_req_s": ls.get("num_finished", 0) / window if window else None,
                        "latency_p99": ls.get("latency_s", {}).get("p99"), "ttft_p99": ls.get("ttft_s", {}).get("p99"),
                        "tpot_p99": ls.get("tpot_s", {}).get("p99"), "slo_at_scale": att,
                        "decode_wait_ms": waits.get(llm)}
    row["per_llm"] = per_llm
    # fairness: the worst-served LLM (lowest SLO attainment at the scale; ties: highest p99 TTFT)
    judged = [(v["slo_at_scale"], -(v["ttft_p99"] or 0.0), llm) for llm, v in per_llm.items()
              if v["slo_at_scale"] is not None]
    if judged:
        worst = min(judged)[2]
        row["worst_llm"] = {"llm": worst, "slo_at_scale": per_llm[worst]["slo_at_scale"],
                            "ttft_p99": per_llm[worst]["ttft_p99"], "tpot_p99": per_llm[worst]["tpot_p99"]}
    return row


def decode_waits(doc: dict) -> dict[str, float]:
    """Per LLM, the mean time a decodable batch waited for its job (ms), from each launch's own
    summary (launches before this figure existed have none)."""
    out = {}
    for launch in doc.get("parts", []):
        for llm, s in launch.get("summary", {}).get("per_model", {}).items():
            if "scheduler" in s:
                out[llm] = s["scheduler"]["decode_wait_ms_mean"]
    return out


def group_key(labels: dict) -> str | None:
    """The label that groups runs (alpha for power-law workloads), or None for one group."""
    return "alpha" if "alpha" in labels else None


def sustained_table(rows: list[dict], target: float) -> dict:
    """{group: {system: sustained_rate(...)}} over the rows' offered rates and SLO attainment."""
    out: dict = {}
    for row in rows:
        key = row.get("alpha", "all")
        out.setdefault(key, {}).setdefault(row["system"], []).append((row["offered_req_s"], row["slo_at_scale"] or 0.0))
    return {g: {s: sustained_rate(pts, target) for s, pts in by_sys.items()} for g, by_sys in out.items()}


def _natural(name: str):
    head, _, tail = name.rpartition("-")
    return (head, int(tail)) if tail.isdigit() else (name, -1)
