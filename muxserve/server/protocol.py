"""Request bodies of the OpenAI-compatible API and the error shape, as OpenAI and vLLM use them.

Numbers and flags are strict JSON types (``true`` is not 1, ``"5"`` is not 5, in token ids
neither). Unknown fields are accepted and ignored (as vLLM does), so clients that send more than
this server reads still work; fields that would change the answer and are not supported
(``logprobs``, ``echo``, penalties, ``n`` > 1, tools, ``response_format``, ``logit_bias``,
guided decoding, ...) are refused with a 400 naming them (``prompts.check_body``).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt

from muxserve.engine.sampling_params import SEED_MAX, SEED_MIN, TOP_K_MAX


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
    n: StrictInt = _bounded(1, minimum=1, maximum=1)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    presence_penalty: StrictFloat | None = None
    frequency_penalty: StrictFloat | None = None
    best_of: StrictInt | None = _bounded(minimum=1, maximum=1)
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
    echo: StrictBool = False
    logprobs: StrictInt | None = None
    suffix: str | None = None


class ChatCompletionRequest(_GenerationRequest):
    messages: list[dict[str, Any]]
    max_completion_tokens: StrictInt | None = _bounded(minimum=1)  # the newer name of max_tokens
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = None
    add_generation_prompt: StrictBool = True  # vLLM extension
