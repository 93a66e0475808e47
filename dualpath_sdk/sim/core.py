"""Heap-based event loop and fluid links.

A link shares its capacity fairly between the flows of a class, and the `model` class goes first (it gets
`model_share` of the link while any model flow is active, kv takes the rest and everything when no model
flow is active: work-conserving). Fair sharing means every flow of a class advances at the same rate, so a
class keeps one virtual clock `v` (bytes served to each of its flows) and a heap of the virtual times at
which its flows finish: adding or finishing a flow is O(log n) and only this link is recomputed.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable
from typing import Any

MODEL = 0
KV = 1


class EventLoop:
    """Events are (time, seq, callback, arg); seq keeps same-time events in insertion order (determinism).

    Links changed by a callback are recomputed once after it returns (`dirty`), however many flows the
    callback started or ended on them: a batch that starts ten flows on one CNIC schedules one event.
    """

    __slots__ = ("_heap", "_seq", "dirty", "events", "now")

    def __init__(self) -> None:
        self.now = 0.0
        self.events = 0
        self._heap: list[tuple[float, int, Callable[[Any], None], Any]] = []
        self._seq = itertools.count()
        self.dirty: list[Link] = []

    def at(self, t: float, fn: Callable[[Any], None], arg: Any = None) -> None:
        heapq.heappush(self._heap, (t, next(self._seq), fn, arg))

    def flush(self) -> None:
        dirty = self.dirty
        for link in dirty:
            link._reschedule()
        dirty.clear()

    def run(self, until: float = math.inf) -> None:
        heap = self._heap
        pop = heapq.heappop
        dirty = self.dirty
        n = 0
        self.flush()
        while heap and heap[0][0] <= until:
            t, _, fn, arg = pop(heap)
            self.now = t
            fn(arg)
            n += 1
            if dirty:
                for link in dirty:
                    link._reschedule()
                dirty.clear()
        self.events += n


class Job:
    """Counts the parts (flows, compute) of one step; calls `fn(arg)` when the last one ends."""

    __slots__ = ("arg", "fn", "left")

    def __init__(self, fn: Callable[[Any], object], arg: Any) -> None:
        self.fn = fn
        self.arg = arg
        self.left = 1  # a guard part released by `start`, so parts ending early cannot fire it

    def done(self, _: Any = None) -> None:
        self.left -= 1
        if self.left == 0:
            self.fn(self.arg)

    def start(self) -> None:
        self.done()


class Link:
    """One direction of one NIC (or a node's DRAM) as a fluid resource with two priority classes."""

    __slots__ = (
        "_dirty",
        "_fin",
        "_heaps",
        "_last",
        "_loop",
        "_rate",
        "_seq",
        "_v",
        "_version",
        "capacity",
        "carried",
        "model_share",
        "name",
        "served",
    )

    def __init__(self, loop: EventLoop, name: str, capacity: float, model_share: float = 0.99) -> None:
        self._loop = loop
        self.name = name
        self.capacity = capacity
        self.model_share = model_share
        self._v = [0.0, 0.0]
        self._rate = [0.0, 0.0]
        self._heaps: tuple[list[tuple[float, int, float, Job]], ...] = ([], [])
        self._last = 0.0
        self._version = 0
        self._dirty = False
        self._fin = self._on_finish  # one bound method, not one per scheduled event
        self._seq = itertools.count()
        self.served = [0.0, 0.0]  # bytes delivered, integrated from the rates
        self.carried = [0.0, 0.0]  # bytes of finished flows

    def add(self, nbytes: float, cls: int, job: Job) -> None:
        """Start a flow of `nbytes` in class `cls` that counts as one part of `job`."""
        if nbytes <= 0:
            return
        job.left += 1
        loop = self._loop
        if loop.now != self._last:
            self._advance(loop.now)
        heapq.heappush(self._heaps[cls], (self._v[cls] + nbytes, next(self._seq), nbytes, job))
        if not self._dirty:
            self._dirty = True
            loop.dirty.append(self)

    def active(self, cls: int) -> int:
        return len(self._heaps[cls])

    def served_until(self, now: float) -> float:
        """Bytes served by `now`, both classes, without moving the clocks (an observer must not round
        them differently from the run)."""
        dt = now - self._last
        served = self.served[0] + self.served[1]
        if dt > 0:
            served += self._rate[0] * dt * len(self._heaps[0]) + self._rate[1] * dt * len(self._heaps[1])
        return served

    def _advance(self, now: float) -> None:
        dt = now - self._last
        if dt > 0:
            rate, v, served, heaps = self._rate, self._v, self.served, self._heaps
            r = rate[0]
            if r:
                v[0] += r * dt
                served[0] += r * dt * len(heaps[0])
            r = rate[1]
            if r:
                v[1] += r * dt
                served[1] += r * dt * len(heaps[1])
            self._last = now

    def _reschedule(self) -> None:
        self._dirty = False
        hm, hk = self._heaps
        n_model, n_kv = len(hm), len(hk)
        cap = self.capacity
        rate = self._rate
        if n_model:
            model_cap = cap * self.model_share if n_kv else cap
            r_model = rate[0] = model_cap / n_model
            r_kv = rate[1] = (cap - model_cap) / n_kv if n_kv else 0.0
        else:
            r_model = rate[0] = 0.0
            r_kv = rate[1] = cap / n_kv if n_kv else 0.0
        self._version += 1
        v = self._v
        wait = math.inf
        if n_model and r_model > 0:
            wait = (hm[0][0] - v[0]) / r_model
        if n_kv and r_kv > 0:
            w = (hk[0][0] - v[1]) / r_kv
            if w < wait:
                wait = w
        if wait < math.inf:
            loop = self._loop
            heapq.heappush(
                loop._heap,
                (loop.now + (wait if wait > 0.0 else 0.0), next(loop._seq), self._fin, self._version),
            )

    def _on_finish(self, version: int) -> None:
        if version != self._version:
            return  # superseded by a later add/finish on this link
        loop = self._loop
        now = loop.now
        self._advance(now)
        finished: list[Job] = []
        # A flow within a nanosecond-per-second of `now` is done: a later event could not advance the
        # float clock, and waiting for it would loop forever.
        slack = 1e-9 * (1.0 + now)
        pop = heapq.heappop
        for c in (MODEL, KV):
            heap = self._heaps[c]
            if not heap:
                continue
            v = self._v[c]
            limit = v + self._rate[c] * slack + 1e-9 * v
            while heap and heap[0][0] <= limit:
                _, _, nbytes, job = pop(heap)
                self.carried[c] += nbytes
                finished.append(job)
            if not heap:
                self._v[c] = 0.0  # restart the virtual clock: keeps float precision over long runs
        if not self._dirty:
            self._dirty = True
            loop.dirty.append(self)
        for job in finished:
            job.done()
