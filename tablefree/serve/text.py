"""Generated ids -> text as it grows: incremental decoding and stop strings that never leak into a stream."""

from __future__ import annotations


class IncrementalText:
    """Decodes one sequence's output token by token; holds back any tail that may begin a stop string."""

    def __init__(self, tokenizer, stop: list[str], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.stop = stop
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0  # characters of `text` already handed out
        self._prefix = 0  # decode from here so multi-token characters and merges come out whole
        self._read = 0

    def add(self, token: int) -> tuple[str, bool]:
        """Append one id; returns (new text safe to emit, whether a stop string was hit)."""
        self.ids.append(token)
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before) :]
            self._prefix, self._read = self._read, len(self.ids)
        if self.stop:
            # Only the new text (plus the longest stop string's reach) can contain a new match.
            start = max(0, self.emitted - max(len(s) for s in self.stop))
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                return self._release(len(self.text)), True
            return self._release(len(self.text) - self._held()), False
        return self._release(len(self.text)), False

    def finish(self) -> str:
        """The held-back tail, once the sequence ends without a stop string."""
        return self._release(len(self.text))

    def _held(self) -> int:
        """Length of the longest suffix of the unreleased text that is a proper prefix of some stop string."""
        # No stop-string prefix straddles what was released (it would have been held), so only the unreleased tail
        # is searched: a long stop string then costs one sequence little, and the batch it shares nothing.
        unreleased = len(self.text) - self.emitted
        longest = 0
        for stop in self.stop:
            for size in range(min(len(stop) - 1, unreleased), longest, -1):
                if self.text.endswith(stop[:size]):
                    longest = size
                    break
        return longest

    def _release(self, upto: int) -> str:
        upto = max(upto, self.emitted)
        out = self.text[self.emitted : upto]
        self.emitted = upto
        return out

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)
