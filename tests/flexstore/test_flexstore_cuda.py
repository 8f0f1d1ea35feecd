"""CUDA IPC: the cross-process tests of the CPU path, on a GPU (skipped without CUDA)."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from muxserve.engine.llm_engine import EngineConfig, LLMEngine
from muxserve.engine.loader import iter_weights, load_model
from muxserve.engine.model_config import ModelSpec
from muxserve.engine.sampling_params import SamplingParams
from muxserve.flexstore import attached_engine
from muxserve.flexstore.segments import list_shm

from .helpers import PAGE_BYTES, ipc_address, kv_pattern, make_config, run_worker, start_flexstore

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
WEIGHT = "layers.0.self_attn.qkv_proj.weight"


@pytest.fixture
def cuda_store(tiny_models, tmp_path):
    config = make_config(tiny_models, ipc_address(tmp_path), device="cuda", kv_cache_bytes=256 * PAGE_BYTES)
    before = list_shm()
    store = start_flexstore(config, tmp_path / "flexstore.log")
    yield store
    if store.proc.poll() is None:
        assert store.stop() == 0
    # Neither our segments nor torch's CUDA IPC reference-count files outlive FlexStore.
    assert list_shm() - before == set(), (tmp_path / "flexstore.log").read_text()[-2000:]


def test_cuda_kv_and_weights_are_shared_across_processes(cuda_store, tiny_models):
    with cuda_store.client() as client:
        attached = client.attach("qwen-b")
        assert attached.pool.buffer.is_cuda and attached.device.type == "cuda"
        weight = dict(attached.model.named_parameters())[WEIGHT]
        before = weight.view(-1)[0].item()

        done = run_worker(cuda_store, "write", cuda_store.config.address, "qwen-b", "kv-req", 10, 3.0, WEIGHT, 1234.5)
        assert done["pages"] == client.pages_of("qwen-b", "kv-req") and len(done["pages"]) == 9
        assert done["old_weight"] == before
        view = attached.pool.view(attached.layout)
        assert torch.equal(view[done["pages"]].cpu(), kv_pattern(9, attached.layout, 3.0))
        assert weight.view(-1)[0].item() == 1234.5  # the same device memory
        weight.view(-1)[0] = before

        reference = load_model(ModelSpec.from_folder(tiny_models["qwen-b"]), torch.float32, torch.device("cuda"),
                               iter_weights(tiny_models["qwen-b"], torch.float32))
        ours = dict(attached.model.named_parameters())
        for name, param in reference.named_parameters():
            assert torch.equal(ours[name], param), name
        assert len({p.untyped_storage().data_ptr() for p in ours.values()}) == 1  # one IPC mapping, no copy
        attached.close()


def test_cuda_engine_on_flexstore_generates_as_in_process(cuda_store, tiny_models):
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, 300, (int(n),), generator=gen).tolist()
               for n in torch.randint(3, 30, (6,), generator=gen)]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)

    def run(engine):
        seqs = [engine.add_request(p, params) for p in prompts]
        while engine.has_unfinished():
            engine.step()
        return [s.output_token_ids for s in seqs]

    reference = LLMEngine(EngineConfig(model=str(tiny_models["qwen-b"]), device="cuda",
                                       kv_cache_bytes=256 * PAGE_BYTES, page_bytes=PAGE_BYTES))
    with cuda_store.client() as client:
        assert run(attached_engine(client, "qwen-b")) == run(reference)


def test_cuda_flexstore_sigint_releases_everything(cuda_store):
    with cuda_store.client() as client:
        client.attach("llama-a").close()
    os.kill(cuda_store.pid, signal.SIGINT)
    assert cuda_store.proc.wait(30) == 128 + signal.SIGINT
