"""SLO attainment, sustained rate, pooled base latencies and static splits, on hand-made inputs."""

from __future__ import annotations

import pytest

from benchmark.end_to_end.e2e_metrics import (
    Run,
    pooled_bases,
    run_metrics,
    slo_attainment,
    sustained_rate,
    sustained_table,
)
from benchmark.end_to_end.e2e_plan import split_kv, split_shares
from muxserve.scheduler.stats import BaseLatency, RequestRecord

# prefill 0.1 s at 10 tokens, 0.3 s at 30 (linear in between); decode step 0.01 s
BASE = {"llm-0": BaseLatency(((10, 0.1), (30, 0.3)), 0.01), "llm-1": BaseLatency(((10, 0.2),), 0.02)}


def rec(idx, model, prompt, out, latency, arrival=0.0, finished=True):
    end = arrival + latency if finished else None
    return RequestRecord(idx, model, arrival, prompt, out, submit=arrival, prefill_end=arrival + latency / 4 if finished
                         else None, end=end, output_token_ids=[])


def test_slo_attainment_counts_each_scale_and_unfinished_requests():
    # base latencies: llm-0 20 tokens, 11 out -> 0.2 + 10 * 0.01 = 0.3 s;
    # llm-1 5 tokens, 6 out -> 0.2 + 5 * 0.02 = 0.3 s
    records = [rec(0, "llm-0", 20, 11, 0.3),   # 1x
               rec(1, "llm-0", 20, 11, 0.6),   # 2x
               rec(2, "llm-1", 5, 6, 0.85),    # 2.83x -> meets 3x
               rec(3, "llm-1", 5, 6, 6.0),     # 20x exactly
               rec(4, "llm-0", 20, 11, 0.0, finished=False)]
    curve = slo_attainment(records, BASE, total=5)
    assert curve[1] == pytest.approx(1 / 5)
    assert curve[2] == pytest.approx(2 / 5)
    assert curve[3] == pytest.approx(3 / 5)
    assert curve[19] == pytest.approx(3 / 5)
    assert curve[20] == pytest.approx(4 / 5)  # the unfinished one never counts
    # a request missing from the records (a launch that lost it) counts as a miss too
    assert slo_attainment(records, BASE, total=8)[20] == pytest.approx(4 / 8)


def test_sustained_rate_is_the_last_rate_of_an_unbroken_passing_prefix():
    pts = [(2.0, 1.0), (4.0, 0.995), (8.0, 0.95), (16.0, 0.5)]
    got = sustained_rate(pts, 0.99)
    assert got["rate"] == 4.0 and not got["all_pass"] and not got["none_pass"]
    # crossing between (4, 0.995) and (8, 0.95): 4 + 0.005 / 0.045 * 4
    assert got["interpolated"] == pytest.approx(4 + 4 * 0.005 / 0.045)
    # a failure below a pass ends the prefix: 8 req/s passing again does not count
    assert sustained_rate([(2.0, 1.0), (4.0, 0.9), (8.0, 0.995)], 0.99)["rate"] == 2.0
    assert sustained_rate([(8.0, 0.999), (2.0, 1.0)], 0.99) == {"rate": 8.0, "interpolated": None, "all_pass": True,
                                                                 "none_pass": False}
    assert sustained_rate([(2.0, 0.5)], 0.99) == {"rate": 0.0, "interpolated": None, "all_pass": False,
                                                   "none_pass": True}


def _run(system, tag, rate, latencies, bases=BASE):
    records = [rec(i, "llm-0", 20, 11, lat, arrival=0.1 * i) for i, lat in enumerate(latencies)]
    return Run(tag, system, {"alpha": 1.3, "rate_scale": rate, "duration_s": 1.0}, {"llm-0": rate}, records, bases,
               len(records), [])


def test_run_metrics_and_sustained_table_over_rates():
    runs = [_run("muxserve", "a", 1.0, [0.3] * 10), _run("muxserve", "b", 2.0, [0.3] * 9 + [3.0]),
            _run("spatial", "a", 1.0, [0.3] * 9 + [3.0]), _run("spatial", "b", 2.0, [3.0] * 10)]
    rows = [run_metrics(r, BASE, slo_scale=8) for r in runs]
    assert [r["slo_at_scale"] for r in rows] == [1.0, 0.9, 0.9, 0.0]
    assert rows[0]["finished"] == 10 and rows[0]["num_requests"] == 10
    assert rows[0]["arrived_req_s"] == 10.0
    # 10 requests, first arrival 0, last end 0.9 + 0.3 = 1.2 s
    assert rows[0]["throughput_req_s"] == pytest.approx(10 / 1.2)
    assert rows[0]["per_llm"]["llm-0"]["throughput_req_s"] == pytest.approx(10 / 1.2)
    assert rows[0]["ttft_p50"] == pytest.approx(0.075)
    table = sustained_table(rows, 0.99)
    assert table[1.3]["muxserve"]["rate"] == 1.0 and table[1.3]["spatial"]["none_pass"]


def test_pooled_bases_take_the_median_of_the_temporal_runs():
    b1 = {"llm-0": BaseLatency(((16, 0.1), (64, 0.2)), 0.010)}
    b2 = {"llm-0": BaseLatency(((16, 0.3), (64, 0.4)), 0.030)}
    b3 = {"llm-0": BaseLatency(((16, 0.2), (64, 0.9)), 0.020)}
    runs = [_run("temporal", "a", 1.0, [0.1], b1), _run("temporal", "b", 2.0, [0.1], b2),
            _run("temporal", "c", 4.0, [0.1], b3),
            _run("muxserve", "a", 1.0, [0.1], {"llm-0": BaseLatency(((16, 9.0),), 9.0)})]
    pooled = pooled_bases(runs, "temporal")
    assert pooled["llm-0"].prefill_points == ((16, 0.2), (64, 0.4))
    assert pooled["llm-0"].decode_step == pytest.approx(0.020)


def test_split_shares_and_kv_slices():
    assert split_shares([1.0]) == [100]
    assert split_shares([3.0, 1.0]) == [75, 25]
    assert split_shares([1.0, 1.0, 1.0]) == [34, 33, 33]
    # clamped to 10..90: the tiny one gets 10, the others share the remaining 90 in proportion
    assert split_shares([100.0, 1.0, 50.0]) == [60, 10, 30]
    assert split_shares([1.0, 0.0]) == [90, 10]
    assert sum(split_shares([5.0, 4.0, 3.0, 2.0, 1.0])) == 100
    with pytest.raises(RuntimeError, match="cannot split"):
        split_shares([1.0] * 11)
    assert split_kv(100.0, [3.0, 1.0], [10.0, 10.0]) == pytest.approx([75.0, 25.0])
    # a floor bigger than the proportional share is kept; the rest is split among the others
    assert split_kv(100.0, [9.0, 1.0], [10.0, 30.0]) == pytest.approx([70.0, 30.0])
    with pytest.raises(RuntimeError, match="cannot hold"):
        split_kv(10.0, [1.0, 1.0], [6.0, 6.0])
