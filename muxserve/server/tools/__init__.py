"""Tool calling: rendering ``tools`` with the model's chat template, ``tool_choice``, and the
parsers of each family's call format (one module per family)."""

from muxserve.server.tools.base import ParsedOutput, StreamingToolParser, ToolCall, ToolFormat
from muxserve.server.tools.registry import (
                                            FORMATS,
                                            ToolRequest,
                                            hermes_system_prompt,
                                            template_supports_tools,
                                            tool_format_for,
                                            tool_messages,
)

__all__ = ["FORMATS", "ParsedOutput", "StreamingToolParser", "ToolCall", "ToolFormat", "ToolRequest",
           "hermes_system_prompt", "template_supports_tools", "tool_format_for", "tool_messages"]
