"""Which tool-call format a model speaks, and what ``tools`` / ``tool_choice`` ask of a request.

The format is read from the chat template first (its tool markers), then from the architecture.
A template that knows no tools (SmolLM2's) gets the Hermes format, described to the model in a
system message (``tool_messages``).

``tool_choice`` (OpenAI): ``none`` (the model must not call: no tools in the prompt, no parsing),
``auto`` (the default with tools: it may call), ``required`` (it must call one: decoding follows the
grammar of the family's call format) and ``{"type": "function", "function": {"name": N}}`` (it
must call N).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from muxserve.engine.structured import GrammarError, GuidedSpec
from muxserve.server.tools.base import ToolFormat
from muxserve.server.tools.hermes import HermesFormat
from muxserve.server.tools.llama3 import Llama3JsonFormat
from muxserve.server.tools.mistral import MistralFormat

FORMATS: dict[str, type[ToolFormat]] = {f.name: f for f in (HermesFormat, Llama3JsonFormat, MistralFormat)}
_BY_ARCHITECTURE = {"Qwen2ForCausalLM": "hermes", "Qwen3ForCausalLM": "hermes", "MistralForCausalLM": "mistral",
                    "LlamaForCausalLM": "llama3_json"}
_MARKERS = (("<tool_call>", "hermes"), ("[TOOL_CALLS]", "mistral"), ("[AVAILABLE_TOOLS]", "mistral"),
            ("<|python_tag|>", "llama3_json"), ("Environment: ipython", "llama3_json"))


def template_supports_tools(chat_template: str | None) -> bool:
    return bool(chat_template) and "tools" in chat_template


def tool_format_for(architecture: str | None, chat_template: str | None) -> ToolFormat:
    """The tool-call format of a model, from its chat template's markers, else its architecture;
    Hermes for a template without tools."""
    if template_supports_tools(chat_template):
        for marker, name in _MARKERS:
            if marker in chat_template:
                return FORMATS[name]()
        if architecture in _BY_ARCHITECTURE:
            return FORMATS[_BY_ARCHITECTURE[architecture]]()
    return HermesFormat()


@dataclass
class ToolRequest:
    tools: list[dict]
    choice: str  # none, auto, required or named
    name: str | None = None  # the function of a named choice

    @classmethod
    def from_body(cls, tools: Any, tool_choice: Any) -> ToolRequest | None:
        """``tools`` and ``tool_choice`` of a chat request, checked; None when no tool is involved."""
        if tools is None or tools == []:
            if tool_choice not in (None, "none", "auto"):
                raise GrammarError(f"tool_choice {json.dumps(tool_choice)} needs tools", "tool_choice")
            return None
        if not isinstance(tools, list):
            raise GrammarError(f"tools must be a list of functions, got {tools!r}", "tools")
        names = []
        for i, tool in enumerate(tools):
            fn = tool.get("function") if isinstance(tool, dict) else None
            if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
                raise GrammarError(f'tools[{i}] must be {{"type": "function", "function": {{...}}}}, got {tool!r}',
                                   "tools")
            if not isinstance(fn.get("name"), str) or not fn["name"]:
                raise GrammarError(f"tools[{i}].function.name must be a non-empty string, got {fn.get('name')!r}",
                                   "tools")
            if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
                raise GrammarError(f"tools[{i}].function.parameters must be a JSON schema object, got "
                                   f"{fn['parameters']!r}", "tools")
            names.append(fn["name"])
        if tool_choice is None or tool_choice in ("auto", "none", "required"):
            return cls(tools, tool_choice or "auto")
        fn = tool_choice.get("function") if isinstance(tool_choice, dict) else None
        if not isinstance(tool_choice, dict) or tool_choice.get("type") != "function" or not isinstance(fn, dict):
            raise GrammarError('tool_choice must be "none", "auto", "required" or {"type": "function", "function": '
                               f'{{"name": ...}}}}, got {tool_choice!r}', "tool_choice")
        if fn.get("name") not in names:
            raise GrammarError(f"tool_choice names the function {fn.get('name')!r}, which is not in tools "
                               f"({', '.join(names)})", "tool_choice")
        return cls(tools, "named", fn["name"])

    @property
    def prompt_tools(self) -> list[dict] | None:
        """The tools the prompt shows the model (none for ``none``: it must not call)."""
        return None if self.choice == "none" else self.tools

    @property
    def parses_calls(self) -> bool:
        return self.choice != "none"

    def guided_spec(self, fmt: ToolFormat) -> GuidedSpec | None:
        """The grammar that forces a call (``required``, named), in the family's format."""
        if self.choice not in ("required", "named"):
            return None
        return fmt.call_spec(self.tools, self.name)


def tool_messages(messages: list[dict], request: ToolRequest | None,
                  chat_template: str | None) -> tuple[list[dict], list[dict] | None]:
    """(messages, tools) for ``apply_chat_template``: assistant ``tool_calls`` with their
    ``arguments`` parsed from OpenAI's JSON strings (templates write them with ``tojson``), and,
    for a template without tools, the tools described in a system message in the Hermes format."""
    out = []
    for message in messages:
        calls = message.get("tool_calls")
        if calls:
            message = {**message, "tool_calls": [_call_for_template(c) for c in calls]}
        out.append(message)
    tools = request.prompt_tools if request else None
    if tools is None or template_supports_tools(chat_template):
        return out, tools
    system = hermes_system_prompt(tools)
    if out and out[0].get("role") == "system":
        out[0] = {**out[0], "content": f"{out[0].get('content') or ''}\n\n{system}".lstrip()}
    else:
        out.insert(0, {"role": "system", "content": system})
    return out, None


def hermes_system_prompt(tools: list[dict]) -> str:
    """Qwen2.5's own words for the Hermes format, for templates that have none."""
    listed = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
            f"{listed}\n</tools>\n\nFor each function call, return a json object with function name and arguments "
            "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
            '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')


def _call_for_template(call: dict) -> dict:
    fn = dict(call.get("function") or {})
    if isinstance(fn.get("arguments"), str):
        try:
            fn["arguments"] = json.loads(fn["arguments"])
        except json.JSONDecodeError:
            pass  # the template shows it as it came
    return {**call, "function": fn}
