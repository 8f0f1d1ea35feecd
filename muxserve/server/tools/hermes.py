"""Qwen2.5 / Qwen3 (Hermes) format: each call is ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``.

Also the format of models whose chat template knows no tools (SmolLM2): the tools are then
described in a system message that asks for this very format (``render.py``).
"""

from __future__ import annotations

import json

from muxserve.engine.structured import GuidedSpec
from muxserve.server.tools.base import PartialCall, ToolFormat, arguments_text, call_schema, held_prefix, partial_name

START, END = "<tool_call>", "</tool_call>"


class HermesFormat(ToolFormat):
    name = "hermes"

    def content_end(self, text: str, final: bool) -> int:
        at = text.find(START)
        if at >= 0:
            return at
        return len(text) if final else len(text) - held_prefix(text, START)

    def parse_calls(self, text: str, final: bool) -> list[PartialCall] | None:
        if START not in text:
            return None
        calls = []
        for block in text.split(START)[1:]:
            body, closed = (block.split(END, 1)[0], True) if END in block else (block, False)
            call = PartialCall(partial_name(body))
            if closed or final:
                try:
                    obj = json.loads(body)
                except json.JSONDecodeError:
                    obj = None
                if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
                    return calls if not final else None  # not a call: the whole text is content
                call = PartialCall(obj["name"], arguments_text(obj.get("arguments", obj.get("parameters"))))
            calls.append(call)
        return calls

    def call_spec(self, tools: list[dict], name: str | None) -> GuidedSpec:
        return GuidedSpec.tagged_json(START + "\n", call_schema(tools, name, "arguments"), "\n" + END)
