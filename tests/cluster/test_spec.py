"""Reading the placement's output: what the cluster takes from placement.json, and the errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from muxserve.cluster.ray_cluster import fit_nodes, ray_address
from muxserve.cluster.spec import load_placement, portable_config
from muxserve.errors import ClusterError

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "placement_8gpu" / "placement"


def test_reads_the_placement_optimizer_output():
    spec = load_placement(EXAMPLE)  # the folder; placement.json itself works the same
    assert spec.source == EXAMPLE / "placement.json"
    assert [(m.name, m.node, m.num_gpus, m.llms) for m in spec.meshes] == [
        ("mesh0", 0, 4, ("llm-2", "llm-8")), ("mesh1", 0, 2, ("llm-3", "llm-4", "llm-5")),
        ("mesh2", 0, 1, ("llm-0", "llm-7", "llm-9")), ("mesh3", 0, 1, ("llm-1", "llm-6"))]
    assert spec.meshes[0].config_path == EXAMPLE / "muxserve" / "models_mesh0_n4.yaml"
    assert list(spec.nodes()) == [0]
    assert spec.mesh_of("llm-7").name == "mesh2"
    assert load_placement(EXAMPLE / "placement.json").meshes == spec.meshes


def test_portable_config_makes_model_paths_absolute_and_drops_the_workload():
    mesh = load_placement(EXAMPLE).meshes[1]
    doc = yaml.safe_load(portable_config(mesh, REPO))
    assert [m["model"] for m in doc["models"]] == [str(REPO / "examples/shapes/qwen2.5-7b"),
                                                   str(REPO / "examples/shapes/yi-34b"),
                                                   str(REPO / "examples/shapes/llama-3-8b")]
    assert "workloads" not in doc
    assert doc["num_gpus"] == 2 and doc["models"][0]["tensor_parallel_size"] == 2
    # a short name (or a path that does not exist here) is left as it is
    assert yaml.safe_load(portable_config(mesh, Path("/nonexistent")))["models"][0]["model"] == \
        "examples/shapes/qwen2.5-7b"


def _placement(tmp_path: Path, meshes: list[dict], configs: dict[str, list[str]]) -> Path:
    for name, llms in configs.items():
        doc = {"num_gpus": 1, "models": [{"name": n, "model": "smollm2-135m", "model_dtype": "fp32"} for n in llms]}
        (tmp_path / name).write_text(yaml.safe_dump(doc))
    (tmp_path / "placement.json").write_text(json.dumps({"meshes": meshes}))
    return tmp_path


def _mesh(i: int, config: str, llms: list[str], **extra) -> dict:
    return {"mesh": i, "node": 0, "num_gpus": 1, "config": config, "llms": llms, **extra}


@pytest.mark.parametrize("case, message", [
    ("missing", "placement {tmp}/nope does not exist (give the placement's output folder or its placement.json)"),
    ("no_json", "placement folder {tmp} has no placement.json (write it with python -m muxserve.muxsched.placement "
                "--output-dir {tmp})"),
    ("not_json", "{tmp}/placement.json: not valid JSON near byte 1: "),  # then msgspec's reason
    ("no_config", "{tmp}/placement.json: "),  # then msgspec's words naming `config` of meshes[0]
    ("config_missing", "{tmp}/placement.json: meshes[0] (mesh 0): config 'gone.yaml': model config {tmp}/gone.yaml "
                       "does not exist"),
    ("llms_differ", "{tmp}/placement.json: meshes[0] (mesh 0): placement.json lists LLMs ['a', 'b'] but its config "
                    "{tmp}/a.yaml serves ['a']"),
    ("twice", "{tmp}/placement.json: meshes[1] (mesh 1): LLM 'a' is also on mesh 0; an LLM runs on one mesh"),
    ("gpus", "{tmp}/placement.json: meshes[0] (mesh 0): num_gpus 2 but its config {tmp}/a.yaml has num_gpus 1"),
])
def test_bad_placements_are_refused_naming_file_and_value(tmp_path, case, message):
    target = tmp_path
    if case == "missing":
        target = tmp_path / "nope"
    elif case == "not_json":
        (tmp_path / "placement.json").write_text("{nope")
    elif case == "no_config":
        (tmp_path / "placement.json").write_text(json.dumps({"meshes": [{"mesh": 0, "node": 0, "num_gpus": 1,
                                                                          "llms": ["a"]}]}))
    elif case == "config_missing":
        _placement(tmp_path, [_mesh(0, "gone.yaml", ["a"])], {})
    elif case == "llms_differ":
        _placement(tmp_path, [_mesh(0, "a.yaml", ["a", "b"])], {"a.yaml": ["a"]})
    elif case == "twice":
        _placement(tmp_path, [_mesh(0, "a.yaml", ["a"]), _mesh(1, "a.yaml", ["a"])], {"a.yaml": ["a"]})
    elif case == "gpus":
        _placement(tmp_path, [_mesh(0, "a.yaml", ["a"], num_gpus=2)], {"a.yaml": ["a"]})
    with pytest.raises(ClusterError) as err:
        load_placement(target)
    if case in ("not_json", "no_config"):  # the file and the place are ours, the reason msgspec's
        assert str(err.value).startswith(message.format(tmp=tmp_path)), str(err.value)
        assert case == "not_json" or ("config" in str(err.value) and "meshes[0]" in str(err.value))
    else:
        assert str(err.value) == message.format(tmp=tmp_path)


def test_fit_nodes_keeps_each_placement_node_on_one_machine():
    assert fit_nodes({0: 4, 1: 2}, [2.0, 4.0])
    assert fit_nodes({0: 4, 1: 4}, [8.0])  # two placement nodes may share a big machine
    assert not fit_nodes({0: 3}, [2.0, 2.0])  # but a node's meshes never span machines
    assert not fit_nodes({0: 2, 1: 2, 2: 1}, [2.0, 2.0])


def test_ray_address_defaults_to_the_head_port():
    assert ray_address("10.0.0.5") == "10.0.0.5:6379"
    assert ray_address("10.0.0.5:6380") == "10.0.0.5:6380"


def test_the_cluster_example_is_a_placement_of_two_machines():
    spec = load_placement(REPO / "examples" / "cluster" / "placement")
    assert [(m.name, m.node, m.num_gpus, m.llms) for m in spec.meshes] == [
        ("mesh0", 0, 1, ("llm-0",)), ("mesh1", 1, 1, ("llm-1", "llm-2"))]
    assert spec.num_gpus == 2
