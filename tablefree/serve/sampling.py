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


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """One row: temperature, then top-k, top-p and min-p cut the tail to -inf."""
    # Shifted so the top logit is 0 before scaling: a small temperature then underflows to -inf, never overflows.
    logits = (logits - logits.max()) / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        ordered, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(ordered, dim=-1).cumsum(-1)
        # Keep every token whose preceding mass is below top_p, and the top token always (top_p=0 is greedy).
        drop = (cumulative - torch.softmax(ordered, dim=-1)) >= params.top_p
        drop[0] = False
        logits = logits.scatter(-1, order, ordered.masked_fill(drop, float("-inf")))
    if params.min_p > 0:
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    return logits


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
            for i, token in zip(greedy, logits[greedy].argmax(-1).tolist()):
                chosen[i] = token
        plain = [i for i in usable if _is_plain(rows[i].params)]
        if plain:
            # The common case (temperature only, no seed) takes one batched draw, in place when it is every row.
            temps = torch.tensor([rows[i].params.temperature for i in plain], device=logits.device)[:, None]
            scaled = logits if len(plain) == len(rows) else logits[plain]
            # Shifted to a top logit of 0 before scaling, so no temperature can overflow the division.
            weights = scaled.sub_(scaled.max(-1, keepdim=True).values).div_(temps).exp_().cpu()
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
            return int(line.argmax())
        probs = torch.softmax(filter_logits(line, row.params), dim=-1).cpu()
        return int(draw(probs[None], torch.rand(1, generator=row.generator or self.shared))[0])


def finite_rows(logits: torch.Tensor) -> list[bool]:
    """Whether each row holds only finite values: a row's sum screens it (~30x faster than isfinite over V ids),
    and the exact test settles the rare rows the sum flags, which may merely overflow."""
    finite = torch.isfinite(logits.sum(-1)).tolist()
    for i in [i for i, ok in enumerate(finite) if not ok]:
        finite[i] = bool(torch.isfinite(logits[i]).all())
    return finite


def draw(weights: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling from unnormalised weights, one uniform number per row (torch.multinomial is ~10x slower over 65,536 ids)."""
    cdf = weights.cumsum(-1)
    picked = torch.searchsorted(cdf, (uniform.to(cdf.dtype) * cdf[:, -1])[:, None], right=True)[:, 0]
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
