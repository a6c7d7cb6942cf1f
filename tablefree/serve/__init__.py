"""`tablefree serve`: an OpenAI-compatible HTTP server with continuous batching.

Modules: engine (the batch scheduler and KV cache), sampling (next-token choice), text (incremental
decoding, stop strings), protocol (request bodies, errors), app (routes, tokenising off the event
loop), responses (response bodies and stream chunks), gate (API key, body size and encoding, metrics
per request), metrics (Prometheus), server (flags, the listening socket, connection bounds, model
loading and uvicorn). What the server bounds and what bad input gets: docs/safety.md.
"""

from __future__ import annotations


def add_cli(subparsers) -> None:
    serve = subparsers.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API (port 30000)")
    serve.add_argument("model", nargs="?", help="model directory or cached hub id")
    serve.add_argument("--model-path", help="the same as MODEL (the spelling of SGLang's command)")
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; 0.0.0.0 for all)")
    serve.add_argument("--port", type=int, default=30000, help="port to listen on (default 30000; 0 picks a free one)")
    serve.add_argument("--served-model-name", help="the name clients pass as 'model' (default: MODEL as given)")
    serve.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1, /tokenize and /detokenize. The key is "
                                         "taken from --api-key-file, else --api-key, else $TABLEFREE_API_KEY; none of them: "
                                         "no key (prefer the file or the variable: a flag shows in the process list)")
    serve.add_argument("--api-key-file", help="read the API key from this file (its one line; see --api-key)")
    serve.add_argument("--dtype", default="auto", help="auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16, float16")
    serve.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N, mps")
    serve.add_argument("--max-batch-size", type=int, default=32, help="sequences decoded together")
    serve.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    serve.add_argument("--max-queue", type=int, default=512, help="waiting sequences before answering 503")
    serve.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024, help="request body limit (413 above it)")
    serve.add_argument("--max-connections", type=int, default=None,
                       help="open connections at most; more are closed on arrival (default 1000, or fewer when the "
                            "open-file limit, ulimit -n, leaves less room)")
    serve.add_argument("--timeout-keep-alive", type=float, default=5.0,
                       help="seconds a connection may sit idle, waiting for its next or its first request (default 5)")
    serve.add_argument("--request-read-timeout", type=float, default=30.0,
                       help="seconds a client has to send a whole request (head and body) once its connection waits "
                            "for one; slower ones are closed (default 30)")
    serve.add_argument("--shutdown-timeout", type=float, default=30.0,
                       help="on SIGTERM/SIGINT, seconds to let in-flight requests finish before closing them (default 30)")
    serve.add_argument("--threads", type=int, default=None,
                       help="CPU threads for the model (default: torch's, one per core; on a shared machine fewer is faster)")
    serve.add_argument("--seed", type=int, default=None, help="seed for requests without their own 'seed'")
    serve.add_argument("--trust-remote-code", action="store_true", help="serve any causal LM that transformers loads")
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])

    def run(args) -> int:
        from .server import serve_command

        return serve_command(args)

    serve.set_defaults(run=run)
