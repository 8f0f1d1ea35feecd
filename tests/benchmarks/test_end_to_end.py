"""The whole end-to-end pipeline on CPU: two tiny LLMs, one alpha, one rate scale, a few seconds of
traffic, the common SLO base (each LLM alone) and the four systems (spatial and instances: two
launches side by side) on two lanes (two runs at a time, own ports), then analyze.py."""

from __future__ import annotations

import json
import shutil
import tarfile

import pytest

from benchmark.end_to_end import analyze
from benchmark.end_to_end.e2e_common import read_json
from muxserve.workload.workload_file import load_workload

from .helpers import run_module, write_shape, write_sharegpt

pytestmark = pytest.mark.timeout(600)
SYSTEMS = ("muxserve", "temporal", "spatial", "instances")


@pytest.fixture(scope="module")
def e2e(tmp_path_factory, smollm2_folder):  # the workload generator tokenizes with the embedded SmolLM2
    root = tmp_path_factory.mktemp("e2e")
    args = ["--llms", str(write_shape(root / "tiny-a", "tiny-a")), str(write_shape(root / "tiny-b", "tiny-b")),
            "--alphas", "1.3", "--rate-scales", "1", "--max-rate", "4", "--duration", "2",
            "--dataset-source", str(write_sharegpt(root / "sharegpt.json")), "--max-output-len", "8",
            "--device", "cpu", "--gpu-memory-gb", "1", "--kv-cache-gb", "0.03", "--output-dir", str(root / "runs"),
            "--lanes", "2", "--port-base", "26000"]
    proc = run_module("end_to_end.run_end_to_end", *args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root, args, proc


def test_every_system_serves_every_request(e2e):
    root, _, proc = e2e
    point = root / "runs" / "points" / "alpha1.3_scale1"
    workload = load_workload(point / "workload.json")
    expected = {r.idx: r for r in workload.requests}
    assert len(expected) >= 4 and {r.llm for r in workload.requests} == {"llm-0", "llm-1"}
    models = (point / "models.yaml").read_text()
    assert "rate: 4.0" in models and "rate: 1.624505" in models  # 4 x 2^-1.3
    for system in SYSTEMS:
        doc = read_json(point / f"{system}.json.gz")
        assert doc["system"] == system and doc["unfinished"] == []
        assert doc["num_requests"] == doc["num_requests_expected"] == len(expected)
        assert doc["summary"]["overall"]["num_finished"] == len(expected)
        assert sorted(doc["base_latency"]) == ["llm-0", "llm-1"]
        for r in doc["requests"]:
            want = expected[r["idx"]]
            assert (r["model"], r["prompt_len"], r["num_output_tokens"]) == (
                want.llm, len(want.prompt_token_ids), want.output_len)
            assert r["arrival"] <= r["submit"] <= r["prefill_end"] <= r["end"]
        assert not list((point / "runs" / system).glob("*.stats.json*"))  # compacted
    parts = {s: read_json(point / f"{s}.json.gz")["parts"] for s in SYSTEMS}
    assert [(p["launch"], p["schedule_approach"], p["split_by_model"]) for p in parts["spatial"]] == [
        ("llm-0", "fix", "llm-0"), ("llm-1", "fix", "llm-1")]
    assert [(p["launch"], p["schedule_approach"], p["split_by_model"]) for p in parts["instances"]] == [
        ("llm-0", "adbs", "llm-0"), ("llm-1", "adbs", "llm-1")]
    assert [(p["launch"], p["schedule_approach"]) for p in parts["temporal"]] == [("mesh0", "fcfs")]
    assert [(p["launch"], p["schedule_approach"]) for p in parts["muxserve"]] == [("mesh0", "adbs")]
    assert all(not p["mps"] for ps in parts.values() for p in ps)  # no MPS on CPU
    # the spatial split gives llm-0 (rate 4) the larger KV slice; both slices add up to the shared pool
    plan = json.loads((point / "plan.json").read_text())
    split = plan["systems"]["spatial"]["notes"]["split"]
    assert split["llm-0"]["kv_gb"] > split["llm-1"]["kv_gb"]
    assert split["llm-0"]["kv_gb"] + split["llm-1"]["kv_gb"] == pytest.approx(0.03, abs=2e-3)
    assert split["llm-0"]["sm_percent"] + split["llm-1"]["sm_percent"] == 100
    # instances: the same KV slices, every process on all SMs ([100, 90]), no MPS
    inst = plan["systems"]["instances"]["notes"]["split"]
    assert {n: v["kv_gb"] for n, v in inst.items()} == {n: v["kv_gb"] for n, v in split.items()}
    assert all(v["sm_percent"] == 100 for v in inst.values())
    for launch in plan["systems"]["instances"]["launches"]:
        assert "mps_percentage: [100, 90]" in (point / launch["config"]).read_text() and not launch["mps"]
    assert "done 5, failed 0, pending 0" in proc.stdout


def test_the_common_base_measures_each_llm_alone_and_replays_nothing(e2e):
    root, _, proc = e2e
    point = root / "runs" / "points" / "alpha1.3_scale1"
    doc = read_json(point / "alone.json.gz")
    assert doc["system"] == "alone" and doc["requests"] == [] and doc["num_requests_expected"] == 0
    assert sorted(doc["base_latency"]) == ["llm-0", "llm-1"]
    assert all(b["decode_step"] > 0 and len(b["prefill_points"]) >= 2 for b in doc["base_latency"].values())
    [part] = doc["parts"]
    assert part["schedule_approach"] == "fcfs" and not part["mps"] and part["replay_start_wall"] is None
    assert "--calibrate-only" in (point / "runs" / "alone" / "mesh0.log").read_text().splitlines()[0]
    plan = json.loads((point / "plan.json").read_text())
    [launch] = plan["systems"]["alone"]["launches"]
    assert launch["calibrate_only"] and "mps_percentage: [100, 90]" in (point / launch["config"]).read_text()


def test_two_lanes_ran_side_by_side_on_their_own_ports(e2e):
    root, _, proc = e2e
    point = root / "runs" / "points" / "alpha1.3_scale1"
    docs = {s: read_json(point / f"{s}.json.gz") for s in SYSTEMS}
    # the common base starts on lane 0, temporal next to it on lane 1, the others on the lane freed first
    assert read_json(point / "alone.json.gz")["lane"]["index"] == 0 and docs["temporal"]["lane"]["index"] == 1
    assert "2 lanes, one run each at a time" in proc.stdout
    assert "running temporal (1 launch(es)) on lane 1" in proc.stdout
    for doc in docs.values():
        lane = doc["lane"]
        assert lane["num_lanes"] == 2 and lane["port_base"] == 26000 + 1000 * lane["index"]
        for part in doc["parts"]:
            cmd = part["command"]
            ports = [int(cmd[cmd.index(f) + 1]) for f in ("--flexstore-port", "--master-port", "--server-port")]
            assert all(lane["port_base"] <= p < lane["port_base"] + 1000 for p in ports), (lane, ports)
    assert [lane["index"] for lane in json.loads((root / "runs" / "experiment.json").read_text())["lanes"]] == [0, 1]


def test_second_run_resumes_without_launching_and_exports(e2e):
    root, args, _ = e2e
    proc = run_module("end_to_end.run_end_to_end", *args, "--export-tgz", str(root / "out" / "runs.tgz"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "done 0, failed 0, pending 0, already there 5" in proc.stdout
    assert "running" not in proc.stdout
    with tarfile.open(root / "out" / "runs.tgz") as tar:
        names = tar.getnames()
    assert {f"runs/points/alpha1.3_scale1/{s}.json.gz" for s in (*SYSTEMS, "alone")} <= set(names)
    assert "runs/experiment.json" in names and "runs/points/alpha1.3_scale1/models.yaml" in names
    assert not [n for n in names if "/logs" in n or n.endswith("workload.json")]


def test_a_call_for_some_systems_keeps_the_others_plans_and_description(e2e, tmp_path):
    root, args, _ = e2e
    runs = tmp_path / "runs"
    shutil.copytree(root / "runs", runs)
    out_at = args.index("--output-dir") + 1
    again = args[:out_at] + [str(runs)] + args[out_at + 1:] + ["--systems", "spatial", "--dry-run"]
    proc = run_module("end_to_end.run_end_to_end", *again)
    assert proc.returncode == 0, proc.stderr[-2000:]
    plan = json.loads((runs / "points" / "alpha1.3_scale1" / "plan.json").read_text())
    assert sorted(plan["systems"]) == sorted((*SYSTEMS, "alone"))
    experiment = json.loads((runs / "experiment.json").read_text())
    assert experiment["systems"] == list(SYSTEMS) and experiment["alphas"] == [1.3]
    assert experiment["device_infos"] == [experiment["device_info"]]  # the same machine twice: listed once
    # a call on another machine adds its description, and the report lists both
    first = dict(experiment["device_info"], cpu_count=64, muxserve_commit="abc1234")
    (runs / "experiment.json").write_text(json.dumps(dict(experiment, device_infos=[first])))
    proc = run_module("end_to_end.run_end_to_end", *again)
    assert proc.returncode == 0, proc.stderr[-2000:]
    experiment = json.loads((runs / "experiment.json").read_text())
    assert experiment["device_infos"] == [first, experiment["device_info"]]
    assert analyze.main(["--runs-dir", str(runs), "--output-dir", str(tmp_path / "report")]) == 0
    setup = (tmp_path / "report" / "report.md").read_text()
    assert "- the 2 devices and software the calls that filled this run folder ran on" in setup
    assert "64 CPU cores" in setup and "muxserve commit abc1234" in setup


def test_analyze_writes_report_plots_and_rows(e2e, tmp_path):
    root, _, _ = e2e
    out = root / "results"
    # in this process (the CLI's main): no second interpreter start
    assert analyze.main(["--runs-dir", str(root / "runs"), "--output-dir", str(out), "--slo-scale", "10"]) == 0
    for name in ("throughput_vs_alpha.png", "slo_attainment_vs_scale.png", "p99_latency_vs_rate.png",
                 "slo_attainment_vs_rate.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
    summary = json.loads((out / "summary.json").read_text())
    rows = summary["rows"]
    n = len(load_workload(root / "runs" / "points" / "alpha1.3_scale1" / "workload.json").requests)
    assert [r["system"] for r in rows] == ["muxserve", "temporal", "spatial", "instances"]
    assert all(r["finished"] == r["num_requests"] == n and r["unfinished"] == 0 for r in rows)
    assert all(r["alpha"] == 1.3 and r["rate_scale"] == 1.0 and r["offered_req_s"] == pytest.approx(5.624505)
               for r in rows)
    assert all(set(r["slo_curve"]) == {str(s) for s in range(1, 21)} for r in rows)
    assert all(r["slo_curve"]["20"] >= r["slo_curve"]["1"] for r in rows)
    # every system judged on the base measured by the 'alone' run
    assert summary["slo_base"].startswith("alone (pooled)")
    alone = read_json(root / "runs" / "points" / "alpha1.3_scale1" / "alone.json.gz")["base_latency"]
    assert {k: (v["prefill_points"], v["decode_step"]) for k, v in summary["base_latency"].items()} == {
        k: (v["prefill_points"], v["decode_step"]) for k, v in alone.items()}
    other = tmp_path / "temporal-base"
    assert analyze.main(["--runs-dir", str(root / "runs"), "--output-dir", str(other), "--slo-base", "temporal",
                         "--no-plots"]) == 0
    assert json.loads((other / "summary.json").read_text())["slo_base"] == "temporal (pooled)"
    assert set(summary["sustained"]["1.3"]) == set(SYSTEMS)
    # every LLM decoded, and its row reports the decode wait its launch measured
    for r in rows:
        doc = read_json(root / "runs" / "points" / "alpha1.3_scale1" / f"{r['system']}.json.gz")
        measured = {llm: s["scheduler"] for part in doc["parts"] for llm, s in part["summary"]["per_model"].items()}
        assert sorted(r["per_llm"]) == sorted(measured) == ["llm-0", "llm-1"]
        for llm, v in r["per_llm"].items():
            assert measured[llm]["decode_jobs"] > 0
            assert v["decode_wait_ms"] == measured[llm]["decode_wait_ms_mean"]
    report = (out / "report.md").read_text()
    for label in ("MuxServe", "Temporal multiplexing", "Spatial partitioning", "Instances (no MPS)"):
        line = next(x for x in report.splitlines() if x.startswith(f"| 1.3 | 1 | {label} | 5.62 |"))
        assert line.endswith(f"| {n}/{n} |"), line
    for r in rows:  # the worst-served LLM is the one with the lowest attainment
        assert r["worst_llm"]["slo_at_scale"] == min(v["slo_at_scale"] for v in r["per_llm"].values())
    for heading in ("## Setup", "### Throughput and latency", "### Fairness: the worst-served LLM",
                    "### Highest rate sustained at 99% SLO attainment (scale 10)", "### SLO attainment vs SLO scale",
                    "### Per LLM", "| decode wait |", "## Targets: the paper's claims", "## Commands",
                    "![throughput_vs_alpha.png](throughput_vs_alpha.png)"):
        assert heading in report, heading
    assert "python -m muxserve.muxsched.workload_utils power-law --alpha 1.3" in report
    assert "- runs: up to 2 at a time, concurrently on one host" in report
