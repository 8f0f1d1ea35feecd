"""Choices and logprobs as the API writes them, without a server: seeds of n choices, best_of's pick,
OpenAI's logprob shapes, tool calls in a chat choice."""

from __future__ import annotations

from types import SimpleNamespace

from muxserve.engine.logprobs import TokenLogprobs
from muxserve.engine.sampling_params import SEED_MAX, SEED_MIN
from muxserve.server.api import Choices, Generation, chat_choice
from muxserve.server.choices import CompletionLogprobs, TokenText, best_indices, chat_logprobs, choice_seeds
from muxserve.server.protocol import ChatCompletionRequest
from muxserve.server.tools import ToolRequest
from muxserve.server.tools.hermes import HermesFormat


class Tok:
    """A tokenizer whose token i is the text of ``WORDS[i]``."""

    WORDS = ["Hi", " there", "é", "!"]

    def decode(self, ids):
        return "".join(self.WORDS[i] for i in ids)


def test_choice_seeds_count_up_from_the_seed_and_wrap_in_64_bits():
    assert choice_seeds(7, 1) == [7] and choice_seeds(None, 1) == [None]
    assert choice_seeds(7, 3) == [7, 8, 9]
    assert choice_seeds(SEED_MAX, 2) == [SEED_MAX, SEED_MIN]
    unseeded = choice_seeds(None, 4)
    assert all(SEED_MIN <= s <= SEED_MAX for s in unseeded) and len(set(unseeded)) == 4


def test_best_indices_take_the_highest_scores_first_and_the_earlier_on_ties():
    assert best_indices([-3.0, -1.0, -2.0, -1.0], 3) == [1, 3, 2]


def test_completion_logprobs_shape_offsets_and_infinity():
    writer = CompletionLogprobs(TokenText(Tok()), offset=10)
    first = writer.chunk([(0, None), (1, TokenLogprobs(1, -0.5, 2, [(0, -0.1), (3, float("-inf"))]))])
    assert first == {"tokens": ["Hi", " there"], "token_logprobs": [None, -0.5],
                     "top_logprobs": [None, {"Hi": -0.1, "!": -9999.0}], "text_offset": [10, 12]}
    assert writer.chunk([(2, TokenLogprobs(2, -1.0, 1))])["text_offset"] == [18]  # continues across chunks


def test_chat_logprobs_carry_bytes_and_alternatives():
    out = chat_logprobs(TokenText(Tok()), [TokenLogprobs(2, -0.25, 1, [(2, -0.25), (3, -2.0)]), None])
    assert out == {"content": [{"token": "é", "logprob": -0.25, "bytes": [195, 169], "top_logprobs": [
        {"token": "é", "logprob": -0.25, "bytes": [195, 169]}, {"token": "!", "logprob": -2.0, "bytes": [33]}]}]}
    assert TokenText(None)(5) == "token_id:5"


def _chat_answer(text: str, parallel: bool | None) -> dict:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    body = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}], tools=tools,
                                 parallel_tool_calls=parallel)
    model = SimpleNamespace(tokenizer=Tok())
    gen = Generation(model, [1], None, None, text=text, finish_reason="stop")
    choices = Choices([gen], 1, False, ToolRequest.from_body(tools, "auto"), HermesFormat())
    return chat_choice(body, choices, gen)


def test_tool_calls_replace_the_content_and_parallel_false_keeps_the_first():
    two = ('<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>\n'
           '<tool_call>\n{"name": "f", "arguments": {"a": 2}}\n</tool_call>')
    out = _chat_answer(two, None)
    assert out["finish_reason"] == "tool_calls" and out["message"]["content"] is None
    assert [c["function"]["arguments"] for c in out["message"]["tool_calls"]] == ['{"a": 1}', '{"a": 2}']
    assert [c["function"]["arguments"] for c in _chat_answer(two, False)["message"]["tool_calls"]] == ['{"a": 1}']
    plain = _chat_answer("No call needed.", None)
    assert plain["message"] == {"role": "assistant", "content": "No call needed."} and plain["finish_reason"] == "stop"
