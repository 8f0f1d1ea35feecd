"""Structured outputs (``engine/structured.py``, ``server/guided.py``): specs, compilation and its
errors, the batched mask, and the real SmolLM2 decoding under hypothesis-generated JSON schemas
(every output parses and validates)."""

from __future__ import annotations

import dataclasses
import json
import re

import jsonschema
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from muxserve.engine import SamplingParams
from muxserve.engine.sampler import sample
from muxserve.engine.structured import (
    GrammarCache,
    GrammarError,
    GuidedSpec,
    allocate_bitmask,
    fill_bitmask,
    mask_logits,
)
from muxserve.server.guided import guided_spec

EOS = 2  # SmolLM2-Instruct's <|im_end|>
VOCAB = 49152


@pytest.fixture(scope="module")
def tokenizer(smollm2_folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_folder)


@pytest.fixture(scope="module")
def cache(tokenizer):
    return GrammarCache(tokenizer, VOCAB, [EOS])


def feed(matcher, tokenizer, text: str) -> None:
    matcher.advance(tokenizer.encode(text, add_special_tokens=False))


# -- specs from requests ------------------------------------------------------------------------
def test_response_format_kinds():
    assert guided_spec({"type": "text"}) is None
    assert guided_spec(None, {}) is None
    assert guided_spec({"type": "json_object"}) == GuidedSpec("json_object", "", "response_format")
    schema = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "string"}}}
    spec = guided_spec({"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}})
    assert spec.kind == "json_schema" and json.loads(spec.text) == schema and spec.param == "response_format"
    # Property order is kept (the output follows it), so it is part of the key.
    reordered = {"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "integer"}}}
    assert GuidedSpec.json_schema(reordered).key != spec.key
    assert list(json.loads(spec.text)["properties"]) == ["b", "a"]


def test_vllm_fields():
    assert guided_spec(None, {"guided_json": '{"type": "integer"}'}) == GuidedSpec(
        "json_schema", '{"type": "integer"}', "guided_json")
    assert guided_spec(None, {"guided_regex": "[ab]+"}) == GuidedSpec("regex", "[ab]+", "guided_regex")
    assert guided_spec(None, {"guided_choice": ["yes", "no"]}) == GuidedSpec(
        "choice", '["yes", "no"]', "guided_choice")
    assert guided_spec(None, {"structured_outputs": {"choice": ["a"]}}) == GuidedSpec(
        "choice", '["a"]', "structured_outputs.choice")


@pytest.mark.parametrize("response_format, extra, param, message", [
    ({"type": "xml"}, {}, "response_format",
     "response_format.type must be text, json_object or json_schema, got 'xml'"),
    ("json", {}, "response_format", "response_format must be an object with a type, got 'json'"),
    ({"type": "json_schema"}, {}, "response_format",
     "response_format.json_schema must be an object with a schema, got None"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, {}, "response_format",
     "response_format.json_schema.schema is required"),
    ({"type": "json_schema", "json_schema": {"schema": {}, "strict": "yes"}}, {}, "response_format",
     "response_format.json_schema.strict must be a boolean, got 'yes'"),
    (None, {"guided_json": "{oops"}, "guided_json",
     "guided_json must be a JSON schema, got text that is not JSON: Expecting property name enclosed in double "
     "quotes: line 1 column 2 (char 1)"),
    (None, {"guided_json": 5}, "guided_json", "guided_json must be a JSON schema (an object), got int"),
    (None, {"guided_regex": ""}, "guided_regex", "guided_regex must be a non-empty string, got ''"),
    (None, {"guided_choice": []}, "guided_choice",
     "guided_choice must be a non-empty list of non-empty strings, got []"),
    (None, {"guided_choice": ["a", ""]}, "guided_choice",
     "guided_choice must be a non-empty list of non-empty strings, got ['a', '']"),
    (None, {"guided_grammar": "  "}, "guided_grammar", "guided_grammar must be a non-empty EBNF grammar, got '  '"),
    (None, {"guided_json_object": True}, "guided_json_object",
     "guided_json_object is not supported; use response_format json_object, guided_json, guided_regex, "
     "guided_choice or guided_grammar"),
    ({"type": "json_object"}, {"guided_regex": "a"}, "guided_regex",
     "only one structured-output constraint per request, got response_format, guided_regex"),
    (None, {"structured_outputs": {"structural_tag": "x"}}, "structured_outputs",
     "structured_outputs.structural_tag is not supported; use json, regex, choice or grammar"),
])
def test_bad_requests_name_the_field(response_format, extra, param, message):
    with pytest.raises(GrammarError) as err:
        guided_spec(response_format, extra)
    assert err.value.param == param
    assert str(err.value) == message
    assert isinstance(err.value, ValueError)


def test_an_ebnf_grammar_compiles_and_constrains(cache):
    spec = GuidedSpec.grammar('root ::= "ab" | "cd"')
    matcher = cache.matcher(spec)
    assert not matcher.finished
    with pytest.raises(GrammarError, match="guided_grammar could not be compiled"):
        cache.compile(GuidedSpec.grammar("root ::= ("))


def test_spec_travels_as_a_list():
    spec = GuidedSpec.regex("a+", "guided_regex")
    assert GuidedSpec.from_wire(spec.to_wire()) == spec
    with pytest.raises(ValueError, match="kind must be one of"):
        GuidedSpec("lark", "x")


# -- compilation --------------------------------------------------------------------------------
@pytest.mark.parametrize("spec, message", [
    (GuidedSpec.json_schema({"type": "foo"}, "guided_json"),
     'guided_json could not be compiled into a grammar: Unsupported type "foo"'),
    (GuidedSpec.json_schema({"enum": []}),
     "response_format could not be compiled into a grammar: enum array must not be empty"),
    (GuidedSpec.json_schema({"properties": {"a": {"$ref": "#/$defs/x"}}}),
     "response_format could not be compiled into a grammar: Cannot find field '$defs' in #/$defs/x"),
    (GuidedSpec.regex("[a-z]+("),
     "guided_regex could not be compiled into a grammar: Regex parsing error at position 8: The parenthesis "
     "is not closed."),
])
def test_a_spec_that_does_not_compile_is_a_clear_error(cache, spec, message):
    with pytest.raises(GrammarError) as err:
        cache.compile(spec)
    assert str(err.value) == message
    assert err.value.param == spec.param


def test_compiled_once_per_spec(cache):
    before = cache.compilations
    spec = GuidedSpec.json_schema({"type": "object", "properties": {"n": {"type": "integer"}}}, "guided_json")
    first = cache.compile(spec)
    assert cache.compile(spec) is first
    # The same schema from another field is the same grammar.
    assert cache.compile(GuidedSpec.json_schema(json.loads(spec.text), "response_format")) is first
    assert cache.compilations == before + 1


def test_the_cache_keeps_the_most_recent(tokenizer):
    small = GrammarCache(tokenizer, VOCAB, [EOS], max_entries=2)
    a, b, c = (GuidedSpec.regex(r) for r in ("a+", "b+", "c+"))
    small.compile(a), small.compile(b), small.compile(a), small.compile(c)  # b is the least recent
    assert small.compilations == 3
    small.compile(a)
    assert small.compilations == 3
    small.compile(b)
    assert small.compilations == 4


# -- matchers -----------------------------------------------------------------------------------
def allowed(bitmask: torch.Tensor, row: int = 0) -> set[int]:
    bits = (bitmask[row].repeat_interleave(32) >> torch.arange(32, dtype=torch.int32).repeat(bitmask.shape[1])) & 1
    return set(torch.nonzero(bits).flatten().tolist())


def test_json_object_finishes_when_the_object_closes(cache, tokenizer):
    m = cache.matcher(GuidedSpec("json_object"))
    ids = tokenizer.encode('{"a": [1, {"b": null}]}', add_special_tokens=False)
    m.advance(ids[:-1])
    assert not m.finished and m.num_accepted == len(ids) - 1
    m.advance(ids)  # the whole output so far: only its last token is new
    assert m.finished and m.num_accepted == len(ids)
    bitmask = allocate_bitmask(1, VOCAB)
    m.fill(bitmask, 0)
    assert allowed(bitmask) == {EOS}


def test_a_forbidden_token_is_refused(cache, tokenizer):
    m = cache.matcher(GuidedSpec.choice(["yes", "no"]))
    with pytest.raises(ValueError, match=r"^token \d+ is not allowed by the grammar after 0 tokens$"):
        feed(m, tokenizer, "maybe")


def test_choice_with_quotes_backslashes_and_unicode(cache, tokenizer):
    choices = ['say "hi"', "naïve\\x", "a"]
    for text in choices:
        m = cache.matcher(GuidedSpec.choice(choices))
        feed(m, tokenizer, text)
        # "a" is also a prefix of nothing else: every choice ends the output.
        assert m.finished, text


def test_an_integer_without_bounds_may_go_on_and_allows_stop(cache, tokenizer):
    m = cache.matcher(GuidedSpec.json_schema({"type": "integer"}))
    feed(m, tokenizer, "42")
    assert not m.finished  # more digits could follow
    bitmask = allocate_bitmask(1, VOCAB)
    m.fill(bitmask, 0)
    ids = allowed(bitmask)
    assert EOS in ids and tokenizer.encode("7", add_special_tokens=False)[0] in ids
    assert tokenizer.encode("a", add_special_tokens=False)[0] not in ids


def test_fill_bitmask_rows(cache, tokenizer):
    assert fill_bitmask([None, None], VOCAB) is None
    m = cache.matcher(GuidedSpec.choice(["yes", "no"]))
    bitmask = fill_bitmask([None, m, None], VOCAB)
    assert bitmask.shape == (3, VOCAB // 32) and bitmask.dtype == torch.int32
    assert bool((bitmask[0] == -1).all()) and bool((bitmask[2] == -1).all())
    first = {tokenizer.encode(w, add_special_tokens=False)[0] for w in ("yes", "no")}
    assert first <= allowed(bitmask, 1) and len(allowed(bitmask, 1)) < 10


def test_mask_logits_matches_a_bit_by_bit_reference():
    gen = torch.Generator().manual_seed(3)
    vocab = 100  # not a multiple of 32: the last word's high bits are past the vocabulary
    logits = torch.randn(3, vocab, generator=gen)
    bitmask = torch.randint(-2**31, 2**31 - 1, (3, 4), dtype=torch.int32, generator=gen)
    out = mask_logits(logits, bitmask)
    for b in range(3):
        for t in range(vocab):
            bit = (int(bitmask[b, t // 32]) >> (t % 32)) & 1
            assert out[b, t].item() == (logits[b, t].item() if bit else float("-inf"))
    assert torch.isfinite(logits).all()  # the raw logits are left as they were


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mask_logits_on_the_gpu_equals_the_cpu():
    logits = torch.randn(32, 49152)
    bitmask = torch.randint(-2**31, 2**31 - 1, (32, 1536), dtype=torch.int32)
    assert torch.equal(mask_logits(logits.cuda(), bitmask).cpu(), mask_logits(logits, bitmask))


def test_the_sampler_never_draws_a_masked_token():
    logits = torch.zeros(2, 64)
    logits[:, 5] = 10.0  # the model's favourite, forbidden below
    bitmask = torch.zeros(2, 2, dtype=torch.int32)
    bitmask[:, 0] = (1 << 7) | (1 << 9)  # only tokens 7 and 9
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, seed=1)]
    for _ in range(5):
        tokens = sample(logits, params, [None, 123], bitmask)
        assert tokens[0] == 7 and tokens[1] in (7, 9)
    assert sample(logits, params, [None, 123]) == [5, 5]


# -- the real model ---------------------------------------------------------------------------
class GuidedRun:
    """Runs requests through an ``LLMEngine`` with a grammar each (``SamplingParams.guided``): the
    engine keeps their matchers, masks every step and ends a request once its grammar is complete."""

    def __init__(self, engine):
        self.engine = engine

    def generate(self, prompts: list[list[int]], params: list[SamplingParams], specs: list) -> list:
        seqs = [self.engine.add_request(p, dataclasses.replace(sp, guided=spec))
                for p, sp, spec in zip(prompts, params, specs)]
        while self.engine.has_unfinished():
            self.engine.step()
        return seqs


def chat_prompt(tokenizer, text: str) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                        tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def output_text(tokenizer, seq) -> str:
    ids = [t for t in seq.output_token_ids if t != EOS]
    return tokenizer.decode(ids)


def check_complete(seq) -> None:
    """A request under a grammar ends with ``stop`` when its grammar is complete (by a stop token, or
    where only a stop token could follow)."""
    assert seq.finish_reason.value == "stop", f"hit max_tokens: {seq.output_token_ids[-20:]}"
    assert seq.matcher.finished


# Bounded JSON schemas: every string has maxLength, every number a range, every array maxItems,
# so each one has outputs of bounded length and the grammar ends them.
_NAMES = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=8)
_SCALARS = st.one_of(
    st.builds(lambda n: {"type": "string", "maxLength": n}, st.integers(1, 12)),
    st.builds(lambda lo, span: {"type": "integer", "minimum": lo, "maximum": lo + span},
              st.integers(-100, 100), st.integers(0, 1000)),
    st.builds(lambda lo, span: {"type": "number", "minimum": lo, "maximum": lo + span},
              st.integers(-10, 10), st.integers(1, 100)),
    st.just({"type": "boolean"}),
    st.lists(st.one_of(_NAMES, st.integers(-5, 50)), min_size=1, max_size=4, unique=True).map(
        lambda values: {"enum": values}),
)


def _objects(values):
    def build(props, data):
        names = list(props)
        required = data.draw(st.lists(st.sampled_from(names), unique=True, max_size=len(names)))
        return {"type": "object", "properties": props, "required": required}

    return st.builds(build, st.dictionaries(_NAMES, values, min_size=1, max_size=3), st.data())


def _arrays(values):
    return st.builds(lambda items, n: {"type": "array", "items": items, "maxItems": n}, values, st.integers(1, 3))


_LEVEL1 = st.one_of(_SCALARS, _objects(_SCALARS), _arrays(_SCALARS))
SCHEMAS = st.one_of(_objects(_LEVEL1), _arrays(_objects(_SCALARS)))  # nesting up to 2 below the root


@pytest.mark.slow
@pytest.mark.parametrize("sampled", [False, True])
def test_every_output_follows_its_generated_schema(monkeypatch, smollm2_llm, cache, sampled):
    engine, tokenizer = smollm2_llm.engine, smollm2_llm.get_tokenizer()
    run = GuidedRun(engine)
    seen: list[dict] = []

    @settings(max_examples=6, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(SCHEMAS, min_size=3, max_size=3))
    def check(schemas):
        prompts = [chat_prompt(tokenizer, f"Answer in JSON following this schema: {json.dumps(s)}") for s in schemas]
        params = [SamplingParams(max_tokens=400, temperature=1.0 if sampled else 0, seed=7 + i if sampled else None)
                  for i in range(len(schemas))]
        specs = [GuidedSpec.json_schema(s) for s in schemas]
        for schema, seq in zip(schemas, run.generate(prompts, params, specs)):
            check_complete(seq)
            instance = json.loads(output_text(tokenizer, seq))
            jsonschema.validate(instance, schema)
            seen.append(schema)

    check()
    assert len(seen) == 18


@pytest.mark.slow
def test_json_object_regex_and_choice_on_the_model(monkeypatch, smollm2_llm, cache):
    engine, tokenizer = smollm2_llm.engine, smollm2_llm.get_tokenizer()
    run = GuidedRun(engine)
    specs = [GuidedSpec("json_object"), GuidedSpec.regex(r"\d{3}-[A-Z]{2}"),
             GuidedSpec.choice(["Paris", "London", "Rome"]), GuidedSpec("json_object")]
    questions = ["Describe a cat as a JSON object.", "Give me a code.", "What is the capital of France?",
                 "List two fruits in JSON."]
    prompts = [chat_prompt(tokenizer, q) for q in questions]
    params = [SamplingParams(max_tokens=300, temperature=0), SamplingParams(max_tokens=50, temperature=0.8, seed=3),
              SamplingParams(max_tokens=20, temperature=0), SamplingParams(max_tokens=300, temperature=0.7, seed=5)]
    seqs = run.generate(prompts, params, specs)
    for seq in seqs:
        check_complete(seq)
    texts = [output_text(tokenizer, s) for s in seqs]
    assert isinstance(json.loads(texts[0]), dict) and isinstance(json.loads(texts[3]), dict)
    assert re.fullmatch(r"\d{3}-[A-Z]{2}", texts[1])
    assert texts[2] in ("Paris", "London", "Rome")


@pytest.mark.slow
def test_unconstrained_rows_of_a_guided_batch_are_unchanged(monkeypatch, smollm2_llm, cache):
    engine, tokenizer = smollm2_llm.engine, smollm2_llm.get_tokenizer()
    prompt = chat_prompt(tokenizer, "Write a haiku about the sea.")
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    alone = smollm2_llm.generate([prompt], greedy)[0].token_ids
    run = GuidedRun(engine)
    json_prompt = chat_prompt(tokenizer, "A JSON object please.")
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["n"]}
    seqs = run.generate([json_prompt, prompt], [SamplingParams(max_tokens=50, temperature=0), greedy],
                        [GuidedSpec.json_schema(schema), None])
    assert seqs[1].output_token_ids == alone
    jsonschema.validate(json.loads(output_text(tokenizer, seqs[0])), schema)
