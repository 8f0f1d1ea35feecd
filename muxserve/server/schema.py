"""What /openapi.json declares: response bodies, the error responses of each route, no 422.

The handlers encode their answers with msgspec; the models here only describe them. Invalid
requests are answered 400 (not FastAPI's 422), so the 422 FastAPI declares on every route
with a body is taken out of the schema.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from muxserve.server.protocol import ApiError, ChatCompletionRequest, CompletionRequest


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: int


class ErrorResponse(BaseModel):
    """OpenAI's error shape."""

    error: ErrorDetail


class Health(BaseModel):
    status: Literal["ok"]


class Version(BaseModel):
    version: str


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str
    parent: str | None
    max_model_len: int
    permission: list[Any]


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy shape: per token its text, logprob, alternatives and where it starts in the text."""

    tokens: list[str]
    token_logprobs: list[float | None]  # None: the first token of an echoed prompt
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: Literal["stop", "length"] | None
    stop_reason: str | None
    prompt_token_ids: list[int] | None = None  # with return_token_ids
    token_ids: list[int] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text of an object


class ToolCall(BaseModel):
    id: str
    type: Literal["function"]
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None  # None when the answer is only tool calls
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: Literal["stop", "length", "tool_calls"] | None
    stop_reason: str | None
    token_ids: list[int] | None = None  # with return_token_ids


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_token_ids: list[int] | None = None  # with return_token_ids


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


_WHEN = {400: "a bad field, named in `param`, or a prompt over the context or the KV pool",
         401: "the API key is missing or incorrect (only when the server has one)",
         404: "unknown model",
         413: "the request body is larger than --max-request-bytes",
         500: "an internal error while handling this request",
         503: "the server is draining, or the engine stopped"}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` entries declaring the error body for each status."""
    return {s: {"model": ErrorResponse, "description": f"{ApiError.TYPES[s]}: {_WHEN[s]}"} for s in statuses}


def streamed(model: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """A 200 that is ``model`` as JSON, or with ``stream: true`` a server-sent event stream."""
    return {200: {"model": model, "description": "the answer; with `stream: true` an SSE stream of chunks "
                                                 "(`data: {...}`), then `data: [DONE]`",
                  "content": {"text/event-stream": {"schema": _SSE_EVENT}}}}


# One server-sent event (OpenAPI 3.1: the schema of an event stream describes each event).
_SSE_EVENT = {"type": "object", "required": ["data"],
              "properties": {"data": {"type": "string", "description": "a chunk as JSON, an error object as "
                                                                        "JSON, or `[DONE]`"}}}


def install_openapi(app: FastAPI, model_names: list[str]) -> None:
    """Build the schema once, without FastAPI's 422 responses (this API answers 400); ``model``
    is one of ``model_names`` (another one gets a 404)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes,
                                 description=app.description)
            for path in schema["paths"].values():
                for operation in path.values():
                    operation["responses"].pop("422", None)
            components = schema["components"]["schemas"]
            for name in ("HTTPValidationError", "ValidationError"):
                components.pop(name, None)
            # FastAPI's OpenAPI model holds bounds as floats, which cannot say 2**63 - 1 (the
            # largest seed): the request bodies are declared as pydantic writes them.
            for model in (CompletionRequest, ChatCompletionRequest):
                own = model.model_json_schema(ref_template="#/components/schemas/{model}")
                own["properties"]["model"]["enum"] = model_names
                components.update(own.pop("$defs", {}))
                components[model.__name__] = own
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
