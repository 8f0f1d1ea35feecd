"""What every tool-call format shares: the parsed result, call ids, JSON scanning, and the
streaming parser that turns any family's non-streaming parse into OpenAI's deltas.

A family (``ToolFormat``) says three things: how far the text is plain content (``content_end``,
which holds back what may still become the start of a call), how to read the calls out of the
rest (``parse_calls``, tolerant of an unfinished tail while streaming), and the grammar that forces
a call (``call_spec``, for ``tool_choice`` ``required`` or a named function).

Streaming re-reads the whole text after each delta and sends only what became certain: content up
to ``content_end``, and each call (id, name and arguments in one delta) as soon as it is complete.
At the end it sends whatever the non-streaming parse of the final text adds, so the deltas of a
stream always add up to the non-streaming answer, however the text was split. A call is sent whole
rather than in argument fragments because only a complete call is certain to stay a call (a
truncated or malformed one turns the text back into content in both answers).
"""

from __future__ import annotations

import json
import secrets
import string
from dataclasses import dataclass, field
from typing import Any

from muxserve.engine.structured import GuidedSpec

_ID_CHARS = string.ascii_letters + string.digits


def call_id() -> str:
    """An OpenAI-style tool call id: ``call_`` and 24 random alphanumerics."""
    return "call_" + "".join(secrets.choice(_ID_CHARS) for _ in range(24))


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text of an object, as OpenAI sends it
    id: str = field(default_factory=call_id)

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class PartialCall:
    """A call as far as the text shows it: the name once complete, the arguments once the call is."""

    name: str | None = None
    arguments: str | None = None


@dataclass
class ParsedOutput:
    content: str | None
    tool_calls: list[ToolCall]

    @property
    def finish_reason(self) -> str | None:
        """``tool_calls`` when the answer calls a tool (it replaces ``stop``)."""
        return "tool_calls" if self.tool_calls else None


def arguments_text(value: Any) -> str:
    """Arguments as OpenAI's JSON string: compact, non-ASCII kept."""
    return json.dumps({} if value is None else value, ensure_ascii=False)


def json_end(text: str, start: int) -> int | None:
    """The index just past the JSON value that starts at ``text[start]`` (after whitespace), or
    None if it is not complete yet. Strings and escapes are honoured; the value is not checked."""
    i, n = start, len(text)
    while i < n and text[i] in " \t\r\n":
        i += 1
    if i == n:
        return None
    if text[i] not in "[{\"":
        j = i
        while j < n and text[j] not in " \t\r\n,}]":
            j += 1
        return j if j < n else None  # a bare number or literal may go on
    depth, in_string, escaped = 0, False, False
    for j in range(i, n):
        c = text[j]
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
                if depth == 0:
                    return j + 1
        elif c == '"':
            in_string = True
        elif c in "[{":
            depth += 1
        elif c in "]}":
            depth -= 1
            if depth == 0:
                return j + 1
    return None


def partial_name(text: str, key: str = "name") -> str | None:
    """The value of ``"name"`` in the (maybe unfinished) JSON object ``text``, once its closing
    quote has arrived."""
    at = text.find(f'"{key}"')
    if at < 0:
        return None
    colon = text.find(":", at + len(key) + 2)
    if colon < 0:
        return None
    end = json_end(text, colon + 1)
    if end is None:
        return None
    try:
        value = json.loads(text[colon + 1:end])
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, str) else None


def held_prefix(text: str, marker: str) -> int:
    """How many characters at the end of ``text`` could be the start of ``marker``."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-k:]):
            return k
    return 0


class ToolFormat:
    """One family's tool-call format. Subclasses set ``name`` and implement the three methods."""

    name = ""

    def content_end(self, text: str, final: bool) -> int:
        """How much of ``text`` is content for sure (before any call)."""
        raise NotImplementedError

    def parse_calls(self, text: str, final: bool) -> list[PartialCall] | None:
        """The complete calls in ``text`` (None or empty: the text holds no call; then it is all
        content). While streaming (``final`` False) only calls that no later text can undo."""
        raise NotImplementedError

    def call_spec(self, tools: list[dict], name: str | None) -> GuidedSpec:
        """The grammar of a forced call: of ``name``, or of any of ``tools``."""
        raise NotImplementedError

    def parse(self, text: str) -> ParsedOutput:
        """The non-streaming answer: content and complete tool calls of the whole output."""
        calls = self.parse_calls(text, final=True)
        if not calls:
            return ParsedOutput(text, [])
        content = text[:self.content_end(text, final=True)].rstrip()
        complete = [ToolCall(c.name, c.arguments) for c in calls if c.name is not None and c.arguments is not None]
        if not complete:
            return ParsedOutput(text, [])
        return ParsedOutput(content or None, complete)


def call_schema(tools: list[dict], name: str | None, arguments_key: str) -> dict:
    """A JSON schema of one call object ``{"name": ..., arguments_key: ...}`` of the named tool or
    of any tool."""
    chosen = [t for t in tools if name is None or t["function"]["name"] == name]
    options = [{"type": "object",
                "properties": {"name": {"const": t["function"]["name"]},
                               arguments_key: t["function"].get("parameters") or {"type": "object"}},
                "required": ["name", arguments_key]} for t in chosen]
    return options[0] if len(options) == 1 else {"anyOf": options}


class StreamingToolParser:
    """Feeds text deltas, returns OpenAI chat deltas: ``{"content": ...}`` and/or
    ``{"tool_calls": [{"index", "id", "type", "function": {"name", "arguments"}}]}``."""

    def __init__(self, fmt: ToolFormat):
        self.fmt = fmt
        self.text = ""
        self._content_sent = 0
        self._sent: list[ToolCall] = []  # calls sent, in order

    def feed(self, delta: str) -> dict[str, Any] | None:
        self.text += delta
        return self._step(final=False)

    def finish(self) -> dict[str, Any] | None:
        """The end of the output: whatever the non-streaming parse adds."""
        return self._step(final=True)

    @property
    def finish_reason(self) -> str | None:
        return "tool_calls" if self._sent else None

    def tool_calls(self) -> list[ToolCall]:
        return list(self._sent)

    def _step(self, final: bool) -> dict[str, Any] | None:
        if final:
            parsed = self.fmt.parse(self.text)
            content = self.text if not parsed.tool_calls else (parsed.content or "")
            calls = [PartialCall(c.name, c.arguments) for c in parsed.tool_calls]
        else:
            # Trailing whitespace waits: it is dropped if a call follows.
            content = self.text[:self.fmt.content_end(self.text, final=False)].rstrip()
            calls = self.fmt.parse_calls(self.text, final=False) or []
        out_content = content[self._content_sent:]
        self._content_sent = max(self._content_sent, len(content))
        return self._delta(out_content, calls)

    def _delta(self, content: str, calls: list[PartialCall]) -> dict[str, Any] | None:
        items = []
        for index, call in enumerate(calls):
            if call.name is None or call.arguments is None:
                break
            if index < len(self._sent):
                continue
            sent = ToolCall(call.name, call.arguments)
            self._sent.append(sent)
            items.append({"index": index, "id": sent.id, "type": "function",
                          "function": {"name": sent.name, "arguments": sent.arguments}})
        out: dict[str, Any] = {}
        if content:
            out["content"] = content
        if items:
            out["tool_calls"] = items
        return out or None
