"""Generation semantics of the engine on a tiny random-weight Llama: batching, sampling, stopping, limits."""

from __future__ import annotations

import pytest
from conftest import TINY_KV_BYTES, TINY_MAX_POS, copy_with_config, random_prompts

from muxserve.engine import LLM, SamplingParams

PROMPTS = random_prompts((3, 20, 45, 64), seed=7)
GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
SAMPLED = dict(max_tokens=24, temperature=0.8, top_p=0.9, top_k=50, ignore_eos=True)


def token_ids(outputs) -> list[list[int]]:
    return [o.token_ids for o in outputs]


def assert_pool_empty(llm: LLM) -> None:
    allocator = llm.engine.allocator
    assert allocator.num_free == allocator.num_pages
    assert allocator.used_by(llm.engine.MODEL_NAME) == 0
    assert not llm.engine.has_unfinished()


@pytest.fixture(scope="module")
def greedy_outputs(tiny_llm):
    return token_ids(tiny_llm.generate(PROMPTS, GREEDY))


# -- batching ----------------------------------------------------------------------------------
def test_batch_equals_prompts_one_by_one(tiny_llm, greedy_outputs):
    alone = [tiny_llm.generate([p], GREEDY)[0].token_ids for p in PROMPTS]
    assert greedy_outputs == alone
    assert all(len(t) == 24 for t in alone)
    assert len({tuple(t) for t in alone}) == len(PROMPTS)  # the prompts really lead to different text


def test_seeded_sampling_batch_equals_one_by_one(tiny_llm):
    params = [SamplingParams(**SAMPLED, seed=100 + i) for i in range(len(PROMPTS))]
    engine = tiny_llm.engine
    batch = [engine.add_request(p, sp) for p, sp in zip(PROMPTS, params)]
    while engine.has_unfinished():
        engine.step()
    for prompt, sp, seq in zip(PROMPTS, params, batch):
        assert seq.output_token_ids == tiny_llm.generate([prompt], sp)[0].token_ids
    assert_pool_empty(tiny_llm)


def test_greedy_and_sampled_requests_share_a_batch(tiny_llm, greedy_outputs):
    engine = tiny_llm.engine
    sampled = SamplingParams(**SAMPLED, seed=5)
    seqs = [engine.add_request(p, GREEDY if i % 2 == 0 else sampled) for i, p in enumerate(PROMPTS)]
    while engine.has_unfinished():
        engine.step()
    for i, (prompt, seq) in enumerate(zip(PROMPTS, seqs)):
        if i % 2 == 0:
            assert seq.output_token_ids == greedy_outputs[i]
        else:
            assert seq.output_token_ids == tiny_llm.generate([prompt], sampled)[0].token_ids


def test_max_num_seqs_limits_the_batch_not_the_result(tiny_model, greedy_outputs, monkeypatch):
    llm = LLM(str(tiny_model("llama-gqa-hd64")), kv_cache_bytes=TINY_KV_BYTES, max_num_seqs=2)
    sizes = []
    real_step = llm.engine.runner.execute
    monkeypatch.setattr(llm.engine.runner, "execute",
                        lambda seqs, prefill: sizes.append(len(seqs)) or real_step(seqs, prefill))
    assert token_ids(llm.generate(PROMPTS, GREEDY)) == greedy_outputs
    assert max(sizes) == 2


# -- sampling ----------------------------------------------------------------------------------
def test_seeded_sampling_is_reproducible_and_depends_on_the_seed(tiny_llm, greedy_outputs):
    first = token_ids(tiny_llm.generate(PROMPTS, SamplingParams(**SAMPLED, seed=1234)))
    second = token_ids(tiny_llm.generate(PROMPTS, SamplingParams(**SAMPLED, seed=1234)))
    other = token_ids(tiny_llm.generate(PROMPTS, SamplingParams(**SAMPLED, seed=4321)))
    assert first == second
    assert all(len(t) == 24 for t in first)
    assert first != other
    assert first != greedy_outputs
    assert_pool_empty(tiny_llm)


@pytest.mark.parametrize("filters", [dict(top_k=1), dict(top_p=1e-6)], ids=["top_k=1", "top_p=1e-6"])
def test_filters_that_keep_one_token_sample_the_argmax(tiny_llm, greedy_outputs, filters):
    # At temperature 5 an unfiltered sample is close to uniform over 512 tokens; the filter must
    # leave only the most likely token.
    params = SamplingParams(max_tokens=24, temperature=5.0, seed=3, ignore_eos=True, **filters)
    assert token_ids(tiny_llm.generate(PROMPTS, params)) == greedy_outputs


# -- stopping ----------------------------------------------------------------------------------
@pytest.mark.parametrize("max_tokens", [1, 5, 33])
def test_max_tokens_ends_exactly(tiny_llm, max_tokens):
    outputs = tiny_llm.generate(PROMPTS, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
    assert [len(o.token_ids) for o in outputs] == [max_tokens] * len(PROMPTS)
    assert [o.finish_reason for o in outputs] == ["length"] * len(PROMPTS)
    assert_pool_empty(tiny_llm)


def test_max_tokens_output_is_a_prefix_of_a_longer_run(tiny_llm, greedy_outputs):
    short = tiny_llm.generate(PROMPTS, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    assert token_ids(short) == [t[:5] for t in greedy_outputs]


@pytest.mark.parametrize("ignore_eos", [False, True])
def test_stop_token_ends_the_request_with_it(tiny_llm, greedy_outputs, ignore_eos):
    full = greedy_outputs[1]
    stop = full[6]
    end = full.index(stop)  # the first time it appears
    (out,) = tiny_llm.generate([PROMPTS[1]], SamplingParams(max_tokens=24, temperature=0, stop_token_ids=[stop],
                                                             ignore_eos=ignore_eos))
    assert out.token_ids == full[: end + 1]
    assert out.token_ids[-1] == stop
    assert out.finish_reason == "stop"
    assert_pool_empty(tiny_llm)


@pytest.mark.parametrize("source", ["config.json", "generation_config.json"])
def test_eos_ends_the_request_unless_ignore_eos(tiny_model, greedy_outputs, tmp_path, source):
    full = greedy_outputs[2]
    eos = full[9]
    end = full.index(eos)
    change = {"eos_token_id": eos}
    folder = copy_with_config(tiny_model("llama-gqa-hd64"), tmp_path / "eos",
                              config=change if source == "config.json" else None,
                              generation_config=change if source == "generation_config.json" else None)
    llm = LLM(str(folder), kv_cache_bytes=TINY_KV_BYTES)
    assert eos in llm.engine.eos_token_ids

    (stopped,) = llm.generate([PROMPTS[2]], SamplingParams(max_tokens=24, temperature=0))
    assert stopped.token_ids == full[: end + 1]
    assert stopped.finish_reason == "stop"

    (ignored,) = llm.generate([PROMPTS[2]], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
    assert ignored.token_ids == full
    assert ignored.finish_reason == "length"


def test_context_limit_ends_generation(tiny_llm):
    prompt = random_prompts([TINY_MAX_POS - 3], seed=11)[0]
    (out,) = tiny_llm.generate([prompt], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
    assert len(out.token_ids) == 3
    assert out.finish_reason == "length"


# -- rejected requests -------------------------------------------------------------------------
@pytest.mark.parametrize("length", [TINY_MAX_POS, TINY_MAX_POS + 44])
def test_prompt_longer_than_the_context_is_rejected(tiny_llm, length):
    prompt = random_prompts([length], seed=3)[0]
    with pytest.raises(ValueError, match=rf"prompt of {length} tokens .*context of {TINY_MAX_POS} tokens"):
        tiny_llm.generate([prompt], GREEDY)
    assert_pool_empty(tiny_llm)


def test_a_rejected_batch_queues_nothing(tiny_llm, greedy_outputs):
    too_long = random_prompts([TINY_MAX_POS + 1], seed=3)[0]
    with pytest.raises(ValueError, match=f"prompt of {TINY_MAX_POS + 1} tokens"):
        tiny_llm.generate([PROMPTS[0], too_long], GREEDY)
    assert_pool_empty(tiny_llm)
    assert token_ids(tiny_llm.generate(PROMPTS, GREEDY)) == greedy_outputs


@pytest.mark.parametrize("prompt, message", [
    ([], "prompt is empty"),
    ([5, 512, 7], r"out of the vocabulary \[0, 512\): \[512\]"),
    ([-1, 3], r"out of the vocabulary \[0, 512\): \[-1\]"),
])
def test_bad_prompt_ids_are_rejected(tiny_llm, prompt, message):
    with pytest.raises(ValueError, match=message):
        tiny_llm.engine.add_request(prompt, GREEDY)
    assert not tiny_llm.engine.has_unfinished()


def test_request_bigger_than_the_pool_is_rejected(tiny_model):
    # 16 pages of 16 KiB; one 32-token block of 2 layers x 2 KV heads takes 4 pages -> 128 tokens.
    llm = LLM(str(tiny_model("llama-gqa-hd64")), kv_cache_bytes=16 * 16 * 1024)
    assert llm.engine.allocator.max_tokens(llm.engine.MODEL_NAME) == 128
    prompt = random_prompts([100])[0]
    with pytest.raises(ValueError, match="needs 150 tokens of KV cache but the whole pool holds 128"):
        llm.generate([prompt], SamplingParams(max_tokens=50))
    (out,) = llm.generate([prompt], SamplingParams(max_tokens=28, temperature=0, ignore_eos=True))
    assert len(out.token_ids) == 28


@pytest.mark.parametrize("kwargs, message", [
    (dict(dtype="int8"), "unsupported dtype 'int8'"),
    (dict(device="tpu"), "unsupported device 'tpu'"),
    (dict(max_num_seqs=0), "max_num_seqs must be >= 1, got 0"),
    (dict(kv_cache_bytes=1000), r"kv_cache_bytes \(1000\) is smaller than one page \(16384\)"),
    (dict(gpu_memory_utilization=1.5), r"gpu_memory_utilization must be in \(0, 1\], got 1.5"),
    (dict(attention_backend="flash"), "unknown attention backend 'flash'"),
])
def test_bad_engine_arguments_are_rejected(tiny_model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        LLM(str(tiny_model("llama-gqa-hd64")), **{"kv_cache_bytes": TINY_KV_BYTES, **kwargs})


# -- text ------------------------------------------------------------------------------------
def test_token_id_prompts_need_no_tokenizer(tiny_llm, greedy_outputs):
    # Random-weight benchmark models have no tokenizer: ids in, ids out, empty text.
    (out,) = tiny_llm.generate(PROMPTS[0], GREEDY)  # a single prompt as one list of ids
    assert out.token_ids == greedy_outputs[0]
    assert out.text == "" and out.prompt is None
    with pytest.raises(FileNotFoundError, match="has no tokenizer"):
        tiny_llm.generate("hello", GREEDY)
