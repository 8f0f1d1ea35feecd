"""Tool calling (``server/tools``): each family's parser on exact strings, streaming equal to
non-streaming for any split of the text, tool_choice, rendering with each family's chat template
(fixtures), and forced calls on the real SmolLM2."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from muxserve.engine.structured import GrammarError
from muxserve.server.tools import StreamingToolParser, ToolRequest, hermes_system_prompt, tool_format_for, tool_messages
from muxserve.server.tools.hermes import HermesFormat
from muxserve.server.tools.llama3 import Llama3JsonFormat
from muxserve.server.tools.mistral import MistralFormat

FIXTURES = Path(__file__).parent / "fixtures"
TEMPLATES = {name: (FIXTURES / f"{name}.jinja").read_text()
             for name in ("llama3_1_tools", "qwen2_5_tools", "mistral_v03_tools")}

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Local time of a timezone",
    "parameters": {"type": "object", "properties": {"tz": {"type": "string", "maxLength": 30}}, "required": ["tz"]}}}
TOOLS = [WEATHER, TIME]

# (format, model text, expected content, expected [(name, arguments)])
CASES = [
    (HermesFormat(), 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": '
                     '"celsius"}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"tz": "CET"}}\n'
                     '</tool_call>',
     "Let me look.", [("get_weather", '{"city": "Paris", "unit": "celsius"}'), ("get_time", '{"tz": "CET"}')]),
    (HermesFormat(), '<tool_call>\n{"name": "get_time", "arguments": {"tz": "Asia/Tōkyō"}}\n</tool_call>',
     None, [("get_time", '{"tz": "Asia/Tōkyō"}')]),
    (HermesFormat(), "No tool needed: it is 3 < 4.", "No tool needed: it is 3 < 4.", []),
    (HermesFormat(), '<tool_call>\n{"name": "get_time", "arguments": {"tz": ', '<tool_call>\n{"name": "get_time", '
                                                                             '"arguments": {"tz": ', []),
    (Llama3JsonFormat(), '{"name": "get_weather", "parameters": {"city": "Oslo", "unit": "celsius"}}',
     None, [("get_weather", '{"city": "Oslo", "unit": "celsius"}')]),
    (Llama3JsonFormat(), '<|python_tag|>{"name": "get_time", "parameters": {"tz": "UTC"}}; '
                         '{"name": "get_weather", "parameters": {"city": "Rome", "unit": "fahrenheit"}}',
     None, [("get_time", '{"tz": "UTC"}'), ("get_weather", '{"city": "Rome", "unit": "fahrenheit"}')]),
    (Llama3JsonFormat(), "The weather is {unknown} today.", "The weather is {unknown} today.", []),
    (Llama3JsonFormat(), '{"city": "Oslo"}', '{"city": "Oslo"}', []),
    (MistralFormat(), 'Sure.[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Lyon", "unit": "celsius"}}, '
                      '{"name": "get_time", "arguments": {"tz": "CET"}}]',
     "Sure.", [("get_weather", '{"city": "Lyon", "unit": "celsius"}'), ("get_time", '{"tz": "CET"}')]),
    (MistralFormat(), '[{"name": "get_time", "arguments": {"tz": "[UTC]"}}]', None, [("get_time", '{"tz": "[UTC]"}')]),
    (MistralFormat(), "[1, 2] is a list.", "[1, 2] is a list.", []),
]


def calls_of(parsed) -> list[tuple[str, str]]:
    return [(c.name, c.arguments) for c in parsed.tool_calls]


@pytest.mark.parametrize("fmt, text, content, calls", CASES)
def test_non_streaming_parse(fmt, text, content, calls):
    parsed = fmt.parse(text)
    assert parsed.content == content
    assert calls_of(parsed) == calls
    assert parsed.finish_reason == ("tool_calls" if calls else None)
    for call in parsed.tool_calls:
        assert re.fullmatch(r"call_[A-Za-z0-9]{24}", call.id)
        assert call.to_openai() == {"id": call.id, "type": "function",
                                    "function": {"name": call.name, "arguments": call.arguments}}


def stream(fmt, chunks: list[str]):
    """Feed ``chunks``; return (content, [(name, arguments)], ids, deltas) assembled from the deltas."""
    parser = StreamingToolParser(fmt)
    deltas = [parser.feed(c) for c in chunks] + [parser.finish()]
    content, calls, ids = "", [], []
    for d in filter(None, deltas):
        content += d.get("content", "")
        for item in d.get("tool_calls", []):
            assert item["index"] == len(calls) and item["type"] == "function"  # each call once, whole
            calls.append((item["function"]["name"], item["function"]["arguments"]))
            ids.append(item["id"])
    return content, calls, ids, parser


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(CASES), st.data())
def test_streaming_agrees_with_non_streaming_for_any_split(case, data):
    fmt, text, content, calls = case
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(text) - 1)), max_size=12)))
    chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    got_content, got_calls, ids, parser = stream(fmt, chunks)
    assert got_content == (content or "")
    assert got_calls == calls
    assert parser.finish_reason == ("tool_calls" if calls else None)
    assert [c.id for c in parser.tool_calls()] == ids and len(set(ids)) == len(ids)


def test_streaming_sends_content_then_each_call_as_soon_as_it_closes():
    text = CASES[0][1]
    parser = StreamingToolParser(HermesFormat())
    deltas = [parser.feed(ch) for ch in text]
    first_call = next(i for i, d in enumerate(deltas) if d and "tool_calls" in d)
    assert "".join(d.get("content", "") for d in deltas[:first_call] if d) == "Let me look."
    assert deltas[first_call]["tool_calls"][0]["function"] == {"name": "get_weather",
                                                              "arguments": '{"city": "Paris", "unit": "celsius"}'}
    assert text[:first_call + 1].endswith("</tool_call>")  # the first call, before the second one came


def test_content_that_looks_like_a_marker_start_is_held_then_released():
    parser = StreamingToolParser(HermesFormat())
    assert parser.feed("a <tool") == {"content": "a"}
    assert parser.feed("box> b") == {"content": " <toolbox> b"}
    assert parser.finish() is None


# -- tool_choice --------------------------------------------------------------------------------
def test_tool_choice_kinds():
    assert ToolRequest.from_body(None, None) is None
    assert ToolRequest.from_body([], "none") is None
    auto = ToolRequest.from_body(TOOLS, None)
    assert auto.choice == "auto" and auto.prompt_tools == TOOLS and auto.parses_calls
    assert auto.guided_spec(HermesFormat()) is None
    none = ToolRequest.from_body(TOOLS, "none")
    assert none.prompt_tools is None and not none.parses_calls and none.guided_spec(HermesFormat()) is None
    named = ToolRequest.from_body(TOOLS, {"type": "function", "function": {"name": "get_time"}})
    assert (named.choice, named.name) == ("named", "get_time")
    spec = named.guided_spec(HermesFormat())
    assert spec.kind == "tagged_json" and spec.param == "tool_choice"
    assert json.loads(spec.text) == {"begin": "<tool_call>\n", "end": "\n</tool_call>", "schema": {
        "type": "object", "properties": {"name": {"const": "get_time"}, "arguments": TIME["function"]["parameters"]},
        "required": ["name", "arguments"]}}
    required = ToolRequest.from_body(TOOLS, "required").guided_spec(MistralFormat())
    schema = json.loads(required.text)["schema"]
    assert schema["minItems"] == 1 and len(schema["items"]["anyOf"]) == 2


@pytest.mark.parametrize("tools, choice, param, message", [
    (None, "required", "tool_choice", 'tool_choice "required" needs tools'),
    ({"type": "function"}, None, "tools", "tools must be a list of functions, got {'type': 'function'}"),
    ([{"type": "code"}], None, "tools", 'tools[0] must be {"type": "function", "function": {...}}, got {\'type\': '
                                        "'code'}"),
    ([{"type": "function", "function": {"name": ""}}], None, "tools",
     "tools[0].function.name must be a non-empty string, got ''"),
    ([{"type": "function", "function": {"name": "f", "parameters": "x"}}], None, "tools",
     "tools[0].function.parameters must be a JSON schema object, got 'x'"),
    (TOOLS, "always", "tool_choice", 'tool_choice must be "none", "auto", "required" or {"type": "function", '
                                     '"function": {"name": ...}}, got \'always\''),
    (TOOLS, {"type": "function", "function": {"name": "nope"}}, "tool_choice",
     "tool_choice names the function 'nope', which is not in tools (get_weather, get_time)"),
])
def test_bad_tools_and_tool_choice_name_the_field(tools, choice, param, message):
    with pytest.raises(GrammarError) as err:
        ToolRequest.from_body(tools, choice)
    assert (err.value.param, str(err.value)) == (param, message)


# -- families and rendering ---------------------------------------------------------------------
@pytest.mark.parametrize("architecture, template, family", [
    ("LlamaForCausalLM", "llama3_1_tools", "llama3_json"),
    ("Qwen2ForCausalLM", "qwen2_5_tools", "hermes"),
    ("MistralForCausalLM", "mistral_v03_tools", "mistral"),
    ("Qwen3ForCausalLM", None, "hermes"),
    ("LlamaForCausalLM", "{{ messages }}", "hermes"),  # no tools in the template: Hermes, described
])
def test_family_from_template_and_architecture(architecture, template, family):
    assert tool_format_for(architecture, TEMPLATES.get(template, template)).name == family


HISTORY = [{"role": "user", "content": "Weather in Paris?"},
           {"role": "assistant", "content": None, "tool_calls": [
               {"id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
           {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees"}]


def render(tokenizer, template: str, messages, tools) -> str:
    return tokenizer.apply_chat_template(messages, tools=tools, chat_template=template, tokenize=False,
                                         add_generation_prompt=True)


@pytest.fixture(scope="module")
def tokenizer(smollm2_folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_folder)


def test_qwen_template_renders_tools_and_history(tokenizer):
    request = ToolRequest.from_body(TOOLS, "auto")
    messages, tools = tool_messages(HISTORY, request, TEMPLATES["qwen2_5_tools"])
    text = render(tokenizer, TEMPLATES["qwen2_5_tools"], messages, tools)
    listed = "\n".join(json.dumps(t) for t in TOOLS)
    assert f"<tools>\n{listed}\n</tools>" in text
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
            '"unit": "celsius"}}\n</tool_call><|im_end|>') in text
    assert "<|im_start|>user\n<tool_response>\n18 degrees\n</tool_response><|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    # tool_choice none: no tools in the prompt.
    messages, tools = tool_messages(HISTORY[:1], ToolRequest.from_body(TOOLS, "none"), TEMPLATES["qwen2_5_tools"])
    assert "<tools>" not in render(tokenizer, TEMPLATES["qwen2_5_tools"], messages, tools)


def test_llama_template_renders_tools_in_the_first_user_message(tokenizer):
    messages, tools = tool_messages(HISTORY, ToolRequest.from_body([TIME], "auto"), TEMPLATES["llama3_1_tools"])
    text = render(tokenizer, TEMPLATES["llama3_1_tools"], messages, tools)
    assert "Environment: ipython\n" in text
    assert ("<|start_header_id|>user<|end_header_id|>\n\nGiven the following functions, please respond with a JSON "
            "for a function call with its proper arguments that best answers the given prompt.\n\nRespond in the "
            'format {"name": function name, "parameters": dictionary of argument name and its value}. Do not use '
            f"variables.\n\n{json.dumps(TIME, indent=4)}\n\nWeather in Paris?<|eot_id|>") in text
    assert ('<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "get_weather", "parameters": {"city": '
            '"Paris", "unit": "celsius"}}<|eot_id|>') in text
    # Meta's template writes a tool result with tojson (a string is iterable in Jinja): quoted.
    assert '<|start_header_id|>ipython<|end_header_id|>\n\n"18 degrees"<|eot_id|>' in text


def test_mistral_template_renders_available_tools_and_calls(tokenizer):
    messages, tools = tool_messages(HISTORY + [{"role": "user", "content": "And the time?"}],
                                    ToolRequest.from_body([TIME], "auto"), TEMPLATES["mistral_v03_tools"])
    text = render(tokenizer, TEMPLATES["mistral_v03_tools"], messages, tools)
    params = json.dumps(TIME["function"]["parameters"])
    assert (f'[AVAILABLE_TOOLS] [{{"type": "function", "function": {{"name": "get_time", "description": "Local time '
            f'of a timezone", "parameters": {params}}}}}][/AVAILABLE_TOOLS][INST] And the time?[/INST]') in text
    assert ('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}, '
            '"id": "call_1"}]') in text
    assert '[TOOL_RESULTS] {"content": 18 degrees, "call_id": "call_1"}[/TOOL_RESULTS]' in text


def test_a_template_without_tools_gets_them_in_a_system_message(tokenizer):
    template = tokenizer.chat_template
    assert tool_format_for("LlamaForCausalLM", template).name == "hermes"
    messages, tools = tool_messages(HISTORY[:1], ToolRequest.from_body(TOOLS, "auto"), template)
    assert tools is None
    assert messages[0] == {"role": "system", "content": hermes_system_prompt(TOOLS)}
    with_system = [{"role": "system", "content": "Be brief."}, *HISTORY[:1]]
    messages, _ = tool_messages(with_system, ToolRequest.from_body(TOOLS, "auto"), template)
    assert messages[0]["content"] == "Be brief.\n\n" + hermes_system_prompt(TOOLS) and len(messages) == 2
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n")


# -- forced calls on the real model ---------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("fmt", [HermesFormat(), Llama3JsonFormat(), MistralFormat()], ids=lambda f: f.name)
@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}],
                         ids=["required", "named"])
def test_a_forced_call_parses_and_follows_the_parameters(smollm2_llm, fmt, choice):
    from engine.test_structured import GuidedRun, output_text

    from muxserve.engine import SamplingParams

    engine, tokenizer = smollm2_llm.engine, smollm2_llm.get_tokenizer()
    request = ToolRequest.from_body(TOOLS, choice)
    messages, tools = tool_messages([{"role": "user", "content": "What time is it in Tokyo, and is it raining?"}],
                                    request, tokenizer.chat_template)
    prompt = list(tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True,
                                                tokenize=True)["input_ids"])
    run = GuidedRun(engine)
    params = [SamplingParams(max_tokens=200, temperature=0), SamplingParams(max_tokens=200, temperature=1.0, seed=9)]
    specs = [request.guided_spec(fmt) for _ in params]
    for seq in run.generate([prompt, prompt], params, specs):
        assert seq.finish_reason.value == "stop" and seq.matcher.finished
        parsed = fmt.parse(output_text(tokenizer, seq))
        assert len(parsed.tool_calls) >= 1 and parsed.finish_reason == "tool_calls"
        for call in parsed.tool_calls:
            if request.name:
                assert call.name == request.name
            tool = next(t for t in TOOLS if t["function"]["name"] == call.name)
            jsonschema.validate(json.loads(call.arguments), tool["function"]["parameters"])
