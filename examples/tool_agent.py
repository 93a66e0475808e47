"""A tool-using agent loop on Session.step: the model asks for a tool, the program runs it, the result
goes back as a `tool` message, and every turn reloads the whole history from the cache.

The small default model seldom decides to call a tool by itself: when a reply has no tool call, this
loop asks for one on the model's behalf (an assistant message with `tool_calls`, as an agent framework
that forces `tool_choice` would), so the loop always exercises the tool path.

    python examples/tool_agent.py
"""

import json
import os

import dualpath_sdk as dp

FILES = {
    "calc.py": "def add(a, b):\n    return a - b\n\n\ndef mul(a, b):\n    return a * b\n",
    "test_calc.py": "from calc import add, mul\n\n\ndef test_add():\n    assert add(2, 3) == 5\n",
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "read_file",
            "description": "Return the contents of a file of the repository",
            "parameters": {
                "type": "object",
                "properties": {"path": {"type": "string"}},
                "required": ["path"],
            },
        },
    }
]


def read_file(path: str) -> str:
    return FILES.get(path, f"error: no file {path!r}")


with dp.Cluster.local(model=os.environ.get("DUALPATH_MODEL")) as cluster:
    agent = cluster.session(system="You are a coding agent. Use the tools to look at the code.")
    r = agent.step("The test test_add fails. Find out why.", tools=TOOLS, max_tokens=48)
    for turn, path in enumerate(["test_calc.py", "calc.py", "calc.py"], start=1):
        if r.tool_calls:
            calls, forced = r.tool_calls, []
        else:  # force the call the model did not make
            call = {
                "id": f"call_{turn}",
                "type": "function",
                "function": {"name": "read_file", "arguments": json.dumps({"path": path})},
            }
            calls, forced = [call], [{"role": "assistant", "content": None, "tool_calls": [call]}]
        results = [
            {
                "role": "tool",
                "tool_call_id": c["id"],
                "content": read_file(**json.loads(c["function"]["arguments"])),
            }
            for c in calls
        ]
        r = agent.step([*forced, *results], max_tokens=48)
        fn = calls[0]["function"]
        print(
            f"turn {turn}: {'forced' if forced else 'chosen'} {fn['name']}({fn['arguments']}), "
            f"prompt {r.usage.prompt_tokens}, cached {r.usage.cached_tokens}, "
            f"ttft {r.timings.ttft_s * 1000:.0f} ms"
        )
    print("final answer:", r.text.strip()[:200])
