"""Drafts a sequence proposes from its own text, checked by the engine in the step that feeds its last token.

Prompt lookup (n-gram speculation, as vLLM's `ngram` method and llama.cpp's lookup decoding): when a sequence's last n
tokens occurred earlier in its prompt or output, the tokens that followed them then are a guess at what follows now.
The engine feeds that guess to the same decode step as the sequence's last token, one row per token (SlotDecoder's
shared slots), and, for a greedy sequence, keeps the model's own choice at each row up to the first row fed a wrong
guess: the output is the one plain steps would give, in fewer steps when the text repeats itself (code, quotes, lists,
a small model's loops). A step of a few more rows costs a little more than one (docs/architecture.md gives the
figures), so a sequence whose guesses keep failing stops guessing for a while, longer each time.

Greedy rows keep the greedy choice; rows that sample at a temperature alone (no top-p, top-k, min-p, seed of their
own) keep a guess with the probability the model gives it and otherwise draw from the rest of that distribution
(speculative sampling, TokenSampler.speculate), so each token is distributed as without drafts. Rows with penalties
or logit_bias never draft (their distribution reads their earlier output), nor rows with a seed of their own (their
text must not depend on the batch, and the room for drafts does).
"""

from __future__ import annotations

from .sampling import is_plain

LONGEST, SHORTEST = 3, 2  # n-gram lengths looked up, longest first; a 1-token match guesses too often wrong
PROMPT_WINDOW = 4096  # a long prompt's last tokens indexed (its start rarely predicts the reply; the index stays small)
MOST_PAUSE = 16  # steps a sequence whose every guess failed waits at most before it guesses again


def drafts_for(params, alone: bool) -> bool:
    """Whether a sequence of these sampling params may draft in a step, `alone` when it is the step's only sequence:
    greedy, or plain sampling (`is_plain`) while alone, with nothing that reads its earlier output.

    A sampled sequence drafts only alone: about half its guesses hold at temperature 0.5, and beside other sequences
    its extra rows cost more than they save. Small-affine trained, 64 tokens, best of 3, tokens/s with drafts over
    without at 1 / 2 / 4 sequences: sampled at 0.5, float32 1.44 / 1.03 / 0.88, int8 head and body 1.31 / 1.04 / 0.86;
    greedy, 3.18 / 2.39 / 1.36 and 3.24 / 2.24 / 1.39."""
    return not params.penalized and (params.greedy or alone and is_plain(params))


class NgramDrafts:
    """One sequence's drafts: an index of where each n-gram of its tokens last occurred, grown as tokens come, and how
    many tokens to guess next (more after guesses that held, fewer after one that failed)."""

    def __init__(self, most: int):
        self.most = most
        self.tokens: list[int] = []
        self.follows: dict[tuple[int, ...], int] = {}  # n-gram -> index of the token after its latest occurrence
        self.limit = most  # tokens to guess next
        self.pause = 0  # steps left without guessing
        self.backoff = 0  # the pause after the next guess that fails outright

    def propose(self, prompt_ids: list[int], output_ids: list[int], room: int) -> list[int]:
        """Up to min(room, the current limit) tokens guessed to follow prompt_ids + output_ids; [] when its last
        n-gram never occurred before (or it is pausing). The guess continues through itself, so a loop of any period
        is guessed in full."""
        self._read(prompt_ids, output_ids)
        if self.pause:
            self.pause -= 1
            return []
        count = min(room, self.limit)
        tokens = self.tokens
        if count <= 0:
            return []
        for n in range(LONGEST, SHORTEST - 1, -1):
            start = self.follows.get(tuple(tokens[-n:])) if len(tokens) > n else None
            if start is not None:
                break
        else:
            return []
        draft: list[int] = []
        end = len(tokens)
        for i in range(start, start + count):
            draft.append(tokens[i] if i < end else draft[i - end])
        return draft

    def checked(self, guessed: int, held: int) -> None:
        """After a step that checked `guessed` tokens, of which the first `held` were right."""
        if held == guessed:
            self.limit, self.backoff = min(self.most, self.limit + 2), 0
        elif held:
            self.limit, self.backoff = held + 1, 0
        else:
            self.limit = 1
            self.backoff = min(2 * self.backoff + 1, MOST_PAUSE)
            self.pause = self.backoff

    def _read(self, prompt_ids: list[int], output_ids: list[int]) -> None:
        """Indexes the tokens that came since the last call: each n-gram that now has a token after it."""
        tokens, known = self.tokens, len(self.tokens)
        if known < len(prompt_ids):
            tokens.extend(prompt_ids[known:])
            tokens.extend(output_ids)
        else:
            tokens.extend(output_ids[known - len(prompt_ids):])
        follows = self.follows
        # Token i follows the n-grams ending at i - 1; the last token follows nothing yet.
        for i in range(max(known, len(prompt_ids) - PROMPT_WINDOW, 1), len(tokens)):
            for n in range(SHORTEST, LONGEST + 1):
                if i >= n:
                    follows[tuple(tokens[i - n : i])] = i
