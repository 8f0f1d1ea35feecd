"""From an API request to what the engine runs: prompt token ids and SamplingParams, checked.

Every problem is an ``ApiError`` (400 or 404) whose message names the field and the value.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from muxserve.engine.logprobs import MAX_TOP_LOGPROBS
from muxserve.engine.sampling_params import SamplingParams
from muxserve.engine.structured import GrammarError, GuidedSpec
from muxserve.server.driver import ServedModel
from muxserve.server.guided import guided_spec
from muxserve.server.protocol import (
    MAX_CHOICES,
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    _GenerationRequest,
)
from muxserve.server.tools import ToolFormat, ToolRequest, tool_format_for, tool_messages

_PARAM_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "seed")

# Fields of OpenAI's and vLLM's APIs that would change the answer and are not implemented: refused
# (ignoring them would answer something other than what was asked). name -> (values that ask for
# nothing, how to say them, why).
_NOT_IMPLEMENTED = {
    "functions": ((None, []), "", "this server calls tools: use tools"),
    "function_call": ((None, "none"), ' must be "none" or absent', "this server calls tools: use tool_choice"),
}


def check_body(body: _GenerationRequest) -> None:
    """Refuse, before any work, text that is not Unicode and fields that are not implemented."""
    if (hit := _lone_surrogate(body, "")) is not None:
        where, char, index = hit
        raise ApiError(400, f"{where} is not valid Unicode: it holds a lone surrogate {ascii(char)} at index "
                            f"{index}", where)
    _refuse_unsupported(body)


def _lone_surrogate(value: Any, path: str) -> tuple[str, str, int] | None:
    """(field path, character, index) of the first lone surrogate (``"\\ud800"`` in JSON) in a
    string of ``value``, keys included: tokenizers and UTF-8 encoders refuse them."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")  # only a surrogate fails
        except UnicodeEncodeError as exc:
            return path or "body", value[exc.start], exc.start
        return None
    if isinstance(value, BaseModel):
        value = dict(value)  # declared fields and the extra ones
    if isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            if (hit := _lone_surrogate(key, where)) or (hit := _lone_surrogate(item, where)):
                return hit
    elif isinstance(value, list):
        for i, item in enumerate(value):
            if (hit := _lone_surrogate(item, f"{path}[{i}]")) is not None:
                return hit
    return None


def find_model(models: dict[str, ServedModel], name: str) -> ServedModel:
    try:
        return models[name]
    except KeyError:
        raise ApiError(404, f"The model `{name}` does not exist.", "model") from None


def completion_prompt(body: CompletionRequest, model: ServedModel) -> list[int]:
    prompt: Any = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise ApiError(400, f"prompt: one prompt per request is supported, got a batch of {len(prompt)}",
                           "prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise ApiError(400, "prompt must not be empty", "prompt")
        ids = list(_tokenizer(model, "prompt").encode(prompt, add_special_tokens=True))
    else:
        ids = list(prompt)
    if not ids:
        raise ApiError(400, "prompt must not be empty", "prompt")
    bad = [t for t in ids if not 0 <= t < model.vocab_size]
    if bad:
        raise ApiError(400, f"prompt token ids {bad[:5]} are outside the vocabulary of `{model.name}` "
                            f"[0, {model.vocab_size})", "prompt")
    return ids


def tool_request(body: ChatCompletionRequest) -> ToolRequest | None:
    """``tools`` and ``tool_choice``, checked (a 400 naming the field)."""
    try:
        return ToolRequest.from_body(body.tools, body.tool_choice)
    except GrammarError as exc:
        raise ApiError(400, str(exc), exc.param) from None


def tool_format(model: ServedModel) -> ToolFormat:
    tokenizer = _tokenizer(model, "tools")
    return tool_format_for(model.architecture, getattr(tokenizer, "chat_template", None))


def chat_prompt(body: ChatCompletionRequest, model: ServedModel) -> list[int]:
    tokenizer = _tokenizer(model, "messages")
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(400, f"model `{model.name}` has no chat template; use /v1/completions", "messages")
    if not body.messages:
        raise ApiError(400, "messages must not be empty", "messages")
    conversation = []
    for i, message in enumerate(body.messages):
        if not isinstance(message.get("role"), str):
            raise ApiError(400, f"messages[{i}].role must be a string, got {short_repr(message.get('role'))}",
                           f"messages[{i}].role")
        conversation.append({**message, "content": _text_of(message.get("content"), i)})
    conversation, tools = tool_messages(conversation, tool_request(body), tokenizer.chat_template)
    try:
        encoded = tokenizer.apply_chat_template(conversation, tools=tools,
                                                add_generation_prompt=body.add_generation_prompt, tokenize=True)
    except Exception as exc:
        raise ApiError(400, f"messages could not be rendered with the chat template of `{model.name}`: {exc}",
                       "messages") from None
    if hasattr(encoded, "keys") and "input_ids" in encoded:  # transformers 5: a BatchEncoding
        encoded = encoded["input_ids"]
    return list(encoded)


def sampling_params(body: _GenerationRequest, model: ServedModel, prompt_len: int,
                    max_tokens: int | None, prompt_field: str, guided: GuidedSpec | None = None) -> SamplingParams:
    """Check the sampling fields and the lengths; ``max_tokens`` None: what the context leaves.

    ``guided``: the request's grammar (``guided``), already compiled once."""
    if prompt_len >= model.max_model_len:
        raise ApiError(400, f"This model's maximum context length is {model.max_model_len} tokens. However, your "
                            f"prompt has {prompt_len} tokens; reduce the length of the {prompt_field}.",
                       prompt_field)
    room = min(model.max_model_len, model.max_tokens) - prompt_len
    if max_tokens is None:
        if room < 1:
            raise ApiError(400, f"the prompt of {prompt_len} tokens leaves no room in the KV pool, which holds at "
                                f"most {model.max_tokens} tokens of `{model.name}`", prompt_field)
        max_tokens = room
    elif isinstance(max_tokens, int) and max_tokens >= 1:
        if prompt_len + max_tokens > model.max_model_len:
            raise ApiError(400, f"This model's maximum context length is {model.max_model_len} tokens. However, "
                                f"you requested {prompt_len + max_tokens} tokens ({prompt_len} in the "
                                f"{prompt_field}, {max_tokens} in the completion).", "max_tokens")
        if prompt_len + max_tokens > model.max_tokens:
            raise ApiError(400, f"the request needs {prompt_len + max_tokens} tokens of KV cache but the pool holds "
                                f"at most {model.max_tokens} tokens of `{model.name}`; lower max_tokens",
                           "max_tokens")
    values = {"max_tokens": max_tokens, "temperature": 1.0 if body.temperature is None else body.temperature,
              "top_p": 1.0 if body.top_p is None else body.top_p, "top_k": -1 if body.top_k is None else body.top_k,
              "seed": body.seed}
    if values["top_k"] == 0:  # OpenAI-style clients send 0 for "off"
        values["top_k"] = -1
    logprobs, prompt_logprobs = _logprobs(body)
    try:
        return SamplingParams(**values, ignore_eos=body.ignore_eos, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                              guided=guided, logit_bias=_logit_bias(body, model))
    except ValueError as exc:  # SamplingParams names the field first
        field = str(exc).split()[0]
        raise ApiError(400, str(exc), field if field in _PARAM_FIELDS else None) from None


def stop_strings(body: _GenerationRequest) -> list[str]:
    stop = body.stop
    if stop is None:
        return []
    stop = [stop] if isinstance(stop, str) else list(stop)
    if any(not s for s in stop):
        raise ApiError(400, f"stop strings must not be empty, got {short_repr(stop)}", "stop")
    return stop


def _refuse_unsupported(body: _GenerationRequest) -> None:
    for name in ("n", "best_of"):
        value = getattr(body, name)
        if value is not None and not 1 <= value <= MAX_CHOICES:
            raise ApiError(400, f"{name} must be in [1, {MAX_CHOICES}], got {value}", name)
    if body.best_of is not None and body.best_of < body.n:
        raise ApiError(400, f"best_of must be at least n ({body.n}), got {body.best_of}", "best_of")
    if body.stream and body.best_of not in (None, body.n):
        raise ApiError(400, "best_of other than n is not supported when streaming (the best choices are known at "
                            "the end only)", "best_of")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(body, name)
        if value not in (None, 0, 0.0):
            raise ApiError(400, f"{name} is not supported (must be 0), got {value}", name)
    if getattr(body, "suffix", None) is not None:
        raise ApiError(400, "suffix is not supported", "suffix")
    if isinstance(body, ChatCompletionRequest) and body.top_logprobs and not body.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    extra = body.model_extra or {}
    for name, (absent, must, why) in _NOT_IMPLEMENTED.items():
        value = extra.get(name)
        if not any(value == a for a in absent):
            raise ApiError(400, f"{name}{must or ' is not supported'} ({why}), got {short_repr(value)}", name)
    backend = extra.get("guided_decoding_backend")
    if backend not in (None, "xgrammar", "auto"):
        raise ApiError(400, f"guided_decoding_backend must be xgrammar (the only one here), got {short_repr(backend)}",
                       "guided_decoding_backend")


def _logprobs(body: _GenerationRequest) -> tuple[int | None, int | None]:
    """(alternatives per generated token, per prompt token), None where not asked."""
    if isinstance(body, CompletionRequest):
        k = body.logprobs
        if k is not None and not 0 <= k <= MAX_TOP_LOGPROBS:
            raise ApiError(400, f"logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}], got {k}", "logprobs")
        return k, (k if body.echo and k is not None else None)
    if isinstance(body, ChatCompletionRequest) and body.logprobs:
        k = body.top_logprobs or 0
        if not 0 <= k <= MAX_TOP_LOGPROBS:
            raise ApiError(400, f"top_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}], got {k}",
                           "top_logprobs")
        return k, None
    return None, None


def _logit_bias(body: _GenerationRequest, model: ServedModel) -> dict[int, float] | None:
    if not body.logit_bias:
        return None
    out = {}
    for key, value in body.logit_bias.items():
        try:
            token = int(key)
        except ValueError:
            raise ApiError(400, f"logit_bias keys must be token ids, got {short_repr(key)}", "logit_bias") from None
        if not 0 <= token < model.vocab_size:
            raise ApiError(400, f"logit_bias token id {token} is outside the vocabulary of `{model.name}` "
                                f"[0, {model.vocab_size})", "logit_bias")
        if not -100 <= value <= 100:
            raise ApiError(400, f"logit_bias values must be in [-100, 100], got {value} for token {token}",
                           "logit_bias")
        out[token] = float(value)
    return out


def guided(body: _GenerationRequest, model: ServedModel, tools: ToolRequest | None = None,
           fmt: ToolFormat | None = None) -> GuidedSpec | None:
    """The grammar the output must follow (structured output, or a forced tool call), compiled once
    here so that a bad one is a 400 naming its field."""
    extra = {**(body.model_extra or {}), "guided_json": body.guided_json, "guided_regex": body.guided_regex,
             "guided_choice": body.guided_choice, "guided_grammar": body.guided_grammar}
    try:
        spec = guided_spec(body.response_format, extra)
        forced = tools.guided_spec(fmt) if tools is not None and fmt is not None else None
        if spec is not None and forced is not None:
            raise GrammarError(f"tool_choice {tools.choice!r} forces a tool call, which {spec.param} would "
                               "constrain too: send one of them", spec.param)
        spec = spec or forced
        if spec is not None:
            _tokenizer(model, spec.param)
            model.grammars().compile(spec)
    except GrammarError as exc:
        raise ApiError(400, str(exc), exc.param) from None
    return spec


def short_repr(value: Any, limit: int = 200) -> str:
    """``repr(value)``, cut to ``limit`` characters: errors quote values, not whole prompts."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _tokenizer(model: ServedModel, field: str):
    if model.tokenizer is None:
        raise ApiError(400, f"model `{model.name}` has no tokenizer (its folder {model.folder} has none); "
                            "send the prompt as a list of token ids to /v1/completions", field)
    return model.tokenizer


def _text_of(content: Any, i: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, f"messages[{i}].content[{j}]: only text parts are supported, got "
                                    f"{short_repr(part)}", f"messages[{i}].content")
            parts.append(part["text"])
        return "".join(parts)
    raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts, got {short_repr(content)}",
                   f"messages[{i}].content")
