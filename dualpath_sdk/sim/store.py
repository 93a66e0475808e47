"""KV storage smaller than the working set: LRU eviction and session pins, as the SDK's store does them.

The SDK's store (store/index.py) evicts unpinned blocks least recently used first, and a session pins
its Full Blocks for a TTL after every step (api/session.py; closing the session drops the pins). A read
touches every block of the prefix at one instant, and among blocks of one instant the index takes the
earliest written first: the head of a session's chain. A chain without its head is unreachable (the
cached prefix is the longest stored run from block 0), so one evicted block costs the session its whole
prefix and the rest of its blocks are the next victims. The simulator therefore evicts a session's whole
chain at once, sessions in LRU order. Writes that find the store full of pinned blocks fail (the SDK's
puts are strict) and those blocks are recomputed at the session's next call.

Per session (an agent) the store keeps one stored prefix of `held` blocks. A call's chain is not evicted
between its lookup and the end of its read (the simulator has no mid-read miss); after the read it is
evictable again unless pinned, while the call prefills and decodes.
"""

from __future__ import annotations

import heapq
import itertools


class SessionStore:
    """Stored blocks per agent within `capacity` blocks; a session's pin lasts `pin_ttl_s` after each
    commit (0: no pins)."""

    __slots__ = (
        "_lru",
        "_pins",
        "_seq",
        "_stamp",
        "capacity",
        "evicted",
        "failed",
        "held",
        "pin_ttl_s",
        "pinned_until",
        "used",
    )

    def __init__(self, agents: int, capacity: int, pin_ttl_s: float) -> None:
        self.capacity = capacity
        self.pin_ttl_s = pin_ttl_s
        self.held = [0] * agents  # leading blocks of each agent's chain in the store
        self.used = 0
        self.pinned_until = [0.0] * agents  # the pin of each agent's last commit
        self._lru: list[tuple[float, int, int, int]] = []  # (last used, seq, agent, stamp): evictable
        self._pins: list[tuple[float, int, int, int, float]] = []  # (expiry, seq, agent, stamp, last used)
        self._stamp = [0] * agents  # an agent's one valid heap entry; lookup invalidates it (in flight)
        self._seq = itertools.count()
        self.evicted = 0  # blocks
        self.failed = 0  # blocks whose write found no room

    def lookup(self, agent: int, blocks: int) -> int:
        """How many of the call's `blocks` of history are stored; they are kept until `read_done`."""
        self._stamp[agent] += 1
        return min(self.held[agent], blocks)

    def read_done(self, agent: int, now: float) -> None:
        """The call's read ended at `now` (its blocks' last use): its chain is evictable again, unless the
        pin of its last commit still holds."""
        until = self.pinned_until[agent]
        self._file(agent, now, until if until > now else None)

    def commit(self, agent: int, blocks: int, found: int, now: float, last_use: float, closes: bool) -> None:
        """The call, which found `found` blocks stored, ended with `blocks` whole blocks of history: the DE
        writes the ones after `found` (evicting unpinned chains, least recently used first, when they do
        not fit), then the chain is pinned for the TTL, or left evictable when the session `closes` or
        pins are off. `last_use`: when its prefix was read. A chain evicted while its call ran is not
        written again (the DE persists only the blocks it computed, which now follow a missing head)."""
        missing = blocks - self.held[agent] if self.held[agent] >= found else 0
        if missing > 0:
            room = self.capacity - self.used
            if missing > room:
                room += self._evict(missing - room, now)
            written = min(missing, room)
            self.held[agent] += written
            self.used += written
            self.failed += missing - written
        pinned = not closes and self.pin_ttl_s > 0
        self.pinned_until[agent] = now + self.pin_ttl_s if pinned else 0.0
        self._file(agent, last_use, self.pinned_until[agent] if pinned else None)

    def _file(self, agent: int, last_use: float, until: float | None) -> None:
        """File the agent's chain in the pin heap (pinned `until`) or, unpinned, in the LRU heap."""
        stamp = self._stamp[agent] = self._stamp[agent] + 1
        if until is None:
            heapq.heappush(self._lru, (last_use, next(self._seq), agent, stamp))
        else:
            heapq.heappush(self._pins, (until, next(self._seq), agent, stamp, last_use))

    def _evict(self, need: int, now: float) -> int:
        """Evict whole unpinned chains, least recently used first, until `need` blocks are free."""
        pins, lru, stamp = self._pins, self._lru, self._stamp
        while pins and pins[0][0] <= now:  # the index drops pins whose TTL ran out
            _, seq, agent, s, last_use = heapq.heappop(pins)
            if stamp[agent] == s:
                heapq.heappush(lru, (last_use, seq, agent, s))
        freed = 0
        while freed < need and lru:
            _, _, agent, s = heapq.heappop(lru)
            if stamp[agent] != s:
                continue
            stamp[agent] += 1
            freed += self.held[agent]
            self.evicted += self.held[agent]
            self.used -= self.held[agent]
            self.held[agent] = 0
        return freed
