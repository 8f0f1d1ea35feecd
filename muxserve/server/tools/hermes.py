"""Qwen2.5 / Qwen3 (Hermes) format: each call is ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``.

Also the format of models whose chat template knows no tools (SmolLM2): the tools are then
described in a system message that asks for this very format (``render.py``).
"""

from __future__ import annotations

import json

from muxserve.engine.structured import GuidedSpec
from muxserve.server.tools.base import PartialCall, ToolFormat, arguments_text, call_schema, held_prefix

START, END = "<tool_call>", "</tool_call>"


class HermesFormat(ToolFormat):
    name = "hermes"

    def content_end(self, text: str, final: bool) -> int:
        at = text.find(START)
        if at >= 0:
            return at
        return len(text) if final else len(text) - held_prefix(text, START)

    def parse_calls(self, text: str, final: bool) -> list[PartialCall] | None:
        """Every block that holds a call object; a block that does not (malformed, or cut off by
        max_tokens) is skipped. At the end, an unclosed last block counts if it holds a whole call
        (the model may stop right before the closing tag)."""
        if START not in text:
            return None
        calls = []
        for block in text.split(START)[1:]:
            if END not in block and not final:
                break
            obj = _call_object(block.split(END, 1)[0])
            if obj is not None:
                calls.append(PartialCall(obj["name"], arguments_text(obj.get("arguments", obj.get("parameters")))))
        return calls

    def call_spec(self, tools: list[dict], name: str | None) -> GuidedSpec:
        return GuidedSpec.tagged_json(START + "\n", call_schema(tools, name, "arguments"), "\n" + END)


def _call_object(body: str) -> dict | None:
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) and isinstance(obj.get("name"), str) else None
