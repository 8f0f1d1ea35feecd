"""Statistics of a run on hand-made timestamps: exact means, percentiles, throughput, SLO attainment."""

from __future__ import annotations

import pytest

from muxserve.scheduler.stats import SLO_SCALES, BaseLatency, RequestRecord, format_stats, summarize, summarize_run


def rec(idx, model, arrival, prompt_len, output_len, prefill_end=None, end=None, submit=None, preempted=0):
    return RequestRecord(idx=idx, model=model, arrival=arrival, prompt_len=prompt_len, output_len=output_len,
                         submit=submit, prefill_end=prefill_end, end=end, num_preemptions=preempted)


def llm1_records():
    return [
        rec(0, "llm-1", 0.0, 10, 5, prefill_end=1.0, end=3.0, submit=0.5),  # ttft 1.0  tpot 0.5  lat 3.0
        rec(1, "llm-1", 1.0, 20, 3, prefill_end=1.5, end=2.5, preempted=2),  # ttft 0.5  tpot 0.5  lat 1.5
        rec(2, "llm-1", 2.0, 30, 1, prefill_end=4.0, end=4.0),  # ttft 2.0  (no tpot)  lat 2.0
        rec(3, "llm-1", 3.0, 40, 2, prefill_end=5.0, end=7.0),  # ttft 2.0  tpot 2.0  lat 4.0
        rec(4, "llm-1", 3.5, 50, 9),  # never finished
    ]


BASE = BaseLatency(prefill_points=((10, 0.2), (50, 1.0)), decode_step=0.25)


def test_record_properties():
    r = rec(0, "m", 1.0, 10, 5, prefill_end=1.5, end=3.5)
    assert (r.ttft, r.tpot, r.latency) == (0.5, 0.5, 2.5)
    assert rec(0, "m", 1.0, 10, 1, prefill_end=2.0, end=2.0).tpot == 0.0


def test_base_latency_interpolates_prefill_and_adds_decode_steps():
    assert BASE.of(10, 5) == pytest.approx(0.2 + 4 * 0.25)
    assert BASE.of(20, 3) == pytest.approx(0.4 + 2 * 0.25)
    assert BASE.of(30, 1) == pytest.approx(0.6)
    assert BASE.of(5, 1) == pytest.approx(0.2)  # clamped below the first point
    assert BASE.of(100, 3) == pytest.approx(1.5)  # clamped above the last point


def test_summarize_exact():
    s = summarize(llm1_records())
    assert s["num_requests"] == 5
    assert s["num_finished"] == 4
    assert s["elapsed_s"] == 7.0  # last end - first arrival
    assert s["throughput_req_s"] == pytest.approx(4 / 7)
    assert s["throughput_tok_s"] == pytest.approx((15 + 23 + 31 + 42) / 7)
    assert s["output_tok_s"] == pytest.approx(11 / 7)
    assert s["num_preemptions"] == 2
    # latency [3.0, 1.5, 2.0, 4.0]; numpy's linear percentiles over [1.5, 2, 3, 4]
    assert s["latency_s"] == pytest.approx({"mean": 2.625, "p50": 2.5, "p90": 3.7, "p99": 3.97})
    assert s["ttft_s"] == pytest.approx({"mean": 1.375, "p50": 1.5, "p90": 2.0, "p99": 2.0})
    # one-token outputs have no TPOT: [0.5, 0.5, 2.0]
    assert s["tpot_s"] == pytest.approx({"mean": 1.0, "p50": 0.5, "p90": 1.7, "p99": 1.97})
    assert "slo_attainment" not in s


def test_slo_attainment_counts_unfinished_as_misses():
    s = summarize(llm1_records(), BASE)
    # latency / base: 3.0 / 1.2 = 2.5, 1.5 / 0.9 = 1.67, 2.0 / 0.6 = 3.33, 4.0 / 1.05 = 3.81; one unfinished of 5
    assert s["slo_attainment"] == pytest.approx(
        {"1": 0.0, "2": 0.2, "3": 0.4, "5": 0.8, "8": 0.8, "10": 0.8, "15": 0.8, "20": 0.8})
    assert list(s["slo_attainment"]) == [str(x) for x in SLO_SCALES]


def test_summarize_without_finished_requests():
    assert summarize([]) == {"num_requests": 0, "num_finished": 0}
    assert summarize([rec(0, "m", 0.0, 5, 5)]) == {"num_requests": 1, "num_finished": 0}


def _run_records():
    return llm1_records() + [
        rec(5, "llm-10", 1.0, 8, 4, prefill_end=1.5, end=2.5),  # lat 1.5, base 0.2 (clamped) + 0.75: 1.58x
        rec(6, "llm-2", 0.5, 10, 2, prefill_end=1.0, end=2.0),  # lat 1.5, base 0.2 + 0.25 = 0.45: 3.33x
    ]


def test_summarize_run_sorts_llm_names_naturally():
    run = summarize_run(_run_records())
    assert list(run["per_model"]) == ["llm-1", "llm-2", "llm-10"]
    assert run["per_model"]["llm-1"] == summarize(llm1_records())
    assert run["per_model"]["llm-10"]["latency_s"]["mean"] == 1.5
    overall = run["overall"]
    assert (overall["num_requests"], overall["num_finished"]) == (7, 6)
    assert overall["elapsed_s"] == 7.0
    assert overall["throughput_req_s"] == pytest.approx(6 / 7)
    assert overall["throughput_tok_s"] == pytest.approx((111 + 12 + 12) / 7)
    assert "slo_attainment" not in overall


def test_summarize_run_natural_sort_of_other_names():
    names = ["llm-10", "b", "llm-2", "a-3", "llm-1", "a"]
    run = summarize_run([rec(i, n, 0.0, 1, 1, 1.0, 1.0) for i, n in enumerate(names)])
    assert list(run["per_model"]) == ["a", "a-3", "b", "llm-1", "llm-2", "llm-10"]


def test_summarize_run_slo_pools_every_llm():
    bases = {"llm-1": BASE, "llm-2": BASE, "llm-10": BASE}
    run = summarize_run(_run_records(), bases)
    assert run["per_model"]["llm-10"]["slo_attainment"]["2"] == 1.0
    assert run["per_model"]["llm-2"]["slo_attainment"] == pytest.approx(
        {"1": 0.0, "2": 0.0, "3": 0.0, "5": 1.0, "8": 1.0, "10": 1.0, "15": 1.0, "20": 1.0})
    # ratios 2.5, 1.67, 3.33, 3.81 (llm-1), 1.58 (llm-10), 3.33 (llm-2); 7 requests
    assert run["overall"]["slo_attainment"] == pytest.approx(
        {"1": 0.0, "2": 2 / 7, "3": 3 / 7, "5": 6 / 7, "8": 6 / 7, "10": 6 / 7, "15": 6 / 7, "20": 6 / 7})
    # a missing base: no overall SLO figure, and none for that LLM
    run = summarize_run(_run_records(), {"llm-1": BASE})
    assert "slo_attainment" not in run["overall"]
    assert "slo_attainment" not in run["per_model"]["llm-2"]
    assert "slo_attainment" in run["per_model"]["llm-1"]


def test_format_stats_lines():
    records = _run_records() + [rec(7, "llm-3", 0.0, 4, 4)]
    text = format_stats(summarize_run(records, {"llm-1": BASE, "llm-2": BASE, "llm-3": BASE, "llm-10": BASE}))
    lines = text.splitlines()
    assert lines[:7] == [
        "Name: llm-1",
        "  Requests: 4/5 finished in 7.00 s",
        "  Throughput 0.57 requests/s 15.9 tokens/s",
        "  [avg latency] mean: 2.625 s, p50: 2.500, p90: 3.700, p99: 3.970",
        "  [TTFT] mean: 1.375 s, p50: 1.500, p90: 2.000, p99: 2.000",
        "  [TPOT] mean: 1.000 s, p50: 0.500, p90: 1.700, p99: 1.970",
        "  [SLO attainment] 1x: 0.0%, 2x: 20.0%, 3x: 40.0%, 5x: 80.0%, 8x: 80.0%, 10x: 80.0%, 15x: 80.0%, 20x: 80.0%",
    ]
    names = [line for line in lines if not line.startswith("  ")]
    assert names == ["Name: llm-1", "Name: llm-2", "Name: llm-3", "Name: llm-10", "Summary:"]
    assert lines[lines.index("Name: llm-3") + 1] == "  no finished requests"
    summary = lines[lines.index("Summary:"):]
    assert summary[1] == "  Requests: 6/8 finished in 7.00 s"
    assert summary[2] == f"  Throughput {6 / 7:.2f} requests/s {135 / 7:.1f} tokens/s"
    assert summary[-1].startswith("  [SLO attainment] 1x: 0.0%, 2x: 25.0%, 3x: 37.5%, 5x: 75.0%")
