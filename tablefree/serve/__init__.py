"""`tablefree serve`: an OpenAI-compatible HTTP server with continuous batching.

Modules: engine (the batch scheduler and KV cache), decoder (its decode step for GPT-NeoX shapes), drafts (the tokens
a greedy sequence guesses from its own text), engine_process (that engine in a process of its own),
params (what a request asks of the sampler), sampling (next-token choice), text (incremental decoding, stop strings), protocol (the typed request and response
bodies, the one error type), app (routes, tokenising off the event loop), responses (a request's engine
events made into protocol's response bodies and stream chunks), gate (API key, body size and encoding,
metrics per request), metrics (Prometheus), server (flags, the listening socket, connection bounds, model
loading and uvicorn). What the server bounds and what bad input gets: docs/safety.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

# The weights' precision, of the output head and of the body's linear layers (precision.choose_precision): float32, the
# model's own weights, keeps greedy output equal to `generate`'s.
PRECISIONS = ("float32", "int8", "auto")
AUTO_RULE = ("measured at start over 512 positions of held-out text, it keeps >= 98%% of the model's own top-1 choices "
             "and bits per byte within 0.5%%")
HEAD_PRECISION_HELP = ("the output head's weights: float32 (the model's own; the default), int8 (one scale per vocabulary "
                       "row: a quarter of the bytes a decode step mostly reads; on CPUs with VNNI or AMX the hidden "
                       "states are quantised to int8 per row too), or auto (int8 on a CPU when, "
                       f"{AUTO_RULE}, else float32)")
BODY_PRECISION_HELP = ("the weights of the blocks' linear layers in decode steps: float32 (the model's own; the default), "
                       "int8 (one scale per output channel; GPT-NeoX-shaped models on a CPU), or auto (int8 where it "
                       f"can run and, with the head's choice, {AUTO_RULE}, else float32)")


# Where the engine runs (server.start_engine): a worker thread of the server's process, or a process of its own.
# The default is what was faster here, measured by `python bench/serve.py --servers tablefree-process --dtypes float32`
# (small-affine, 64 tokens per completion, paired turns, medians; a 2-core machine whose other core ran other
# jobs' training throughout): process / thread tokens/s, four runs (threads default, 1, default, default):
#   clients 1: streamed 0.99 0.98 0.99 0.97, plain 0.95 0.98 1.11 0.98
#   clients 8: streamed 1.00 1.00 0.89 0.76, plain 0.96 0.98 1.04 1.00
#   clients 32: streamed 1.01 1.01 1.09 1.01, plain 0.97 1.02 1.08 0.98
# Equal within the noise, with the engine process busy 0.80-0.99 of a core and the server's own process 0.03-0.08:
# serving HTTP costs little beside the model. The thread engine starts in half the time (6 s against 11-13 s) in
# 0.58 GiB instead of 1.0, so it is the default; the engine process is for machines with a core to spare. Again
# once the model loaded in a passing thread (both engines' OpenMP workers then spin; a 2-core Xeon, 3 repeats),
# thread / process: clients 1, 8, 32 streamed 1.06 1.03 1.05, plain 1.00 1.01 1.08.
ENGINES = ("thread", "process")
DEFAULT_ENGINE = "thread"
ENGINE_HELP = ("where the engine (forward passes, sampling, detokenising, stop strings) runs: thread (the default: a worker "
               "thread of the server's process) or process (a process of its own, so the server's HTTP and JSON work "
               "runs beside it on another core instead of sharing one interpreter lock; more memory and a slower start; "
               "if it dies, the requests it served fail with 500 and the server exits with an error)")

# Greedy rows (and plain sampled ones decoding alone) guess up to this many next tokens from their own text, checked in
# the step that feeds their last token (drafts.py: the same output in fewer steps when the text repeats itself).
# Small-affine with int8 head and body, one greedy stream of 64 tokens that loops, best of 4 (tokens/s): 0 (off) 680,
# 2 1,332, 4 1,720, 7 2,141; with every guess made wrong on purpose, 681, 659, 669, 659: a sequence whose guesses fail
# stops guessing, for longer each time.
DRAFT_TOKENS = 7
DRAFT_HELP = ("tokens a request may guess from its own prompt and output (prompt lookup: what followed its last 2-3 "
              "tokens where they occurred before) and have checked in the same decode step as its last token: greedy "
              "requests keep the model's own choices, so their text is that of one token a step, and requests that "
              "sample at a temperature alone (no top-p, top-k, min-p or seed of their own) keep a guess with the "
              "probability the model gives it, so their tokens are distributed as without guesses (these guess only "
              "while they decode alone); fewer steps when the text repeats itself. Penalties and logit_bias turn "
              f"guessing off. 0: off (default {DRAFT_TOKENS}; a decode step holds 8 rows at most with drafts)")


def limit(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class ServeLimits:
    """What one server accepts and how long it waits: each limit's default and meaning, written once."""

    max_batch_size: int = limit(32, "sequences decoded together")
    max_queue: int = limit(512, "waiting sequences before answering 503")
    max_body_bytes: int = limit(4 * 1024 * 1024, "request body limit in bytes (413 above it)")
    timeout_keep_alive: float = limit(5.0, "seconds a connection may sit idle, waiting for its next or its first request")
    request_read_timeout: float = limit(30.0, "seconds a client has to send a whole request (head and body) once its "
                                              "connection waits for one; slower ones are closed")
    shutdown_timeout: float = limit(30.0, "on SIGTERM/SIGINT, seconds to let in-flight requests finish before closing them")


def add_cli(subparsers) -> None:
    from ..runtime import add_runtime_flags

    serve = subparsers.add_parser("serve")
    serve.add_argument("model", nargs="?", help="model directory or cached hub id")
    serve.add_argument("--model-path", help="the same as MODEL (the spelling of SGLang's command)")
    serve.add_argument("--host", default="127.0.0.1", help="bind address (0.0.0.0 for all)")
    serve.add_argument("--port", type=int, default=30000, help="port to listen on (0 picks a free one)")
    serve.add_argument("--served-model-name", help="the name clients pass as 'model' (default: MODEL as given)")
    serve.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1, /tokenize and /detokenize. The key is "
                                         "taken from --api-key-file, else --api-key, else $TABLEFREE_API_KEY; none of them: "
                                         "no key (prefer the file or the variable: a flag shows in the process list)")
    serve.add_argument("--api-key-file", help="read the API key from this file (its one line; see --api-key)")
    add_runtime_flags(serve)
    serve.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    for spec in fields(ServeLimits):
        serve.add_argument(f"--{spec.name.replace('_', '-')}", type=type(spec.default), default=spec.default,
                           help=spec.metadata["help"])
    serve.add_argument("--max-connections", type=int, default=None,
                       help="open connections at most; more are closed on arrival (default 1000, or fewer when the "
                            "open-file limit, ulimit -n, leaves less room)")
    serve.add_argument("--head-precision", default="float32", help=HEAD_PRECISION_HELP)
    serve.add_argument("--body-precision", default="float32", help=BODY_PRECISION_HELP)
    serve.add_argument("--draft-tokens", type=int, default=DRAFT_TOKENS, help=DRAFT_HELP)
    serve.add_argument("--engine", default=DEFAULT_ENGINE, help=ENGINE_HELP)
    serve.add_argument("--threads", type=int, default=None,
                       help="CPU threads for the model (default: torch's, one per core; on a shared machine fewer is faster)")
    serve.add_argument("--seed", type=int, default=None,
                       help="seed of the generator shared by requests without their own 'seed': the same requests in the "
                            "same order then sample the same text (default: a random seed)")
    serve.add_argument("--trust-remote-code", action="store_true", help="serve any causal LM that transformers loads")
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                       help="uvicorn's log level")

    def run(args) -> int:
        from .server import serve_command

        return serve_command(args)

    serve.set_defaults(run=run)
