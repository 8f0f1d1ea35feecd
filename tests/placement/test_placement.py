"""Placement: mesh groups, model memory, the estimator on exact numbers, hand-checked placements,
YAMLs that the launcher's config loader accepts, and the greedy against the exact ILP."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from muxserve.config import load_config
from muxserve.placement.cli import main
from muxserve.placement.costs import BatchEstimate, CostModel
from muxserve.placement.estimator import Estimator
from muxserve.placement.greedy import build_meshes, greedy_place, mesh_groups, node_splits, optimize
from muxserve.placement.llms import GB, PlacementSettings, describe_llms, model_facts
from muxserve.placement.synthetic import SCALES, SHAPES, random_instance, synthetic_table, write_shape
from muxserve.workload.models_file import LLMEntry


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("configs")
    return {shape: write_shape(root / shape, shape) for shape in SHAPES}


def constant_table(key: str, decode_ms: dict[int, float], max_bs: int) -> dict:
    """Prefill 100 ms and decode ``decode_ms[sm]`` whatever the batch and length, batches up to ``max_bs``."""
    return {key: {"1": {str(sm): {str(bs): {str(sl): {"prefill": 100.0, "decoding": dec} for sl in (32, 512)}
                                  for bs in (1, max_bs)} for sm, dec in decode_ms.items()}}}


def estimator(entries, table, prompt=20.0, output=10.0, **settings) -> Estimator:
    costs = CostModel(table, prompt, output)
    dtype = settings.get("model_dtype", "fp16")
    return Estimator(describe_llms(entries, costs, dtype), costs, PlacementSettings(**settings))


def layout(p) -> list[tuple[int, int, tuple[int, ...], list[str]]]:
    return [(m.node, m.size, m.devices, m.llms) for m in p.meshes]


def test_mesh_groups():
    assert node_splits(8) == [(8,), (4, 4), (4, 2, 2), (4, 2, 1, 1), (4, 1, 1, 1, 1), (2, 2, 2, 2), (2, 2, 2, 1, 1),
                              (2, 2, 1, 1, 1, 1), (2, 1, 1, 1, 1, 1, 1), (1,) * 8]  # the original's list for 8
    assert node_splits(6) == [(4, 2), (4, 1, 1), (2, 2, 2), (2, 2, 1, 1), (2, 1, 1, 1, 1), (1,) * 6]
    assert node_splits(1) == [(1,)] and node_splits(3) == [(2, 1), (1, 1, 1)]
    assert mesh_groups(2, 2) == [((2,), (2,)), ((2,), (1, 1)), ((1, 1), (1, 1))]
    assert [(m.node, m.size, m.devices) for m in build_meshes(((4, 2, 1, 1), (2, 2)))] == [
        (0, 4, (0, 1, 2, 3)), (0, 2, (4, 5)), (0, 1, (6,)), (0, 1, (7,)), (1, 2, (0, 1)), (1, 2, (2, 3))]


def test_cost_model_interpolates_the_table():
    cell = lambda pre, dec: {"prefill": pre, "decoding": dec}  # noqa: E731
    table = {"m": {"1": {"100": {
        "1": {"32": cell(10, 5), "64": cell(20, 6)},
        "4": {"32": cell(40, 8), "64": cell(-1, 10)},  # the 4 x 64 prefill was not measured
        "8": {"32": cell(-1, -1), "64": cell(-1, -1)}}}}}  # batch 8 and beyond: out of memory
    costs = CostModel(table, avg_prompt_len=48, avg_output_len=40)  # decode at 48 + 40 / 2 = 68 tokens
    lat = costs.latencies("m", 1, 100)
    assert lat.max_bs == 4
    # prefill: bs 1 halfway between 32 and 64 tokens; bs 4 from its one point, in proportion to tokens
    assert lat.prefill[1:].tolist() == pytest.approx([0.015, 0.030, 0.045, 0.060])
    # decode: past 64 tokens along the last segment (6 + 4/32 ms, 10 + 4 * 2/32 ms)
    assert lat.decode[1:].tolist() == pytest.approx([0.006125, 0.0075, 0.008875, 0.01025])
    # tpt(bs) = bs / (decode * 40 + prefill) = 3.85, 6.06, 7.5, 8.51 req/s
    assert costs.best_batch(lat, 7.0, max_bs=8) == BatchEstimate(3, pytest.approx(7.5), True)
    assert costs.best_batch(lat, 9.0, max_bs=8) == BatchEstimate(4, pytest.approx(4 / 0.47), False)
    assert costs.best_batch(lat, 7.0, max_bs=2) == BatchEstimate(2, pytest.approx(2 / 0.33), False)


def test_model_memory_comes_from_config_json(tmp_path):
    # a folder named like a 65B model holding the small shape: its size is the config's, not the name's
    folder = write_shape(tmp_path / "llama-65b", "small")
    h, i, layers, heads, kv, vocab = SHAPES["small"]
    d = h // heads
    per_layer = h * heads * d + 2 * h * kv * d + heads * d * h + 3 * h * i + 2 * h
    assert model_facts(folder) == (2 * vocab * h + layers * per_layer + h, 2 * layers * kv * d)
    assert model_facts(f"random:{folder}") == model_facts(folder)


def test_estimator_on_exact_numbers(models):
    # tpt(bs) = bs / (0.010 s * 10 + 0.100 s) = 5 bs alone; together the two prefills add up
    table = constant_table(models["small"], {50: 10.0}, max_bs=10**6)  # batches bound by KV only
    est = estimator([LLMEntry("a", models["small"], 12.0), LLMEntry("b", models["small"], 4.0)], table)
    cand = est.candidates["a"][1]
    assert (cand.decode_sm, cand.prefill_sm, cand.batch_size, cand.throughput, cand.satisfied) == (
        50, 50, 3, 15.0, True)
    # colocated: tpt_i = bs_i / 0.3; a grows 1 -> 4 (ties go to the first), then b 1 -> 2
    both = est.estimate(1, ["b", "a"])
    assert both.batch_sizes == {"a": 4, "b": 2}
    assert both.served == pytest.approx(16.0) and both.throughputs == {"a": 12.0, "b": 4.0}
    # KV: one sequence each, the rest in proportion to rate x KV per token (3:1 for equal models)
    budget = 80 * GB * 0.98 - 2 * est.llms["a"].weight_bytes("fp16") - 2 * 7.6 * GB
    seq = est.llms["a"].kv_bytes_per_token * 30
    spare = budget - 2 * seq
    assert both.max_num_seqs == {"a": 1 + int(spare * 0.75 // seq), "b": 1 + int(spare * 0.25 // seq)}
    assert both.kv_bytes_per_gpu == budget
    # Δ is 4 on either GPU: the tie goes to the idle one
    placement = optimize(est, 1, 2)
    assert layout(placement) == [(0, 1, (0,), ["a"]), (0, 1, (1,), ["b"])] and placement.served == pytest.approx(16.0)
    assert layout(optimize(est, 1, 1)) == [(0, 1, (0,), ["a", "b"])]


def test_decode_share_is_the_smallest_that_meets_the_rate_and_a_mesh_caps_the_sum(models):
    # batches up to 8: tpt(8) = 8 / (decode * 10 + 0.1) = 14.5, 17.8, 22.9, 32 req/s at 30, 50, 70, 90 %
    table = constant_table(models["small"], {30: 45.0, 50: 35.0, 70: 25.0, 90: 15.0, 100: 10.0}, max_bs=8)
    entries = [LLMEntry("llm-0", models["small"], 19.0), LLMEntry("llm-1", models["small"], 19.0),
               LLMEntry("llm-2", models["small"], 10.0)]
    est = estimator(entries, table)
    got = {n: (c[1].prefill_sm, c[1].decode_sm, c[1].batch_size) for n, c in est.candidates.items()}
    assert got == {"llm-0": (90, 70, 7), "llm-1": (90, 70, 7), "llm-2": (90, 30, 6)}
    # 70 + 70 > 100 + 20: the two busy LLMs never share a GPU; the idle one joins the first
    assert est.estimate(1, ["llm-0", "llm-1"]) is None
    assert layout(optimize(est, 1, 2)) == [(0, 1, (0,), ["llm-0", "llm-2"]), (0, 1, (1,), ["llm-1"])]
    with pytest.raises(ValueError, match="no mesh group of the cluster can hold every LLM"):
        optimize(est, 1, 1)


def test_two_hot_llms_and_a_cold_one_on_two_gpus(models):
    table = synthetic_table({models["small"]: 0.3}, ngpus=(1,))
    entries = [LLMEntry("llm-0", models["small"], 120.0), LLMEntry("llm-1", models["small"], 80.0),
               LLMEntry("llm-2", models["small"], 2.0)]
    est = estimator(entries, table, prompt=161, output=338)
    got = {n: (c[1].decode_sm, c[1].satisfied) for n, c in est.candidates.items()}
    # llm-0 is beyond one GPU even at 90 % of the SMs; the others need the least share (30 %)
    assert got == {"llm-0": (90, False), "llm-1": (30, True), "llm-2": (30, True)}
    placement = optimize(est, 1, 2)
    # each hot LLM gets a GPU; the cold one joins llm-1, which has room: next to the saturated
    # llm-0 its prefills would cost llm-0 more than the 2 req/s it adds
    assert placement.group == ((1, 1),)
    assert layout(placement) == [(0, 1, (0,), ["llm-0"]), (0, 1, (1,), ["llm-1", "llm-2"])]
    assert est.estimate(1, ["llm-0", "llm-2"]).served < est.estimate(1, ["llm-0"]).served
    assert est.estimate(1, ["llm-1", "llm-2"]).served == pytest.approx(82.0)
    assert placement.served == pytest.approx(est.estimate(1, ["llm-0"]).served + 82.0)
    assert est.estimate(1, ["llm-0", "llm-1", "llm-2"]) is None  # 90 + 30 + 30 > 100 + 20


def test_a_model_too_big_for_one_gpu_gets_a_two_gpu_mesh(models):
    table = synthetic_table({models["big"]: 1.8, models["small"]: 0.3}, ngpus=(1, 2))
    entries = [LLMEntry("llm-0", models["small"], 5.0), LLMEntry("llm-1", models["big"], 2.0)]
    params_big = model_facts(models["big"])[0]
    assert params_big * 2 / GB > 24 * 0.98 - 4  # 24.3 GB of fp16 weights: no single 24 GB GPU holds it
    est = estimator(entries, table, prompt=161, output=338, gpu_memory_gb=24, reserve_gb=4)
    assert sorted(est.candidates["llm-1"]) == [2] and sorted(est.candidates["llm-0"]) == [1, 2]
    placement = optimize(est, 1, 2)
    assert placement.group == ((2,),)
    assert layout(placement) == [(0, 2, (0, 1), ["llm-0", "llm-1"])]


def write_inputs(tmp_path: Path, models, rates: dict[str, tuple[str, float]], nnodes=1, ngpus=2) -> tuple[Path, Path]:
    doc = {"cluster": {"nnodes": nnodes, "ngpus_per_node": ngpus},
           "models": [{"name": n, "model": models[shape], "rate": r} for n, (shape, r) in rates.items()]}
    models_yaml = tmp_path / "models.yaml"
    models_yaml.write_text(yaml.safe_dump(doc, sort_keys=False))
    costs = tmp_path / "costs.json"
    costs.write_text(json.dumps(synthetic_table({models["small"]: 0.3, models["medium"]: 1.0}, ngpus=(1, 2))))
    return models_yaml, costs


def test_cli_writes_configs_that_load(tmp_path, models, capsys):
    models_yaml, costs = write_inputs(tmp_path, models, {"llm-0": ("medium", 12.0), "llm-1": ("small", 6.0),
                                                        "llm-2": ("small", 2.0), "llm-3": ("medium", 0.5)})
    out = tmp_path / "out"
    rc = main(["--model-yaml", str(models_yaml), "--cost-file", str(costs), "--output-dir", str(out),
               "--compare-ilp", "--avg-prompt-len", "161", "--avg-output-len", "338"])
    assert rc == 0
    summary = json.loads((out / "placement.json").read_text())
    printed = capsys.readouterr().out
    assert "| mesh | node | GPUs | LLM |" in printed and "exact optimum" in printed
    placed = sorted(name for mesh in summary["meshes"] for name in mesh["llms"])
    assert placed == ["llm-0", "llm-1", "llm-2", "llm-3"]  # every LLM exactly once
    assert summary["ilp_tpt"] >= summary["expected_tpt"] - 1e-6 and summary["greedy_gap"] <= 0.05
    for kind in ("muxserve", "temporal", "spatial"):
        assert summary["files"][kind]
        for rel in summary["files"][kind]:
            config = load_config(out / rel)
            for m in config.models:
                assert m.tensor_parallel_size == config.num_gpus and m.devices == list(range(config.num_gpus))
                assert m.model_dtype == "fp16" and m.max_num_seqs >= 1
    for mesh in summary["meshes"]:
        config = load_config(out / mesh["config"])
        assert config.model_names == mesh["llms"] and config.overload_threshold == 2
        rows = {r["llm"]: r for r in summary["llms"]}
        assert [m.mps_percentage for m in config.models] == [rows[n]["mps_percentage"] for n in mesh["llms"]]
        assert [m.max_num_seqs for m in config.models] == [rows[n]["max_num_seqs"] for n in mesh["llms"]]
        assert 0 < config.gpu_memory_utilization < 1
        assert sum(m.decode_percentage for m in config.models) <= 120
        temporal = load_config(out / mesh["config"].replace("muxserve/", "temporal/"))
        assert [m.mps_percentage for m in temporal.models] == [[100, 90]] * len(mesh["llms"])
    assert summary["spatial_num_gpus"] == sum(s["num_gpus"] for s in summary["spatial"])
    # the output folder is not written twice without --overwrite
    assert main(["--model-yaml", str(models_yaml), "--cost-file", str(costs), "--output-dir", str(out)]) == 2
    assert capsys.readouterr().err.strip() == (f"error: output folder {out} is not empty; pass --overwrite to write "
                                               "into it")


def test_cli_takes_average_lengths_from_the_workload(tmp_path, models, capsys):
    from muxserve.workload.workload_file import WorkloadRequest, write_workload

    models_yaml, costs = write_inputs(tmp_path, models, {"llm-0": ("small", 2.0), "llm-1": ("small", 1.0)})
    workload = tmp_path / "w.json"
    write_workload(workload, {}, [WorkloadRequest(0, "llm-0", 0.1, [1] * 100, 40),
                                  WorkloadRequest(1, "llm-1", 0.2, [1] * 300, 60)])
    rc = main(["--model-yaml", str(models_yaml), "--cost-file", str(costs), "--output-dir", str(tmp_path / "o"),
               "--workload-file", str(workload), "--write-kv-bytes"])
    assert rc == 0
    summary = json.loads((tmp_path / "o" / "placement.json").read_text())
    assert (summary["avg_prompt_len"], summary["avg_output_len"]) == (200.0, 50.0)
    config = load_config(tmp_path / "o" / summary["meshes"][0]["config"])
    assert config.workloads.workload_file == str(workload) and config.kv_cache_bytes > 0


@pytest.mark.parametrize("change, message", [
    ({"cost": None}, "error: cost table {tmp}/missing.json does not exist"),
    ({"cost": {"x": {"1": {"100": {"1": {"32": {"prefill": 1}}}}}}},
     "error: cost table {tmp}/costs.json: x/1/100/1/32 must be {{\"prefill\": ms, \"decoding\": ms}}, "
     "got {{'prefill': 1}}"),
    ({"rate": None}, "error: {tmp}/models.yaml: models[0] ('llm-0') has no 'rate' (requests/s)"),
])
def test_cli_errors(change, message, tmp_path, models, capsys):
    models_yaml, costs = write_inputs(tmp_path, models, {"llm-0": ("small", 2.0)})
    if "cost" in change:
        if change["cost"] is None:
            costs = tmp_path / "missing.json"
        else:
            costs.write_text(json.dumps(change["cost"]))
    if "rate" in change:
        models_yaml.write_text(f"models:\n- {{name: llm-0, model: {models['small']}}}\n")
    rc = main(["--model-yaml", str(models_yaml), "--cost-file", str(costs), "--output-dir", str(tmp_path / "o")])
    assert rc == 2
    assert capsys.readouterr().err.strip() == message.format(tmp=tmp_path)


def test_model_missing_from_the_cost_table(tmp_path, models, capsys):
    models_yaml, costs = write_inputs(tmp_path, models, {"llm-0": ("big", 2.0)})
    assert main(["--model-yaml", str(models_yaml), "--cost-file", str(costs), "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: llm-0: model '{models['big']}' is not in the cost table (it has [")


def check_valid(est: Estimator, placement) -> None:
    """Every LLM placed once; weights + reserve + KV within each GPU; decode shares within the limit."""
    s = est.settings
    assert sorted(n for m in placement.meshes for n in m.llms) == sorted(est.llms)
    for mesh in placement.meshes:
        if not mesh.llms:
            continue
        weights = sum(est.llms[n].mesh_weight_bytes(mesh.size, s.model_dtype) for n in mesh.llms) / mesh.size
        assert all(mesh.size in est.llms[n].tp_sizes() for n in mesh.llms)  # TP = mesh size splits each
        assert weights + len(mesh.llms) * s.reserve_gb * GB + mesh.estimate.kv_bytes_per_gpu <= s.usable_bytes + 1
        assert sum(est.candidates[n][mesh.size].decode_sm for n in mesh.llms) <= 100 + s.overload_sm
        kv_need = sum(est.llms[n].kv_bytes_per_token * est.seq_len * mesh.estimate.max_num_seqs[n] for n in mesh.llms)
        assert kv_need <= mesh.estimate.kv_bytes_per_gpu * mesh.size + 1


def test_greedy_is_valid_and_close_to_the_ilp_optimum(models):
    pytest.importorskip("pulp")
    from muxserve.placement.ilp import ilp_place

    table = synthetic_table({models[shape]: scale for shape, scale in SCALES.items()})
    gaps = []
    # 19, 141, 194: the greedy alone is 18-30 % off; 1093: the worst of 1,190 with local search (1.4 %);
    # 356: a tight packing that only the lookahead finds
    for seed in (19, 102, 141, 194, 201, 1093, 356, 5, 7):
        nnodes, ngpus, entries, gpu_gb = random_instance(seed, models)
        est = estimator(entries, table, prompt=161, output=338, gpu_memory_gb=gpu_gb)
        greedy, exact = optimize(est, nnodes, ngpus), ilp_place(est, nnodes, ngpus)
        check_valid(est, greedy)
        check_valid(est, exact)
        assert exact.served >= greedy.served - 1e-6
        gaps.append(1 - greedy.served / exact.served)
    assert max(gaps) <= 0.05, gaps
    alone = greedy_place(est, optimize(est, nnodes, ngpus).group)
    assert alone is not None and alone.method == "greedy"
