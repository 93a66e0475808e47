"""Many agents at once on the async face: each is a task that steps its own session with `astep`; the
event loop never blocks while the cluster prefills and decodes.

    python examples/async_agents.py
"""

import os

import anyio

import dualpath_sdk as dp

TASKS = ["Summarize: tests pass.", "Name one Python linter.", "Say hello in French.", "Count to three."]


async def agent(cluster: dp.Cluster, task: str, results: dict[str, list[int]]) -> None:
    session = cluster.session(system="You are brief.")
    cached = []
    for turn in range(3):
        r = await session.astep(task if turn == 0 else "Go on.", max_tokens=16)
        cached.append(r.usage.cached_tokens)
    results[task] = cached


async def main() -> None:
    with dp.Cluster.local(model=os.environ.get("DUALPATH_MODEL")) as cluster:
        results: dict[str, list[int]] = {}
        async with anyio.create_task_group() as tasks:
            for task in TASKS:
                tasks.start_soon(agent, cluster, task, results)
        for task, cached in results.items():
            print(f"{task:28s} cached tokens per turn: {cached}")


anyio.run(main)
