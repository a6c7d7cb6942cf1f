"""Memory of the three paper presets: training state, and a micro-batch's activations and logits before and after the lean loss.

1. Parameters and training-state bytes (fp32 weights + fp32 gradients of trainable parameters +
   AdamW's two fp32 moments), built on the meta device.
2. For paper-affine (32 layers x 1024, V = 65,536), one micro-batch of B x 1,024 tokens: the bytes
   its forward pass keeps for the backward pass (every tensor autograd saves, each storage counted
   once, parameters not), measured on the CPU for one sequence through 1 and 2 of the blocks at full
   width and vocabulary with bfloat16 activations (as under GPU bfloat16 autocast), and for two
   sequences through 1 block, extrapolated linearly to 32 blocks and B sequences; plus
   the loss's transient tensors at its peak, counted from their shapes: the plain loss's gradient of
   the logits (float32 + bfloat16, B x 1,024 x V) against the lean loss's one chunk (`tablefree.loss`;
   the gradients it computes in the forward pass are among the saved bytes). Printed for B = 16 with the plain loss
   (`F.cross_entropy(model(ids).logits.float())`) and the lean one, and the largest B whose
   training state + activations + loss transients fit in 80 GiB.

Last line: the lean loss's activation + logits bytes over the plain loss's at B = 16.

    python bench/memory.py [--batch 16] [--budget-gib 80]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from tablefree.loss import MAX_LOGITS, summed_next_token_loss
from tablefree.presets import build_config, build_model

SEQ = 1024
GIB = 2**30


def footprint(preset: str) -> dict:
    with torch.device("meta"):
        model = build_model(build_config(preset))
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    trainable_input = sum(p.numel() for p in model.get_input_embeddings().parameters())
    bytes_total = 4 * params + 4 * trainable + 8 * trainable
    return dict(preset=preset, params=params, trainable=trainable, input=trainable_input, bytes=bytes_total)


def saved_for_backward(layers: int, batch: int, lean: bool) -> int:
    """Bytes autograd keeps between the forward and the backward pass of `batch` 1,024-token sequences.

    Measured on the CPU with paper-affine's width and vocabulary but `layers` of its blocks, bfloat16
    weights (so activations are bfloat16, as under GPU autocast); parameters are not counted.
    """
    config = build_config("paper-affine", num_hidden_layers=layers)
    model = build_model(config, seed=0).to(torch.bfloat16)
    weights = {p.untyped_storage()._cdata for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage._cdata not in weights:
            storages[storage._cdata] = storage.nbytes()
        return tensor  # kept alive until the end, so no storage is freed and reused while counting

    ids = torch.randint(0, config.vocab_size, (batch, SEQ + 1), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        if lean:
            loss = summed_next_token_loss(model, ids[:, :-1], ids[:, 1:])
        else:
            logits = model(input_ids=ids[:, :-1]).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
    del loss
    return sum(storages.values())


def saved_line(lean: bool, layers: int) -> tuple[int, int]:
    """(fixed bytes, bytes per sequence) saved by a `layers`-block model: both terms are linear in blocks and
    sequences, so three small measurements (1 block x 1 sequence, 2 x 1, 1 x 2) fix them."""
    base, two_blocks, two_sequences = (saved_for_backward(n, b, lean) for n, b in ((1, 1), (2, 1), (1, 2)))
    per_block = two_blocks - base  # per sequence
    per_sequence_outside_blocks = two_sequences - base - per_block
    fixed = base - per_sequence_outside_blocks - per_block
    return fixed, per_sequence_outside_blocks + layers * per_block


def loss_transient(config, batch: int, lean: bool) -> int:
    """Bytes the loss holds at its peak beyond what is saved: the logits' gradient, or one chunk's tensors."""
    vocab = config.vocab_size
    if not lean:
        return batch * SEQ * vocab * (4 + 2)  # float32 gradient of the log-softmax, then its bfloat16 cast
    positions = max(1, MAX_LOGITS // vocab)
    return positions * vocab * (2 + 4 + 2)  # bfloat16 logits, float32 log-probabilities, bfloat16 gradient


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16, help="sequences of 1,024 tokens in the micro-batch")
    parser.add_argument("--budget-gib", type=float, default=80.0, help="accelerator memory to fit in")
    args = parser.parse_args()

    rows = [footprint(p) for p in ("paper-learned", "paper-minimal", "paper-affine")]
    reference = rows[0]
    print(f"{'preset':15s} {'parameters':>13s} {'trainable':>13s} {'input params':>13s} {'w+g+AdamW MiB':>14s} {'saving':>8s}")
    for row in rows:
        saving = 1 - row["bytes"] / reference["bytes"]
        print(f"{row['preset']:15s} {row['params']:13,d} {row['trainable']:13,d} {row['input']:13,d} "
              f"{row['bytes'] / 2**20:14,.1f} {saving:8.1%}")
    print(f"table-free (affine) / learned training state: {rows[2]['bytes'] / reference['bytes']:.3f}\n")

    config = build_config("paper-affine")
    state = rows[2]["bytes"]
    print(f"paper-affine, micro-batch {args.batch} x {SEQ:,} tokens, bfloat16 activations, {args.budget_gib:g} GiB budget, "
          f"training state {state / GIB:.1f} GiB (saved bytes measured on 1-2 blocks x 1-2 sequences, "
          f"extrapolated to {config.num_hidden_layers} x {args.batch})")
    print(f"| {'loss':<6} | {'saved for backward (GiB)':>24} | {'loss transients (GiB)':>21} | {'activations + logits (GiB)':>26} | "
          f"{'largest micro-batch':>19} |")
    print(f"|{'-' * 8}|{'-' * 26}|{'-' * 23}|{'-' * 28}|{'-' * 21}|")
    totals = {}
    for name, lean in (("plain", False), ("lean", True)):
        fixed, per_sequence = saved_line(lean, config.num_hidden_layers)
        saved = fixed + args.batch * per_sequence
        transient = loss_transient(config, args.batch, lean)
        # Every term is linear in the micro-batch B: fixed + B x growth; the largest B under the budget.
        fixed += 2 * loss_transient(config, 1, lean) - loss_transient(config, 2, lean)
        growth = per_sequence + loss_transient(config, 2, lean) - loss_transient(config, 1, lean)
        largest = int((args.budget_gib * GIB - state - fixed) // growth)
        totals[name] = saved + transient
        print(f"| {name:<6} | {saved / GIB:>24.2f} | {transient / GIB:>21.2f} | {(saved + transient) / GIB:>26.2f} | {largest:>19,d} |")
    print(f"\nlean / plain activation + logits memory at micro-batch {args.batch}: {totals['lean'] / totals['plain']:.2f}x")
    print(f"ratio {totals['lean'] / totals['plain']:.3f}")


if __name__ == "__main__":
    main()
