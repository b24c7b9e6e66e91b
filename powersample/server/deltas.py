"""Text deltas of a sample whose tokens arrive as they are drawn (`base`, `low-temp` streamed token by token).

A streamed delta can never be taken back, so `TextStream` sends only text that the finished sample's text must
start with (`protocol.finish`: the decoded tokens, cut before the earliest stop string):

- the text of every token but the last, once it is settled: the growth of a decode over a window of recent tokens
  (so a tokenizer's treatment of a sequence's first token cancels out, and the work per token stays bounded), kept
  only when the longer text extends the shorter one and does not end in U+FFFD (a character whose bytes are split
  over tokens waits for its last byte; a detokenizer that rewrites earlier text waits until the end);
- minus any tail that could still start a stop string; once one appears the text before it is final and nothing
  after it is sent.

`finish` then gives what is left of the final text. Each `add` decodes at most 2 * `window` tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT = "\ufffd"  # what a detokenizer shows for the bytes of a character it has not seen the end of


class TextStream:
    """The safe-to-send text of one sample as its tokens arrive (see the module docstring)."""

    def __init__(self, decode: Callable[[Sequence[int]], str], stops: Sequence[str], window: int = 8):
        self.decode, self.stops, self.window = decode, [s for s in stops if s], window
        self.tokens: list[int] = []
        self.text = ""  # the settled text: that of tokens[: self.settled]
        self.settled = 0
        self.sent = ""  # the text sent so far: a prefix of self.text
        self.stopped = False  # a stop string was found: nothing more is sent before `finish`

    def add(self, tokens: Sequence[int]) -> str:
        """The new text that is safe to send now that `tokens` were drawn ("" when none is)."""
        self.tokens += tokens
        if self.stopped:
            return ""
        self._settle(len(self.tokens) - 1)
        return self._release()

    def finish(self, final: str) -> str:
        """What is left to send of the sample's final text (`protocol.Output.text`)."""
        if not final.startswith(self.sent):
            raise RuntimeError(f"the streamed text {self.sent[-40:]!r} is not a prefix of the final text")
        rest, self.sent, self.stopped = final[len(self.sent) :], final, True
        return rest

    def _settle(self, upto: int) -> None:
        """Settle the text of tokens[:upto] when its decode extends the settled text cleanly."""
        if upto <= self.settled:
            return
        start = max(0, self.settled - self.window)
        before = self.decode(self.tokens[start : self.settled])
        after = self.decode(self.tokens[start:upto])
        if after.startswith(before) and not after.endswith(REPLACEMENT):
            self.text += after[len(before) :]
            self.settled = upto

    def _release(self) -> str:
        """The settled text not sent yet, up to the earliest stop string or short of a possible one's start."""
        longest = max((len(s) for s in self.stops), default=0)
        begin = max(0, len(self.sent) - longest)
        found = [i for i in (self.text.find(s, begin) for s in self.stops) if i >= 0]
        if found:
            end, self.stopped = min(found), True
        else:
            end = len(self.text) - _open_stop(self.text, self.stops)
        delta = self.text[len(self.sent) : max(end, len(self.sent))]
        self.sent += delta
        return delta


def _open_stop(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of a stop string (it may still become one)."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best
