"""Where a decode step's time goes: the serving engine at 1, 8 and 32 rows, phase by phase and operator by operator.

For each row count, that many sequences on the prompt "Once upon a time," are admitted and run a few steps (warm-up),
then --steps decode steps are timed. Phases, from the engine's own methods timed around each call: the model's
forward (the body and the output head; through transformers' forward, with --hf-forward, also the KV cache's growth:
its DynamicCache concatenates each layer's keys and values every step), sampling and handing out the tokens (`_next_tokens`: sampling, detokenising, stop
strings, events), and the rest of the step (admission, dropping finished rows, Python around it); the forward's output
head is timed by hooks on its module (the rest of the forward is the body). Then the same steps
under torch.profiler: the operators that take the most self CPU time, so "the forward" splits into the head's matrix
product, attention, the MLP and the cache's copies.
Network: `small-affine` (4 layers, width 256, V = 65,536) fresh from `tablefree new` unless --model is given; sampled
at temperature 0.5 as bench/serve.py asks. Prints per-step milliseconds; no goal, it is the profile that
bench/engine.py's rates are explained by.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from tablefree.runtime import add_runtime_flags, resolve_runtime
from tablefree.serve.engine import Engine, Sequence
from tablefree.serve.precision import Int8Head
from tablefree.serve.params import SamplingParams
from tablefree.serve.server import context_length, load_for_serving

PROMPT = "Once upon a time,"
PHASES = {"_slot_step": "forward (SlotDecoder: body, head)", "_decode_forward": "forward (body, head, cache growth)",
          "_next_tokens": "sampling and handing out"}


def timed_engine(engine: Engine, spent: dict[str, float]) -> None:
    """Wraps the engine's phase methods on this instance so that each call adds its seconds to `spent`."""
    for name in PHASES:
        method = getattr(engine, name)

        def wrapper(*args, _method=method, _name=name, **kwargs):
            began = time.perf_counter()
            try:
                return _method(*args, **kwargs)
            finally:
                spent[_name] += time.perf_counter() - began

        setattr(engine, name, wrapper)


def timed_head(engine: Engine, spent: dict[str, float]):
    """Times the output head's calls (the module the forward calls, whatever precision runs inside it) into
    spent["head"], by a pre-hook and a hook on it; returns their handles."""
    head, began = engine.model.get_output_embeddings(), []

    def before(module, args):
        began.append(time.perf_counter())

    def after(module, args, output):
        spent["head"] += time.perf_counter() - began.pop()

    return [head.register_forward_pre_hook(before), head.register_forward_hook(after)]


def admitted(engine: Engine, ids: list[int], rows: int, max_tokens: int) -> list[Sequence]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.5, ignore_eos=True)
    sequences = [Sequence(ids, params, engine.tokenizer, lambda event: None, set()) for _ in range(rows)]
    for seq in sequences:  # each its own request, as from clients: one request holds at most half the batch
        engine.submit([seq])
    while engine.waiting or engine.running < rows:  # prefill: every row joins the batch
        engine.step()
    return sequences


def profile_rows(engine: Engine, ids: list[int], rows: int, steps: int, top: int) -> None:
    spent: dict[str, float] = defaultdict(float)
    timed_engine(engine, spent)
    hooks = timed_head(engine, spent)
    sequences = admitted(engine, ids, rows, max_tokens=16 + 2 * steps)
    for _ in range(8):  # warm-up at this batch size
        engine.step()
    spent.clear()
    began = time.perf_counter()
    for _ in range(steps):
        engine.step()
    total = time.perf_counter() - began
    spent = dict(spent)  # the timed steps only: the profiled ones below add to the wrappers' dict, not this one
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            engine.step()
    for seq in sequences:
        seq.cancel()
    while engine.running or engine.waiting:
        engine.step()
    for name in PHASES:
        vars(engine).pop(name, None)
    for hook in hooks:
        hook.remove()

    per_step = 1000 * total / steps
    print(f"\n{rows} rows: {per_step:.2f} ms per decode step, {rows * steps / total:.0f} tokens/s")
    head = spent.pop("head", 0.0)
    rest = total - sum(spent.values())
    for name, label in PHASES.items():
        if name not in spent:
            continue  # the other decode path
        print(f"  {label:<38}{1000 * spent[name] / steps:>8.2f} ms  {spent[name] / total:>6.1%}")
        if name in ("_slot_step", "_decode_forward"):
            print(f"  {'  of which the output head':<38}{1000 * head / steps:>8.2f} ms  {head / total:>6.1%}")
    print(f"  {'the rest of the step (Python, admission)':<38}{1000 * rest / steps:>8.2f} ms  {rest / total:>6.1%}")
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    profiled = sum(e.self_cpu_time_total for e in events) or 1
    print(f"  operators by self CPU time (under the profiler, {steps} steps):")
    for event in events[:top]:
        print(f"    {event.key[:44]:<44}{event.count // steps:>5} calls/step{event.self_cpu_time_total / steps / 1000:>8.3f} ms"
              f"  {event.self_cpu_time_total / profiled:>6.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a model directory (default: a fresh small-affine)")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--steps", type=int, default=48, help="decode steps timed per row count")
    parser.add_argument("--top", type=int, default=12, help="operators listed per row count")
    parser.add_argument("--head-precision", choices=("float32", "int8"), default="float32")
    parser.add_argument("--body-precision", choices=("float32", "int8"), default="float32")
    parser.add_argument("--hf-forward", action="store_true",
                        help="decode through the model's own forward, as the engine did before SlotDecoder")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    add_runtime_flags(parser)
    args = parser.parse_args()
    runtime = resolve_runtime(args.device, args.dtype, args.threads)
    path = args.model
    if path is None:
        path = str(Path(tempfile.mkdtemp(prefix="bench-profile-")) / "small-affine")
        subprocess.run([sys.executable, "-m", "tablefree.cli", "new", "small-affine", path], check=True,
                       capture_output=True)
    model, tokenizer = load_for_serving(path, runtime.dtype, runtime.device, trust_remote_code=False)
    head = Int8Head.of(model) if args.head_precision == "int8" else None
    engine = Engine(model, tokenizer, max_batch_size=max(args.rows), max_model_len=context_length(model.config, None),
                    seed=0, head=head, lower_body=args.body_precision == "int8", slots=not args.hf_forward)
    ids = tokenizer.encode(PROMPT, add_special_tokens=False)
    print(f"decode-step profile of {Path(path).name}, {args.head_precision} head, {args.body_precision} body, {'transformers forward' if args.hf_forward else 'SlotDecoder'}, sampled (temperature 0.5); "
          f"{runtime.describe()}")
    for rows in args.rows:
        profile_rows(engine, ids, rows, args.steps, args.top)


if __name__ == "__main__":
    main()
