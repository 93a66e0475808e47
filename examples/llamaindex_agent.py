"""A LlamaIndex FunctionAgent with a local tool on DualPathLLM: LlamaIndex resends the whole
conversation on every LLM call, and each call continues the one session that holds it, so only the
new messages are prefilled while the rest of the KV-Cache is reloaded (the `cached` column).

The small default model seldom decides to call a tool by itself: the agent forces the first call of
each run (`initial_tool_choice`, a named `tool_choice`: the reply is made to open a call of that
tool, and the model writes its arguments). A 135M model writes sensible arguments only when the
tool's JSON schema is not in its prompt (it copies the schema instead), so the tool here is
described in words only (`Described`) and takes whatever arguments it is given. A model that writes
no well-formed call at all (a tiny test model) just answers in text, and the run ends there. Each
run stops after three LLM calls.

    pip install -e integrations/llamaindex_dualpath
    python examples/llamaindex_agent.py
"""

import os
from typing import Any

import anyio
from llama_index.core.agent.workflow import AgentOutput, FunctionAgent, ToolCallResult
from llama_index.core.memory import ChatMemoryBuffer
from llama_index.core.tools import FunctionTool, ToolMetadata
from llamaindex_dualpath import DualPathLLM

import dualpath_sdk as dp

FILES = {
    "calc.py": "def add(a, b):\n    return a - b\n\n\ndef mul(a, b):\n    return a * b\n",
    "test_calc.py": "from calc import add, mul\n\n\ndef test_add():\n    assert add(2, 3) == 5\n",
}
QUESTIONS = [
    "The test in test_calc.py fails. Read test_calc.py.",
    "Now read calc.py. What is wrong with add?",
    "Read calc.py again and say how to fix add.",
]


def read_file(path: str = "", **other: Any) -> str:
    """Return the contents of the file at `path`."""
    named = [name for name in sorted(FILES, key=len, reverse=True) if name in f"{path} {other}"]
    return FILES[named[0]] if named else f"error: no file {path!r}; the files are {sorted(FILES)}"


class Described(ToolMetadata):
    """A tool described by its name and description only: no parameter schema in the prompt."""

    def to_openai_tool(self, skip_length_check: bool = False) -> dict[str, Any]:
        return {"type": "function", "function": {"name": self.name, "description": self.description}}


async def main() -> None:
    with dp.Cluster.local(model=os.environ.get("DUALPATH_MODEL")) as cluster:
        llm = DualPathLLM(cluster=cluster, max_tokens=40)
        tool = FunctionTool(read_file, Described(name="read_file", description=str(read_file.__doc__)))
        agent = FunctionAgent(
            tools=[tool],
            llm=llm,
            system_prompt="You are a coding agent. Use the tools to look at the code. Answer briefly.",
            initial_tool_choice="read_file",  # force the first call of each run (see above)
        )
        memory = ChatMemoryBuffer.from_defaults(token_limit=llm.metadata.context_window)  # across runs
        calls = 0
        for turn, question in enumerate(QUESTIONS, start=1):
            handler = agent.run(
                user_msg=question, memory=memory, max_iterations=3, early_stopping_method="generate"
            )
            async for event in handler.stream_events():
                if isinstance(event, AgentOutput) and event.raw:
                    calls += 1
                    usage, what = event.raw["usage"], "replies"
                    if event.tool_calls:
                        call = event.tool_calls[0]
                        what = f"calls {call.tool_name}({call.tool_kwargs})"
                    print(
                        f"turn {turn} call {calls}: {what}, prompt {usage['prompt_tokens']}, "
                        f"cached {usage['cached_tokens']}, session {event.raw['session_id'][:8]}"
                    )
                elif isinstance(event, ToolCallResult):
                    print(f"    tool {event.tool_name} -> {str(event.tool_output.content)[:50]!r}")
            answer = await handler
            print(f"    answer: {str(answer).strip()[:100]!r}")


anyio.run(main)
