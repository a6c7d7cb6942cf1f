"""Next-token choice for a batch of sequences, each with its own sampling fields (OpenAI/vLLM semantics)."""

from __future__ import annotations

import torch

from .params import SamplingParams


def apply_penalties(logits: torch.Tensor, params: SamplingParams, prompt_ids: list[int], output_ids: list[int]) -> torch.Tensor:
    """One row: repetition penalty over prompt+output (HF), presence/frequency over the output (OpenAI), logit bias."""
    vocab = logits.shape[-1]
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(prompt_ids) | set(output_ids)), dtype=torch.long, device=logits.device)
        seen = seen[seen < vocab]
        picked = logits[seen]
        logits[seen] = torch.where(picked > 0, picked / params.repetition_penalty, picked * params.repetition_penalty)
    if output_ids and (params.presence_penalty or params.frequency_penalty):
        counts = torch.bincount(torch.tensor(output_ids, device=logits.device), minlength=vocab)[:vocab].to(logits.dtype)
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(logits.dtype)
    for token, bias in params.logit_bias.items():
        logits[token] += bias
    return logits


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

        `rows[i]` has `.params`, `.prompt_ids`, `.output_ids`, `.generator` (None unless seeded).
        """
        logits = logits.float()
        finite = finite_rows(logits)
        chosen: list[int | Exception] = [
            0 if ok else NonFiniteLogits("the model produced non-finite logits (NaN or infinity) for this sequence")
            for ok in finite
        ]
        usable = [i for i, ok in enumerate(finite) if ok]
        greedy = [i for i in usable if rows[i].params.greedy and not rows[i].params.penalized]
        if greedy:
            for i, token in zip(greedy, first_argmax(logits if len(greedy) == len(rows) else logits[greedy]).tolist()):
                chosen[i] = token
        plain = [i for i in usable if _is_plain(rows[i].params)]
        if plain:
            # The common case (temperature only, no seed) takes one batched draw, in place when it is every row.
            temps = torch.tensor([rows[i].params.temperature for i in plain], device=logits.device)[:, None]
            scaled = logits if len(plain) == len(rows) else logits[plain]
            # Shifted to a top logit of 0 before scaling, so no temperature can overflow the division; softmax's
            # exp is the fast one (torch.exp is ~2x slower over a 65,536-wide row).
            weights = torch.softmax(scaled.sub_(scaled.amax(-1, keepdim=True)).div_(temps), dim=-1).cpu()
            for i, token in zip(plain, draw(weights, torch.rand(len(plain), generator=self.shared)).tolist()):
                chosen[i] = token
        for i in sorted(set(usable) - set(greedy) - set(plain)):
            try:
                chosen[i] = self._sample_row(logits[i].clone(), rows[i])
            except Exception as exc:  # this row's penalties or filters failed: it ends alone, the others are sampled
                chosen[i] = exc
        return chosen

    def _sample_row(self, line: torch.Tensor, row) -> int:
        if row.params.penalized:
            line = apply_penalties(line, row.params, row.prompt_ids, row.output_ids)
            if torch.isnan(line).any() or not torch.isfinite(line.max()):
                raise NonFiniteLogits("the penalties and logit_bias left no finite logits to sample from")
        if row.params.greedy:
            return int(first_argmax(line[None])[0])
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
    """`logits.argmax(-1)` for rows without NaN (the first id of the largest value), ~10x faster over 65,536 ids:
    argmax over the blocks' maxima finds the first block holding the row's maximum, then argmax within it."""
    tiles = blocks(logits, float("-inf"))
    block = tiles.amax(-1).argmax(-1)
    rows = torch.arange(len(tiles), device=logits.device)
    return (block * BLOCK + tiles[rows, block].argmax(-1)).clamp(max=logits.shape[-1] - 1)


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


def _is_plain(params: SamplingParams) -> bool:
    return (
        not params.greedy
        and not params.penalized
        and params.seed is None
        and params.top_p >= 1.0
        and params.top_k <= 0
        and params.min_p <= 0
    )


def top_logprobs(logprobs: torch.Tensor, count: int) -> list[tuple[int, float]]:
    """The `count` most likely (token, logprob) pairs of one row."""
    if count <= 0:
        return []
    values, ids = torch.topk(logprobs, count)
    return list(zip(ids.tolist(), values.tolist()))
