"""Commands of the cluster layer without a cluster: bad input is refused with a message naming the
value, the statistics of meshes merge into one file, and the single-node paths never import Ray."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from muxserve.cluster import cli
from muxserve.cluster.merge import MeshResult, merge_stats
from muxserve.scheduler.stats import RequestRecord, summarize_run

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "placement_8gpu" / "placement"


@pytest.fixture(autouse=True)
def state_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MUXSERVE_CLUSTER_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("MUXSERVE_API_KEY", raising=False)


def test_single_node_commands_do_not_import_ray():
    code = ("import sys, muxserve.launch, muxserve.serve, muxserve.cluster.cli, muxserve.cluster.replay, "
            "muxserve.cluster.frontdoor; print(sorted(m for m in sys.modules if m.split('.')[0] == 'ray'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert (out.returncode, out.stdout.strip()) == (0, "[]"), out.stderr


@pytest.mark.parametrize("argv, code, message", [
    (["up", "/nonexistent/placement"], 2,
     "error: placement /nonexistent/placement does not exist (give the placement's output folder or its "
     "placement.json)\n"),
    (["up", str(EXAMPLE), "--", "--device", "cpu", "--port", "9000"], 2,
     "error: instance flag --port (after --) is set by the cluster itself; reserved: --host, --port, "
     "--flexstore-port, --server-port, --log-dir, --mps-dir, --drain-timeout, --stats-file, --workload-file, "
     "--api-key, --split-by-model\n"),
    (["down", "--name", "nothing"], 1, None),
    (["status", "--name", "nothing"], 1, None),
    (["down", "--name", "a/b"], 2, "error: --name 'a/b': use letters, digits, '-', '_' or '.'\n"),
])
def test_bad_input_is_refused_with_the_value_named(capsys, tmp_path, argv, code, message):
    assert cli.main(argv) == code
    out = capsys.readouterr()
    if message is not None:
        assert out.err == message
    elif argv[0] == "down":
        assert out.out == (f"no cluster named 'nothing' runs on this machine (no state file "
                           f"{tmp_path / 'state' / 'nothing.json'})\n")
    else:
        assert out.out == "no cluster named 'nothing' runs on this machine\n"


def test_an_unreachable_ray_address_fails_fast_naming_it(capsys, tmp_path):
    from muxserve.cluster.process import free_port

    port = free_port()  # nothing listens there
    start = time.monotonic()
    code = cli.main(["up", str(EXAMPLE), "--address", f"127.0.0.1:{port}", "--port", str(free_port())])
    assert time.monotonic() - start < 30
    err = capsys.readouterr().err
    assert code == 2
    assert err == (f"error: cannot reach the Ray cluster at 127.0.0.1:{port} (from --address): [Errno 111] Connection "
                   f"refused; start it with `ray start --head --port {port}` on that machine\n")
    assert not (tmp_path / "state" / "default.json").exists()  # nothing left behind


def test_help_explains_every_command():
    parser = cli.build_parser()
    for command in ("up", "down", "status"):
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args([command, "--help"])
        assert exit_.value.code == 0


@pytest.mark.parametrize("extra, message", [
    (["--nnodes", "2"], "error: --nnodes 2: a replay over several nodes takes the placement's output (its folder or "
                        "placement.json), got {config}\n"),
    (["--nnodes", "2", "--node-rank", "2"], "error: --node-rank 2 must be in [0, --nnodes 2)\n"),
])
def test_launch_refuses_a_multi_node_run_without_a_placement(capsys, tmp_path, extra, message):
    from muxserve import launch

    config = tmp_path / "cfg.yaml"
    config.write_text("models: [{name: a, model: smollm2-135m}]\n")
    assert launch.main([str(config), *extra]) == 2
    assert capsys.readouterr().err == message.format(config=config)


def test_launch_refuses_a_workload_with_llms_no_mesh_holds(capsys, tmp_path):
    from muxserve import launch

    workload = tmp_path / "w.json"
    workload.write_text(json.dumps({"arrivals": [0.0], "requests": [{"model_name": "llm-42", "idx": 0,
                                                                     "data": [[1, 2], 2, 3]}]}))
    assert launch.main([str(EXAMPLE), "--workload-file", str(workload)]) == 2
    assert capsys.readouterr().err == (f"error: workload {workload} names LLMs that no mesh of "
                                       f"{EXAMPLE / 'placement.json'} holds: ['llm-42']\n")


def _stats(records: list[RequestRecord], llms, wait_ms: float, preemptions: int) -> dict:
    summary = summarize_run(records)
    summary["overall"]["scheduler_preemptions"] = preemptions
    for llm in llms:
        summary["per_model"][llm]["scheduler"] = {"decode_wait_ms_mean": wait_ms, "decode_jobs": 3}
    return {"schedule_approach": "adbs", "summary": summary, "base_latency": {},
            "requests": [dict(r.__dict__) for r in records]}


def test_merged_statistics_recompute_the_summary_over_every_mesh():
    a = [RequestRecord(0, "a", 0.0, 4, 3, 0.0, 0.1, 0.3, [1, 2, 3]),
         RequestRecord(2, "a", 0.5, 4, 2, 0.5, 0.6, 0.9, [4, 5])]
    c = [RequestRecord(1, "c", 0.2, 8, 2, 0.2, 0.4, 1.2, [6, 7], num_preemptions=1)]
    results = [MeshResult("mesh0", 0, ["a"], _stats(a, ["a"], 1.5, 0), "10.0.0.1", "n0", ["0"], 9.0),
               MeshResult("mesh1", 1, ["c"], _stats(c, ["c"], 2.5, 4), "10.0.0.2", "n1", ["0", "1"], 8.0)]
    doc = merge_stats(results, ["cmd"], "p.json")
    assert [(r["idx"], r["instance"], r["output_token_ids"]) for r in doc["requests"]] == [
        (0, "mesh0", [1, 2, 3]), (1, "mesh1", [6, 7]), (2, "mesh0", [4, 5])]
    expected = summarize_run(a + c)
    assert doc["summary"]["overall"]["num_finished"] == 3
    assert doc["summary"]["overall"]["elapsed_s"] == pytest.approx(1.2)
    assert doc["summary"]["overall"]["latency_s"] == expected["overall"]["latency_s"]
    assert doc["summary"]["overall"]["scheduler_preemptions"] == 4
    assert doc["summary"]["per_model"]["c"]["scheduler"]["decode_wait_ms_mean"] == 2.5
    assert doc["schedule_approach"] == "adbs"
    assert [(m["mesh"], m["node_ip"], m["num_requests"]) for m in doc["meshes"]] == [
        ("mesh0", "10.0.0.1", 2), ("mesh1", "10.0.0.2", 1)]


def test_without_ray_the_cluster_commands_say_how_to_install_it(monkeypatch, capsys):
    from muxserve.cluster.process import free_port

    monkeypatch.setitem(sys.modules, "ray", None)  # what a machine without Ray has
    assert cli.main(["up", str(EXAMPLE), "--port", str(free_port())]) == 2
    assert capsys.readouterr().err == ("error: the cluster commands need Ray: pip install -r requirements-cluster.txt "
                                       "(or pip install 'ray==2.60.0')\n")
