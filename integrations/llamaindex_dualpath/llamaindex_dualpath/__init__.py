"""LlamaIndex on dualpath-sdk: `DualPathLLM`, whose whole-history calls continue cached sessions."""

from llamaindex_dualpath.llm import DualPathLLM, message_tool_calls, to_dualpath_messages, tool_choice

__all__ = ["DualPathLLM", "message_tool_calls", "to_dualpath_messages", "tool_choice"]
