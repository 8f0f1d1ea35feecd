"""Request bodies of the OpenAI-compatible API and the error shape, as OpenAI and vLLM use them.

Numbers and flags are strict JSON types (``true`` is not 1, ``"5"`` is not 5, in token ids
neither). Unknown fields are accepted and ignored (as vLLM does), so clients that send more than
this server reads still work; fields that would change the answer and are not supported
(penalties, ``suffix``, ``functions``, ``guided_decoding_backend`` other than xgrammar, ...) are
refused with a 400 naming them (``prompts.check_body``).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt

from muxserve.engine.sampling_params import SEED_MAX, SEED_MIN, TOP_K_MAX

MAX_CHOICES = 16  # n and best_of: each choice is one sequence in the engine


class ApiError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with HTTP ``status``."""

    TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
             405: "MethodNotAllowedError", 413: "RequestTooLargeError", 500: "InternalServerError",
             503: "ServiceUnavailableError"}

    def __init__(self, status: int, message: str, param: str | None = None,
                 headers: dict[str, str] | None = None):
        message, param = _printable(message), _printable(param)
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "APIError"),
                          "param": self.param, "code": self.status}}


def _printable(text: str | None) -> str | None:
    """``text`` with any lone surrogate (from a JSON ``\\ud800`` escape) written out as ``\\ud800``:
    an error that quotes a bad value must itself encode as UTF-8."""
    return None if text is None else text.encode("utf-8", "backslashreplace").decode("utf-8")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: StrictBool = False


def _bounded(default: Any = None, **schema: Any) -> Any:
    """A field whose range /openapi.json states while the handlers check it, with messages that
    name the value (``prompts.sampling_params``)."""
    return Field(default, json_schema_extra=schema)


class _GenerationRequest(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: StrictInt | None = _bounded(minimum=1)
    temperature: StrictFloat | None = _bounded(minimum=0, maximum=100)  # default 1.0, as OpenAI and vLLM
    top_p: StrictFloat | None = _bounded(exclusiveMinimum=0, maximum=1)
    top_k: StrictInt | None = Field(default=None, ge=-1, le=TOP_K_MAX)  # -1 or 0: off
    seed: StrictInt | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)  # what the sampler takes, one stream each
    stop: str | list[str] | None = None
    n: StrictInt = _bounded(1, minimum=1, maximum=MAX_CHOICES)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    presence_penalty: StrictFloat | None = None
    frequency_penalty: StrictFloat | None = None
    best_of: StrictInt | None = _bounded(minimum=1, maximum=MAX_CHOICES)  # >= n; the n most likely are answered
    logit_bias: dict[str, StrictFloat | StrictInt] | None = None  # token id -> bias in [-100, 100]
    response_format: dict[str, Any] | None = None  # {"type": "text" | "json_object" | "json_schema", ...}
    # vLLM's guided decoding (one constraint per request, response_format included)
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None  # EBNF (xgrammar's dialect, GBNF-like), its rule ``root`` first
    # vLLM extensions
    ignore_eos: StrictBool = False
    return_token_ids: StrictBool = False  # add prompt_token_ids and token_ids to each choice

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_GenerationRequest):
    prompt: str | list[StrictInt] | list[str] | list[list[StrictInt]]
    # OpenAI's and vLLM's default for completions (null: what the context leaves)
    max_tokens: StrictInt | None = _bounded(16, minimum=1)
    echo: StrictBool = False  # the prompt before the completion (with its logprobs when logprobs is set)
    logprobs: StrictInt | None = _bounded(minimum=0, maximum=20)  # alternatives per token (0: the token only)
    suffix: str | None = None


class ChatCompletionRequest(_GenerationRequest):
    messages: list[dict[str, Any]]
    max_completion_tokens: StrictInt | None = _bounded(minimum=1)  # the newer name of max_tokens
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = _bounded(minimum=0, maximum=20)  # with logprobs: alternatives per token
    tools: list[dict[str, Any]] | None = None  # [{"type": "function", "function": {"name", "parameters"}}]
    tool_choice: str | dict[str, Any] | None = None  # none, auto, required or {"type": "function", ...}
    parallel_tool_calls: StrictBool | None = None  # false: at most one call per answer
    add_generation_prompt: StrictBool = True  # vLLM extension
