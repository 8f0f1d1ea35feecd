"""model_config YAML: a valid file loads; every inconsistency is a ConfigError naming the file, the field
and the value (our own checks word for word; msgspec's type checks by what they name, not its wording)."""

from __future__ import annotations

import textwrap

import pytest

from muxserve.config import load_config
from muxserve.errors import ConfigError


def assert_names(err, path, *fragments) -> None:
    """The message starts with the file and names every fragment (the field, the bad value)."""
    message = str(err.value)
    assert message.startswith(f"{path}: "), message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


VALID = """\
num_gpus: 2
max_num_seqs: 128
overload_threshold: 3
gpu_memory_utilization: 0.4
models:
  - name: llm-0
    model: smollm2-135m
    tensor_parallel_size: 1
    pipeline_parallel_size: 1
    placement: [[0]]
    mps_percentage: [100, 30]
    model_dtype: fp32
    max_num_seqs: 16
  - name: llm-1
    model: smollm2-135m
    tensor_parallel_size: 2
    placement: [[0, 1]]
    mps_percentage: [40, 80]
    model_dtype: bf16
workloads:
  workload_file: examples/basic/workload.json
"""


def write(tmp_path, text: str, name: str = "model_config.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_valid_config_loads(tmp_path):
    config = load_config(write(tmp_path, VALID))
    assert (config.num_gpus, config.max_num_seqs, config.overload_threshold) == (2, 128, 3)
    assert config.gpu_memory_utilization == 0.4
    assert config.kv_cache_bytes is None
    assert config.model_names == ["llm-0", "llm-1"]
    assert config.workloads.workload_file == "examples/basic/workload.json"
    m0, m1 = config.models
    assert (m0.prefill_percentage, m0.decode_percentage, m0.torch_dtype_name, m0.devices) == (100, 30, "float32", [0])
    # the larger percentage runs prefill, whatever the order
    assert (m1.prefill_percentage, m1.decode_percentage, m1.torch_dtype_name, m1.devices) == (
        80, 40, "bfloat16", [0, 1])
    assert (m1.tensor_parallel_size, m1.pipeline_parallel_size, m1.load_format) == (2, 1, "auto")


def test_per_model_max_num_seqs_honoured(tmp_path):
    config = load_config(write(tmp_path, VALID))
    assert config.max_num_seqs_of("llm-0") == 16
    assert config.max_num_seqs_of("llm-1") == 128  # falls back to the instance-wide value
    with pytest.raises(ConfigError, match=r"^no LLM named 'llm-9' in the config; LLMs: \['llm-0', 'llm-1'\]$"):
        config.max_num_seqs_of("llm-9")


def test_defaults(tmp_path):
    config = load_config(write(tmp_path, "models:\n  - name: a\n    model: m\n"))
    assert (config.num_gpus, config.max_num_seqs, config.overload_threshold) == (1, 256, 2)
    (m,) = config.models
    assert (m.placement, m.mps_percentage, m.model_dtype, m.max_num_seqs) == ([[0]], [100, 100], "fp16", None)
    assert config.workloads.workload_file is None


def test_duplicate_names(tmp_path):
    path = write(tmp_path, """\
        models:
          - name: llm-0
            model: m
          - name: llm-0
            model: m
        """)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}: models[1] ('llm-0'): two LLMs are named 'llm-0'; names must be unique"


@pytest.mark.parametrize("pcts, where, bound", [
    ("[130, 30]", "[0]", "100"),
    ("[100, 0]", "[1]", "1"),
])
def test_mps_percentage_out_of_range(tmp_path, pcts, where, bound):
    path = write(tmp_path, f"models:\n  - name: a\n    model: m\n    mps_percentage: {pcts}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert_names(err, path, f"models[0].mps_percentage{where}", bound)


def test_mps_percentage_needs_two_values(tmp_path):
    path = write(tmp_path, "models:\n  - name: a\n    model: m\n    mps_percentage: [100, 30, 20]\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}: models[0] ('a'): mps_percentage must be [prefill, decode], got [100, 30, 20]"


def test_placement_outside_num_gpus(tmp_path):
    path = write(tmp_path, """\
        num_gpus: 2
        models:
          - name: a
            model: m
            tensor_parallel_size: 2
            placement: [[1, 2]]
        """)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}: models[0] ('a'): placement devices [2] are outside num_gpus=2"


def test_placement_length_must_match_tp_times_pp(tmp_path):
    path = write(tmp_path, """\
        num_gpus: 4
        models:
          - name: a
            model: m
            tensor_parallel_size: 2
            pipeline_parallel_size: 2
            placement: [[0, 1]]
        """)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == (f"{path}: models[0] ('a'): placement [0, 1] has 2 devices but "
                              f"tensor_parallel_size x pipeline_parallel_size = 4")


def test_empty_placement(tmp_path):
    path = write(tmp_path, "models:\n  - name: a\n    model: m\n    placement: [[]]\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}: models[0] ('a'): placement must list the devices, e.g. [[0]]"


def test_unknown_fields(tmp_path):
    path = write(tmp_path, "foo: 3\nmodels:\n  - name: a\n    model: m\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert_names(err, path, "foo")
    path = write(tmp_path, "models:\n  - name: a\n    model: m\n    bar: 1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert_names(err, path, "bar", "models[0]")


def test_bad_values(tmp_path):
    path = write(tmp_path, "models:\n  - name: a\n    model: m\n    model_dtype: int8\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert_names(err, path, "'int8'", "models[0].model_dtype")
    path = write(tmp_path, "models: []\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert_names(err, path, "models", "1")
    path = write(tmp_path, "overload_threshold: 11\nmodels:\n  - name: a\n    model: m\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert_names(err, path, "overload_threshold", "10")


def test_missing_models(tmp_path):
    path = write(tmp_path, "num_gpus: 1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert_names(err, path, "models")


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"model config {path} does not exist"
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path)  # a folder is not a config file


def test_invalid_yaml(tmp_path):
    path = write(tmp_path, "num_gpus: 1\nmodels: [a, b\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}: not valid YAML: while parsing a flow sequence")


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_residency_is_pinned_or_elastic(tmp_path):
    config = load_config(write(tmp_path, "models:\n  - name: a\n    model: m\n    residency: elastic\n"))
    assert config.models[0].residency == "elastic"
    assert load_config(write(tmp_path, "models:\n  - name: a\n    model: m\n")).models[0].residency == "pinned"
    path = write(tmp_path, "models:\n  - name: a\n    model: m\n    residency: sometimes\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}: models[0] ('a'): residency must be 'pinned' or 'elastic', got 'sometimes'"


def test_elastic_needs_a_single_device(tmp_path):
    path = write(tmp_path, VALID.replace("    model_dtype: bf16\n", "    model_dtype: bf16\n    residency: elastic\n"))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert_names(err, path, "models[1] ('llm-1')", "residency 'elastic' needs a single-device instance",
                 "num_gpus=2", "use residency 'pinned'")


def test_offload_idle_s_needs_an_elastic_llm(tmp_path):
    from muxserve.instance.cli import check_instance_args
    from muxserve.launch import build_parser

    config = load_config(write(tmp_path, "models:\n  - name: a\n    model: m\n"))
    args = build_parser().parse_args(["cfg.yaml", "--offload-idle-s", "5"])
    with pytest.raises(ConfigError, match="--offload-idle-s: no LLM of cfg.yaml has 'residency: elastic'"):
        check_instance_args(args, config, "cpu", "cfg.yaml")
    args = build_parser().parse_args(["cfg.yaml", "--offload-idle-s", "-1"])
    with pytest.raises(ConfigError, match="--offload-idle-s must be >= 0, got -1"):
        check_instance_args(args, config, "cpu", "cfg.yaml")
