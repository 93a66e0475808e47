"""LangChain on dualpath-sdk: `ChatDualPath`, a chat model whose conversations are cached sessions."""

from langchain_dualpath.chat_models import ChatDualPath, to_messages

__all__ = ["ChatDualPath", "to_messages"]
