"""/tokenize and /detokenize (``server/tokenize.py``) on SmolLM2's tokenizer."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from muxserve.server.tokenize import (
    DetokenizeRequest,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    detokenize,
    tokenize_messages,
    tokenize_prompt,
)


@pytest.fixture(scope="module")
def tokenizer(smollm2_folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_folder)


def test_tokenize_a_prompt(tokenizer):
    out = tokenize_prompt(tokenizer, "Hello world", 8192)
    assert out == {"count": 2, "max_model_len": 8192, "tokens": [19556, 905]}
    assert tokenizer.decode(out["tokens"]) == "Hello world"


def test_tokenize_messages_equals_the_chat_prompt(tokenizer):
    messages = [{"role": "user", "content": "Hi"}]
    out = tokenize_messages(tokenizer, messages, 8192)
    expected = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"])
    assert out == {"count": len(expected), "max_model_len": 8192, "tokens": expected}
    text = tokenizer.decode(out["tokens"])
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    without = tokenize_messages(tokenizer, messages, 8192, add_generation_prompt=False)
    assert without["tokens"] == expected[:without["count"]]
    assert tokenizer.decode(expected[without["count"]:]) == "<|im_start|>assistant\n"


def test_detokenize_round_trips(tokenizer):
    ids = tokenizer.encode("Ünïcödé and emoji 🙂")
    assert detokenize(tokenizer, ids, 49152) == {"prompt": "Ünïcödé and emoji 🙂"}


@pytest.mark.parametrize("call, message", [
    (lambda t: detokenize(t, [1, 49152, -3], 49152), r"^tokens \[49152, -3\] are outside the vocabulary \[0, 49152\)$"),
    (lambda t: tokenize_messages(t, [], 10), "^messages must not be empty$"),
    (lambda t: tokenize_messages(t, [{"role": "user", "content": "x"}], 10, True, True),
     "^add_generation_prompt and continue_final_message cannot both be true$"),
    (lambda t: tokenize_prompt(t, 5, 10), "^prompt must be a string, got int$"),
])
def test_bad_input_names_the_field(tokenizer, call, message):
    with pytest.raises(ValueError, match=message):
        call(tokenizer)


def test_request_models_follow_vllm():
    assert TokenizeCompletionRequest(model="m", prompt="x").add_special_tokens is True
    chat = TokenizeChatRequest(model="m", messages=[{"role": "user", "content": "x"}])
    assert (chat.add_generation_prompt, chat.add_special_tokens) == (True, False)
    assert DetokenizeRequest(model="m", tokens=[1, 2]).tokens == [1, 2]
    with pytest.raises(ValidationError):
        DetokenizeRequest(model="m", tokens=[True])
