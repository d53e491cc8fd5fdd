"""Streaming detokenization and stop strings."""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream


class TextStream:
    """Turns output tokens into text deltas, holding back incomplete characters and stop strings."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self._stream = DecodeStream(skip_special_tokens=True)
        self.stop = [s for s in stop if s]
        self.text = ""          # everything decoded so far
        self.emitted = 0        # characters of ``text`` already handed out
        self.stopped = False

    def push(self, tokens: Sequence[int]) -> str:
        """Add tokens; returns the new text that is safe to emit."""
        if self.stopped:
            return ""
        for tok in tokens:
            piece = self._stream.step(self.tokenizer, tok)
            if piece:
                self.text += piece
        if self.stop:
            hits = [i for i in (self.text.find(s) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.stopped = True
                return self._take(len(self.text))
            # A stop string may be starting at the end: hold back that much.
            hold = max(len(s) - 1 for s in self.stop)
            return self._take(max(self.emitted, len(self.text) - hold))
        return self._take(len(self.text))

    def finish(self) -> str:
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        delta = self.text[self.emitted : upto]
        self.emitted = max(self.emitted, upto)
        return delta
