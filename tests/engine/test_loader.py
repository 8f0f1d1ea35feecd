"""Checkpoint loading and model resolution: sharded folders, clear errors, convert-once caching."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import TINY_KV_BYTES, build_tiny_model, random_prompts
from safetensors.torch import load_file, save_file

from muxserve.engine import LLM, SamplingParams, model_hub
from muxserve.engine.loader import INDEX_FILE, iter_weights, safetensors_files
from muxserve.engine.model_hub import KNOWN_MODELS, resolve_model

GREEDY = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
PROMPTS = random_prompts((4, 19, 37), seed=5)


def generate(folder) -> list[list[int]]:
    llm = LLM(str(folder), kv_cache_bytes=TINY_KV_BYTES)
    return [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]


@pytest.fixture(scope="module")
def single_outputs(tiny_model):
    return generate(tiny_model("qwen2"))


def weights_only_copy(src: Path, dest: Path, drop=(), change=None) -> Path:
    """Copy a single-file checkpoint, dropping or replacing tensors."""
    shutil.copytree(src, dest)
    tensors = load_file(str(dest / "model.safetensors"))
    for name in drop:
        del tensors[name]
    tensors.update(change or {})
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    return dest


# -- sharded checkpoints ------------------------------------------------------------------------
def test_sharded_checkpoint_loads_like_the_single_file(tmp_path, single_outputs, tiny_model):
    sharded = build_tiny_model("qwen2", tmp_path / "sharded", max_shard_size="100KB")
    index = json.loads((sharded / INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (sharded / "model.safetensors").exists()
    assert safetensors_files(sharded) == [sharded / name for name in shards]
    single = dict(iter_weights(tiny_model("qwen2")))
    split = dict(iter_weights(sharded))
    assert split.keys() == single.keys() == index["weight_map"].keys()
    assert all(split[name].equal(single[name]) for name in single)  # same seed, same tensors
    assert generate(sharded) == single_outputs


def test_index_naming_a_missing_shard_is_an_error(tmp_path):
    sharded = build_tiny_model("qwen2", tmp_path / "sharded", max_shard_size="100KB")
    shard = sorted(set(json.loads((sharded / INDEX_FILE).read_text())["weight_map"].values()))[-1]
    (sharded / shard).unlink()
    with pytest.raises(FileNotFoundError, match=f"names shards that do not exist: .*{shard}"):
        LLM(str(sharded), kv_cache_bytes=TINY_KV_BYTES)


# -- broken folders ------------------------------------------------------------------------------
def test_folder_without_config_is_an_error(tiny_model, tmp_path):
    folder = tmp_path / "no-config"
    shutil.copytree(tiny_model("qwen2"), folder)
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=f"model folder {folder} has no config.json"):
        LLM(str(folder), kv_cache_bytes=TINY_KV_BYTES)


def test_folder_without_weights_is_an_error(tiny_model, tmp_path):
    folder = tmp_path / "no-weights"
    folder.mkdir()
    shutil.copy(tiny_model("qwen2") / "config.json", folder / "config.json")
    with pytest.raises(FileNotFoundError, match=f"no safetensors weights in {folder}"):
        LLM(str(folder), kv_cache_bytes=TINY_KV_BYTES)


def test_unsupported_architecture_is_named(tmp_path):
    from transformers import GPT2Config

    folder = tmp_path / "gpt2"
    config = GPT2Config(n_layer=1, n_embd=64, n_head=2, vocab_size=100, architectures=["GPT2LMHeadModel"])
    config.save_pretrained(folder)
    with pytest.raises(ValueError,
                       match=r"unsupported architecture \['GPT2LMHeadModel'\].*supported: LlamaForCausalLM"):
        LLM(str(folder), kv_cache_bytes=TINY_KV_BYTES)


def test_unsupported_rope_type_is_named(tiny_model, tmp_path):
    folder = tmp_path / "yarn"
    shutil.copytree(tiny_model("llama3-rope"), folder)
    config = json.loads((folder / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unsupported rope type 'yarn'"):
        LLM(str(folder), kv_cache_bytes=TINY_KV_BYTES)


def test_missing_tensor_is_named(tiny_model, tmp_path):
    folder = weights_only_copy(tiny_model("qwen2"), tmp_path / "missing",
                               drop=["model.norm.weight", "model.layers.1.self_attn.k_proj.bias"])
    with pytest.raises(ValueError, match=r"lacks tensors for Qwen2ForCausalLM: "
                                         r".*'layers\.1\.self_attn\.qkv_proj\.bias@128'.*'norm\.weight'"):
        LLM(str(folder), kv_cache_bytes=TINY_KV_BYTES)


def test_wrong_shape_and_unknown_tensors_are_named(tiny_model, tmp_path):
    import torch

    folder = weights_only_copy(tiny_model("qwen2"), tmp_path / "shape",
                               change={"model.layers.0.mlp.up_proj.weight": torch.zeros(255, 128)})
    with pytest.raises(ValueError,
                       match=r"'model.layers.0.mlp.up_proj.weight' has shape \(255, 128\), expected \(256, 128\)"):
        LLM(str(folder), kv_cache_bytes=TINY_KV_BYTES)
    folder = weights_only_copy(tiny_model("qwen2"), tmp_path / "extra", change={"model.extra.weight": torch.zeros(3)})
    with pytest.raises(ValueError, match="'model.extra.weight' has no place in Qwen2ForCausalLM"):
        LLM(str(folder), kv_cache_bytes=TINY_KV_BYTES)


# -- model_hub ------------------------------------------------------------------------------------
def test_resolve_nonexistent_path_names_it_and_the_short_names(tmp_path):
    missing = tmp_path / "nowhere" / "model"
    with pytest.raises(FileNotFoundError) as err:
        resolve_model(missing)
    assert str(missing) in str(err.value)
    assert "smollm2-135m" in str(err.value)
    assert set(KNOWN_MODELS) == {"smollm2-135m"}


def test_resolve_folder_returns_it(tiny_model):
    folder = tiny_model("qwen2")
    assert resolve_model(folder) == folder
    assert resolve_model(str(folder)) == folder


@pytest.mark.slow
def test_second_resolve_does_not_convert_again(smollm2_folder, monkeypatch):
    def no_conversion(gguf, out):
        raise AssertionError(f"converted {gguf} again")

    monkeypatch.setattr(model_hub, "_write_hf_folder", no_conversion)
    assert resolve_model("smollm2-135m") == smollm2_folder
    assert (smollm2_folder / model_hub.COMPLETE_MARKER).is_file()
    assert (smollm2_folder / "config.json").is_file() and (smollm2_folder / "model.safetensors").is_file()


def test_convert_happens_once_and_leaves_no_temporary_folder(tmp_path, monkeypatch):
    calls = []

    def fake_write(gguf, out):
        calls.append(gguf)
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(model_hub, "_write_hf_folder", fake_write)
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF")
    dest = tmp_path / "cache" / "fake"
    assert model_hub.convert_gguf(gguf, dest) == dest
    assert model_hub.convert_gguf(gguf, dest) == dest
    assert calls == [gguf]
    assert sorted(p.name for p in dest.iterdir()) == [model_hub.COMPLETE_MARKER, "config.json"]
    assert sorted(p.name for p in dest.parent.iterdir()) == [".fake.lock", "fake"]


def test_failed_conversion_leaves_nothing_behind(tmp_path, monkeypatch):
    def broken_write(gguf, out):
        out.mkdir(parents=True)
        (out / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(model_hub, "_write_hf_folder", broken_write)
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF")
    dest = tmp_path / "cache" / "fake"
    with pytest.raises(RuntimeError, match="disk full"):
        model_hub.convert_gguf(gguf, dest)
    assert sorted(p.name for p in dest.parent.iterdir()) == [".fake.lock"]
