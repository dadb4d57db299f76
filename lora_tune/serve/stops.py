"""From the text decoded so far to the pieces a client may be sent: cut before a stop string, never ahead of it.

A streamed piece cannot be taken back, so text that might be the start of a stop string (the stop is "###" and the
text ends in "#") is held back until the next tokens show whether it is; so is a trailing U+FFFD, which is what
half of a multi-byte UTF-8 character decodes to until its other bytes arrive.
"""

from __future__ import annotations

from dataclasses import dataclass, field

REPLACEMENT = "\ufffd"


@dataclass
class StopCutter:
    stops: list[str] = field(default_factory=list)
    sent: str = ""
    stopped: bool = False  # a stop string was found: the answer ends before it

    def feed(self, text: str) -> str:
        """`text` is everything generated so far; returns the new piece that is safe to send (maybe empty)."""
        if self._cut_at_stop(text):
            return self._advance(text[: self._stop_at(text)])
        safe = text.rstrip(REPLACEMENT)
        return self._advance(safe[: len(safe) - self._held_back(safe)])

    def finish(self, text: str) -> str:
        """The generation ended (end of turn, length or a stop string): the rest of the text, up to any stop."""
        if self._cut_at_stop(text):
            return self._advance(text[: self._stop_at(text)])
        return self._advance(text)

    def _cut_at_stop(self, text: str) -> bool:
        self.stopped = self.stopped or self._stop_at(text) >= 0
        return self.stopped

    def _stop_at(self, text: str) -> int:
        hits = [i for i in (text.find(stop) for stop in self.stops) if i >= 0]
        return min(hits) if hits else -1

    def _held_back(self, text: str) -> int:
        """Length of the longest end of `text` that is the start of some stop string."""
        longest = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest

    def _advance(self, upto: str) -> str:
        # Decoding more tokens normally only appends; if it ever rewrites the tail, what was sent stands (as
        # transformers' TextStreamer does) and only what lies beyond its length is new.
        piece = upto[len(self.sent) :]
        self.sent += piece
        return piece
