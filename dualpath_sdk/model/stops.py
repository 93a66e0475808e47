"""Stop strings over streamed text: emit what is safe now, hold back what could start a stop string.

The reply ends where the first stop string to complete begins (of two completing at the same
character, the longer one: it begins earlier); the stop string and everything after it are dropped.
The result is the same for every split of the text into deltas.
"""

from __future__ import annotations

from collections.abc import Sequence

from dualpath_sdk.errors import InvalidInput

MAX_STOPS = 8
MAX_STOP_CHARS = 256


class StopStrings:
    """One reply's stop strings, fed the reply's text deltas as they are decoded."""

    def __init__(self, stops: str | Sequence[str] | None) -> None:
        if stops is None:
            stops = []
        elif isinstance(stops, str):
            stops = [stops]
        elif not isinstance(stops, (list, tuple)):
            raise InvalidInput("stop must be a string or a list of strings")
        if len(stops) > MAX_STOPS:
            raise InvalidInput(f"at most {MAX_STOPS} stop strings, got {len(stops)}")
        for s in stops:
            if not isinstance(s, str) or not s or len(s) > MAX_STOP_CHARS:
                raise InvalidInput(
                    f"each stop string must be a non-empty string of at most {MAX_STOP_CHARS} chars"
                )
        self.stops: tuple[str, ...] = tuple(dict.fromkeys(stops))
        self._held = ""
        self.stopped = False

    def feed(self, delta: str) -> tuple[str, bool]:
        """(the text that can be emitted now, whether a stop string has completed).

        Once stopped, further deltas are dropped: `("", True)`.
        """
        if self.stopped:
            return "", True
        text = self._held + delta
        cut = self._first_stop(text)
        if cut is not None:
            self._held, self.stopped = "", True
            return text[:cut], True
        keep = self._held_back(text)
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep], False

    def flush(self) -> str:
        """At the end of the reply: the text held back (it never completed a stop string)."""
        held, self._held = self._held, ""
        return held

    def _first_stop(self, text: str) -> int | None:
        """Where the stop string that completes first in `text` begins, if one does.

        Every stop string that ended in text fed earlier was found then, so one found now ends in
        this delta, and begins in it or in the held-back text (which is kept for exactly that)."""
        best: tuple[int, int] | None = None  # (end, -length): first to end, then the longest
        for s in self.stops:
            i = text.find(s)
            if i >= 0 and (best is None or (i + len(s), -len(s)) < best):
                best = (i + len(s), -len(s))
        return None if best is None else best[0] + best[1]

    def _held_back(self, text: str) -> int:
        """The length of the longest suffix of `text` that is a proper prefix of some stop string."""
        longest = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:k]):
                    longest = k
                    break
        return longest
