"""`tablefree generate MODEL --prompt TEXT`: sample from a saved model, streaming tokens as they come."""

from __future__ import annotations

import sys

import torch
from transformers import TextStreamer

from .errors import TableFreeError
from .hub import load_model


def generate_command(
    model_path: str,
    prompt: str,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    stream=None,
) -> str:
    """Generate a continuation of `prompt`, printing it to `stream` token by token; returns the new text."""
    if max_new_tokens < 1:
        raise TableFreeError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0:
        raise TableFreeError(f"--temperature must be >= 0 (0 means greedy), got {temperature}")
    if top_p is not None and not 0 < top_p <= 1:
        raise TableFreeError(f"--top-p must be in (0, 1], got {top_p}")
    if top_k is not None and top_k < 1:
        raise TableFreeError(f"--top-k must be at least 1, got {top_k}")
    model, tokenizer = load_model(model_path)
    if tokenizer is None:
        raise TableFreeError(f"{model_path} has no tokenizer files; save the model with its tokenizer")
    input_ids = torch.tensor([tokenizer.encode(prompt)], dtype=torch.long)
    if input_ids.numel() == 0:
        raise TableFreeError("the prompt is empty; give at least one character")
    context = model.config.max_position_embeddings
    if input_ids.shape[1] + max_new_tokens > context:
        raise TableFreeError(
            f"prompt ({input_ids.shape[1]} tokens) + --max-new-tokens ({max_new_tokens}) exceeds the "
            f"model's context of {context} tokens"
        )
    stream = stream or sys.stdout
    streamer = _StreamTo(tokenizer, stream)
    sampling = dict(do_sample=True, temperature=temperature, top_k=top_k or 0, top_p=top_p or 1.0) if temperature > 0 else dict(do_sample=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        output = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            streamer=streamer,
            pad_token_id=model.config.pad_token_id,
            **sampling,
        )
    return tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True)


class _StreamTo(TextStreamer):
    """transformers' TextStreamer writing to a chosen stream instead of print()."""

    def __init__(self, tokenizer, stream):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.stream = stream

    def on_finalized_text(self, text: str, stream_end: bool = False):
        self.stream.write(text + ("\n" if stream_end else ""))
        self.stream.flush()


def add_cli(subparsers) -> None:
    gen = subparsers.add_parser("generate", help="generate text from a model, streamed to the terminal")
    gen.add_argument("model", help="model directory or cached hub id")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--seed", type=int, default=0)
    gen.set_defaults(run=_generate_cli)


def _generate_cli(args) -> int:
    generate_command(args.model, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
    return 0
