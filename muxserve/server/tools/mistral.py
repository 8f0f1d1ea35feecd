"""Mistral format: ``[TOOL_CALLS]`` then a JSON array ``[{"name": ..., "arguments": {...}}, ...]``.

``[TOOL_CALLS]`` is a control token: the text parsed here must be decoded with special tokens
kept. A forced call (``call_spec``) is generated as the bare array, which a grammar can spell
(control tokens are outside grammars), so an answer that starts with ``[{"name"`` is read as calls
too.
"""

from __future__ import annotations

import json

from muxserve.engine.structured import GuidedSpec
from muxserve.server.tools.base import PartialCall, ToolFormat, arguments_text, call_schema, held_prefix, json_end

START = "[TOOL_CALLS]"
BARE = '[{"name"'


class MistralFormat(ToolFormat):
    name = "mistral"

    def _body_start(self, text: str) -> int | None:
        at = text.find(START)
        if at >= 0:
            return at + len(START)
        stripped = text.lstrip()
        return len(text) - len(stripped) if stripped.startswith(BARE) else None

    def content_end(self, text: str, final: bool) -> int:
        at = text.find(START)
        if at >= 0:
            return at
        stripped = text.lstrip()
        if stripped.startswith(BARE) or (not final and BARE.startswith(stripped.replace(" ", ""))):
            return 0
        return len(text) if final else len(text) - held_prefix(text, START)

    def parse_calls(self, text: str, final: bool) -> list[PartialCall] | None:
        start = self._body_start(text)
        if start is None:
            return None
        body = text[start:]
        end = json_end(body, 0)
        if end is None:  # the array is not closed (yet, or cut off): no call is certain
            return None
        try:
            items = json.loads(body[:end])
        except json.JSONDecodeError:
            return None
        if not isinstance(items, list) or not all(isinstance(c, dict) and isinstance(c.get("name"), str)
                                                  for c in items):
            return None
        return [PartialCall(c["name"], arguments_text(c.get("arguments", c.get("parameters")))) for c in items]

    def call_spec(self, tools: list[dict], name: str | None) -> GuidedSpec:
        # At most one call per tool offered (one for a named tool): an unbounded array lets a
        # model call on until max_tokens, and the answer would not parse.
        schema = {"type": "array", "items": call_schema(tools, name, "arguments"), "minItems": 1,
                  "maxItems": 1 if name is not None else len(tools)}
        return GuidedSpec.tagged_json("", schema, "")

