"""``POST /tokenize`` and ``POST /detokenize`` as vLLM serves them (no ``/v1`` prefix).

/tokenize takes ``{"model", "prompt", "add_special_tokens"}`` (a completion prompt, special
tokens added by default) or ``{"model", "messages", "add_generation_prompt", ...}`` (a chat rendered
with the model's template) and answers ``{"count", "max_model_len", "tokens"}``; /detokenize takes
``{"model", "tokens"}`` and answers ``{"prompt"}``. Bad input is a ValueError naming the field.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt


class TokenizeCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    prompt: str
    add_special_tokens: StrictBool = True


class TokenizeChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[dict[str, Any]]
    add_generation_prompt: StrictBool = True
    continue_final_message: StrictBool = False
    add_special_tokens: StrictBool = False  # the template writes them


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    tokens: list[StrictInt]


def tokenize_prompt(tokenizer, prompt: str, max_model_len: int, add_special_tokens: bool = True) -> dict[str, Any]:
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
    ids = list(tokenizer.encode(prompt, add_special_tokens=add_special_tokens))
    return {"count": len(ids), "max_model_len": max_model_len, "tokens": ids}


def tokenize_messages(tokenizer, messages: list[dict[str, Any]], max_model_len: int,
                      add_generation_prompt: bool = True, continue_final_message: bool = False,
                      tools: list[dict] | None = None) -> dict[str, Any]:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("messages: the model has no chat template; tokenize a prompt instead")
    if not messages:
        raise ValueError("messages must not be empty")
    if add_generation_prompt and continue_final_message:
        raise ValueError("add_generation_prompt and continue_final_message cannot both be true")
    try:
        encoded = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                                continue_final_message=continue_final_message, tokenize=True)
    except Exception as exc:
        raise ValueError(f"messages could not be rendered with the chat template: {exc}") from None
    ids = list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)
    return {"count": len(ids), "max_model_len": max_model_len, "tokens": ids}


def detokenize(tokenizer, tokens: list[int], vocab_size: int) -> dict[str, str]:
    bad = [t for t in tokens if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"tokens {bad[:5]} are outside the vocabulary [0, {vocab_size})")
    return {"prompt": tokenizer.decode(tokens)}
