"""The next-token loss of a causal LM without its batch x sequence x V logits: the lean loss.

With V = 65,536 the output side dominates: a batch's full float32 logits are 2 GiB per 8 x 1,024
tokens, and the plain loss keeps them (and their log-softmax) for the backward pass. Here the output
projection and cross-entropy run `max_logits` logits at a time. When a gradient is wanted, each
chunk's gradients (of the hidden states and of the head weight) are computed in the forward pass,
right after its loss, and the chunk's logits are freed; the backward pass only scales them. So the
head costs the same three matrix products as the plain loss, and no logits outlive their chunk.

One definition serves training (`tablefree.train`) and evaluation (`tablefree.evaluate`).
Matrix products follow the caller's autocast (bfloat16 logits under bfloat16 autocast, as the plain
`head(hidden)` would be); softmax and the sums are float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import TableFreeError

# Logits held at once. On an accelerator 128 MiB of float32, 512 positions of a 65,536-token vocabulary;
# on a CPU 16 MiB, 64 positions: a chunk then stays in cache, which runs faster (docs/architecture.md).
MAX_LOGITS = 1 << 25
CPU_MAX_LOGITS = 1 << 22


def default_max_logits(device) -> int:
    return CPU_MAX_LOGITS if torch.device(device).type == "cpu" else MAX_LOGITS


def causal_lm(model):
    """The GPT-NeoX causal LM inside torch.compile and DDP wrappers (FSDP2 keeps the model's own class)."""
    from transformers import GPTNeoXForCausalLM

    for wrapper_field in ("_orig_mod", "module"):  # torch.compile's, then DDP's
        inner = getattr(model, wrapper_field, None)
        if isinstance(inner, torch.nn.Module):
            model = inner
    if not isinstance(model, GPTNeoXForCausalLM):
        raise TableFreeError(f"tablefree trains and scores GPT-NeoX causal LMs (tablefree's own and stock ones), not "
                             f"{type(model).__name__}; score other models with lm-evaluation-harness")
    return model


def summed_next_token_loss(model, input_ids, targets, max_logits: int | None = None):
    """Summed cross-entropy of `model`'s predictions at `input_ids` against `targets` (a float32 scalar).

    `model` is a GPT-NeoX causal LM, bare or inside DDP, FSDP2 or torch.compile; it is called as a
    whole, so the wrappers' hooks run, with no logits kept: the head runs here, a chunk at a time.
    """
    head = causal_lm(model).get_output_embeddings()
    no_positions = torch.zeros(0, dtype=torch.long, device=input_ids.device)
    # The last hidden state is the final LayerNorm's output, the head's input.
    hidden = model(input_ids=input_ids, use_cache=False, logits_to_keep=no_positions, output_hidden_states=True).hidden_states[-1]
    return summed_cross_entropy(head, hidden, targets, max_logits)


def summed_cross_entropy(head, hidden, targets, max_logits: int | None = None):
    """Summed cross-entropy of `head(hidden)` against `targets`, `max_logits` logits at a time (default: by device).

    `head` is a bias-free linear layer (V x d weight); `hidden` (..., d), `targets` (...) ids in [0, V).
    Differentiable in `hidden` and `head.weight`; no chunk's logits are kept for the backward pass.
    """
    weight = head.weight
    if getattr(head, "bias", None) is not None:
        raise TableFreeError(f"the chunked loss takes a bias-free output head; this {type(head).__name__} has a bias")
    if hidden.shape[:-1] != targets.shape:
        raise TableFreeError(f"hidden states {tuple(hidden.shape)} and targets {tuple(targets.shape)} do not match")
    positions = max(1, (max_logits or default_max_logits(hidden.device)) // weight.shape[0])
    flat_hidden, flat_targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _ChunkedCrossEntropy.apply(flat_hidden, weight, flat_targets, head, positions)
    return _chunked(head, flat_hidden, flat_targets, positions, False, False)[0]


def _chunked(head, hidden, targets, positions: int, grad_hidden: bool, grad_weight: bool):
    """(summed loss, its gradient in hidden or None, in the head weight or None), `positions` rows at a time."""
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    d_hidden = torch.empty_like(hidden) if grad_hidden else None
    d_weight = torch.zeros(head.weight.shape, dtype=torch.float32, device=hidden.device) if grad_weight else None
    for start in range(0, targets.numel(), positions):
        rows, ids = hidden[start : start + positions], targets[start : start + positions]
        logits = head(rows)
        log_probs = F.log_softmax(logits.float(), dim=-1)
        loss -= log_probs.gather(1, ids[:, None]).sum()
        if d_hidden is None and d_weight is None:
            continue
        d_logits = log_probs.exp_()  # softmax - one_hot(ids): the loss's gradient in the logits
        d_logits[torch.arange(ids.numel(), device=ids.device), ids] -= 1
        # In the logits' dtype (autocast's), as the plain loss's backward would multiply them; cast once.
        low = d_logits.to(logits.dtype)
        del log_probs, logits
        if d_hidden is not None:
            d_hidden[start : start + positions] = low @ head.weight
        if d_weight is not None and (low.dtype == d_weight.dtype or rows.shape[0] < rows.shape[1]):
            # Summed inside a float32 product; a lower-precision one costs a pass over V x d per chunk,
            # more than the chunk itself when it has fewer positions than the width.
            d_weight.addmm_(d_logits.t(), rows.float())
        elif d_weight is not None:
            d_weight += (low.t() @ rows).float()
    return loss, d_hidden, d_weight


class _ChunkedCrossEntropy(torch.autograd.Function):
    """The loss and, in the same pass over the chunks, its gradients; backward only scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, head, positions):
        loss, d_hidden, d_weight = _chunked(head, hidden, targets, positions, *ctx.needs_input_grad[:2])
        ctx.save_for_backward(d_hidden, d_weight)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        d_hidden, d_weight = ctx.saved_tensors
        d_hidden = None if d_hidden is None else d_hidden * grad_loss.to(d_hidden.dtype)
        d_weight = None if d_weight is None else (d_weight * grad_loss).to(ctx.weight_dtype)
        return d_hidden, d_weight, None, None, None
