"""A branching search with fork: one shared history, several continuations tried side by side. Each
branch reuses every block of the trunk, so only its own new tokens are computed.

    python examples/branching_search.py
"""

import os

import dualpath_sdk as dp

IDEAS = ["Fix it by changing the operator.", "Fix it by rewriting the test.", "Fix it with a lookup table."]

with dp.Cluster.local(model=os.environ.get("DUALPATH_MODEL")) as cluster:
    trunk = cluster.session(system="You are a careful reviewer.")
    trunk.step(
        "def add(a, b): return a - b  # the tests say add(2, 3) should be 5. What is wrong?", max_tokens=48
    )
    scores = []
    for idea in IDEAS:
        branch = trunk.fork()  # shares every cached block of the trunk
        r = branch.step(f"{idea} Explain in one sentence.", max_tokens=32)
        scores.append((len(r.text), idea, r))
        print(
            f"{idea:40s} prompt {r.usage.prompt_tokens:4d}  cached {r.usage.cached_tokens:4d}  "
            f"ttft {r.timings.ttft_s * 1000:5.0f} ms  {r.text.strip()[:60]!r}"
        )
    _, best, _ = min(scores, key=lambda s: s[0])
    print("shortest explanation:", best)
