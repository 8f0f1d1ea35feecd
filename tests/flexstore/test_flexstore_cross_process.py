"""Zero-copy sharing between processes on CPU: KV pages, weights, and the engine on FlexStore's pool."""

from __future__ import annotations

import torch

from muxserve.engine.llm_engine import EngineConfig, LLMEngine
from muxserve.engine.loader import iter_weights, load_model
from muxserve.engine.model_config import ModelSpec
from muxserve.engine.sampling_params import SamplingParams
from muxserve.flexstore import FlexStoreConfig, ModelEntry, attached_engine

from .helpers import PAGE_BYTES, ipc_address, kv_pattern, make_config, run_worker, start_flexstore

WEIGHT = "layers.0.self_attn.qkv_proj.weight"


def test_kv_and_weights_written_by_one_process_are_seen_by_another(shared_store, client):
    attached = client.attach("qwen-b")  # mapped before the other process writes
    weight = dict(attached.model.named_parameters())[WEIGHT]
    before = weight.view(-1)[0].item()

    # A runtime-like process takes pages for 10 tokens (3 blocks x 3 pages), fills them, pokes a weight.
    done = run_worker(shared_store, "write", shared_store.config.address, "qwen-b", "kv-req", 10, 3.0, WEIGHT, 1234.5)
    assert done["pages"] == client.pages_of("qwen-b", "kv-req") and len(done["pages"]) == 9
    assert done["old_weight"] == before

    view = attached.pool.view(attached.layout)  # (num_pages, 2, page_tokens, head_dim)
    assert torch.equal(view[done["pages"]], kv_pattern(9, attached.layout, 3.0))
    assert weight.view(-1)[0].item() == 1234.5  # the same memory, no re-attach
    weight.view(-1)[0] = before
    assert client.free("qwen-b", ["kv-req"]) == 9
    attached.close()


def test_attached_weights_equal_the_checkpoint_and_are_not_copied(client, tiny_models):
    for name in ("llama-a", "qwen-b", "llama-c"):
        attached = client.attach(name)
        reference = load_model(ModelSpec.from_folder(tiny_models[name]), torch.float32, torch.device("cpu"),
                               iter_weights(tiny_models[name], torch.float32))
        ours, theirs = dict(attached.model.named_parameters()), dict(reference.named_parameters())
        assert sorted(ours) == sorted(theirs)
        for pname, param in theirs.items():
            assert torch.equal(ours[pname], param), pname
        # Every parameter is a view of the one shared weight segment: nothing was copied.
        segment_base = attached._segments[0].tensor.data_ptr()
        assert {p.untyped_storage().data_ptr() for p in ours.values()} == {segment_base}
        assert attached.spec == ModelSpec.from_folder(tiny_models[name])
        attached.close()


def _generate(engine: LLMEngine, prompts, max_tokens: int):
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    seqs = [engine.add_request(p, params) for p in prompts]
    while engine.has_unfinished():
        engine.step()
    return [s.output_token_ids for s in seqs], [s.num_preemptions for s in seqs]


def _prompts(vocab: int, n: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (int(k),), generator=gen).tolist()
            for k in torch.randint(3, 30, (n,), generator=gen)]


def test_engine_on_flexstore_generates_as_in_process(tiny_models, tmp_path):
    # 64 pages: qwen-b takes 3 pages per 4 tokens, so 8 sequences of up to ~50 tokens must preempt.
    config = make_config(tiny_models, ipc_address(tmp_path), names=["qwen-b"], kv_cache_bytes=64 * PAGE_BYTES)
    prompts = _prompts(300, 10, seed=7)
    reference = LLMEngine(EngineConfig(model=str(tiny_models["qwen-b"]), kv_cache_bytes=64 * PAGE_BYTES,
                                       page_bytes=PAGE_BYTES, max_num_seqs=8))
    expected, expected_preemptions = _generate(reference, prompts, 24)
    assert sum(expected_preemptions) > 0

    store = start_flexstore(config, tmp_path / "flexstore.log")
    try:
        with store.client() as client:
            engine = attached_engine(client, "qwen-b", max_num_seqs=8)
            assert engine.pool.num_pages == 64 and engine.allocator is client
            tokens, preemptions = _generate(engine, prompts, 24)
            assert tokens == expected  # token for token
            assert preemptions == expected_preemptions
            stats = client.stats()
            assert stats.num_free == 64 and stats.models[0].preemptions == sum(expected_preemptions)
    finally:
        assert store.stop() == 0


def test_two_engines_share_one_pool(client, tiny_models):
    # 256 pages: 3 x <= 40 tokens of llama-a (<= 20 pages each) and of llama-c (<= 40 each) fit without preemption.
    runs = {}
    for name, vocab in (("llama-a", 256), ("llama-c", 200)):
        prompts = _prompts(vocab, 3, seed=11)
        reference = LLMEngine(EngineConfig(model=str(tiny_models[name]), kv_cache_bytes=256 * PAGE_BYTES,
                                           page_bytes=PAGE_BYTES))
        runs[name] = (attached_engine(client, name), prompts, _generate(reference, prompts, 10)[0])
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    seqs = {name: [engine.add_request(p, params) for p in prompts] for name, (engine, prompts, _) in runs.items()}
    while any(engine.has_unfinished() for engine, _, _ in runs.values()):
        for engine, _, _ in runs.values():  # interleaved steps on one pool
            engine.step()
    for name, (_, _, expected) in runs.items():
        assert [s.output_token_ids for s in seqs[name]] == expected
        assert all(s.num_preemptions == 0 for s in seqs[name])
    assert client.num_free == 256


def test_a_head_size_that_does_not_divide_the_page_shares_flexstore_s_pool(tiny_models, tiny_model, tmp_path):
    """head_dim 80 in fp32 pages of 4 KiB: 6 tokens of 640 B each and 256 B unused per page, next to
    llama-a (head_dim 16: 32 tokens, no remainder). FlexStore reports that geometry and both engines
    on its pool generate what they generate in process."""
    folders = {"hd80": tiny_model("llama-hd80"), "llama-a": tiny_models["llama-a"]}
    page_bytes, num_pages = 4096, 128
    config = FlexStoreConfig(models=tuple(ModelEntry(n, str(f)) for n, f in folders.items()),
                             address=ipc_address(tmp_path), kv_cache_bytes=num_pages * page_bytes,
                             page_bytes=page_bytes)
    runs = {}
    for name, vocab in (("hd80", 512), ("llama-a", 256)):
        prompts = _prompts(vocab, 3, seed=13)
        reference = LLMEngine(EngineConfig(model=str(folders[name]), kv_cache_bytes=num_pages * page_bytes,
                                           page_bytes=page_bytes))
        runs[name] = (prompts, _generate(reference, prompts, 12)[0])
    store = start_flexstore(config, tmp_path / "flexstore.log")
    try:
        with store.client() as fs:
            info = fs.info()
            assert [(m.name, m.layout.page_tokens, m.layout.pages_per_block, m.max_tokens) for m in info.models] == [
                ("hd80", 6, 4, 128 // 4 * 6), ("llama-a", 32, 4, 128 // 4 * 32)]
            engines = {name: attached_engine(fs, name) for name in folders}
            assert engines["hd80"].pool.view(engines["hd80"].layout).stride(0) == page_bytes // 4
            params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
            seqs = {name: [engines[name].add_request(p, params) for p in runs[name][0]] for name in folders}
            while any(e.has_unfinished() for e in engines.values()):
                for e in engines.values():  # interleaved steps on one pool
                    e.step()
            for name, (_, expected) in runs.items():
                assert [s.output_token_ids for s in seqs[name]] == expected, name
            assert fs.num_free == num_pages
    finally:
        assert store.stop() == 0
