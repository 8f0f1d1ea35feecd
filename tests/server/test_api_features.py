"""End to end, with the official openai client: logprobs, echo, n and best_of, structured outputs,
tools, logit_bias and /tokenize against a real ``python -m muxserve.serve``.

``tiny``: a 2-layer random Llama with SmolLM2's tokenizer (fast; its numbers are checked against
transformers); ``smol``: the embedded SmolLM2-135M-Instruct (real answers for JSON and tool calls).
"""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pytest
import torch
from conftest import load_hf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .helpers import start_server, write_config

pytestmark = pytest.mark.timeout(600)

TOL = 2e-4  # fp32 engine vs fp32 transformers, through different kernels
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 10}},
                                       "required": ["zone"]}}}
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_tok_folder):
    tmp = tmp_path_factory.mktemp("server")
    srv = start_server(write_config(tmp / "cfg.yaml", {"tiny": str(tiny_tok_folder), "smol": "smollm2-135m"}), tmp)
    yield srv
    code = srv.stop()
    assert code == 0, srv.log_tail()


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def tiny_hf(tiny_tok_folder):
    return load_hf(tiny_tok_folder)


@torch.inference_mode()
def hf_logprobs(model, ids: list[int]) -> torch.Tensor:
    """(len(ids), vocab): row t is log P(next token | ids[:t + 1]) by transformers."""
    logits = model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def check_top(got: dict[str, float] | list, expected_values: torch.Tensor) -> None:
    values = sorted((v for v in (got.values() if isinstance(got, dict) else got)), reverse=True)
    # alternatives whose texts collide merge in a dict: compare the best ones
    assert values == pytest.approx(expected_values[:len(values)].tolist(), abs=TOL)


# -- log-probabilities ------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_completion_logprobs_and_echo_equal_transformers(oai, tiny_hf, temperature):
    out = oai.completions.create(model="tiny", prompt="The quick brown fox jumps over", max_tokens=6,
                                 temperature=temperature, seed=5, logprobs=3, echo=True,
                                 extra_body={"return_token_ids": True})
    [choice] = out.choices
    prompt, generated = choice.prompt_token_ids, choice.token_ids
    ids = prompt + generated
    expected = hf_logprobs(tiny_hf, ids)
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing precedes the first token
    for t in range(1, len(ids)):
        # raw logprobs: the model's distribution whatever the temperature (vLLM's default)
        assert lp.token_logprobs[t] == pytest.approx(expected[t - 1, ids[t]].item(), abs=TOL)
        check_top(lp.top_logprobs[t], expected[t - 1].topk(3).values)
    assert choice.text.startswith("The quick brown fox jumps over")
    assert "".join(lp.tokens) == choice.text
    assert lp.text_offset == [sum(len(tok) for tok in lp.tokens[:i]) for i in range(len(ids))]
    if temperature == 0:
        assert generated == [int(expected[len(prompt) - 1 + i].argmax()) for i in range(len(generated))]


def test_chat_logprobs_equal_transformers_and_streaming_agrees(oai, tiny_hf):
    kwargs = dict(model="tiny", messages=[{"role": "user", "content": "Name a color."}], max_tokens=5,
                  temperature=0, logprobs=True, top_logprobs=2, extra_body={"return_token_ids": True})
    out = oai.chat.completions.create(**kwargs)
    ids = out.prompt_token_ids + out.choices[0].token_ids
    expected = hf_logprobs(tiny_hf, ids)
    content = out.choices[0].logprobs.content
    assert len(content) == 5
    start = len(out.prompt_token_ids)
    for i, entry in enumerate(content):
        assert entry.logprob == pytest.approx(expected[start - 1 + i, ids[start + i]].item(), abs=TOL)
        assert entry.bytes == list(entry.token.encode())
        check_top([t.logprob for t in entry.top_logprobs], expected[start - 1 + i].topk(2).values)
    chunks = list(oai.chat.completions.create(**kwargs, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == out.choices[0].message.content


def test_streamed_completion_logprobs_equal_the_whole_answer(oai):
    kwargs = dict(model="tiny", prompt="Once upon a time", max_tokens=6, temperature=0, logprobs=2, echo=True)
    whole = oai.completions.create(**kwargs).choices[0]
    chunks = [c.choices[0] for c in oai.completions.create(**kwargs, stream=True)]
    assert "".join(c.text for c in chunks) == whole.text
    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert [x for c in chunks for x in getattr(c.logprobs, key)] == getattr(whole.logprobs, key), key


# -- several choices --------------------------------------------------------------------------------
def test_n_choices_are_the_seeds_seed_plus_one_and_reproducible(oai):
    kwargs = dict(model="tiny", prompt="In a quiet village", max_tokens=8, temperature=1.0)
    out = oai.completions.create(**kwargs, n=3, seed=11)
    again = oai.completions.create(**kwargs, n=3, seed=11)
    texts = [c.text for c in sorted(out.choices, key=lambda c: c.index)]
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert texts == [c.text for c in sorted(again.choices, key=lambda c: c.index)]
    assert texts == [oai.completions.create(**kwargs, seed=11 + i).choices[0].text for i in range(3)]
    assert len(set(texts)) > 1
    assert out.usage.completion_tokens == 24
    unseeded = oai.completions.create(**kwargs, n=3)
    assert len({c.text for c in unseeded.choices}) > 1  # each choice has its own random seed
    streamed = list(oai.completions.create(**kwargs, n=3, seed=11, stream=True))
    by_index = {i: "".join(c.choices[0].text for c in streamed if c.choices[0].index == i) for i in range(3)}
    assert [by_index[i] for i in range(3)] == texts


def test_best_of_answers_the_most_likely_choices(oai):
    kwargs = dict(model="tiny", prompt="The weather today", max_tokens=5, temperature=1.0)
    scores = {}
    for i in range(4):
        c = oai.completions.create(**kwargs, seed=100 + i, logprobs=0).choices[0]
        scores[c.text] = sum(c.logprobs.token_logprobs)
    out = oai.completions.create(**kwargs, seed=100, n=2, best_of=4)
    ranked = sorted(scores, key=scores.get, reverse=True)
    assert [c.text for c in out.choices] == ranked[:2]
    assert [c.index for c in out.choices] == [0, 1]
    assert out.choices[0].logprobs is None  # not asked for
    assert out.usage.completion_tokens == 20  # every generated choice counts


# -- structured outputs ---------------------------------------------------------------------------
_LEAF = st.one_of(
    st.just({"type": "integer", "minimum": 0, "maximum": 99}),
    st.just({"type": "boolean"}),
    st.integers(1, 6).map(lambda n: {"type": "string", "maxLength": n}),
    st.lists(st.sampled_from(["red", "green", "blue", "cyan"]), min_size=1, max_size=3, unique=True).map(
        lambda e: {"enum": e}),
)
SCHEMAS = st.dictionaries(st.sampled_from(["name", "age", "ok", "tag", "color"]), _LEAF, min_size=1, max_size=3).map(
    lambda props: {"type": "object", "properties": props, "required": sorted(props), "additionalProperties": False})


@settings(max_examples=4, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(schema=SCHEMAS)
def test_every_json_schema_answer_parses_and_validates(oai, schema):
    out = oai.chat.completions.create(
        model="smol", messages=[{"role": "user", "content": "Describe a thing as JSON."}], max_tokens=80,
        temperature=0.8, seed=1,
        response_format={"type": "json_schema", "json_schema": {"name": "thing", "schema": schema, "strict": True}})
    choice = out.choices[0]
    assert choice.finish_reason == "stop"  # the grammar ended it
    jsonschema.validate(json.loads(choice.message.content), schema)


def test_json_object_regex_choice_and_grammar(oai):
    ask = [{"role": "user", "content": "Answer."}]
    out = oai.chat.completions.create(model="smol", messages=ask, max_tokens=60, temperature=0,
                                      response_format={"type": "json_object"})
    assert isinstance(json.loads(out.choices[0].message.content), dict)
    out = oai.completions.create(model="tiny", prompt="Call me at", max_tokens=12, seed=3,
                                 extra_body={"guided_regex": r"\d{3}-\d{4}"})
    assert re.fullmatch(r"\d{3}-\d{4}", out.choices[0].text) and out.choices[0].finish_reason == "stop"
    out = oai.completions.create(model="tiny", prompt="Pick", max_tokens=10, seed=4,
                                 extra_body={"guided_choice": ["alpha", "beta"]})
    assert out.choices[0].text in ("alpha", "beta")
    out = oai.completions.create(model="tiny", prompt="Say", max_tokens=10, seed=5,
                                 extra_body={"guided_grammar": 'root ::= "yes" | "no" "!"'})
    assert out.choices[0].text in ("yes", "no!")
    streamed = "".join(c.choices[0].text for c in oai.completions.create(
        model="tiny", prompt="Call me at", max_tokens=12, seed=3, stream=True,
        extra_body={"guided_regex": r"\d{3}-\d{4}"}))
    assert streamed == oai.completions.create(model="tiny", prompt="Call me at", max_tokens=12, seed=3,
                                              extra_body={"guided_regex": r"\d{3}-\d{4}"}).choices[0].text


@pytest.mark.parametrize("extra, param, message", [
    ({"guided_json": {"type": "nonsense"}}, "guided_json", "guided_json could not be compiled into a grammar"),
    ({"guided_regex": "("}, "guided_regex", "guided_regex could not be compiled into a grammar"),
    ({"response_format": {"type": "xml"}}, "response_format", "response_format.type must be text"),
    ({"guided_json": {"type": "object"}, "guided_regex": "a"}, "guided_regex", "only one structured-output"),
    ({"logprobs": 21}, "logprobs", "logprobs must be an integer in [0, 20], got 21"),
    ({"n": 2, "best_of": 1}, "best_of", "best_of must be at least n (2), got 1"),
    ({"logit_bias": {"99999999": 5}}, "logit_bias", "logit_bias token id 99999999 is outside the vocabulary"),
    ({"logit_bias": {"5": 101}}, "logit_bias", "logit_bias values must be in [-100, 100]"),
    ({"presence_penalty": 0.5}, "presence_penalty", "presence_penalty is not supported"),
])
def test_bad_fields_are_a_400_naming_them(client, extra, param, message):
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2, **extra})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and r.json()["error"]["message"].startswith(message)


def test_logit_bias_moves_the_greedy_token(oai):
    kwargs = dict(model="tiny", prompt="The quick brown fox", max_tokens=1, temperature=0,
                  extra_body={"return_token_ids": True})
    greedy = oai.completions.create(**kwargs).choices[0].token_ids[0]
    banned = oai.completions.create(**kwargs, logit_bias={str(greedy): -100}).choices[0].token_ids[0]
    forced = oai.completions.create(**kwargs, logit_bias={"42": 100}).choices[0].token_ids[0]
    assert banned != greedy and forced == 42


# -- tools ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_a_forced_tool_call_parses_and_streaming_agrees(oai, choice):
    kwargs = dict(model="smol", messages=ASK_WEATHER, max_tokens=40, temperature=0, tools=[WEATHER, TIME],
                  tool_choice=choice)
    out = oai.chat.completions.create(**kwargs)
    [call] = out.choices[0].message.tool_calls
    assert out.choices[0].finish_reason == "tool_calls"
    name = "get_time" if isinstance(choice, dict) else call.function.name
    assert call.function.name == name and call.id.startswith("call_")
    tool = {"get_weather": WEATHER, "get_time": TIME}[name]
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])
    chunks = list(oai.chat.completions.create(**kwargs, stream=True))
    calls = [tc for c in chunks if c.choices and c.choices[0].delta.tool_calls for tc in c.choices[0].delta.tool_calls]
    assert [(tc.function.name, tc.function.arguments) for tc in calls] == [(name, call.function.arguments)]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_results_go_back_into_the_prompt(oai):
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    messages = [*ASK_WEATHER, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 24 C"}]
    out = oai.chat.completions.create(model="smol", messages=messages, max_tokens=24, temperature=0,
                                      tools=[WEATHER], tool_choice="none")
    assert out.choices[0].message.tool_calls is None and out.choices[0].message.content
    assert out.choices[0].finish_reason in ("stop", "length")


# -- tokenize ---------------------------------------------------------------------------------------
def test_tokenize_and_detokenize_round_trip(client, oai):
    r = client.post("/tokenize", json={"model": "tiny", "prompt": "Hello world"})
    body = r.json()
    assert r.status_code == 200 and body["count"] == len(body["tokens"]) and body["max_model_len"] == 512
    out = oai.completions.create(model="tiny", prompt="Hello world", max_tokens=1,
                                 extra_body={"return_token_ids": True})
    assert body["tokens"] == out.choices[0].prompt_token_ids
    text = client.post("/detokenize", json={"model": "tiny", "tokens": body["tokens"]}).json()
    assert text == {"prompt": "Hello world"}
    chat = client.post("/tokenize", json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}).json()
    out = oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=1,
                                      extra_body={"return_token_ids": True})
    assert chat["tokens"] == out.prompt_token_ids
    r = client.post("/detokenize", json={"model": "tiny", "tokens": [10**9]})
    assert (r.status_code, r.json()["error"]["param"]) == (400, "tokens")
    assert client.post("/tokenize", json={"model": "nope", "prompt": "x"}).status_code == 404


# -- preemption -----------------------------------------------------------------------------------
def test_guided_seeded_requests_survive_preemption_unchanged(tmp_path, tiny_tok_folder):
    """A pool of 6 pages (3 blocks of 64 tokens of ``tiny``) and 4 requests of 60 + 30 tokens: they
    preempt each other. A recomputed request's grammar catches up in both runtimes, and its
    seeded choices and logprobs are those it gets alone."""
    from concurrent.futures import ThreadPoolExecutor

    from .helpers import metric_samples

    config = write_config(tmp_path / "cfg.yaml", {"tiny": str(tiny_tok_folder)}, kv_cache_bytes=6 * 16384)
    srv = start_server(config, tmp_path, "--schedule-approach", "fcfs")  # no quota: all 4 start
    try:
        with httpx.Client(base_url=srv.url, timeout=120) as c:
            def ask(i: int) -> dict:
                r = c.post("/v1/completions", json={
                    "model": "tiny", "prompt": [100 + i + j for j in range(60)], "max_tokens": 40, "seed": i,
                    "temperature": 1.0, "logprobs": 1, "guided_regex": "[0-9]{30}", "return_token_ids": True})
                assert r.status_code == 200, r.text
                return r.json()["choices"][0]

            alone = [ask(i) for i in range(4)]
            before = metric_samples(c.get("/metrics").text)
            with ThreadPoolExecutor(4) as pool:
                together = list(pool.map(ask, range(4)))
            after = metric_samples(c.get("/metrics").text)
        key = ("vllm:num_preemptions_total", (("model_name", "tiny"),))
        assert after[key] > before[key]
        for a, b in zip(alone, together):
            assert re.fullmatch("[0-9]{30}", b["text"]) and b["finish_reason"] == "stop"
            assert (b["token_ids"], b["text"]) == (a["token_ids"], a["text"])
            assert b["logprobs"]["token_logprobs"] == pytest.approx(a["logprobs"]["token_logprobs"], abs=1e-4)
    finally:
        assert srv.stop() == 0, srv.log_tail()
