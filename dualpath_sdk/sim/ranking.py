"""Incrementally maintained candidate sets, so a scheduling pass never walks every engine or group.

The scheduler's PE choice and level-1 DE choice pick the argmin (tok, report order) again and again for k
queued requests; only the k smallest items of each class can ever be picked (each pick removes one item and
re-inserts it with a larger load), so the simulator hands the scheduler those k items, in report order,
instead of all 384 engine reports of a 48P96D cluster. `Ranking` keeps them at O(log n) per load change.
"""

from __future__ import annotations

import heapq
import itertools


class Ranking:
    """Items 0..n-1, each in at most one of `classes` min-heaps keyed by (key, order); lazy deletion.

    `order` must be unique per item (it breaks ties, as the position in a report list does).
    """

    __slots__ = ("_limit", "_next", "heaps", "stamp")

    def __init__(self, items: int, classes: int) -> None:
        self.heaps: list[list[tuple[int, int, int, int]]] = [[] for _ in range(classes)]
        self.stamp = [-1] * items  # the stamp of each item's one valid entry; -1: in no heap
        self._next = itertools.count()
        self._limit = 4 * items + 64

    def put(self, cls: int, item: int, key: int, order: int) -> None:
        """(Re)insert `item` in class `cls`; any earlier entry of it becomes stale."""
        s = next(self._next)
        self.stamp[item] = s
        heap = self.heaps[cls]
        heapq.heappush(heap, (key, order, item, s))
        if len(heap) > self._limit:
            stamp = self.stamp
            heap[:] = [e for e in heap if stamp[e[2]] == e[3]]
            heapq.heapify(heap)

    def remove(self, item: int) -> None:
        self.stamp[item] = -1

    def smallest(self, cls: int, k: int) -> list[tuple[int, int, int]]:
        """The k smallest valid (key, order, item) of class `cls`, ascending; the heap keeps them."""
        heap, stamp = self.heaps[cls], self.stamp
        out: list[tuple[int, int, int, int]] = []
        pop = heapq.heappop
        while heap and len(out) < k:
            e = pop(heap)
            if stamp[e[2]] == e[3]:
                out.append(e)
        for e in out:
            heapq.heappush(heap, e)
        return [(e[0], e[1], e[2]) for e in out]
