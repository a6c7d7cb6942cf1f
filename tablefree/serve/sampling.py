"""Next-token choice for a batch of sequences, each with its own sampling fields (OpenAI/vLLM semantics).

What one request adds to the shared decode step is a fixed number of vectorised operations per row: its penalties
and logit bias are tensors built once per sequence (`Penalties`), never Python loops over its fields' entries.
"""

from __future__ import annotations

import itertools
import math

import numpy
import torch

from .native import native_draw
from .params import SamplingParams


class Penalties:
    """One sequence's penalty inputs as tensors, built once and kept up to date a token at a time: the ids it has seen
    (repetition penalty, HF), how often it generated each id (presence and frequency, OpenAI), and its logit bias."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int], vocab: int, device: torch.device | str = "cpu"):
        self.params = params
        self.seen = None
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab, dtype=torch.bool, device=device)
            prompt = torch.tensor(prompt_ids, dtype=torch.long, device=device)
            self.seen[prompt[prompt < vocab]] = True
        self.counts = torch.zeros(vocab, device=device) if params.presence_penalty or params.frequency_penalty else None
        if params.logit_bias and params.logit_bias_tensors is None:
            bias = params.logit_bias  # ~10x faster through numpy than torch.tensor(list(...)) for 65,536 entries
            params.logit_bias_tensors = (torch.from_numpy(numpy.fromiter(bias, numpy.int64, len(bias))).to(device),
                                         torch.from_numpy(numpy.fromiter(bias.values(), numpy.float32, len(bias))).to(device))
        self.bias = params.logit_bias_tensors if params.logit_bias else None
        self.absorbed = 0  # output ids already counted

    def absorb(self, output_ids: list[int]) -> None:
        """Counts the output ids generated since the last call (one per decode step)."""
        if len(output_ids) > self.absorbed and (self.seen is not None or self.counts is not None):
            new = torch.tensor(output_ids[self.absorbed :], dtype=torch.long, device=(self.seen if self.counts is None
                                                                                      else self.counts).device)
            if self.seen is not None:
                self.seen[new] = True
            if self.counts is not None:
                self.counts.index_add_(0, new, torch.ones(len(new), device=new.device))
        self.absorbed = len(output_ids)

    def apply(self, line: torch.Tensor) -> torch.Tensor:
        """One row's logits with the penalties, then the bias, applied (in place where it can be)."""
        params = self.params
        if self.seen is not None:
            rep = params.repetition_penalty
            line = torch.where(self.seen, torch.where(line > 0, line / rep, line * rep), line)
        if self.counts is not None:
            line -= params.frequency_penalty * self.counts + params.presence_penalty * (self.counts > 0).to(line.dtype)
        if self.bias is not None:
            line.index_add_(0, self.bias[0], self.bias[1].to(line.dtype))
        return line


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One row: temperature, then top-k, top-p and min-p cut the tail to -inf.

    Returns (logits, ids): with top-k on, only the k candidates and their ids (so top-p sorts k values, not V),
    unless the k-th value ties the next, when every id stays (ids None) and the cut keeps the ties.
    """
    ids = None
    if 0 < params.top_k < logits.shape[-1]:
        values, order = torch.topk(logits, params.top_k + 1)
        if values[-1] < values[-2]:
            logits, ids = values[:-1], order[:-1]
    # Shifted so the top logit is 0 before scaling: a small temperature then underflows to -inf, never overflows.
    logits = (logits - logits.max()) / params.temperature
    if ids is None and 0 < params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        ordered, order = (logits, None) if ids is not None else torch.sort(logits, descending=True)
        cumulative = torch.softmax(ordered, dim=-1).cumsum(-1)
        # Keep every token whose preceding mass is below top_p, and the top token always (top_p=0 is greedy).
        drop = (cumulative - torch.softmax(ordered, dim=-1)) >= params.top_p
        drop[0] = False
        kept = ordered.masked_fill(drop, float("-inf"))
        logits = kept if order is None else logits.scatter(-1, order, kept)
    if params.min_p > 0:
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    return logits, ids


class NonFiniteLogits(ValueError):
    """A row of logits holds NaN or infinity: any token drawn from it would be arbitrary."""


class TokenSampler:
    """Picks one token per row; seeded rows draw from their own generator so a fixed seed repeats exactly."""

    def __init__(self, seed: int):
        self.shared = torch.Generator().manual_seed(seed % 2**64)  # torch takes seeds in [0, 2**64) (and negatives)

    def sample(self, logits: torch.Tensor, rows: list) -> list[int | Exception]:
        """Each row's next token, or the exception that stopped that row alone. Overwrites `logits`.

        `rows[i]` has `.params`, `.prompt_ids`, `.output_ids`, `.generator` (None unless seeded) and `.penalties`
        (None until this sampler builds it).

        One pass over the rows' V logits finds each block's maximum (`Maxima`); the finiteness screen, greedy's argmax
        and the plain draw's shift all read those, so a step of greedy or plain rows reads its logits twice at most.
        """
        logits = logits.float()
        maxima = Maxima(logits)
        finite = maxima.finite()
        chosen: list[int | Exception] = [
            0 if ok else NonFiniteLogits("the model produced non-finite logits (NaN or infinity) for this sequence")
            for ok in finite
        ]
        for i in [i for i, ok in enumerate(finite) if ok and rows[i].params.penalized]:
            try:
                logits[i] = self._penalties(rows[i], logits).apply(logits[i])
                if not maxima.refresh(i):
                    raise NonFiniteLogits("the penalties and logit_bias left no finite logits to sample from")
            except Exception as exc:  # this row's penalties failed: it ends alone, the others are sampled
                chosen[i] = exc
        usable = [i for i, ok in enumerate(finite) if ok and not isinstance(chosen[i], Exception)]
        greedy = [i for i in usable if rows[i].params.greedy]
        if greedy:
            for i, token in zip(greedy, maxima.first_argmax(greedy)):
                chosen[i] = token
        plain = [i for i in usable if is_plain(rows[i].params)]
        if plain:
            # The common case (temperature only, no seed) takes one batched draw: natively where the library runs
            # (native_draw; this method 2.5x faster at 1 row, 8x at 8 and 32), else through softmax, in place when it
            # is every row. Either way shifted to a top logit of 0 before scaling, so no temperature can overflow the
            # division.
            temperatures = [rows[i].params.temperature for i in plain]
            uniform = torch.rand(len(plain), generator=self.shared)
            drawn = native_draw(logits, plain, [maxima.tops[i] for i in plain], temperatures, uniform)
            if drawn is None:
                temps = torch.tensor(temperatures, device=logits.device)[:, None]
                every = len(plain) == len(rows)
                scaled = logits if every else logits[plain]
                top = maxima.top if every else maxima.top[plain]
                # softmax's exp is the fast one (torch.exp is ~2x slower over a 65,536-wide row).
                weights = torch.softmax(scaled.sub_(top[:, None]).div_(temps), dim=-1).cpu()
                drawn = draw(weights, uniform).tolist()
            for i, token in zip(plain, drawn):
                chosen[i] = token
        for i in sorted(set(usable) - set(greedy) - set(plain)):
            try:
                chosen[i] = self._sample_row(logits[i].clone(), rows[i])
            except Exception as exc:  # this row's filters failed: it ends alone, the others are sampled
                chosen[i] = exc
        return chosen

    def speculate(self, logits: torch.Tensor, groups: list[tuple[list[int], float]]) -> list[int | Exception]:
        """The choice at each row that plain rows' drafted steps reach (speculative sampling with a guess of one token
        per row). `groups`: per sequence, its draft and temperature; its 1 + len(draft) rows follow one another in
        `logits`. Row j < len(draft) keeps draft[j] with the probability p_j(draft[j]) that its temperature's
        distribution gives it, else draws from p_j without draft[j] (renormalised by the draw) and its sequence ends
        there; a row reached past every guess draws from its p. So each token is distributed as one token a step
        would be. A sequence's rows past the last one reached repeat its choice (never read); a row with a
        non-finite logit ends its sequence there (NonFiniteLogits). One softmax and two draws of uniform numbers for
        every sequence together. Overwrites `logits`."""
        logits = logits.float()
        finite = finite_rows(logits)
        sizes = [1 + len(draft) for draft, _ in groups]
        temps = torch.tensor([t for (_, t), size in zip(groups, sizes) for _ in range(size)], device=logits.device)
        # Shifted to a top logit of 0 before scaling, in place, as `sample` does for plain rows.
        weights = torch.softmax(logits.sub_(logits.amax(-1, keepdim=True)).div_(temps[:, None]), dim=-1)
        firsts = [0, *itertools.accumulate(sizes)][:-1]
        rows = [first + j for first, (draft, _) in zip(firsts, groups) for j in range(len(draft))]
        guesses = [token for draft, _ in groups for token in draft]
        kept = weights[rows, guesses].tolist() if rows else []
        uniform = torch.rand(len(rows), generator=self.shared).tolist()
        choices: list[int | Exception] = []
        ends, refused, at = [], [], 0  # per sequence that draws: (its drawing row, rows left), the guess refused or -1
        for first, (draft, _), size in zip(firsts, groups, sizes):
            row = 0
            while row < len(draft) and finite[first + row] and uniform[at + row] < kept[at + row]:
                row += 1
            at += len(draft)
            choices.extend(draft[:row])
            if not finite[first + row]:
                failed = NonFiniteLogits("the model produced non-finite logits (NaN or infinity) for this sequence")
                choices.extend([failed] * (size - row))
                continue
            ends.append((len(choices), size - row))
            refused.append(draft[row] if row < len(draft) else -1)
            choices.extend([None] * (size - row))
        if ends:
            lines = weights[[row for row, _ in ends]]
            for line, token in enumerate(refused):
                if token >= 0:
                    lines[line, token] = 0.0  # the guess was refused: the rest of p, renormalised by the draw
            drawn = draw(lines, torch.rand(len(ends), generator=self.shared)).tolist()
            for (row, count), token in zip(ends, drawn):
                choices[row : row + count] = [token] * count
        return choices

    @staticmethod
    def _penalties(row, logits: torch.Tensor) -> Penalties:
        if row.penalties is None:  # built once per sequence, on its first step
            row.penalties = Penalties(row.params, row.prompt_ids, logits.shape[-1], logits.device)
        row.penalties.absorb(row.output_ids)
        return row.penalties

    def _sample_row(self, line: torch.Tensor, row) -> int:
        logits, ids = filter_logits(line, row.params)
        picked = draw(torch.softmax(logits, dim=-1).cpu()[None], torch.rand(1, generator=row.generator or self.shared))[0]
        return int(picked) if ids is None else int(ids[int(picked)])


def finite_rows(logits: torch.Tensor) -> list[bool]:
    """Whether each row holds only finite values: a row's sum screens it (~30x faster than isfinite over V ids),
    and the exact test settles the rare rows the sum flags, which may merely overflow."""
    finite = torch.isfinite(logits.sum(-1)).tolist()
    for i in [i for i, ok in enumerate(finite) if not ok]:
        finite[i] = bool(torch.isfinite(logits[i]).all())
    return finite


# Wide rows are read as blocks of this many ids: a reduction per block, then work on one block per row.
BLOCK = 256


def blocks(rows: torch.Tensor, fill: float) -> torch.Tensor:
    """(rows, V) as (rows, ceil(V / BLOCK), BLOCK): a view when BLOCK divides V, else padded with `fill`."""
    extra = -rows.shape[-1] % BLOCK
    if extra:
        rows = torch.nn.functional.pad(rows, (0, extra), value=fill)
    return rows.view(rows.shape[0], -1, BLOCK)


def first_argmax(logits: torch.Tensor) -> torch.Tensor:
    """`logits.argmax(-1)` for rows without NaN (the first id of the largest value), ~4x faster over 65,536 ids:
    argmax over the blocks' maxima finds the first block holding the row's maximum, then argmax within it."""
    return torch.tensor(Maxima(logits).first_argmax(), dtype=torch.long, device=logits.device)


class Maxima:
    """Each row's maximum per block of BLOCK ids, from one pass over (rows, V) logits, and what follows from them.

    A decode step of one row is a few hundred microseconds, and each tensor operation after the head's costs 5-20 us
    there (its data was just evicted from the caches): so the row maxima and the block holding each come from one
    `max` over the block maxima, and they are read into Python once."""

    def __init__(self, logits: torch.Tensor):
        self.tiles = blocks(logits, float("-inf"))  # a view of `logits` when BLOCK divides V
        self.logits = logits
        self.blocks = self.tiles.amax(-1)  # NaN propagates: a row holding one has NaN maxima
        self.top, which = self.blocks.max(-1)  # `which`: the first block holding the row's maximum
        self.tops, self.which = self.top.tolist(), which.tolist()

    def finite(self) -> list[bool]:
        """Whether each row's largest logit is finite: it holds no NaN and no +inf, and not only -inf (-inf entries
        are ids the model rules out; a token is still well defined)."""
        return [math.isfinite(top) for top in self.tops]

    def refresh(self, row: int) -> bool:
        """Reads row `row` again after its logits changed; whether its largest logit is finite."""
        tiles = blocks(self.logits[row : row + 1], float("-inf"))
        if self.logits.shape[-1] % BLOCK:  # padded: the tiles are a copy, not a view of the logits
            self.tiles[row] = tiles[0]
        self.blocks[row] = tiles.amax(-1)[0]
        top, which = self.blocks[row].max(-1)
        self.top[row] = top
        self.tops[row], self.which[row] = float(top), int(which)
        return math.isfinite(self.tops[row])

    def first_argmax(self, rows: list[int] | None = None) -> list[int]:
        """The first id of each row's largest logit, for `rows` (default: all), from the first block holding it."""
        rows = list(range(len(self.tops))) if rows is None else rows
        if not rows:
            return []
        block = [self.which[row] for row in rows]
        if len(rows) == 1:  # one row: a view of its block, no gather
            inner = [int(self.tiles[rows[0], block[0]].argmax())]
        else:
            index = torch.tensor(rows, device=self.tiles.device), torch.tensor(block, device=self.tiles.device)
            inner = self.tiles[index].argmax(-1).tolist()
        last = self.logits.shape[-1] - 1
        return [min(b * BLOCK + i, last) for b, i in zip(block, inner)]


def draw(weights: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling from unnormalised weights >= 0, one uniform number in [0, 1) per row.

    In two levels, so no pass runs a V-wide cumulative sum (the slow part; torch.multinomial is slower still): a
    block is drawn from the blocks' sums, then an id inside it, with the uniform number's remainder rescaled. Each
    level picks the first entry whose cumulative weight exceeds its target, and a target is kept below its level's
    total, so an id of zero weight is never drawn.
    """
    tiles = blocks(weights, 0.0)
    sums = tiles.sum(-1)
    cdf = sums.cumsum(-1)
    total = cdf[:, -1:]
    target = torch.minimum(uniform.to(cdf.dtype)[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    block = torch.searchsorted(cdf, target, right=True).clamp(max=cdf.shape[-1] - 1)
    before = torch.where(block > 0, cdf.gather(-1, (block - 1).clamp(min=0)), 0.0)
    share = ((target - before) / sums.gather(-1, block)).clamp(0.0, 1.0)
    rows = torch.arange(len(tiles), device=weights.device)
    inner = tiles[rows, block[:, 0]].cumsum(-1)
    last = inner[:, -1:]
    inside = torch.minimum(share * last, torch.nextafter(last, torch.zeros_like(last)))
    picked = block[:, 0] * BLOCK + torch.searchsorted(inner, inside, right=True)[:, 0]
    return picked.clamp(max=weights.shape[-1] - 1)


def is_plain(params: SamplingParams) -> bool:
    """Temperature alone, no seed of its own: the rows one batched draw from the shared generator serves."""
    return (
        not params.greedy
        and params.seed is None
        and params.top_p >= 1.0
        and params.top_k <= 0
        and params.min_p <= 0
    )


def top_logprobs(logprobs: torch.Tensor, counts: list[int], chosen: list[int]) -> list[list[tuple[int, float]]]:
    """Per row of `logprobs`: its chosen id first, then its `counts[row]` most likely ids other than that one, as
    (id, logprob) pairs; so count + 1 pairs when the chosen id is outside the top count (vLLM's order and count).
    One top-k over the rows, not one per row."""
    if not counts:
        return []
    picked = logprobs.gather(-1, torch.tensor(chosen, device=logprobs.device)[:, None])[:, 0].tolist()
    most = max(counts)
    values, ids = torch.topk(logprobs, most) if most else (logprobs[:, :0], logprobs[:, :0].long())
    values, ids = values.tolist(), ids.tolist()
    return [[(token, picked[r])] + [(i, v) for i, v in zip(ids[r][: counts[r]], values[r][: counts[r]]) if i != token]
            for r, token in enumerate(chosen)]
