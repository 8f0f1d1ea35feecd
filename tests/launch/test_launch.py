"""End to end: python -m muxserve.launch on three tiny LLMs, checked against the offline engine."""

from __future__ import annotations

import pytest
import yaml

from .helpers import free_port, run_launch

pytestmark = pytest.mark.timeout(600)


def _check_all_match(setup, stats, llms=("llm-0", "llm-1", "llm-2")):
    expected_idx = {r.idx for r in setup.requests if r.llm in llms}
    got = {r["idx"]: r for r in stats["requests"]}
    assert set(got) == expected_idx
    for idx, rec in got.items():
        assert rec["output_token_ids"] == setup.expected[idx], f"request {idx} ({rec['model']})"
        assert rec["output_len"] == len(setup.expected[idx])
        assert rec["arrival"] <= rec["submit"] <= rec["prefill_end"] <= rec["end"]
    summary = stats["summary"]
    assert summary["overall"]["num_finished"] == len(expected_idx)
    assert sorted(summary["per_model"]) == sorted(llms)


def test_adbs_serves_every_request_with_offline_tokens(setup, tmp_path):
    proc, stats = run_launch(setup.config(), setup.workload, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_all_match(setup, stats)
    assert len(setup.requests) >= 60
    # The statistics block of the original, per LLM and overall, with SLO attainment.
    for line in ("Name: llm-0", "Name: llm-2", "Summary:", "Throughput", "[TTFT]", "[TPOT]", "[SLO attainment]",
                 "[decode wait] mean"):
        assert line in proc.stdout
    for llm in ("llm-0", "llm-1", "llm-2"):  # every request decodes at least once (outputs of 2+ tokens)
        assert stats["summary"]["per_model"][llm]["scheduler"]["decode_jobs"] > 0
    assert set(stats["base_latency"]) == {"llm-0", "llm-1", "llm-2"}
    assert stats["summary"]["overall"]["slo_attainment"]["20"] > 0
    # Progress in a log file: plain lines, one per 15 s of replay at most and one at the end; no redraws.
    assert "\r" not in proc.stderr
    progress = [line for line in proc.stderr.splitlines() if line.startswith("requests: ")]
    n = len(setup.requests)
    assert progress[-1].startswith(f"requests: {n}/{n} req (100 %), done in ")
    replay_s = float(progress[-1].rsplit(" ", 2)[-2])
    assert len(progress) <= 1 + replay_s // 15


def test_small_pool_preempts_and_still_matches(setup, tmp_path):
    # Every request at once, 24 pages of 16 KiB and no quotas (roundrobin admits while pages are
    # free): the growing decodes of the three LLMs run out of pages and preempt.
    from muxserve.workload.workload_file import WorkloadRequest, write_workload

    burst = tmp_path / "burst.json"
    write_workload(burst, {}, [WorkloadRequest(r.idx, r.llm, 0.0, r.prompt_token_ids, r.output_len)
                               for r in setup.requests])
    config = setup.config(kv_cache_bytes=24 * 16384)
    proc, stats = run_launch(config, burst, tmp_path, "--no-slo", "--schedule-approach", "roundrobin")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert stats["summary"]["overall"]["scheduler_preemptions"] > 0
    assert any(r["num_preemptions"] > 0 for r in stats["requests"])
    _check_all_match(setup, stats)


def test_fcfs_temporal_multiplexing(setup, tmp_path):
    proc, stats = run_launch(setup.config(), setup.workload, tmp_path, "--no-slo", "--schedule-approach", "fcfs")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert stats["schedule_approach"] == "fcfs"
    _check_all_match(setup, stats)


def test_split_by_model_serves_one_llm(setup, tmp_path):
    # with FlexStore on an explicit TCP port (the default is an ipc socket in the instance's directory)
    proc, stats = run_launch(setup.config(), setup.workload, tmp_path, "--no-slo", "--split-by-model", "llm-1",
                             "--flexstore-port", str(free_port()))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "starting FlexStore at tcp://127.0.0.1:" in proc.stderr
    _check_all_match(setup, stats, llms=("llm-1",))


@pytest.mark.parametrize("change, fragments", [
    ({"models": "dup"}, ["models[1] ('llm-0'): two LLMs are named 'llm-0'; names must be unique"]),
    ({"mps": [100, 130]}, ["models[0].mps_percentage[1]", "100"]),  # the field and the bound it passes
])
def test_inconsistent_config_is_refused_before_start(setup, tmp_path, change, fragments):
    config = setup.config()
    doc = yaml.safe_load(config.read_text())
    if change.get("models") == "dup":
        doc["models"][1]["name"] = "llm-0"
    if "mps" in change:
        doc["models"][0]["mps_percentage"] = change["mps"]
    config.write_text(yaml.safe_dump(doc))
    proc, stats = run_launch(config, setup.workload, tmp_path)
    assert proc.returncode == 2
    [error] = [line for line in proc.stderr.splitlines() if line.startswith(f"error: {config}: ")]
    assert all(f in error for f in fragments), (fragments, error)
    assert stats is None
    assert not (tmp_path / "logs").exists()  # nothing was started


def test_workload_naming_an_unknown_llm_is_refused(setup, tmp_path):
    config = setup.config()
    doc = yaml.safe_load(config.read_text())
    doc["models"] = doc["models"][:2]
    config.write_text(yaml.safe_dump(doc))
    proc, _ = run_launch(config, setup.workload, tmp_path)
    assert proc.returncode == 2
    assert "names LLMs that the config lacks: ['llm-2']" in proc.stderr
    assert not (tmp_path / "logs").exists()


def test_a_token_id_outside_the_vocabulary_is_refused_before_start(setup, tmp_path):
    from muxserve.workload.workload_file import WorkloadRequest, write_workload

    # The tiny LLMs have a vocabulary of 512; request 3 holds an id of a bigger tokenizer.
    requests = [WorkloadRequest(i, f"llm-{i % 3}", 0.1 * i, [7, 8, 511 if i != 3 else 40000, 9], 4) for i in range(5)]
    workload = tmp_path / "big_ids.json"
    write_workload(workload, {}, requests)
    proc, stats = run_launch(setup.config(), workload, tmp_path)
    assert proc.returncode == 2 and stats is None
    assert (f"workload {workload}: request idx 3 of LLM 'llm-0' has prompt token id 40000, outside the vocabulary "
            f"of its model '{setup.models['llm-0']}' (ids 0..511); was the workload tokenized for another model?"
            in proc.stderr)
    assert not (tmp_path / "logs").exists()  # nothing was started


def test_a_truncated_workload_file_is_named_as_such(setup, tmp_path):
    workload = tmp_path / "cut.json"
    workload.write_text("[1,2")
    proc, _ = run_launch(setup.config(), workload, tmp_path)
    assert proc.returncode == 2
    assert (f"workload file {workload}: not valid JSON (truncated?): the text ends at byte 4 before the document is "
            "complete") in proc.stderr
    assert not (tmp_path / "logs").exists()


def test_request_larger_than_the_pool_is_refused(setup, tmp_path):
    # 4 pages: llm-0 (2 layers x 2 kv-heads per block) holds 1 block of 32 tokens at most.
    proc, _ = run_launch(setup.config(kv_cache_bytes=4 * 16384), setup.workload, tmp_path, "--no-slo")
    assert proc.returncode == 2
    assert "need more KV cache than the pool holds for their LLM" in proc.stderr


def test_max_drain_aborts_what_is_left_and_reports_it_unfinished(setup, tmp_path):
    # Every request at once with long outputs; 0.2 s after the last arrival the rest is aborted.
    from muxserve.workload.workload_file import WorkloadRequest, write_workload

    burst = tmp_path / "burst.json"
    write_workload(burst, {}, [WorkloadRequest(r.idx, r.llm, 0.0, r.prompt_token_ids, 200) for r in setup.requests])
    proc, stats = run_launch(setup.config(), burst, tmp_path, "--no-slo", "--max-drain-s", "0.2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "unfinished requests" in proc.stderr
    overall = stats["summary"]["overall"]
    assert overall["num_requests"] == len(setup.requests)
    assert 0 <= overall["num_finished"] < len(setup.requests)
    unfinished = [r for r in stats["requests"] if r["end"] is None]
    assert len(unfinished) == len(setup.requests) - overall["num_finished"]
    assert all(len(r["output_token_ids"]) < 200 for r in unfinished)


def test_negative_max_drain_is_refused(setup, tmp_path):
    proc, _ = run_launch(setup.config(), setup.workload, tmp_path, "--max-drain-s", "-1")
    assert proc.returncode == 2
    assert "--max-drain-s must be >= 0, got -1.0" in proc.stderr


def test_tensor_parallel_llm_colocated_with_single_device_llms(setup, tmp_path):
    # A mesh of two devices (CPU stand-ins, gloo): llm-1 and llm-2 run with tensor_parallel_size 2
    # over both, each rank holding its kv heads in its own device's pool under the same page ids;
    # llm-0 runs on device 0 alone. Greedy tokens equal the single-process offline engine's.
    doc = yaml.safe_load(setup.config().read_text())
    doc["num_gpus"] = 2
    for m in doc["models"]:
        if m["name"] != "llm-0":
            m.update(tensor_parallel_size=2, placement=[[0, 1]])
    config = tmp_path / "tp.yaml"
    config.write_text(yaml.safe_dump(doc))
    proc, stats = run_launch(config, setup.workload, tmp_path, "--no-slo", "--server-port", str(free_port()))
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_all_match(setup, stats)
    logs = {p.name for p in (tmp_path / "logs").iterdir()}
    assert {"llm-1_prefill_rank0.log", "llm-1_prefill_rank1.log", "llm-2_decode_rank1.log",
            "llm-0_decode.log"} <= logs


@pytest.mark.parametrize("update, message", [
    (dict(pipeline_parallel_size=2, placement=[[0, 1]]),
     "LLM 'llm-0' asks for pipeline_parallel_size 2; pipeline parallelism is not supported: use "
     "tensor_parallel_size (a mesh of up to 8 GPUs of one node) instead"),
    (dict(tensor_parallel_size=4, placement=[[0, 1, 2, 3]]),
     "LLM 'llm-0': tensor_parallel_size 4 does not divide num_key_value_heads 2 of LlamaForCausalLM; "
     "each rank must hold whole kv heads"),
])
def test_unsupported_parallelism_is_refused_before_start(setup, tmp_path, update, message):
    doc = yaml.safe_load(setup.config().read_text())
    doc["num_gpus"] = 4
    doc["models"][0].update(update)
    config = tmp_path / "par.yaml"
    config.write_text(yaml.safe_dump(doc))
    proc, stats = run_launch(config, setup.workload, tmp_path)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert not (tmp_path / "logs").exists()
