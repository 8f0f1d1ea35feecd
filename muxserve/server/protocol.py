"""Request bodies of the OpenAI-compatible API and the error shape, as OpenAI and vLLM use them.

Unknown fields are accepted and ignored (as vLLM does), so clients that send more than this
server reads still work; fields that would change the answer and are not supported
(``logprobs``, ``echo``, penalties, ``n`` > 1, tools, ``response_format``, ``logit_bias``,
guided decoding, ...) are refused with a 400 naming them (``prompts.refuse_unsupported``).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

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

    include_usage: bool = False


class _GenerationRequest(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = None
    temperature: float | None = None  # default 1.0, as OpenAI and vLLM
    top_p: float | None = None
    top_k: int | None = Field(default=None, ge=-1, le=TOP_K_MAX)  # -1 or 0: off
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)  # what the sampler takes, one stream each
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    best_of: int | None = None
    # vLLM extensions
    ignore_eos: bool = False
    return_token_ids: bool = False  # add prompt_token_ids and token_ids to each choice

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_GenerationRequest):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's and vLLM's default for completions (null: what the context leaves)
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None


class ChatCompletionRequest(_GenerationRequest):
    messages: list[dict[str, Any]]
    max_completion_tokens: int | None = None  # the newer name of max_tokens
    logprobs: bool | None = None
    top_logprobs: int | None = None
    add_generation_prompt: bool = True  # vLLM extension
