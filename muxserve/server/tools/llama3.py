"""Llama 3.1 / 3.2 / 3.3 JSON format: the whole answer is ``{"name": ..., "parameters": {...}}``,
possibly after ``<|python_tag|>``, several calls separated by ``;``.

``<|python_tag|>`` is a special token: the text parsed here must be decoded with special tokens
kept. An answer that starts like JSON is held back while streaming until the end, when it is
known to be a call (or content).
"""

from __future__ import annotations

import json

from muxserve.engine.structured import GuidedSpec
from muxserve.server.tools.base import PartialCall, ToolFormat, arguments_text, call_schema, json_end

PYTHON_TAG = "<|python_tag|>"


class Llama3JsonFormat(ToolFormat):
    name = "llama3_json"

    def _body_start(self, text: str) -> int | None:
        """Where the calls start, or None if the text is (or may only be) content."""
        stripped = text.lstrip()
        offset = len(text) - len(stripped)
        if stripped.startswith(PYTHON_TAG):
            offset += len(PYTHON_TAG)
            stripped = stripped[len(PYTHON_TAG):]
        return offset if stripped.lstrip().startswith("{") else None

    def content_end(self, text: str, final: bool) -> int:
        if self._body_start(text) is not None:
            return 0
        stripped = text.lstrip()
        if not final and (not stripped or PYTHON_TAG.startswith(stripped) or stripped.startswith(PYTHON_TAG)):
            return 0  # may still become a call
        return len(text)

    def parse_calls(self, text: str, final: bool) -> list[PartialCall] | None:
        """Text after a call would make the whole answer content, so calls are known at the end only."""
        start = self._body_start(text)
        if start is None or not final:
            return None
        calls, i = [], start
        while True:
            end = json_end(text, i)
            if end is None:
                return None
            try:
                obj = json.loads(text[i:end])
            except json.JSONDecodeError:
                return None
            if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
                return None
            calls.append(PartialCall(obj["name"], arguments_text(obj.get("parameters", obj.get("arguments")))))
            rest = text[end:].lstrip()
            if not rest.startswith(";"):
                return None if rest else calls  # text after the call: not a call answer
            i = len(text) - len(rest) + 1

    def call_spec(self, tools: list[dict], name: str | None) -> GuidedSpec:
        return GuidedSpec.tagged_json("", call_schema(tools, name, "parameters"), "")
