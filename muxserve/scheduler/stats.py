"""Per-request records and the per-LLM / overall statistics of a run.

Times are seconds since the start of workload replay. Definitions (as vLLM's benchmarks):
    TTFT    = prefill_end - arrival
    TPOT    = (end - prefill_end) / (output_len - 1)       (0 for one-token outputs)
    latency = end - arrival
A request meets SLO scale s when latency <= s * base_latency, where base_latency is what the
same engine needs for that request alone (prefill of its prompt + output_len decode steps).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SLO_SCALES = (1, 2, 3, 5, 8, 10, 15, 20)


@dataclass
class RequestRecord:
    idx: int
    model: str
    arrival: float
    prompt_len: int
    output_len: int
    submit: float | None = None  # first dispatched to a runtime
    prefill_end: float | None = None
    end: float | None = None
    output_token_ids: list[int] = field(default_factory=list)
    num_preemptions: int = 0

    @property
    def ttft(self) -> float:
        return self.prefill_end - self.arrival

    @property
    def tpot(self) -> float:
        return (self.end - self.prefill_end) / (self.output_len - 1) if self.output_len > 1 else 0.0

    @property
    def latency(self) -> float:
        return self.end - self.arrival


@dataclass(frozen=True)
class BaseLatency:
    """An LLM's unloaded speed: prefill time as a function of prompt length, and one decode step."""

    prefill_points: tuple[tuple[int, float], ...]  # (prompt_len, seconds), sorted by length
    decode_step: float

    def of(self, prompt_len: int, output_len: int) -> float:
        lens = [p for p, _ in self.prefill_points]
        secs = [s for _, s in self.prefill_points]
        prefill = float(np.interp(prompt_len, lens, secs))
        return prefill + max(0, output_len - 1) * self.decode_step


def _dist(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0}
    arr = np.asarray(values)
    return {"mean": float(arr.mean()), "p50": float(np.percentile(arr, 50)),
            "p90": float(np.percentile(arr, 90)), "p99": float(np.percentile(arr, 99))}


def summarize(records: list[RequestRecord], base: BaseLatency | None = None) -> dict:
    """Throughput, latency distributions and SLO attainment of finished requests."""
    done = [r for r in records if r.end is not None]
    if not done:
        return {"num_requests": len(records), "num_finished": 0}
    elapsed = max(r.end for r in done) - min(r.arrival for r in done)
    elapsed = max(elapsed, 1e-9)
    tokens = sum(r.prompt_len + r.output_len for r in done)
    out = {
        "num_requests": len(records),
        "num_finished": len(done),
        "elapsed_s": elapsed,
        "throughput_req_s": len(done) / elapsed,
        "throughput_tok_s": tokens / elapsed,
        "output_tok_s": sum(r.output_len for r in done) / elapsed,
        "latency_s": _dist([r.latency for r in done]),
        "ttft_s": _dist([r.ttft for r in done]),
        "tpot_s": _dist([r.tpot for r in done if r.output_len > 1]),
        "num_preemptions": sum(r.num_preemptions for r in done),
    }
    if base is not None:
        limits = [base.of(r.prompt_len, r.output_len) for r in done]
        out["slo_attainment"] = {
            str(s): sum(r.latency <= s * lim for r, lim in zip(done, limits)) / len(records) for s in SLO_SCALES
        }
    return out


def summarize_run(records: list[RequestRecord], bases: dict[str, BaseLatency] | None = None) -> dict:
    """{"per_model": {name: summary}, "overall": summary}; SLO attainment overall pools every LLM."""
    bases = bases or {}
    models = sorted({r.model for r in records}, key=_natural_key)
    per_model = {m: summarize([r for r in records if r.model == m], bases.get(m)) for m in models}
    overall = summarize(records)
    if bases and records and all(m in bases for m in models):
        done = [r for r in records if r.end is not None]
        overall["slo_attainment"] = {
            str(s): sum(r.latency <= s * bases[r.model].of(r.prompt_len, r.output_len) for r in done) / len(records)
            for s in SLO_SCALES
        }
    return {"per_model": per_model, "overall": overall}


def format_stats(summary: dict) -> str:
    """The statistics block printed at the end of a run (one section per LLM, then the summary)."""
    lines = []
    for name, s in list(summary["per_model"].items()) + [("Summary", summary["overall"])]:
        lines.append(f"Name: {name}" if name != "Summary" else "Summary:")
        if not s.get("num_finished"):
            lines.append("  no finished requests")
            continue
        lines.append(f"  Requests: {s['num_finished']}/{s['num_requests']} finished in {s['elapsed_s']:.2f} s")
        lines.append(f"  Throughput {s['throughput_req_s']:.2f} requests/s {s['throughput_tok_s']:.1f} tokens/s")
        for key, label in (("latency_s", "avg latency"), ("ttft_s", "TTFT"), ("tpot_s", "TPOT")):
            d = s[key]
            lines.append(f"  [{label}] mean: {d['mean']:.3f} s, p50: {d['p50']:.3f}, p90: {d['p90']:.3f}, "
                         f"p99: {d['p99']:.3f}")
        if "slo_attainment" in s:
            att = ", ".join(f"{k}x: {v:.1%}" for k, v in s["slo_attainment"].items())
            lines.append(f"  [SLO attainment] {att}")
        if "scheduler" in s:
            w = s["scheduler"]
            lines.append(f"  [decode wait] mean {w['decode_wait_ms_mean']:.2f} ms before each of {w['decode_jobs']} "
                         "decode jobs (SM units or a prefill first)")
        if "residency" in s:
            r = s["residency"]
            lines.append(f"  [residency] {r['offloads']:.0f} offloads (mean {r['offload_ms_mean']:.1f} ms), "
                         f"{r['wakes']:.0f} wakes (mean {r['wake_ms_mean']:.1f} ms, max {r['wake_ms_max']:.1f} ms), "
                         f"{r['wake_preempted']:.0f} requests of other LLMs preempted by its wakes")
    return "\n".join(lines)


def _natural_key(name: str):
    """Sort llm-2 before llm-10."""
    head, _, tail = name.rpartition("-")
    return (head, int(tail)) if tail.isdigit() else (name, -1)
