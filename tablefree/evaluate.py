"""`tablefree eval MODEL --data DIR|FILE`: validation loss, perplexity and bits per byte.

Bits per byte = summed next-token loss in bits / UTF-8 bytes of the predicted tokens: the measure
that compares models across tokenizers (perplexity is per token, and tokens differ in length).

One definition serves `tablefree eval` and the training loop's validation (`evaluate_shards`): the
val split cut into consecutive windows of seq_len + 1 tokens, the first `max_tokens` predicted tokens,
up to 16 windows per forward pass, float32 weights under the runtime's autocast. So `tablefree eval
MODEL --data DIR --seq-len S --max-tokens N` repeats a run's validation with its seq_len and eval_tokens.
The backbone runs once per batch and the output head a few positions at a time (`tablefree.loss`,
the same loss as training's), so no more than `max_logits` logits exist at once, never windows x
seq_len x V.

Benchmarks beyond this run through lm-evaluation-harness, which loads any saved model as
`lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True`.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from pathlib import Path

import numpy as np

from .corpus import ENGLISH_PROSE, HELDOUT_TEXTS, PYTHON_NOTES, ReadOptions
from .errors import TableFreeError

EVAL_TOKENS = 262_144  # predicted tokens scored by `tablefree eval` unless --max-tokens says otherwise
BATCH_WINDOWS = 16
_BYTE_FALLBACK = re.compile("<0x[0-9A-Fa-f]{2}>")  # a SentencePiece-style tokenizer's token for one raw byte


def token_byte_lengths(tokenizer, vocab_size: int) -> np.ndarray:
    """UTF-8 bytes each id adds to decoded text; special tokens (</s>, <pad>, ...) count zero bytes.

    A byte-level tokenizer's token texts are in GPT-2's byte-to-unicode alphabet (one symbol per byte: 'Ġ'
    is a space) and a byte-fallback token <0xNN> is one byte, so those are counted from the symbols;
    any other token counts the UTF-8 length of its own decoded text.
    """
    backend = tokenizer.backend_tokenizer if hasattr(tokenizer, "backend_tokenizer") else tokenizer
    size = backend.get_vocab_size(with_added_tokens=True)
    texts = backend.decode_batch([[i] for i in range(size)], skip_special_tokens=True)
    lengths = np.zeros(vocab_size, dtype=np.int64)
    lengths[: min(size, vocab_size)] = [len(t.encode("utf-8")) for t in texts[:vocab_size]]
    spec = json.loads(backend.to_str())
    kinds = _decoder_kinds(spec.get("decoder"))
    if not kinds & {"ByteLevel", "ByteFallback"}:
        return lengths
    special = {t["id"] for t in spec.get("added_tokens") or [] if t.get("special")}
    symbols = _byte_symbols() if "ByteLevel" in kinds else set()
    for i in range(min(size, vocab_size)):
        token = backend.id_to_token(i)
        if i in special or token is None:
            continue
        if "ByteFallback" in kinds and _BYTE_FALLBACK.fullmatch(token):
            lengths[i] = 1
        elif symbols and all(char in symbols for char in token):
            lengths[i] = len(token)  # the decoder maps a token made only of byte symbols to one byte per symbol
    return lengths


def _decoder_kinds(decoder: dict | None) -> set[str]:
    """The types of a tokenizer.json decoder and of the decoders inside a Sequence."""
    if not decoder:
        return set()
    return {decoder.get("type")} | {kind for inner in decoder.get("decoders") or [] for kind in _decoder_kinds(inner)}


def _byte_symbols() -> set[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode  # GPT-2's byte-level alphabet

    return set(bytes_to_unicode().values())


def evaluate_windows(model, windows, byte_lengths: np.ndarray, device, autocast=None,
                     batch_windows: int = BATCH_WINDOWS, max_logits: int | None = None) -> dict:
    """Loss (nats/token), perplexity and bits per byte over (T+1)-token windows of ids.

    `model` is a GPT-NeoX causal LM, bare or inside DDP, FSDP2 or torch.compile; `max_logits` caps the
    logits held at once (default: `tablefree.loss.default_max_logits` of the device).
    """
    import torch

    from .loss import causal_lm, summed_next_token_loss

    lm = causal_lm(model)
    was_training = model.training
    model.eval()
    nats, tokens, n_bytes = 0.0, 0, 0
    try:
        with torch.no_grad(), _gathered_root(lm):
            for batch in same_length_batches(windows, batch_windows):
                rows = np.stack(batch)
                ids = torch.as_tensor(rows, device=device)
                with autocast or contextlib.nullcontext():
                    nats += summed_next_token_loss(lm, ids[:, :-1], ids[:, 1:], max_logits).item()
                tokens += ids[:, 1:].numel()
                n_bytes += int(byte_lengths[rows[:, 1:]].sum())
    finally:
        model.train(was_training)
    if tokens == 0:
        raise TableFreeError("nothing to evaluate: the validation data holds fewer than 2 tokens")
    loss = nats / tokens
    ppl = math.exp(loss) if loss < 709 else math.inf  # exp overflows a float past 709 (a diverged model)
    return {"loss": loss, "ppl": ppl, "bits_per_byte": nats / math.log(2) / max(1, n_bytes), "tokens": tokens}


@contextlib.contextmanager
def _gathered_root(model):
    """FSDP2 gathers the root's own parameters (head, final norm) around the root's forward; the chunked head runs after it."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


def same_length_batches(windows, size: int):
    """Group consecutive windows of equal length (one forward pass each); a shorter tail goes alone."""
    batch: list[np.ndarray] = []
    for window in windows:
        if batch and (len(batch) == size or len(window) != len(batch[0])):
            yield batch
            batch = []
        batch.append(np.asarray(window))
    if batch:
        yield batch


def evaluate_shards(model, shards, seq_len: int, max_tokens: int | None, byte_lengths, device, autocast=None) -> dict:
    """The validation of a training run and of `tablefree eval DIR`: `shards` in order, `max_tokens` predicted tokens."""
    return evaluate_windows(model, shards.sequential(seq_len, max_tokens), byte_lengths, device, autocast)


def text_windows(path: Path, tokenizer, seq_len: int, max_tokens: int | None, text_field: str = "text",
                 options: ReadOptions = ReadOptions()):
    """Windows over a local text file's documents, tokenised with the model's tokenizer, its end-of-text id between them."""
    from .corpus import read_local_file

    return document_windows(read_local_file(path, text_field=text_field, options=options), tokenizer, seq_len,
                            max_tokens, str(path))


def document_windows(documents, tokenizer, seq_len: int, max_tokens: int | None, where: str):
    """Windows over `documents` (strings), tokenised with the model's tokenizer, its end-of-text id between them."""
    from .corpus import pieces
    from .tokenizer import end_of_text_id

    separator = end_of_text_id(tokenizer, "of the model")
    ids: list[int] = []
    count = 0
    for doc in documents:
        count += 1
        for piece in pieces(doc):
            # A special token's spelling in the text is text, as prepared data encodes it (tokenizer.text_encoder); no
            # "longer than the maximum" warning: the windows cut it.
            ids.extend(tokenizer.encode(piece, add_special_tokens=False, split_special_tokens=True, verbose=False))
        ids.append(separator)
        if max_tokens is not None and len(ids) > max_tokens:
            break
    if count == 0:
        raise TableFreeError(f"{where} holds no text to evaluate: it is empty or only whitespace")
    if len(ids) == count:
        raise TableFreeError(f"the model's tokenizer turns the text of {where} into no tokens at all")
    array = np.asarray(ids[: None if max_tokens is None else max_tokens + 1], dtype=np.int64)
    for start in range(0, max(0, array.size - 1), seq_len):
        yield array[start : start + seq_len + 1]


def evaluate_model(model_path: str, data: str, seq_len: int | None = None, max_tokens: int | None = EVAL_TOKENS,
                   text_field: str = "text", options: ReadOptions = ReadOptions(), eos_token: str | None = None,
                   runtime=None) -> dict:
    """Evaluate a saved model on the val split of a prepared directory, or on a local text file.

    `runtime` (from `tablefree.runtime.resolve_runtime`) says where; by default the best device present.
    """
    from .hub import load_model
    from .runtime import resolve_runtime
    from .tokenizer import set_end_of_text

    for name, value in (("seq_len", seq_len), ("max_tokens", max_tokens)):
        if value is not None and value < 1:
            raise TableFreeError(f"{name} must be a positive number, got {value}")
    runtime = runtime or resolve_runtime()
    model, tokenizer = load_model(model_path, device=runtime.device)
    if tokenizer is None:
        raise TableFreeError(f"{model_path} has no tokenizer; bits per byte need the tokenizer the model was trained with")
    if eos_token is not None:
        set_end_of_text(tokenizer, eos_token)
    seq_len = seq_len or model.config.max_position_embeddings
    byte_lengths = token_byte_lengths(tokenizer, model.config.vocab_size)
    windows = data_windows(data, tokenizer, seq_len, max_tokens, text_field, options)
    return evaluate_windows(model, windows, byte_lengths, runtime.device, runtime.autocast())


def data_windows(data: str, tokenizer, seq_len: int, max_tokens: int | None, text_field: str = "text",
                 options: ReadOptions = ReadOptions()):
    """The windows `data` is scored on: a prepared directory's val split (cut as training's validation cuts it,
    `evaluate_shards`), a local text file, or a held-out text by name (python-notes, english-prose)."""
    from .data import TokenShards
    from .tokenizer import tokenizer_hash

    path = Path(data)
    if data in HELDOUT_TEXTS:
        return document_windows(HELDOUT_TEXTS[data](), tokenizer, seq_len, max_tokens, data)
    if path.is_dir():
        return TokenShards(path, "val", expected_tokenizer_hash=tokenizer_hash(tokenizer)).sequential(seq_len, max_tokens)
    if path.is_file():
        return text_windows(path, tokenizer, seq_len, max_tokens, text_field, options)
    raise TableFreeError(f"no data at {data}: give a prepared directory, a .txt/.jsonl/.parquet file, "
                         f"{' or '.join(HELDOUT_TEXTS)}")


def unigram_log_probs(data_dir: str | Path, vocab_size: int) -> np.ndarray:
    """Each id's log-probability from its frequency in a prepared directory's train split, add-half smoothed (an id
    never seen keeps some mass): the best a model can do that ignores the context."""
    from .data import TokenShards

    counts = sum(np.bincount(a, minlength=vocab_size)[:vocab_size].astype(np.float64)
                 for a in TokenShards(data_dir, "train").arrays)
    return np.log((counts + 0.5) / (counts.sum() + 0.5 * vocab_size))


def context_free_scores(windows, log_probs: np.ndarray, byte_lengths: np.ndarray) -> dict:
    """Loss, perplexity and bits per byte over `windows` of a model that gives every target t the log-probability
    log_probs[t], whatever came before (uniform and unigram baselines), as `evaluate_windows` reports them."""
    targets = np.concatenate([w[1:] for w in windows])
    nats = -float(log_probs[targets].sum())
    return {"loss": nats / targets.size, "ppl": math.exp(nats / targets.size),
            "bits_per_byte": nats / math.log(2) / max(1, int(byte_lengths[targets].sum())), "tokens": int(targets.size)}


def eval_command(args) -> int:
    from .runtime import resolve_runtime

    runtime = resolve_runtime(args.device, args.dtype)
    print(f"evaluating on {runtime.describe()}")
    options = ReadOptions(bad_text=args.bad_text, bad_records=args.bad_records)
    result = evaluate_model(args.model, args.data, args.seq_len, args.max_tokens, args.text_field, options,
                            args.eos_token, runtime)
    print(f"{args.model}: val loss {result['loss']:.4f}  ppl {result['ppl']:.3f}  "
          f"bits/byte {result['bits_per_byte']:.4f}  ({result['tokens']:,} tokens)")
    return 0


def add_cli(subparsers) -> None:
    from .corpus import add_reading_options
    from .runtime import add_runtime_flags

    ev = subparsers.add_parser("eval", help="validation loss, perplexity and bits per byte of a saved model")
    ev.add_argument("model", help="model directory or cached hub id")
    ev.add_argument("--data", required=True,
                    help=f"a prepared data directory (its val split), a .txt/.jsonl/.parquet file, {PYTHON_NOTES} "
                         f"(held-out text every Python has: IDLE's change logs and Python's licence) or {ENGLISH_PROSE} "
                         f"(held-out English prose written for tablefree: stories, letters, essays); ./{PYTHON_NOTES} "
                         f"is a file of that name")
    ev.add_argument("--seq-len", type=int, default=None,
                    help="window length (default: the model's context; a training run's seq_len repeats its validation)")
    ev.add_argument("--max-tokens", type=int, default=EVAL_TOKENS,
                    help="predicted tokens to score, from the start of the data (a training run's eval_tokens repeats its validation)")
    ev.add_argument("--eos-token", default=None,
                    help="the token between a file's documents (default: the tokenizer's own eos_token)")
    add_runtime_flags(ev)
    add_reading_options(ev)
    ev.set_defaults(run=eval_command)
