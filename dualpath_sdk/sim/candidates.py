"""What the simulator shows the placement pipeline (scheduler.Reports): its engines' figures as reports.

dualpath and oracle choose PEs and DE groups by argmin (tok, report order), so k queued requests can only
go to the k least-loaded PEs of each read_q class and the k least-loaded groups: with `narrow` those are
all the pipeline is shown (ranking.py keeps them), not up to 384 PE reports and a 96-group map per pass.
basic's round robin walks every engine, so it is shown everything. tests/test_sim.py checks that the
narrowed reports give the decisions of the full ones, pass by pass.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Iterable, Mapping, Sequence, Sized
from typing import cast

from dualpath_sdk.scheduler import EngineReport, Waiting
from dualpath_sdk.sim.engines import Node, PrefillEngine
from dualpath_sdk.sim.ranking import Ranking


class SimReports:
    """The scheduler's view of the simulated cluster; the simulator tells it of every load change."""

    __slots__ = (
        "_order",
        "all_pes",
        "alpha",
        "beta",
        "de_nodes",
        "group_rank",
        "narrow",
        "nodes",
        "pe_rank",
        "queue",
        "under_beta",
    )

    def __init__(
        self,
        nodes: list[Node],
        pes: list[PrefillEngine],
        queue: Sized,
        alpha: float,
        beta: float,
        narrow: bool,
    ) -> None:
        self.nodes = nodes
        self.all_pes = pes
        self.de_nodes = [n for n in nodes if n.role == "de"]
        self.queue = queue  # the global queue: how many requests a pass may place
        self.alpha = alpha
        self.beta = beta
        self.narrow = narrow
        self.under_beta: dict[int, PrefillEngine] = {e.idx: e for e in pes}  # in report order
        self._order = itertools.count(len(pes))
        self.pe_rank = Ranking(len(pes), 2)  # class 0: node read_q <= alpha, 1: above
        self.group_rank = Ranking(len(nodes), 1)
        for pos, node in enumerate(self.de_nodes):
            node.pos = pos

    def start(self) -> None:
        """Rank every engine and group by its figures as the run starts."""
        for node in self.nodes:
            node.low = node.read_q <= self.alpha
        for e in self.all_pes:
            self._rank_pe(e)
        for node in self.de_nodes:
            self.group_changed(node)

    # --- scheduler.Reports ---------------------------------------------------------------------------------

    def pes(self) -> list[EngineReport]:
        if not self.under_beta:
            return []
        engines = self._pe_candidates(len(self.queue)) if self.narrow else self.under_beta.values()
        return [EngineReport(e.idx, e.node.idx, "pe", e.seq_e, e.tok_e, e.node.read_q, 0) for e in engines]

    def group_loads(self, k: int) -> Mapping[Hashable, int]:
        if not self.narrow:
            return {n.idx: n.group_tok for n in self.de_nodes}
        cands = self.group_rank.smallest(0, k)
        cands.sort(key=lambda c: c[1])
        return {c[2]: self.nodes[c[2]].group_tok for c in cands}

    def des(self, group: Hashable) -> list[EngineReport]:
        node = self.nodes[cast(int, group)]
        return [EngineReport(e.idx, node.idx, "de", e.seq_e, e.tok_e, node.read_q, e.free) for e in node.des]

    def waiting(self, group: Hashable) -> Sequence[Waiting]:
        return self.nodes[cast(int, group)].de_queue

    def read_q(self, node: Hashable) -> int:
        return self.nodes[cast(int, node)].read_q

    def idle(self, changed: Iterable[int]) -> bool:
        """True when a pass walking the `changed` groups would place nothing: the global queue is empty or
        no PE is under beta (so no PE report), and none of those groups has a queue. Most passes of a
        storage-bound run are such (every finish asks for one), so the simulator skips them."""
        return not (len(self.queue) and self.under_beta) and not any(self.nodes[g].de_queue for g in changed)

    # --- load changes --------------------------------------------------------------------------------------

    def pe_changed(self, e: PrefillEngine) -> bool:
        """After e's tok_e changed: True when it has just come back under beta (it may take work again)."""
        back = False
        if e.tok_e > self.beta:
            self.under_beta.pop(e.idx, None)
        elif e.idx not in self.under_beta:
            self.under_beta[e.idx] = e
            e.order = next(self._order)
            back = True
        if self.narrow:
            self._rank_pe(e)
        return back

    def group_changed(self, node: Node) -> None:
        if self.narrow:
            self.group_rank.put(0, node.idx, node.group_tok, node.pos)

    def add_read_q(self, node: Node, tokens: int) -> None:
        node.read_q += tokens
        low = node.read_q <= self.alpha
        if low != node.low:
            node.low = low
            if self.narrow:
                for e in node.pes:
                    self._rank_pe(e)

    def _pe_candidates(self, k: int) -> list[PrefillEngine]:
        """The k least-loaded engines under beta of each read_q class, in report (under_beta) order."""
        rank = self.pe_rank
        cands = rank.smallest(0, k) + rank.smallest(1, k)
        cands.sort(key=lambda c: c[1])
        return [self.all_pes[c[2]] for c in cands]

    def _rank_pe(self, e: PrefillEngine) -> None:
        if e.idx in self.under_beta:
            self.pe_rank.put(0 if e.node.low else 1, e.idx, e.tok_e, e.order)
        else:
            self.pe_rank.remove(e.idx)
