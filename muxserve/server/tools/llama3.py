"""Llama 3.1 / 3.2 / 3.3 JSON format: the whole answer is ``{"name": ..., "parameters": {...}}``,
possibly after ``<|python_tag|>``, several calls separated by ``;``.

``<|python_tag|>`` is a special token: the text parsed here must be decoded with special tokens
kept. An answer that starts like JSON is held back while streaming until it is known to be a call.
"""

from __future__ import annotations

import json

from muxserve.engine.structured import GuidedSpec
from muxserve.server.tools.base import PartialCall, ToolFormat, arguments_text, call_schema, json_end, partial_name

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
        start = self._body_start(text)
        if start is None:
            return None
        calls, i = [], start
        while True:
            end = json_end(text, i)
            if end is None:  # unfinished: the name may be known already
                if final:
                    return None
                calls.append(PartialCall(partial_name(text[i:])))
                return calls
            try:
                obj = json.loads(text[i:end])
            except json.JSONDecodeError:
                return None
            if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
                return None
            calls.append(PartialCall(obj["name"], arguments_text(obj.get("parameters", obj.get("arguments")))))
            rest = text[end:].lstrip()
            if not rest.startswith(";"):
                if rest and (final or rest.strip()):
                    return None  # text after the call: not a call answer
                return calls
            i = len(text) - len(rest) + 1

    def call_spec(self, tools: list[dict], name: str | None) -> GuidedSpec:
        return GuidedSpec.tagged_json("", call_schema(tools, name, "parameters"), "")
