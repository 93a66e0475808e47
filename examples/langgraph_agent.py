"""A LangGraph ReAct agent (`create_react_agent`) with a local tool on ChatDualPath: LangGraph resends
the whole conversation on every model call, and each call continues the one session that holds it,
so only the new messages are prefilled while the rest of the KV-Cache is reloaded (the `cached`
column, LangChain's `usage_metadata["input_token_details"]["cache_read"]`).

The small default model seldom decides to call a tool by itself: the agent's first model call of
each turn is forced to call the tool (a dynamic model: `bind_tools(..., tool_choice="read_file")`
while the last message is the user's, plain `bind_tools` after). A 135M model writes sensible
arguments only when the tool's JSON schema is not in its prompt (it copies the schema instead), so
the model is given the tool by name and description only, and the tool takes whatever arguments it
is given. A model that writes no well-formed call at all (a tiny test model) just answers in text.
Each turn stops after a few steps.

    pip install -e integrations/langchain_dualpath
    python examples/langgraph_agent.py
"""

import os
import warnings
from typing import Any

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_dualpath import ChatDualPath
from langgraph.prebuilt import create_react_agent

import dualpath_sdk as dp

warnings.filterwarnings("ignore", message=".*create_react_agent.*")  # LangGraph suggests langchain.agents

FILES = {
    "calc.py": "def add(a, b):\n    return a - b\n\n\ndef mul(a, b):\n    return a * b\n",
    "test_calc.py": "from calc import add, mul\n\n\ndef test_add():\n    assert add(2, 3) == 5\n",
}
QUESTIONS = [
    "The test in test_calc.py fails. Read test_calc.py.",
    "Now read calc.py. What is wrong with add?",
    "Read calc.py again and say how to fix add.",
]
SYSTEM = "You are a coding agent. Use the tools to look at the code. Answer briefly."


@tool
def read_file(path: str = "") -> str:
    """Return the contents of the file at `path`."""
    named = [name for name in sorted(FILES, key=len, reverse=True) if name in path]
    return FILES[named[0]] if named else f"error: no file {path!r}; the files are {sorted(FILES)}"


# what the model sees of the tool: its name and description, no parameter schema (see above)
DESCRIBED = {"type": "function", "function": {"name": "read_file", "description": read_file.description}}

with dp.Cluster.local(model=os.environ.get("DUALPATH_MODEL")) as cluster:
    chat = ChatDualPath(cluster=cluster, max_tokens=40)
    forced = chat.bind_tools([DESCRIBED], tool_choice="read_file")
    free = chat.bind_tools([DESCRIBED])

    def model(state: dict[str, Any], runtime: Any) -> Any:
        """Force the call while the user's message is the last one; let the model choose after."""
        return forced if isinstance(state["messages"][-1], HumanMessage) else free

    agent = create_react_agent(model, tools=[read_file], prompt=SYSTEM)
    history: list[BaseMessage] = []
    calls = 0
    for turn, question in enumerate(QUESTIONS, start=1):
        before = len(history)
        state = agent.invoke({"messages": [*history, HumanMessage(question)]}, {"recursion_limit": 5})
        history = state["messages"]
        for message in history[before + 1 :]:
            if isinstance(message, AIMessage) and message.usage_metadata:
                usage = message.usage_metadata
                cached = usage.get("input_token_details", {}).get("cache_read", 0)
                asked = ", ".join(f"{c['name']}({c['args']})" for c in message.tool_calls)
                session = str(message.response_metadata.get("session_id", ""))[:8]
                calls += 1
                print(
                    f"turn {turn} call {calls}: {'calls ' + asked if asked else 'replies'}, "
                    f"prompt {usage['input_tokens']}, cached {cached}"
                    + (f", session {session}" if session else "")
                )
            elif isinstance(message, ToolMessage):
                print(f"    tool {message.name} -> {str(message.content)[:50]!r}")
        print(f"    answer: {str(history[-1].content).strip()[:100]!r}")
