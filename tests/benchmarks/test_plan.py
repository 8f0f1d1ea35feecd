"""Planning the systems for GPU machines (no launch): colocation, placement, spatial splits, instances."""

from __future__ import annotations

import json

import pytest
import yaml

from benchmark.end_to_end.e2e_placement import placement_groups
from benchmark.end_to_end.e2e_plan import (
    GB,
    Machine,
    PlanOptions,
    default_groups,
    describe_llms,
    kv_budget,
    overload_units,
    plan_systems,
)
from muxserve.placement.synthetic import synthetic_table
from muxserve.workload.models_file import (
    LLMEntry,
    ModelsFile,
    write_models_file,
)
from muxserve.workload.workload_file import Workload, WorkloadRequest, write_workload

from .helpers import REPO

SHAPES = ["llama-3.2-1b", "smollm2-1.7b", "llama-3.2-3b", "llama-3-8b"]
RATES = [8.0, 3.3, 1.9, 1.2]


def _setup(tmp_path, num_gpus):
    entries = [LLMEntry(f"llm-{i}", f"examples/shapes/{s}", r) for i, (s, r) in enumerate(zip(SHAPES, RATES))]
    requests = [WorkloadRequest(i, f"llm-{i % 4}", 0.1 * i, [1] * (10 + i), 20 + i) for i in range(12)]
    workload = Workload({"rates": [[e.name, e.rate] for e in entries]}, requests)
    write_workload(tmp_path / "workload.json", workload.info, requests)
    write_models_file(tmp_path / "models.yaml", ModelsFile(entries, 1, num_gpus))
    return entries, workload


def _config(point, launch):
    return yaml.safe_load((point / launch.config).read_text())


def test_one_gpu_colocates_everything_and_splits_it_statically_for_spatial(tmp_path):
    entries, workload = _setup(tmp_path, 1)
    machine = Machine(1, "cuda", 80.0, "bf16", 7.6)
    llms = describe_llms(entries, workload, "bf16")
    assert [m.load_format for m in llms] == ["random"] * 4  # config.json only
    assert [round(m.params / 1e9, 2) for m in llms] == [1.24, 1.71, 3.21, 8.03]
    assert llms[0].max_request_tokens == 10 + 8 + 20 + 8  # the largest request of llm-0 (idx 8)
    groups = default_groups(llms, machine)
    assert [(g.device, g.llms) for g in groups] == [(0, ["llm-0", "llm-1", "llm-2", "llm-3"])]
    assert groups[0].mps == {"llm-0": [80, 30], "llm-1": [80, 30], "llm-2": [80, 40], "llm-3": [80, 50]}
    plans = plan_systems(tmp_path, llms, machine, workload, "workload.json", groups,
                         ["muxserve", "temporal", "spatial"], PlanOptions())
    budget = kv_budget(machine, llms)
    weights = sum(m.params for m in llms) * 2
    assert budget == pytest.approx(80 * GB * 0.98 - weights - 4 * 7.6 * GB)
    mux, tmp = plans["muxserve"].launches, plans["temporal"].launches
    assert [(launch.schedule, launch.mps, launch.workload) for launch in mux + tmp] == [
        ("adbs", True, "workload.json"), ("fcfs", False, "workload.json")]
    mux_cfg, tmp_cfg = _config(tmp_path, mux[0]), _config(tmp_path, tmp[0])
    util = int(budget / (80 * GB) * 1000) / 1000
    assert mux_cfg["gpu_memory_utilization"] == tmp_cfg["gpu_memory_utilization"] == util
    assert [m["mps_percentage"] for m in mux_cfg["models"]] == [[80, 30], [80, 30], [80, 40], [80, 50]]
    assert [m["mps_percentage"] for m in tmp_cfg["models"]] == [[100, 90]] * 4
    assert all(m["load_format"] == "random" and m["model_dtype"] == "bf16" for m in mux_cfg["models"])
    # decode shares 3 + 3 + 4 + 5 = 15 units: MuxServe shares 5 so all four decode together;
    # temporal keeps 2 (its [100, 90] jobs must run one at a time)
    assert (mux_cfg["overload_threshold"], tmp_cfg["overload_threshold"]) == (5, 2)
    spatial = plans["spatial"].launches
    assert [(s.name, s.split_by_model, s.schedule, s.mps, s.devices) for s in spatial] == [
        (f"llm-{i}", f"llm-{i}", "fix", True, [0]) for i in range(4)]
    split = plans["spatial"].notes["split"]
    # SM shares ∝ rate x parameters (8 x 1.24, 3.3 x 1.71, 1.9 x 3.21, 1.2 x 8.03: 9.9, 5.6, 6.1, 9.6)
    assert [split[f"llm-{i}"]["sm_percent"] for i in range(4)] == [32, 18, 19, 31]
    assert sum(v["sm_percent"] for v in split.values()) == 100
    utils = [_config(tmp_path, s)["gpu_memory_utilization"] for s in spatial]
    assert sum(utils) == pytest.approx(mux_cfg["gpu_memory_utilization"], abs=0.005)
    assert utils == sorted(utils, reverse=True)  # KV slices ∝ rate: llm-0 the biggest
    assert [_config(tmp_path, s)["models"][0]["mps_percentage"] for s in spatial] == [
        [42, 32], [28, 18], [29, 19], [41, 31]]  # fix runs prefill 10 points lower: both at the share


def test_overload_units_let_a_meshs_decodes_run_together():
    machine = Machine(1, "cuda", 80.0)
    assert overload_units(machine, [30, 30, 40, 50]) == 5
    assert overload_units(machine, [30, 40]) == 2  # they fit anyway: the flag stands
    assert overload_units(Machine(1, "cuda", 80.0, overload_threshold=7), [30, 30, 40, 50]) == 7
    assert overload_units(machine, [90] * 4) == 10  # at most every unit shared once


def _placed_on_two_gpus(tmp_path, mesh_sizes):
    """The four LLMs placed on a 2-GPU H100 machine with a synthetic cost table of ``mesh_sizes``."""
    entries, workload = _setup(tmp_path, 2)
    machine = Machine(2, "cuda", 80.0, "bf16", 7.6)
    llms = describe_llms(entries, workload, "bf16")
    costs = tmp_path / "costs.json"
    costs.write_text(json.dumps(synthetic_table({s: 0.2 + 0.1 * i for i, s in enumerate(SHAPES)}, ngpus=mesh_sizes)))
    groups, cmd = placement_groups(tmp_path, tmp_path / "models.yaml", tmp_path / "workload.json", costs, llms,
                                   machine, [])
    return workload, machine, llms, groups, cmd


def test_two_gpus_with_placement_and_balanced_spatial_split(tmp_path):
    workload, machine, llms, groups, cmd = _placed_on_two_gpus(tmp_path, (1,))
    assert cmd[:4] == ["python", "-m", "muxserve.muxsched.placement", "--model-yaml"]
    assert sorted(g.device for g in groups) == [0, 1]
    assert sorted(n for g in groups for n in g.llms) == ["llm-0", "llm-1", "llm-2", "llm-3"]
    assert (tmp_path / "placement" / "placement.json").is_file()
    plans = plan_systems(tmp_path, llms, machine, workload, "workload.json", groups,
                         ["muxserve", "temporal", "spatial"], PlanOptions())
    for system in ("muxserve", "temporal"):
        launches = plans[system].launches
        assert sorted(launch.devices[0] for launch in launches) == [0, 1]
        for launch, g in zip(launches, groups):
            sub = json.loads((tmp_path / launch.workload).read_text())
            assert {r["model_name"] for r in sub["requests"]} == set(g.llms)
            idx_map = json.loads((tmp_path / launch.idx_map).read_text())
            assert [workload.requests[i].llm for i in idx_map] == [r["model_name"] for r in sub["requests"]]
            assert [m["name"] for m in _config(tmp_path, launch)["models"]] == g.llms
    # spatial: four LLMs on two GPUs -> two per GPU, each GPU split statically, under MPS
    spatial = plans["spatial"].launches
    assert sorted(s.devices[0] for s in spatial) == [0, 0, 1, 1] and all(s.mps and s.schedule == "fix" for s in spatial)
    split = plans["spatial"].notes["split"]
    for device in (0, 1):
        assert sum(v["sm_percent"] for v in split.values() if v["device"] == device) == 100


def test_enough_gpus_give_every_llm_its_own_for_spatial(tmp_path):
    entries, workload = _setup(tmp_path, 4)
    machine = Machine(4, "cuda", 80.0, "bf16", 7.6)
    llms = describe_llms(entries, workload, "bf16")
    plans = plan_systems(tmp_path, llms, machine, workload, "workload.json", default_groups(llms, machine),
                         ["spatial"], PlanOptions())
    spatial = plans["spatial"].launches
    # busiest (rate x parameters) first: llm-0 (9.9), llm-3 (9.6), llm-2 (6.1), llm-1 (5.6)
    assert [(s.name, s.devices, s.schedule, s.mps) for s in spatial] == [
        ("llm-0", [0], "adbs", False), ("llm-3", [1], "adbs", False), ("llm-2", [2], "adbs", False),
        ("llm-1", [3], "adbs", False)]
    assert all(_config(tmp_path, s)["models"][0]["mps_percentage"] == [100, 90] for s in spatial)
    assert "muxserve" not in plans


def test_too_little_memory_is_refused_with_the_numbers(tmp_path):
    entries, workload = _setup(tmp_path, 1)
    machine = Machine(1, "cuda", 40.0, "bf16", 7.6)
    llms = describe_llms(entries, workload, "bf16")
    with pytest.raises(RuntimeError, match="leave -.* GB of KV cache on one GPU"):
        plan_systems(tmp_path, llms, machine, workload, "workload.json", default_groups(llms, machine),
                     ["muxserve"], PlanOptions())
    assert (REPO / "examples" / "shapes" / "smollm2-1.7b" / "config.json").is_file()


def test_a_two_gpu_mesh_runs_its_llms_tensor_parallel(tmp_path):
    # A cost table with 2-GPU entries only: the placement must put the four LLMs on one mesh of
    # both GPUs, so every LLM runs with tensor_parallel_size 2 over GPUs 0 and 1.
    from muxserve.config import load_config

    workload, machine, llms, groups, _ = _placed_on_two_gpus(tmp_path, (2,))
    assert [(g.devices, g.llms) for g in groups] == [([0, 1], ["llm-0", "llm-1", "llm-2", "llm-3"])]
    weights = sum(m.params for m in llms) * 2
    assert groups[0].kv_bytes == pytest.approx(80 * GB * 0.98 - weights / 2 - 4 * 7.6 * GB)
    plans = plan_systems(tmp_path, llms, machine, workload, "workload.json", groups, ["muxserve", "temporal"],
                         PlanOptions())
    for system in ("muxserve", "temporal"):
        (launch,) = plans[system].launches
        assert launch.devices == [0, 1]
        assert launch.config == f"configs/{system}/mesh0_gpu0-1.yaml"
        cfg = load_config(tmp_path / launch.config)
        assert cfg.num_gpus == 2
        assert [(m.tensor_parallel_size, m.placement) for m in cfg.models] == [(2, [[0, 1]])] * 4


def test_one_gpu_instances_alone_and_the_muxserve_schedule(tmp_path):
    entries, workload = _setup(tmp_path, 1)
    machine = Machine(1, "cuda", 80.0, "bf16", 7.6)
    llms = describe_llms(entries, workload, "bf16")
    groups = default_groups(llms, machine)
    plans = plan_systems(tmp_path, llms, machine, workload, "workload.json", groups,
                         ["alone", "muxserve", "spatial", "instances"], PlanOptions(muxserve_schedule="adbs-paper"))
    assert sorted(plans) == ["alone", "instances", "muxserve", "spatial"]
    assert [launch.schedule for launch in plans["muxserve"].launches] == ["adbs-paper"]
    # instances: one launch per LLM on GPU 0 without MPS, every SM, the static split's KV slices
    inst, spatial = plans["instances"], plans["spatial"]
    assert [(x.name, x.devices, x.schedule, x.mps, x.split_by_model) for x in inst.launches] == [
        (f"llm-{i}", [0], "adbs", False, f"llm-{i}") for i in range(4)]
    for a, b in zip(inst.launches, spatial.launches):
        ca, cb = _config(tmp_path, a), _config(tmp_path, b)
        assert ca["models"][0]["mps_percentage"] == [100, 90] and cb["models"][0]["mps_percentage"] != [100, 90]
        assert ca["gpu_memory_utilization"] == cb["gpu_memory_utilization"]
    assert {n: v["kv_gb"] for n, v in inst.notes["split"].items()} == {
        n: v["kv_gb"] for n, v in spatial.notes["split"].items()}
    # the common base: the whole colocation at [100, 90], no MPS, calibration only
    [base] = plans["alone"].launches
    assert base.calibrate_only and not base.mps and base.schedule == "fcfs"
    assert {m["name"]: m["mps_percentage"] for m in _config(tmp_path, base)["models"]} == {
        f"llm-{i}": [100, 90] for i in range(4)}
