"""FlexStore over a mesh of two devices (CPU stand-ins): per-rank shards, one pool per device, global page ids."""

from __future__ import annotations

import pytest
import torch

from muxserve.engine.loader import load_model, meta_model, random_checkpoint
from muxserve.engine.parallel import TensorParallel
from muxserve.flexstore import protocol as P
from muxserve.flexstore.config import FlexStoreConfig, ModelEntry
from muxserve.flexstore.manager import FlexStoreManager

from .helpers import PAGE_BYTES


@pytest.fixture
def mesh(tiny_models):
    # llama-a (2 kv heads) over both devices; qwen-b (1 kv head) on device 1 alone.
    config = FlexStoreConfig(
        models=(ModelEntry("a", str(tiny_models["llama-a"]), tensor_parallel_size=2, devices=(0, 1)),
                ModelEntry("b", str(tiny_models["qwen-b"]), devices=(1,))),
        address="ipc:///unused", kv_cache_bytes=64 * PAGE_BYTES, page_bytes=PAGE_BYTES, num_devices=2,
        shm_prefix="muxserve-mesh-test")
    manager = FlexStoreManager(config)
    yield manager
    manager.close()


def test_each_rank_holds_its_slice_of_the_checkpoint(mesh, tiny_models):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_models["llama-a"]).state_dict()
    q_rows = hf["model.layers.1.self_attn.q_proj.weight"].shape[0] // 2
    for rank, stored in enumerate(mesh.shards["a"]):
        model = meta_model(stored.spec, stored.dtype, TensorParallel(2, rank))
        params = {t.name: t for t in stored.tensors}
        assert set(params) == {n for n, _ in model.named_parameters()}
        t = params["layers.1.self_attn.qkv_proj.weight"]
        buf = stored.segment.tensor
        n = t.shape[0] * t.shape[1] * 4
        qkv = buf[t.offset: t.offset + n].view(torch.float32).view(t.shape)
        expected_q = hf["model.layers.1.self_attn.q_proj.weight"][rank * q_rows:(rank + 1) * q_rows]
        assert torch.equal(qkv[:q_rows], expected_q)
    assert len(mesh.shards["b"]) == 1


def test_pools_per_device_and_page_geometry_per_rank(mesh):
    info = mesh.handle(P.GetInfo())
    assert info.num_devices == 2 and info.num_pages == 64
    a = next(m for m in info.models if m.name == "a")
    assert (a.tensor_parallel_size, a.devices, a.layout.num_kv_heads) == (2, (0, 1), 1)
    assert a.layout.pages_per_block == 2  # 2 layers x 1 kv head of this rank
    assert len(mesh.pool_segments) == 2
    assert mesh.pool_segments[0].descriptor.name != mesh.pool_segments[1].descriptor.name
    r0, r1 = mesh.handle(P.Attach("a", 0)), mesh.handle(P.Attach("a", 1))
    assert r0.pool.name == mesh.pool_segments[0].descriptor.name
    assert r1.pool.name == mesh.pool_segments[1].descriptor.name
    assert r0.weights.name != r1.weights.name
    b = mesh.handle(P.Attach("b"))
    assert b.pool.name == mesh.pool_segments[1].descriptor.name
    err = mesh.handle(P.Attach("a", 2))
    assert (err.code, err.message) == ("invalid", "model 'a' has 2 tensor-parallel rank(s); there is no rank 2")
    # One allocator: page ids of "a" and "b" never overlap, whatever device they live on.
    pa = mesh.handle(P.Allocate("a", [("r1", 8)])).new_pages["r1"]
    pb = mesh.handle(P.Allocate("b", [("r2", 8)])).new_pages["r2"]
    assert not set(pa) & set(pb)


def test_random_shards_are_slices_of_the_whole_random_model(tiny_models):
    from muxserve.engine.model_config import ModelSpec

    spec = ModelSpec.from_folder(tiny_models["llama-a"])
    whole = dict(random_checkpoint(spec, torch.float32, torch.device("cpu"), seed=5))
    shards = []
    for rank in range(2):
        model = load_model(spec, torch.float32, torch.device("cpu"),
                           random_checkpoint(spec, torch.float32, torch.device("cpu"), seed=5), TensorParallel(2, rank))
        shards.append(dict(model.named_parameters()))
    down = torch.cat([s["layers.0.mlp.down_proj.weight"] for s in shards], dim=1)
    assert torch.equal(down, whole["layers.0.mlp.down_proj.weight"])
    k_rows = whole["layers.0.self_attn.k_proj.weight"].shape[0] // 2
    q_rows = whole["layers.0.self_attn.q_proj.weight"].shape[0] // 2
    k1 = shards[1]["layers.0.self_attn.qkv_proj.weight"][q_rows:q_rows + k_rows]
    assert torch.equal(k1, whole["layers.0.self_attn.k_proj.weight"][k_rows:])
