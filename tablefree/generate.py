"""`tablefree generate MODEL --prompt TEXT`: sample from a saved model, streaming tokens as they come.

It drives the serving engine in process (no HTTP), so its sampling fields mean what the API's do.
"""

from __future__ import annotations

import sys

from .errors import TableFreeError
from .runtime import add_runtime_flags

# Where the command differs from the API's defaults (tablefree.serve.params.SamplingParams): greedy, a fixed
# seed and a longer reply. Every other sampling default is SamplingParams'.
COMMAND_DEFAULTS = {"max_tokens": 64, "temperature": 0.0, "seed": 0}
FLAG_OF_FIELD = {"max_tokens": "--max-new-tokens"}


def generate_text(model_path: str, prompt: str, *, device: str = "auto", dtype: str = "auto", stream=None,
                     **sampling) -> str:
    """Generate a continuation of `prompt`, printing it to `stream` as it comes; returns the new text.

    `sampling` holds SamplingParams fields (max_tokens, temperature, top_k, top_p, min_p, repetition_penalty,
    stop, seed, ...) over COMMAND_DEFAULTS.
    """
    from .hub import load_model
    from .runtime import resolve_runtime
    from .serve.engine import Engine, Sequence, end_of_sequence_ids
    from .serve.params import SamplingFieldError, SamplingParams

    params = SamplingParams(**{**COMMAND_DEFAULTS, **sampling})
    try:
        params.check()
    except SamplingFieldError as exc:
        flag = FLAG_OF_FIELD.get(exc.name, "--" + exc.name.replace("_", "-"))
        raise TableFreeError(f"{flag} {exc.value!r} is not accepted; give {exc.accepted}") from None
    if params.max_tokens < 1:
        raise TableFreeError(f"--max-new-tokens must be at least 1, got {params.max_tokens}")
    if any(stop == "" for stop in params.stop):
        raise TableFreeError("--stop must not be empty; give the text that ends the reply")
    for flag, text in [("--prompt", prompt)] + [("--stop", stop) for stop in params.stop]:
        check_unicode(flag, text)
    runtime = resolve_runtime(device, dtype)
    model, tokenizer = load_model(model_path, dtype=runtime.dtype, device=runtime.device)
    print(f"generating on {runtime.describe()}", file=sys.stderr, flush=True)
    if tokenizer is None:
        raise TableFreeError(f"{model_path} has no tokenizer files; save the model with its tokenizer")
    prompt_ids = tokenizer.encode(prompt)
    if not prompt_ids:
        raise TableFreeError("the prompt is empty; give at least one character")
    context = model.config.max_position_embeddings
    if len(prompt_ids) + params.max_tokens > context:
        raise TableFreeError(
            f"prompt ({len(prompt_ids)} tokens) + --max-new-tokens ({params.max_tokens}) exceeds the "
            f"model's context of {context} tokens"
        )
    stream = stream or sys.stdout
    pieces: list[str] = []
    failure: list[str] = []

    def show(event) -> None:
        pieces.append(event.text)
        stream.write(event.text)
        stream.flush()
        if event.error:
            failure.append(event.error)

    engine = Engine(model, tokenizer, max_batch_size=1, max_model_len=context, seed=params.seed)
    sequence = Sequence(prompt_ids, params, tokenizer, show, end_of_sequence_ids(model, tokenizer))
    engine.submit([sequence])
    while not sequence.finished:
        engine.step()
    stream.write("\n")
    stream.flush()
    if failure:
        raise TableFreeError(f"generation stopped: {failure[0]}")
    return "".join(pieces)


def check_unicode(flag: str, text: str) -> None:
    """Refuses lone surrogates (what undecodable bytes in a command line become): no tokenizer can encode them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise TableFreeError(f"{flag} holds a character that is not valid Unicode at position {exc.start} (bytes not in "
                             f"the terminal's encoding?); give UTF-8 text") from None


def add_cli(subparsers) -> None:
    from .serve.params import SamplingParams  # torch-free, so --help stays light

    gen = subparsers.add_parser("generate", help="generate text from a model, streamed to the terminal")
    gen.add_argument("model", help="model directory or cached hub id")
    gen.add_argument("--prompt", required=True, help="the text to continue")
    gen.add_argument("--max-new-tokens", type=int, default=COMMAND_DEFAULTS["max_tokens"],
                     help="tokens to generate at most (default %(default)s)")
    gen.add_argument("--temperature", type=float, default=COMMAND_DEFAULTS["temperature"],
                     help="0 is greedy (default %(default)s)")
    gen.add_argument("--top-k", type=int, default=SamplingParams.top_k,
                     help="sample among the k most likely tokens; 0 is off (default %(default)s)")
    gen.add_argument("--top-p", type=float, default=SamplingParams.top_p,
                     help="sample among the most likely tokens holding this much probability (default %(default)s)")
    gen.add_argument("--min-p", type=float, default=SamplingParams.min_p,
                     help="drop tokens less likely than this times the top token's probability (default %(default)s)")
    gen.add_argument("--repetition-penalty", type=float, default=SamplingParams.repetition_penalty,
                     help="divide the logits of tokens already seen by this; 1 is off (default %(default)s)")
    gen.add_argument("--stop", action="append", default=[], metavar="TEXT",
                     help="end the reply before this text (repeatable; default none)")
    gen.add_argument("--seed", type=int, default=COMMAND_DEFAULTS["seed"],
                     help="fixes the sampling: the same seed repeats the same text (default %(default)s)")
    add_runtime_flags(gen)
    gen.set_defaults(run=generate_command)


def generate_command(args) -> int:
    generate_text(args.model, args.prompt, device=args.device, dtype=args.dtype, max_tokens=args.max_new_tokens,
                     temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                     repetition_penalty=args.repetition_penalty, stop=args.stop, seed=args.seed)
    return 0
