"""FlexStore settings: the CLI's parsing and the config's validation (exact messages)."""

from __future__ import annotations

import argparse

import msgspec
import pytest

from muxserve.flexstore import FlexStoreConfig, ModelEntry
from muxserve.flexstore.__main__ import build_parser, config_from_args, main, parse_bytes
from muxserve.flexstore.config import parse_model_arg

ADDRESS = "tcp://127.0.0.1:50051"


def test_model_argument():
    assert parse_model_arg("a=smollm2-135m") == ModelEntry("a", "smollm2-135m", "float32")
    assert parse_model_arg("b=/models/x:bfloat16", "float16") == ModelEntry("b", "/models/x", "bfloat16")
    assert parse_model_arg("c=/models/y", "float16") == ModelEntry("c", "/models/y", "float16")
    assert parse_model_arg("d=random:/shapes/8b:bf16") == ModelEntry("d", "/shapes/8b", "bf16", "random")
    assert parse_model_arg("e=C:/odd:path") == ModelEntry("e", "C:/odd:path")  # a colon that is no dtype
    with pytest.raises(ValueError, match=r"--model 'nope': expected NAME=MODEL\[:DTYPE\]"):
        parse_model_arg("nope")


@pytest.mark.parametrize("text, value", [("536870912", 536870912), ("512MiB", 512 * 2**20), ("2GiB", 2 * 2**30),
                                         ("1.5GB", 1_500_000_000), ("64 kib", 65536)])
def test_sizes(text, value):
    assert parse_bytes(text) == value


def test_bad_size():
    with pytest.raises(argparse.ArgumentTypeError, match="not a size: 'lots'"):
        parse_bytes("lots")


def test_cli_to_config_and_json_round_trip():
    args = build_parser().parse_args(["--model", "a=/m/a", "--model", "b=/m/b:bfloat16", "--address", ADDRESS,
                                      "--kv-cache-bytes", "1GiB", "--page-bytes", "4096", "--dtype", "float16"])
    config = config_from_args(args)
    assert config == FlexStoreConfig(models=(ModelEntry("a", "/m/a", "float16"), ModelEntry("b", "/m/b", "bfloat16")),
                                     address=ADDRESS, kv_cache_bytes=2**30, page_bytes=4096)
    # FlexStoreProcess hands the config to the child as JSON.
    assert msgspec.json.decode(msgspec.json.encode(config), type=FlexStoreConfig) == config


def test_help_exits_cleanly(capsys):
    with pytest.raises(SystemExit) as excinfo:
        main(["--help"])
    assert excinfo.value.code == 0
    assert "--kv-cache-bytes" in capsys.readouterr().out


@pytest.mark.parametrize("kwargs, message", [
    (dict(models=()), "FlexStore needs at least one model"),
    (dict(models=(ModelEntry("a", "x"), ModelEntry("a", "y"))), "duplicate model names: ['a']"),
    (dict(address="localhost:5555"),
     "address 'localhost:5555' is not a ZeroMQ endpoint like tcp://127.0.0.1:5555 or ipc:///tmp/fs"),
    (dict(gpu_memory_utilization=1.5), "gpu_memory_utilization must be in (0, 1], got 1.5"),
    (dict(page_bytes=100), "page_bytes must be a positive multiple of 64, got 100"),
    (dict(kv_cache_bytes=10), "kv_cache_bytes (10) is smaller than one page (16384)"),
    (dict(shm_prefix="a/b"), "shm_prefix 'a/b' must be 1-64 letters, digits, '_', '.' or '-'"),
])
def test_config_validation(kwargs, message):
    base = dict(models=(ModelEntry("a", "x"),), address=ADDRESS)
    with pytest.raises(ValueError) as excinfo:
        FlexStoreConfig(**{**base, **kwargs})
    assert str(excinfo.value) == message


def test_model_entry_validation():
    with pytest.raises(ValueError, match=r"^model name 'a b' must be non-empty and have no spaces$"):
        ModelEntry("a b", "x")
    with pytest.raises(ValueError, match=r"^load_format 'npz' of model 'a'; choose from \('auto', 'random'\)$"):
        ModelEntry("a", "x", load_format="npz")


def test_mesh_placement_validation():
    with pytest.raises(ValueError, match=r"^model 'a': devices \[0\] must name 2 distinct device\(s\), one per "
                                         r"tensor-parallel rank$"):
        ModelEntry("a", "x", tensor_parallel_size=2)
    with pytest.raises(ValueError, match=r"^model 'a': devices \[1, 1\] must name 2 distinct"):
        ModelEntry("a", "x", tensor_parallel_size=2, devices=(1, 1))
    with pytest.raises(ValueError) as excinfo:
        FlexStoreConfig(models=(ModelEntry("a", "x", tensor_parallel_size=2, devices=(1, 2)),), address=ADDRESS,
                        num_devices=2)
    assert str(excinfo.value) == "model 'a' is placed on devices [2] outside the mesh of 2 device(s)"
    config = FlexStoreConfig(models=(ModelEntry("a", "x"),), address=ADDRESS, device="cuda:2", num_devices=3)
    assert config.device_names() == ["cuda:2", "cuda:3", "cuda:4"]
    assert FlexStoreConfig(models=(ModelEntry("a", "x"),), address=ADDRESS, num_devices=2).device_names() == ["cpu"] * 2
