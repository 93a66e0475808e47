"""The placement pipeline: the one order of decisions, for the cluster and the simulator alike.

One pass, in the paper's order (PAPER.md, Scheduling):
1. PE choice over the global FIFO queue: the queue's head leaves it, each request with its PE.
2. DE choice, level 1: each of those requests joins the DE group with the fewest tokens and waits in the
   group's queue. A DE group is a node, so a group's id is its node's.
3. DE choice, level 2: each group whose queue or engines changed walks its queue; its head leaves it on
   a DE with memory for it. A group whose every DE is idle (seq_e 0) and whose head fits none of them
   still takes the head, so the DE refuses it (ContextTooLong) and the queue behind it moves on.
4. The read plan of each request that got its DE, from its PE node's and DE node's read queues.
Several placements in one pass see each other: each engine's figures go to one policy call per pass
(choose_pe, or its group's choose_de), which charges seq_e, tok_e and free memory as it places, and the
pass charges its own copy of the nodes' read queues as it plans. The reports themselves stay as they
were: the caller applies the answer to its own state (the simulator's engines, a cluster's reports).
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from dualpath_sdk.scheduler.policy import Scheduler
from dualpath_sdk.scheduler.read_plan import ReadPlan
from dualpath_sdk.scheduler.reports import EngineReport, Request


class Waiting(NamedTuple):
    """A request whose PE and DE group are chosen, in the group's queue until one of its DEs has memory."""

    request: Request
    pe: Hashable
    pe_node: Hashable
    group: Hashable


class Decision(NamedTuple):
    """Request -> PE and DE, and its read plan. Of its cached tokens the PE side reads `pe_tokens` (the
    leading `plan.pe_blocks`) and the DE side `de_tokens`, the last block's partial tail included."""

    request: Request
    pe: Hashable
    de: Hashable
    plan: ReadPlan
    pe_tokens: int
    de_tokens: int


class Pass(NamedTuple):
    """One pass's answer in decision order: `fetched` is the global queue's head, each request now waiting
    in its group's queue; `admitted` is, per group walked, its queue's head (fetched ones included)."""

    fetched: list[Waiting]
    admitted: list[Decision]


class Reports(Protocol):
    """What a pass reads. An implementation may leave out candidates that cannot win (the simulator does:
    sim/ranking.py); its decisions must be those of the full reports (tests/test_sim.py checks them)."""

    def pes(self) -> Sequence[EngineReport]:
        """PEs the queue may go to (a cluster: those fetching), in report order; none without DE groups."""
        ...

    def group_loads(self, k: int) -> Mapping[Hashable, int]:
        """Level-1 loads of the DE groups k requests may join, in report order: tokens of each group's
        unfinished requests, its queue's included."""
        ...

    def des(self, group: Hashable) -> Sequence[EngineReport]:
        """The group's DEs, in report order."""
        ...

    def waiting(self, group: Hashable) -> Sequence[Waiting]:
        """The group's queue, oldest first."""
        ...

    def read_q(self, node: Hashable) -> int:
        """Tokens queued or in flight on the node's storage NIC."""
        ...


@dataclass(frozen=True)
class Snapshot:
    """`Reports` from plain tables, every candidate shown: what a cluster of a few engines builds per pass.

    A PE's report counts the requests waiting in group queues on it (its PE is chosen, it has not been
    told yet), as the level-1 load counts them in their group.
    """

    pe: Sequence[EngineReport]
    de: Mapping[Hashable, Sequence[EngineReport]]  # group (DE node) -> its DEs
    queues: Mapping[Hashable, Sequence[Waiting]] = field(default_factory=dict)
    nodes: Mapping[Hashable, int] = field(default_factory=dict)  # node -> read queue; absent: 0

    def pes(self) -> Sequence[EngineReport]:
        return self.pe if self.de else ()

    def group_loads(self, k: int) -> Mapping[Hashable, int]:
        return {
            g: sum(e.tok_e for e in es) + sum(w.request.tokens for w in self.waiting(g))
            for g, es in self.de.items()
        }

    def des(self, group: Hashable) -> Sequence[EngineReport]:
        return self.de.get(group, ())

    def waiting(self, group: Hashable) -> Sequence[Waiting]:
        return self.queues.get(group, ())

    def read_q(self, node: Hashable) -> int:
        return self.nodes.get(node, 0)


class Pipeline:
    """The pass for one scheduler. `read_tps`: tokens/s one storage NIC reads, the same on every node
    (a split read divides the blocks by the queues and this rate)."""

    def __init__(self, scheduler: Scheduler, block_tokens: int, read_tps: float = 1.0) -> None:
        self.scheduler = scheduler
        self.block_tokens = block_tokens
        self.read_tps = read_tps

    def place(self, queue: Sequence[Request], reports: Reports, changed: Iterable[Hashable] = ()) -> Pass:
        """Decide what `queue` (the global FIFO queue) and the DE groups' queues can start now.

        `changed`: the groups to walk, in order, besides those the pass itself adds to (a cluster may
        name every group; a group whose queue and DEs are as at its last walk places nothing new).
        """
        fetched = self._fetch(queue, reports) if queue else []
        walk: Iterable[Hashable] = changed
        joined: dict[Hashable, list[Waiting]] = {}
        if fetched:
            walk = dict.fromkeys(changed)
            for w in fetched:
                joined.setdefault(w.group, []).append(w)
                walk[w.group] = None
        charged: dict[Hashable, int] = {}
        admitted: list[Decision] = []
        for group in walk:
            self._walk(group, joined.get(group, ()), reports, charged, admitted)
        return Pass(fetched, admitted)

    def _fetch(self, queue: Sequence[Request], reports: Reports) -> list[Waiting]:
        """Steps 1 and 2: PE choice, then each placed request's DE group."""
        pes = reports.pes()
        if not pes:
            return []
        placed = self.scheduler.choose_pe(queue, pes)
        if not placed:
            return []
        loads = reports.group_loads(len(placed))
        if not loads:
            return []
        node = {e.engine_id: e.node_id for e in pes}
        groups = self.scheduler.choose_de_group((p.request for p in placed), loads)
        return [
            Waiting(p.request, p.engine_id, node[p.engine_id], g)
            for p, (_, g) in zip(placed, groups, strict=True)
        ]

    def _walk(
        self,
        group: Hashable,
        joined: Sequence[Waiting],
        reports: Reports,
        charged: dict[Hashable, int],
        admitted: list[Decision],
    ) -> None:
        """Step 3 on one group, then step 4 for each request it places.

        choose_de places requests in order and stops at the first that no DE has memory for; every one it
        places lies in R (the prefix that fits the group's free memory), so R and the request after it are
        all it is given. When the head fits no DE nothing can be placed, so it is not asked.
        """
        queue = reports.waiting(group)
        if not queue and not joined:
            return
        engines = reports.des(group)
        if not engines:
            return
        head = queue[0] if queue else joined[0]
        free = [e.free_tokens for e in engines]
        if head.request.de_memory_tokens > max(free):
            if all(e.seq_e == 0 for e in engines):
                self._admit(head, engines[0].engine_id, group, reports, charged, admitted)
            return
        room = sum(free)
        walked: list[Waiting] = []
        for w in itertools.chain(queue, joined):
            walked.append(w)
            room -= w.request.de_memory_tokens
            if room < 0:
                break
        placements = self.scheduler.choose_de([w.request for w in walked], engines)
        for w, p in zip(walked, placements, strict=False):  # placements: a prefix of `walked`
            self._admit(w, p.engine_id, group, reports, charged, admitted)

    def _admit(
        self,
        w: Waiting,
        de: Hashable,
        de_node: Hashable,
        reports: Reports,
        charged: dict[Hashable, int],
        admitted: list[Decision],
    ) -> None:
        """Step 4: the read plan, charged to the pass's copy of both nodes' read queues (oracle reads
        nothing, so it charges nothing)."""
        request, bt, rate = w.request, self.block_tokens, self.read_tps
        cached = request.cached_tokens
        pe_q = charged[w.pe_node] if w.pe_node in charged else reports.read_q(w.pe_node)
        de_q = charged[de_node] if de_node in charged else reports.read_q(de_node)
        blocks = -(-cached // bt)
        plan = self.scheduler.plan_read(blocks, bt, pe_q, de_q, rate, rate, cached, request.read_plan)
        pe_tokens = min(plan.pe_blocks * bt, cached)
        de_tokens = cached - pe_tokens
        if not self.scheduler.skips_io:
            charged[w.pe_node] = pe_q + pe_tokens
            charged[de_node] = charged.get(de_node, de_q) + de_tokens
        admitted.append(Decision(request, w.pe, de, plan, pe_tokens, de_tokens))
