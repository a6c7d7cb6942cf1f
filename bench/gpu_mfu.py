"""Training MFU, tokens/s and peak memory of the three paper presets on one GPU, eager and torch.compile.

The training step is the trainer's own (`tablefree.train`: build_model, build_optimizer, the
runtime's autocast, the lean loss of `tablefree.loss`, clipping, AdamW); tokens are random ids, which
cost the same FLOPs. `--compare-loss` also runs each configuration with the plain loss
(`F.cross_entropy(model(ids).logits.float())`, full logits) for the difference in MFU and memory.
Device and dtype come from tablefree/runtime.py (`--device`, `--dtype`). MFU = tokens/s x FLOPs per
token / the GPU's datasheet bf16 peak (measured matmul rate printed alongside). Sized for < 5
minutes on an H100/H200 without --compare-loss; the last line is the best MFU.

    python bench/gpu_mfu.py [--micro-batch 16] [--steps 12] [--presets paper-learned,paper-minimal,paper-affine] [--compare-loss]
"""

from __future__ import annotations

import argparse
import time

from tablefree.runtime import add_runtime_flags


def measure(preset: str, compiled: bool, lean: bool, args, runtime) -> dict:
    import torch
    import torch.nn.functional as F

    from tablefree.loss import summed_next_token_loss
    from tablefree.metrics import training_flops_per_token
    from tablefree.presets import build_config, build_model
    from tablefree.train import TrainConfig, build_optimizer

    device = runtime.device
    config = build_config(preset)
    model = build_model(config, seed=0).to(device)
    optimizer = build_optimizer(model, TrainConfig(lr=1e-4), device)
    forward = torch.compile(model) if compiled else model
    generator = torch.Generator(device=device).manual_seed(0)
    batch = torch.randint(0, config.vocab_size, (args.micro_batch, args.seq_len + 1), device=device, generator=generator)
    tokens = batch[:, 1:].numel()

    def step():
        with runtime.autocast():
            if lean:
                loss = summed_next_token_loss(forward, batch[:, :-1], batch[:, 1:]) / tokens
            else:
                logits = forward(input_ids=batch[:, :-1]).logits
        if not lean:
            loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    began = time.perf_counter()
    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    warm_seconds = time.perf_counter() - began
    began = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    loss.item()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - began
    tokens_per_s = args.steps * args.micro_batch * args.seq_len / seconds
    peak_memory = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    del model, optimizer, forward
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"tokens_per_s": tokens_per_s, "flops_per_token": training_flops_per_token(config, args.seq_len),
            "warmup_s": warm_seconds, "peak_memory": peak_memory}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="paper-learned,paper-minimal,paper-affine")
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true", help="eager only (faster to run)")
    parser.add_argument("--compare-loss", action="store_true", help="also run the plain full-logits loss")
    add_runtime_flags(parser)
    args = parser.parse_args()

    import torch

    from tablefree.metrics import measured_matmul_flops, peak_flops
    from tablefree.runtime import resolve_runtime

    runtime = resolve_runtime(args.device, args.dtype)
    device = runtime.device
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    elif args.device == "auto":
        raise SystemExit("no CUDA device visible; this benchmark needs a GPU (or --device cpu with a tiny preset)")
    peak, source = peak_flops(device, runtime.dtype)
    measured = measured_matmul_flops(device, runtime.dtype, size=8192 if device.type == "cuda" else 512,
                                     repeats=20 if device.type == "cuda" else 4)
    print(f"device: {runtime.describe()}; MFU against {peak / 1e12:.1f} TFLOP/s ({source}); measured matmul {measured / 1e12:.1f} TFLOP/s")
    print(f"micro-batch {args.micro_batch} x seq {args.seq_len}, {args.steps} timed steps after {args.warmup} warm-up\n")
    print(f"| {'preset':<14} | {'compile':<7} | {'loss':<5} | {'tokens/s':>10} | {'MFU':>6} | {'MFU vs matmul':>13} | "
          f"{'peak mem (GiB)':>14} | {'warm-up s':>9} |")
    print(f"|{'-' * 16}|{'-' * 9}|{'-' * 7}|{'-' * 12}|{'-' * 8}|{'-' * 15}|{'-' * 16}|{'-' * 11}|")
    best = 0.0
    for preset in args.presets.split(","):
        for compiled in ([False] if args.no_compile else [False, True]):
            for lean in ([True, False] if args.compare_loss else [True]):
                r = measure(preset, compiled, lean, args, runtime)
                mfu = r["tokens_per_s"] * r["flops_per_token"] / peak
                if lean:
                    best = max(best, mfu)
                print(f"| {preset:<14} | {str(compiled):<7} | {'lean' if lean else 'plain':<5} | {r['tokens_per_s']:>10,.0f} | "
                      f"{mfu:>6.1%} | {r['tokens_per_s'] * r['flops_per_token'] / measured:>13.1%} | "
                      f"{r['peak_memory'] / 2**30:>14.1f} | {r['warmup_s']:>9.1f} |", flush=True)
    print(f"\nmfu {best:.3f}")


if __name__ == "__main__":
    main()
