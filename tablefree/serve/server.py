"""`tablefree serve MODEL`: load the model, build the engine and the app, run uvicorn until SIGTERM/SIGINT."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..errors import TableFreeError
from ..hub import load_model, resolve_model_path
from .app import ServeSettings, create_app
from .engine import Engine

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TableFreeError(f"--device {name}: no CUDA device is available; use --device cpu")
    return name


def pick_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if name not in DTYPES:
        raise TableFreeError(f"unknown --dtype {name!r}; choose auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def load_for_serving(model_path: str, dtype: torch.dtype, device: str, trust_remote_code: bool):
    """(model, tokenizer): this project's models through hub.load_model; any causal LM with --trust-remote-code."""
    if not trust_remote_code:
        model, tokenizer = load_model(model_path, dtype=dtype, device=device)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = resolve_model_path(model_path)
        try:
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, trust_remote_code=True).to(device).eval()
            tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=True)
        except (OSError, ValueError, KeyError) as exc:
            raise TableFreeError(f"transformers could not load {path}: {str(exc).splitlines()[0]}") from None
    if tokenizer is None:
        raise TableFreeError(f"{model_path} has no tokenizer files; the server needs one to read prompts")
    return model, tokenizer


def context_length(config, requested: int | None) -> int:
    known = getattr(config, "max_position_embeddings", None)
    if requested is not None:
        if requested < 2:
            raise TableFreeError(f"--max-model-len must be at least 2, got {requested}")
        if known is not None and requested > known:
            raise TableFreeError(f"--max-model-len {requested} is over the model's context of {known} tokens")
        return requested
    if known is None:
        raise TableFreeError("the model config has no max_position_embeddings; pass --max-model-len")
    return known


def stop_ids(model, tokenizer) -> tuple[set[int], set[int]]:
    """(end-of-sequence ids, end-of-turn ids): the second is the special token the chat template puts after a reply."""
    eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        eos_ids.add(tokenizer.eos_token_id)
    turn_ids: set[int] = set()
    if getattr(tokenizer, "chat_template", None):
        marker = "\u2063reply\u2063"
        text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}, {"role": "assistant", "content": marker}],
                                             tokenize=False)
        tail = tokenizer.encode(text[text.rfind(marker) + len(marker):], add_special_tokens=False)
        special = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special} | set(tokenizer.all_special_ids)
        if tail and tail[0] in special:
            turn_ids.add(tail[0])
    return eos_ids, turn_ids


def serve_command(args) -> int:
    import uvicorn

    if args.model and args.model_path and args.model != args.model_path:
        raise TableFreeError(f"two models given ({args.model} and --model-path {args.model_path}); give one")
    model_path = args.model or args.model_path
    if not model_path:
        raise TableFreeError("give the model: tablefree serve MODEL (or --model-path MODEL)")
    if args.threads is not None and args.threads < 1:
        raise TableFreeError(f"--threads must be at least 1, got {args.threads}")
    if args.max_batch_size < 1:
        raise TableFreeError(f"--max-batch-size must be at least 1, got {args.max_batch_size}")
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    model, tokenizer = load_for_serving(model_path, dtype, device, args.trust_remote_code)
    max_model_len = context_length(model.config, args.max_model_len)
    eos_ids, turn_ids = stop_ids(model, tokenizer)
    engine = Engine(model, tokenizer, max_batch_size=args.max_batch_size, max_model_len=max_model_len,
                    max_queue=args.max_queue, eos_ids=eos_ids, seed=args.seed, threads=args.threads)
    settings = ServeSettings(
        model_name=args.served_model_name or str(model_path), max_model_len=max_model_len,
        vocab_size=model.config.vocab_size, api_key=args.api_key, max_body_bytes=args.max_body_bytes,
        eos_ids=frozenset(eos_ids), end_of_turn_ids=frozenset(turn_ids),
    )
    app = create_app(engine, tokenizer, settings)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(f"serving {settings.model_name} ({Path(str(model_path)).name}, {device}, {str(dtype).replace('torch.', '')}, "
          f"context {max_model_len}) on http://{args.host}:{args.port}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_keep_alive=30)
    return 0
