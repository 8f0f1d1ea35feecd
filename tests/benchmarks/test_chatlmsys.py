"""ChatLMSYS pipeline: the synthetic trace, condensing and renaming, and planning runs from a trace."""

from __future__ import annotations

import json
import signal

import pytest
import yaml

from benchmark.chatlmsys import run_chatlmsys
from benchmark.chatlmsys.make_synthetic_trace import make_trace
from muxserve.workload.workload_file import WorkloadRequest, load_workload

from .helpers import write_shape


def test_synthetic_trace_is_reproducible_and_in_lmsys_format():
    a = make_trace(200, 0.01, 4, 1.2, 0.5, seed=3)
    assert a == make_trace(200, 0.01, 4, 1.2, 0.5, seed=3) and a != make_trace(200, 0.01, 4, 1.2, 0.5, seed=4)
    assert len(a) == 200 and [r["tstamp"] for r in a] == sorted(r["tstamp"] for r in a)
    assert a[-1]["tstamp"] - a[0]["tstamp"] <= 0.01 * 86400
    assert {r["model"] for r in a} <= {"vicuna-13b", "koala-13b", "alpaca-13b", "chatglm-6b"}
    counts = {m: sum(r["model"] == m for r in a) for m in ("vicuna-13b", "chatglm-6b")}
    assert counts["vicuna-13b"] > 2 * counts["chatglm-6b"]  # Zipf 1.2: 1 vs 4^-1.2 = 0.19
    assert all(r["conversation"][0]["role"] == "user" and isinstance(r["conversation"][0]["content"], str) for r in a)
    with pytest.raises(ValueError, match="num-models"):
        make_trace(10, 1.0, 99, 1.0, 0.5, 0)


def test_condensed_keeps_the_busiest_llms_renamed_by_popularity():
    reqs = [WorkloadRequest(i, llm, t, [1, 2, 3], 5) for i, (llm, t) in enumerate(
        [("llm-0", 0.0), ("llm-1", 10.0), ("llm-1", 20.0), ("llm-2", 30.0), ("llm-1", 40.0), ("llm-0", 50.0),
         ("llm-2", 60.0), ("llm-2", 70.0), ("llm-3", 80.0)])]
    info = {"chatlmsys_map": {"koala": "llm-0", "vicuna": "llm-1", "alpaca": "llm-2", "dolly": "llm-3"}}
    new, kept, trace_map = run_chatlmsys.condensed(info, reqs, condense=10.0, max_llms=2, max_duration=6.5)
    # llm-1 and llm-2 have 3 requests each (llm-1 first seen earlier); llm-0 and llm-3 are dropped
    assert trace_map == {"vicuna": "llm-0", "alpaca": "llm-1"}
    assert [(r.idx, r.llm, r.arrival) for r in kept] == [(0, "llm-0", 1.0), (1, "llm-0", 2.0), (2, "llm-1", 3.0),
                                                          (3, "llm-0", 4.0), (4, "llm-1", 6.0)]  # 7.0 > 6.5 dropped
    assert new["rates"] == [["llm-0", 1.0], ["llm-1", round(2 / 3, 6)]] and new["num_requests"] == [3, 2]
    assert new["condense"] == 10.0 and new["duration"] == 6.0 and new["prompt_len"] == 3.0


def test_trace_to_planned_runs(tmp_path, monkeypatch, smollm2_folder):
    trace = tmp_path / "trace.jsonl"
    trace.write_text("".join(json.dumps(r) + "\n" for r in make_trace(240, 0.02, 4, 1.2, 0.5, seed=0)))
    out = tmp_path / "runs"
    monkeypatch.chdir(tmp_path)
    handler = signal.getsignal(signal.SIGTERM)
    try:
        rc = run_chatlmsys.main([
            "--trace", str(trace), "--condense", "50", "100", "--max-llms", "2", "--max-duration", "10",
            "--llm-models", str(write_shape(tmp_path / "tiny-a", "tiny-a")),
            str(write_shape(tmp_path / "tiny-b", "tiny-b")),
            "--max-output-len", "8", "--device", "cpu", "--gpu-memory-gb", "1", "--kv-cache-gb", "0.03",
            "--output-dir", str(out), "--dry-run"])
    finally:
        signal.signal(signal.SIGTERM, handler)
    assert rc == 0
    w50, w100 = (load_workload(out / "points" / f"condense{c}" / "workload.json") for c in (50, 100))
    assert w50.info["chatlmsys_map"] == {"vicuna-13b": "llm-0", "koala-13b": "llm-1"}
    assert {r.llm for r in w50.requests} == {"llm-0", "llm-1"} and max(r.arrival for r in w100.requests) <= 10
    # twice the condense factor: twice the rate; the same first requests at half the time
    assert w100.info["rates"][0][1] == pytest.approx(2 * w50.info["rates"][0][1], rel=0.35)
    assert [r.prompt_token_ids for r in w100.requests[:5]] == [r.prompt_token_ids for r in w50.requests[:5]]
    assert w100.requests[3].arrival == pytest.approx(w50.requests[3].arrival / 2, abs=1e-5)
    models = yaml.safe_load((out / "points" / "condense50" / "models.yaml").read_text())
    assert [m["model"] for m in models["models"]] == [str(tmp_path / "tiny-a"), str(tmp_path / "tiny-b")]
    plan = json.loads((out / "points" / "condense100" / "plan.json").read_text())
    assert sorted(plan["systems"]) == ["alone", "instances", "muxserve", "spatial", "temporal"]
    assert plan["labels"]["condense"] == 100
    experiment = json.loads((out / "experiment.json").read_text())
    assert experiment["kind"] == "chatlmsys"
    assert [p["tag"] for p in experiment["points"]] == ["condense50", "condense100"]
    assert "python -m muxserve.muxsched.workload_utils lmsys --trace" in (out / "commands.txt").read_text()
