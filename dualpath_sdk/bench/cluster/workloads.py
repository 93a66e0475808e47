"""The cluster benchmark's agents: synthetic ones shaped like PAPER.md's workload table, and the
conversations of ../shared/traces' trace replayed block by block."""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

BLOCK = 64  # KV block tokens; a trace's hash block becomes one such block
TRACE = Path(  # the workplace's ../shared/traces beside the repository, or $DUALPATH_TRACE
    os.environ.get(
        "DUALPATH_TRACE",
        Path(__file__).resolve().parents[4] / "shared" / "traces" / "mooncake_conversation_trace.jsonl",
    )
)


@dataclass(frozen=True)
class Turn:
    tokens: list[int]  # appended to the session (synthetic agents), or the whole prompt (trace)
    gen: int


@dataclass(frozen=True)
class Agent:
    name: str
    turns: list[Turn]  # turns[0] is primed, untimed
    continues: bool  # True: one session appends every turn; False: every turn is a fresh prompt


def synthetic_agents(n: int, turns: int, first: int, append: int, gen: int, vocab: int) -> list[Agent]:
    """Agents of PAPER.md's table scaled down: a first prompt, then `turns` appends of `append` tokens."""
    agents = []
    for a in range(n):
        rng = random.Random(a)
        sizes = [first] + [append] * turns
        agents.append(
            Agent(f"agent{a}", [Turn([rng.randrange(vocab) for _ in range(k)], gen) for k in sizes], True)
        )
    return agents


def trace_agents(n: int, turns: int, vocab: int, max_blocks: int = 32, path: Path = TRACE) -> list[Agent]:
    """The first `n` conversations of the trace with more than `turns` requests of at most `max_blocks`.

    A request continues the conversation whose blocks its hash_ids prefix ends in (the shared system
    block 0 aside). Hash block h becomes 64 tokens drawn from Random(h); a prompt is input_length / 8
    tokens of its blocks; generation is output_length / 32, clipped to [1, 16] (decode stays light).
    """
    requests = [json.loads(line) for line in path.read_text().splitlines()]
    owner: dict[int, int] = {}
    conversations: dict[int, list[dict]] = {}
    for i, r in enumerate(requests):
        ids = r["hash_ids"]
        k = 0
        while k < len(ids) and ids[k] in owner:
            k += 1
        root = owner[ids[k - 1]] if k >= 2 else i
        conversations.setdefault(root, []).append(r)
        for h in ids[k:]:
            owner[h] = root
    blocks: dict[int, list[int]] = {}

    def tokens(r: dict) -> list[int]:
        for h in r["hash_ids"]:
            if h not in blocks:
                rng = random.Random(h)
                blocks[h] = [rng.randrange(vocab) for _ in range(BLOCK)]
        return [t for h in r["hash_ids"] for t in blocks[h]][: -(-r["input_length"] // 8)]

    agents = []
    for root, conv in conversations.items():
        if len(conv) > turns and all(len(r["hash_ids"]) <= max_blocks for r in conv[: turns + 1]):
            chosen = conv[: turns + 1]
            agents.append(
                Agent(
                    f"conv{root}",
                    [Turn(tokens(r), min(16, max(1, r["output_length"] // 32))) for r in chosen],
                    False,
                )
            )
        if len(agents) == n:
            break
    return agents
