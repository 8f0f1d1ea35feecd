"""Elastic meshes: more LLMs than fit at once when their rates say most are idle."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from muxserve.errors import InputError
from muxserve.placement.cli import main
from muxserve.placement.costs import CostModel
from muxserve.placement.estimator import Estimator
from muxserve.placement.greedy import optimize
from muxserve.placement.llms import GB, PlacementSettings, describe_llms
from muxserve.placement.synthetic import synthetic_table, write_shape
from muxserve.workload.models_file import LLMEntry

SMALL = 0.3  # relative latency of the small shape in the synthetic table


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("shapes")
    return {s: write_shape(root / s, s) for s in ("small", "big")}


def estimator(entries, table, **settings) -> Estimator:
    costs = CostModel(table, 161, 338)
    return Estimator(describe_llms(entries, costs, "fp16"), costs,
                     PlacementSettings(gpu_memory_gb=24, reserve_gb=4, **settings))


def hot_and_cold(shapes, n_cold: int, cold_rate: float = 0.002) -> list[LLMEntry]:
    return [LLMEntry("hot", shapes["small"], 5.0)] + [LLMEntry(f"cold-{i}", shapes["small"], cold_rate)
                                                      for i in range(n_cold)]


def test_expected_resident_set_and_wakes_on_exact_numbers(shapes):
    table = synthetic_table({shapes["small"]: SMALL}, ngpus=(1,))
    est = estimator(hot_and_cold(shapes, 5), table, elastic=True, idle_timeout_s=60)
    w = est.llms["hot"].mesh_weight_bytes(1, "fp16")  # 2.06 GB of fp16 weights
    assert w / GB == pytest.approx(2.0568, abs=1e-4)
    p = 1 - math.exp(-0.002 * 60)
    assert est.p_resident("cold-0") == pytest.approx(p) and est.p_resident("hot") == pytest.approx(1.0)
    assert est.wakes_per_s("cold-0") == pytest.approx(0.002 * math.exp(-0.12))
    assert est.wake_s("cold-0", 1) == pytest.approx(w / 25e9 + 0.05)  # bandwidth estimate: no measured wake_s
    e = est.estimate(1, list(est.llms))
    assert e.weight_bytes == 6 * w and e.resident_bytes == pytest.approx(w * (1 + 5 * p))
    usable = 24 * 0.98 * GB
    reserves = (4 + 5 * (p * 4 + (1 - p) * 1.6)) * GB
    assert e.kv_bytes_per_gpu == pytest.approx(usable - w * (1 + 5 * p) - reserves)
    assert e.wake_fraction == pytest.approx(5 * est.wakes_per_s("cold-0") * (w / 25e9 + 0.05))
    assert e.served == pytest.approx(5.01)  # every rate met, the wakes cost little


def test_six_llms_on_one_gpu_only_when_elastic(shapes):
    table = synthetic_table({shapes["small"]: SMALL}, ngpus=(1,))
    entries = hot_and_cold(shapes, 5)
    # 6 x (2.06 GB weights + 4 GB reserve) = 36 GB > 23.5 GB usable
    with pytest.raises(InputError, match="no mesh group"):
        optimize(estimator(entries, table), 1, 1)
    placement = optimize(estimator(entries, table, elastic=True), 1, 1)
    assert [(m.size, m.llms) for m in placement.meshes] == [(1, ["cold-0", "cold-1", "cold-2", "cold-3", "cold-4",
                                                                 "hot"])]


def test_the_idle_llms_processes_bound_how_many_share_a_gpu(shapes):
    """Each offloaded LLM still costs idle_reserve_gb (its runtime processes): 8 cold ones fit next
    to the hot one on 24 GB, 9 do not; with a 0.8 GB idle reserve (one process), 12 do, 13 do not."""
    table = synthetic_table({shapes["small"]: SMALL}, ngpus=(1,))
    fits = {n: estimator(hot_and_cold(shapes, n), table, elastic=True).estimate(1, ["hot"] + [f"cold-{i}" for i in
                                                                                          range(n)]) is not None
            for n in (8, 9)}
    assert fits == {8: True, 9: False}
    for n, fit in ((12, True), (13, False)):
        est = estimator(hot_and_cold(shapes, n), table, elastic=True, idle_reserve_gb=0.8)
        assert (est.estimate(1, list(est.llms)) is not None) is fit


def test_a_busier_cold_llm_is_resident_more_often_and_placement_splits_two_gpus(shapes):
    table = synthetic_table({shapes["small"]: SMALL}, ngpus=(1,))
    entries = [LLMEntry("hot-a", shapes["small"], 6.0), LLMEntry("hot-b", shapes["small"], 3.0)] + [
        LLMEntry(f"cold-{i}", shapes["small"], 0.01 * (i + 1)) for i in range(6)]
    est = estimator(entries, table, elastic=True)
    assert est.p_resident("cold-5") == pytest.approx(1 - math.exp(-3.6))
    placement = optimize(est, 1, 2)
    assert [(m.size, m.llms) for m in placement.meshes] == [(1, ["cold-0", "cold-1", "cold-3", "hot-a"]),
                                                            (1, ["cold-2", "cold-4", "cold-5", "hot-b"])]
    assert placement.served == pytest.approx(9.21)  # every rate met


def test_measured_wake_time_from_the_cost_table(shapes):
    table = synthetic_table({shapes["small"]: SMALL}, ngpus=(1,))
    table["_wake_s"] = {shapes["small"]: {"1": 0.4}}
    est = estimator(hot_and_cold(shapes, 2), table, elastic=True)
    assert est.wake_s("cold-0", 1) == 0.4
    table["_wake_s"] = {shapes["small"]: {"1": "fast"}}
    with pytest.raises(InputError, match="_wake_s"):
        estimator(hot_and_cold(shapes, 2), table, elastic=True).wake_s("cold-0", 1)


def test_an_llm_that_never_fits_alone_is_refused_with_its_numbers(shapes):
    table = synthetic_table({shapes["small"]: SMALL, shapes["big"]: 1.8}, ngpus=(1,))
    entries = [LLMEntry("small", shapes["small"], 1.0), LLMEntry("huge", shapes["big"], 0.001)]
    with pytest.raises(InputError, match=r"huge \(.*big\) never fits, even alone: 1 GPU: 24\.2\d GB weights \+ 4 GB "
                                         r"reserve \+ 0\.\d+ GB for one sequence > 23\.52 GB usable per GPU"):
        optimize(estimator(entries, table, elastic=True), 1, 1)


def test_cli_elastic_flag_and_models_yaml(tmp_path, shapes, capsys):
    doc = {"cluster": {"nnodes": 1, "ngpus_per_node": 1},
           "models": [{"name": e.name, "model": e.model, "rate": e.rate} for e in hot_and_cold(shapes, 3)]}
    (tmp_path / "models.yaml").write_text(yaml.safe_dump(doc))
    (tmp_path / "costs.json").write_text(json.dumps(synthetic_table({shapes["small"]: SMALL}, ngpus=(1,))))
    base = ["--model-yaml", str(tmp_path / "models.yaml"), "--cost-file", str(tmp_path / "costs.json"),
            "--gpu-memory-gb", "16", "--reserve-gb", "4"]
    assert main(base + ["--output-dir", str(tmp_path / "plain")]) != 0  # 4 x 6.06 GB > 15.7 GB
    assert "no mesh group" in capsys.readouterr().err
    assert main(base + ["--output-dir", str(tmp_path / "el"), "--elastic", "--idle-timeout-s", "30"]) == 0
    summary = json.loads((tmp_path / "el" / "placement.json").read_text())
    assert summary["elastic"] is True
    (mesh,) = summary["meshes"]
    assert mesh["llms"] == ["cold-0", "cold-1", "cold-2", "hot"]
    el = mesh["elastic"]
    assert el["idle_timeout_s"] == 30 and el["p_resident"]["cold-0"] == round(1 - math.exp(-0.06), 4)
    assert el["weights_gb_per_gpu"] > el["memory_gb_per_gpu"] / 2 > el["expected_resident_gb_per_gpu"]
    doc["elastic"] = {"idle_timeout_s": 30}
    (tmp_path / "models.yaml").write_text(yaml.safe_dump(doc))
    assert main(base + ["--output-dir", str(tmp_path / "yaml")]) == 0
    assert json.loads((tmp_path / "yaml" / "placement.json").read_text())["meshes"][0]["elastic"] == el
    doc["elastic"] = {"idle_timeout": 30}
    (tmp_path / "models.yaml").write_text(yaml.safe_dump(doc))
    assert main(base + ["--output-dir", str(tmp_path / "bad")]) != 0
    assert "unknown keys ['idle_timeout']" in capsys.readouterr().err


def test_the_exact_program_agrees_on_an_elastic_instance(shapes):
    from muxserve.placement.ilp import ilp_place

    table = synthetic_table({shapes["small"]: SMALL}, ngpus=(1,))
    entries = [LLMEntry("hot-a", shapes["small"], 6.0), LLMEntry("hot-b", shapes["small"], 3.0)] + [
        LLMEntry(f"cold-{i}", shapes["small"], 0.01 * (i + 1)) for i in range(6)]
    est = estimator(entries, table, elastic=True)
    exact = ilp_place(est, 1, 2)
    assert exact.served == pytest.approx(optimize(est, 1, 2).served)
    assert sorted(n for m in exact.meshes for n in m.llms) == sorted(est.llms)
