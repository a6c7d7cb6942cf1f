"""Engine throughput in process (no HTTP): tokens/s of the serving engine at 1, 8 and 32 concurrent sequences.

Each level starts that many sequences at once on the prompt "Once upon a time," and steps the engine until
each has N new tokens (end-of-sequence ignored), prefill included; greedy (temperature 0) and sampled
(temperature 0.5, as bench/serve.py asks). Networks: `tiny-affine` (2 layers, width 64) and
`small-affine` (4 layers, width 256), both V = 65,536, fresh from `tablefree new` unless given. On
the small network one stream is also decoded in the same run by transformers' `generate` (greedy, the
same weights) and, when llama-cpp-python is installed, by llama.cpp (`llama_cpp.Llama`) on the f32
GGUF export (`tablefree export --format gguf`), fed the same prompt ids, with the same thread count.
The machine may be shared: every figure is the best of --repeats runs, interleaved.
The small network also runs, in the same interleaved turns, through transformers' own forward (the engine's decode
path before SlotDecoder, as the reference for it), with the int8 output head (`--head-precision int8`) and with int8
head and body (`--body-precision int8`); the quality of each int8 choice is measured against the model's own weights:
top-1 agreement and bits per byte over 512 positions of held-out text (python-notes). Give a trained --small: a fresh
network's near-uniform logits make agreement noise.
With --engine-kinds the small network's sampled rates are also measured through a started engine of each kind
(`tablefree serve --engine thread|process`): the worker thread, and the engine process, which adds the pipe both ways
and the parent's reader thread, events counted by plain sinks; paired turns in alternating order, medians.
Every engine of the table decodes one token a step (`draft_tokens=0`). Then one stream of the small network with drafts
(the engine's default, `tablefree serve --draft-tokens`: prompt lookup, serve/drafts.py), float32 and int8 head and
body, greedy and sampled; the greedy one in the same turns as llama.cpp q8_0 with its own prompt lookup
(`LlamaPromptLookupDecoding`, as many tokens guessed): both sides guess from the text, so the ratio compares like with
like. The prompt's greedy text
loops, as a small model's does: drafts show their best here, and a text that never repeats gets nothing from them.
Goals: tiny c8/c1 >= 3; small one stream >= 0.5x llama.cpp f32's, and small c8 >= 1.5x llama.cpp's
aggregate (llama.cpp decodes one sequence at a time, so its aggregate is its one-stream rate).
Last line: ratio = tiny sampled c8 tokens/s / tiny sampled c1 tokens/s.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from tablefree.runtime import add_runtime_flags, resolve_runtime
from tablefree.serve import DRAFT_TOKENS
from tablefree.serve.engine import Engine, Sequence
from tablefree.serve.precision import Int8Head, measure
from tablefree.serve.params import SamplingParams
from tablefree.serve.server import context_length, load_for_serving

PROMPT = "Once upon a time,"
# The small network's engines besides its float32 one: label -> (int8 head, int8 body); None: transformers' forward.
SMALL_VARIANTS = {"small-hf": None, "small-int8": (True, False), "small-int8-body": (True, True)}
LABELS = {"small-hf": "  hf forward", "small-int8": "  int8 head", "small-int8-body": "  int8 h+body"}
MODES = {"greedy": 0.0, "sampled": 0.5}


def engine_rate(engine: Engine, ids: list[int], clients: int, temperature: float, max_tokens: int) -> float:
    """Generated tokens/s of `clients` sequences started together and run to `max_tokens` each."""
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, ignore_eos=True)
    sequences = [Sequence(ids, params, engine.tokenizer, lambda event: None, set()) for _ in range(clients)]
    started = time.perf_counter()
    for seq in sequences:  # each its own request, as from clients: one request holds at most half the batch
        engine.submit([seq])
    while not all(s.finished for s in sequences):
        engine.step()
    seconds = time.perf_counter() - started
    if any(len(s.output_ids) != max_tokens for s in sequences):
        raise SystemExit(f"a sequence ended early: {[len(s.output_ids) for s in sequences]} of {max_tokens} tokens")
    return clients * max_tokens / seconds


def started_rate(engine, tokenizer, ids: list[int], clients: int, temperature: float, max_tokens: int) -> float:
    """Generated tokens/s of `clients` sequences through a started engine (thread or process), counted by their sinks."""
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, ignore_eos=True)
    finished, lock, done, tokens = [0], threading.Lock(), threading.Event(), [0]

    def sink(event) -> None:
        with lock:
            tokens[0] += len(event.token_ids)
            if event.finish_reason:
                finished[0] += 1
                if finished[0] == clients:
                    done.set()

    sequences = [Sequence(ids, params, tokenizer, sink, set()) for _ in range(clients)]
    started = time.perf_counter()
    for seq in sequences:  # each its own request, as from clients
        engine.submit([seq])
    if not done.wait(600):
        raise SystemExit("the engine did not finish in 600 s")
    seconds = time.perf_counter() - started
    if tokens[0] != clients * max_tokens:
        raise SystemExit(f"{tokens[0]} tokens of {clients * max_tokens}: a sequence ended early")
    return clients * max_tokens / seconds


def engine_kinds(path: str, args) -> None:
    """The thread engine against the engine process on one network, sampled: paired turns, medians."""
    from tablefree.serve.server import EngineSpec, start_engine

    spec = EngineSpec(path, args.device, args.dtype, args.threads, max_batch_size=max(args.concurrency), seed=0)
    engines = {kind: start_engine(spec, kind) for kind in ("thread", "process")}
    for engine, _, _ in engines.values():
        engine.start()
    rates: dict[tuple, list[float]] = {}
    try:
        tokenizer = engines["thread"][1]
        ids = tokenizer.encode(PROMPT, add_special_tokens=False)
        for engine, _, _ in engines.values():
            started_rate(engine, tokenizer, ids, 2, 0.5, 8)  # warm-up
        for repeat in range(args.repeats):
            for clients in args.concurrency:
                order = ("thread", "process", "process", "thread")  # A B B A: drift falls on both sides
                for kind in order if repeat % 2 == 0 else order[::-1]:
                    rate = started_rate(engines[kind][0], tokenizer, ids, clients, 0.5, args.max_tokens)
                    rates.setdefault((kind, clients), []).append(rate)
            print(f"  engine kinds: run {repeat + 1} of {args.repeats} done", file=sys.stderr, flush=True)
    finally:
        for engine, _, _ in engines.values():
            engine.stop()
    print(f"\nstarted engines, {Path(path).name}, sampled, {args.max_tokens} new tokens per sequence, median of "
          f"{2 * args.repeats} paired turns (A B B A)")
    print(f"{'engine':<10}" + "".join(f"{f'c{c} tok/s':>12}" for c in args.concurrency))
    for kind in ("thread", "process"):
        print(f"{kind:<10}" + "".join(f"{statistics.median(rates[kind, c]):>12.0f}" for c in args.concurrency))
    print(f"{'proc/thr':<10}" + "".join(
        f"{statistics.median([p / t for p, t in zip(rates['process', c], rates['thread', c])]):>12.2f}"
        for c in args.concurrency))


def generate_rate(model, ids: list[int], max_tokens: int) -> float:
    """transformers' `generate`, greedy, one stream."""
    input_ids = torch.tensor([ids], device=model.device)
    started = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_tokens,
                             min_new_tokens=max_tokens, do_sample=False)
    seconds = time.perf_counter() - started
    assert out.shape[1] - len(ids) == max_tokens
    return max_tokens / seconds


def llama_model(model_dir: str, workdir: Path, threads: int, context: int, outtype: str = "f32", lookup: int = 0):
    """llama_cpp.Llama on the GGUF export of `outtype` (f32, q8_0), or (None, why not); `lookup`: that many tokens
    guessed by llama-cpp-python's prompt lookup (LlamaPromptLookupDecoding), 0: none."""
    try:
        import llama_cpp
    except ImportError:
        return None, "llama-cpp-python is not installed"
    from tablefree.gguf import llama_cpp_without_repacking

    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    llama_cpp_without_repacking()  # q8_0 files crash llama.cpp where it repacks them for AMX (see the function)
    out = workdir / f"gguf-{outtype}"
    if not (out / "model.gguf").exists():
        export = subprocess.run([sys.executable, "-m", "tablefree.cli", "export", model_dir, str(out), "--format",
                                 "gguf", "--outtype", outtype], capture_output=True, text=True)
        if export.returncode != 0:
            return None, f"the GGUF export failed: {export.stdout[-300:]}{export.stderr[-300:]}"
    draft = LlamaPromptLookupDecoding(num_pred_tokens=lookup) if lookup else None
    return llama_cpp.Llama(model_path=str(out / "model.gguf"), n_ctx=context, n_threads=threads,
                           n_threads_batch=threads, verbose=False, draft_model=draft), None


def llama_rate(llm, ids: list[int], max_tokens: int) -> float:
    """llama.cpp, greedy (top_k 1), one stream, from the same prompt ids."""
    started, count = time.perf_counter(), 0
    for _ in llm.generate(ids, top_k=1, temp=0.0, reset=True):
        count += 1
        if count == max_tokens:
            break
    return count / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", help="a tiny model directory (default: a fresh tiny-affine), e.g. the quickstart's")
    parser.add_argument("--small", help="a small model directory (default: a fresh small-affine)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=3, help="runs per figure; the best is shown")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for every engine (default: torch's; on a busy shared machine 1 is steadier)")
    parser.add_argument("--engine-kinds", action="store_true",
                        help="measure the small network through the thread engine and the engine process (only that)")
    add_runtime_flags(parser)
    args = parser.parse_args()
    runtime = resolve_runtime(args.device, args.dtype, args.threads)
    threads = torch.get_num_threads()

    workdir = Path(tempfile.mkdtemp(prefix="bench-engine-"))
    paths = {}
    for name, given in (("tiny", args.tiny), ("small", args.small)):
        paths[name] = given or str(workdir / f"{name}-affine")
        if not given:
            subprocess.run([sys.executable, "-m", "tablefree.cli", "new", f"{name}-affine", paths[name]], check=True,
                           capture_output=True)

    if args.engine_kinds:
        engine_kinds(paths["small"], args)
        return
    best: dict[tuple, float] = {}
    references: dict[str, float] = {}
    reasons = []
    quality = {}
    for name, path in paths.items():
        model, tokenizer = load_for_serving(path, runtime.dtype, runtime.device, trust_remote_code=False)
        context = context_length(model.config, None)
        engines = {name: Engine(model, tokenizer, max_batch_size=max(args.concurrency), max_model_len=context, seed=0,
                                draft_tokens=0)}
        drafted = {}
        int8 = Int8Head.of(model) if name == "small" else None  # quantised once for every int8 variant
        for label, lower in SMALL_VARIANTS.items():
            if name != "small" or (lower is not None and int8 is None):
                continue
            head, lower_body = (int8, lower[1]) if lower else (None, False)
            engines[label] = Engine(model, tokenizer, max_batch_size=max(args.concurrency), max_model_len=context,
                                    seed=0, head=head, lower_body=lower_body, slots=lower is not None, draft_tokens=0)
            if lower is not None:
                quality[label] = measure(model, tokenizer, head, lower_body)
        if name == "small":  # one stream with drafts, float32 and int8 head and body
            drafted = {label: Engine(model, tokenizer, max_batch_size=1, max_model_len=context, seed=0,
                                     head=int8 if label != "small" else None, lower_body=label != "small")
                       for label in ("small", "small-int8-body") if label == "small" or int8 is not None}
        ids = tokenizer.encode(PROMPT, add_special_tokens=False)
        for engine in [*engines.values(), *drafted.values()]:
            engine_rate(engine, ids, 2 if engine.max_batch_size > 1 else 1, 0.5, 8)  # warm-up: first-call allocations
        llm = llm_q8 = llm_lookup = None
        if name == "small":
            reference, _ = load_for_serving(path, runtime.dtype, runtime.device, trust_remote_code=False)
            generate_rate(reference, ids, 8)
            llm, why = llama_model(path, workdir, threads, context)
            llm_q8, why_q8 = llama_model(path, workdir, threads, context, "q8_0")
            llm_lookup, _ = llama_model(path, workdir, threads, context, "q8_0", lookup=DRAFT_TOKENS)
            for why in {why, why_q8} - {None}:
                reasons.append(f"llama.cpp left out: {why}")
        for run in range(args.repeats):
            for mode, temperature in MODES.items():
                for clients in args.concurrency:
                    for label, engine in engines.items():  # every variant in alternating turns
                        key = (label, mode, clients)
                        best[key] = max(best.get(key, 0.0), engine_rate(engine, ids, clients, temperature, args.max_tokens))
            if name == "small":
                references["generate"] = max(references.get("generate", 0.0), generate_rate(reference, ids, args.max_tokens))
                if llm is not None:
                    references["llama"] = max(references.get("llama", 0.0), llama_rate(llm, ids, args.max_tokens))
                if llm_q8 is not None:
                    references["llama q8_0"] = max(references.get("llama q8_0", 0.0), llama_rate(llm_q8, ids, args.max_tokens))
                for label, engine in drafted.items():
                    for mode, temperature in MODES.items():
                        key = (label, f"drafts {mode}", 1)
                        best[key] = max(best.get(key, 0.0), engine_rate(engine, ids, 1, temperature, args.max_tokens))
                if llm_lookup is not None:
                    references["llama q8_0 lookup"] = max(references.get("llama q8_0 lookup", 0.0),
                                                          llama_rate(llm_lookup, ids, args.max_tokens))
            print(f"  {name}: run {run + 1} of {args.repeats} done", file=sys.stderr, flush=True)
        del engines, engine, drafted, model, llm, llm_q8, llm_lookup

    print(f"\nin-process engine, {args.max_tokens} new tokens per sequence, prompt {PROMPT!r}, best of {args.repeats}; "
          f"{runtime.describe()}")
    print(f"{'network':<14}{'mode':<9}" + "".join(f"{f'c{c} tok/s':>12}" for c in args.concurrency) + f"{'c8/c1':>8}")
    labels = {name: Path(path).name[:13] for name, path in paths.items()}
    labels.update({label: LABELS[label] for label in SMALL_VARIANTS if ("small", "greedy", 1) in best and
                   (label, "greedy", 1) in best})
    for name, label in labels.items():
        for mode in MODES:
            rates = [best[name, mode, c] for c in args.concurrency]
            ratio = best.get((name, mode, 8), float("nan")) / best.get((name, mode, 1), float("nan"))
            print(f"{label:<14}{mode:<9}" + "".join(f"{r:>12.0f}" for r in rates) + f"{ratio:>8.2f}")
    for label in SMALL_VARIANTS:
        if (label, "sampled", 1) not in best:
            continue
        speed = " ".join(f"c{c} {best[label, 'sampled', c] / best['small', 'sampled', c]:.2f}x" for c in args.concurrency)
        line = f"small {LABELS[label].strip()} vs float32 (SlotDecoder), sampled: {speed}"
        if label in quality:
            q = quality[label]
            line += (f"; quality over {q.positions} held-out positions: top-1 agreement {q.top1_agreement:.1%} (goal >= 98%), "
                     f"bits per byte {q.bits_per_byte:.4f} -> {q.bits_per_byte_lower:.4f} ({q.bits_per_byte_change:+.2%}, "
                     f"goal within 0.5%)")
        print(line)
    ones = best.get(("small", "greedy", 1))
    if "generate" in references and ones:
        print(f"small one stream, greedy: engine {ones:.0f} tok/s, transformers generate {references['generate']:.0f} "
              f"(engine / generate {ones / references['generate']:.2f})")
    if "llama" in references and ones:
        eights = best.get(("small", "sampled", 8), float("nan"))
        print(f"small vs llama.cpp f32 one stream {references['llama']:.0f} tok/s: engine c1 {ones / references['llama']:.2f}x "
              f"(goal >= 0.5), engine c8 sampled {eights / references['llama']:.2f}x (goal >= 1.5)")
    if "llama q8_0" in references and ones:
        against = ", ".join(f"{LABELS.get(label, 'float32').strip()} {best[label, 'greedy', 1] / references['llama q8_0']:.2f}x"
                            for label in ("small", *SMALL_VARIANTS) if (label, "greedy", 1) in best)
        print(f"small one stream greedy vs llama.cpp q8_0 {references['llama q8_0']:.0f} tok/s: {against} (goal >= 1.0)")
    drafted_labels = [label for label in ("small", "small-int8-body") if (label, "drafts greedy", 1) in best]
    if drafted_labels:
        name_of = {label: LABELS.get(label, "float32").strip() for label in drafted_labels}
        sampled = ", ".join(f"{name_of[label]} {best[label, 'drafts sampled', 1]:.0f} tok/s "
                            f"({best[label, 'drafts sampled', 1] / best[label, 'sampled', 1]:.2f}x without)"
                            for label in drafted_labels if (label, "sampled", 1) in best)
        print(f"small one stream sampled with drafts: {sampled}")
        ours = ", ".join(f"{name_of[label]} {best[label, 'drafts greedy', 1]:.0f} tok/s" for label in drafted_labels)
        line = f"small one stream greedy with drafts ({DRAFT_TOKENS} tokens guessed at most): {ours}"
        for reference in ("llama q8_0", "llama q8_0 lookup"):
            if reference in references:
                against = ", ".join(f"{name_of[label]} {best[label, 'drafts greedy', 1] / references[reference]:.2f}x"
                                    for label in drafted_labels)
                name = "llama.cpp q8_0 with prompt lookup" if reference.endswith("lookup") else "llama.cpp q8_0"
                line += f"; vs {name} {references[reference]:.0f} tok/s: {against}"
        print(line)
    for reason in reasons:
        print(reason)
    tiny = best.get(("tiny", "sampled", 8), float("nan")) / best.get(("tiny", "sampled", 1), float("nan"))
    print(f"tiny sampled c8 / c1 (goal >= 3):\nratio {tiny:.2f}")


if __name__ == "__main__":
    main()
