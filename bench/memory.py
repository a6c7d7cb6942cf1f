"""Parameters and training-state bytes of the three paper presets (built on the meta device).

Bytes = fp32 weights + fp32 gradients of trainable parameters + AdamW's two fp32 moments.
Last line: the saving of the affine table-free model against the learned table, as a ratio of bytes.
"""

from __future__ import annotations

import torch

from tablefree.presets import build_config, build_model


def footprint(preset: str) -> dict:
    with torch.device("meta"):
        model = build_model(build_config(preset))
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    trainable_input = sum(p.numel() for p in model.get_input_embeddings().parameters())
    bytes_total = 4 * params + 4 * trainable + 8 * trainable
    return dict(preset=preset, params=params, trainable=trainable, input=trainable_input, bytes=bytes_total)


def main() -> None:
    rows = [footprint(p) for p in ("paper-learned", "paper-minimal", "paper-affine")]
    reference = rows[0]
    print(f"{'preset':15s} {'parameters':>13s} {'trainable':>13s} {'input params':>13s} {'w+g+AdamW MiB':>14s} {'saving':>8s}")
    for row in rows:
        saving = 1 - row["bytes"] / reference["bytes"]
        print(
            f"{row['preset']:15s} {row['params']:13,d} {row['trainable']:13,d} {row['input']:13,d} "
            f"{row['bytes'] / 2**20:14,.1f} {saving:8.1%}"
        )
    print(f"ratio {rows[2]['bytes'] / reference['bytes']:.3f}")


if __name__ == "__main__":
    main()
