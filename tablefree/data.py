"""`tablefree data prepare`: a weighted mixture of sources -> uint16 token shards + a manifest.

Layout of a prepared directory:
    tokenizer/              the tokenizer the ids belong to (its hash is in the manifest)
    train-00000.bin ...     raw little-endian uint16 token ids, documents separated by </s>
    val-00000.bin ...       the validation split, held out by document
    manifest.json           sources, weights, tokenizer hash, token counts, and every shard's size
    progress.json           while preparing: what is done, so an interrupted run resumes

V = 65,536 fills uint16 exactly, so no id is free for a sentinel: shard sizes live in the manifest.
Deterministic: the same sources, settings and tokenizer give byte-identical shards.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .errors import TableFreeError
from .tokenizer import EOS_ID

MANIFEST = "manifest.json"
PROGRESS = "progress.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Source:
    """One entry of a mixture: `embedded`, a local .txt/.jsonl/.parquet path, or `hf:NAME[:CONFIG]`."""

    spec: str
    weight: float = 1.0
    split: str = "train"
    text_field: str = "text"
    streaming: bool = True

    @property
    def kind(self) -> str:
        if self.spec == "embedded":
            return "embedded"
        return "hub" if self.spec.startswith("hf:") else "file"


def parse_source(text: str, streaming: bool = True) -> Source:
    """`SPEC[@WEIGHT]`, e.g. `hf:HuggingFaceFW/fineweb-edu:sample-10BT@0.7` or `notes.jsonl@0.3`."""
    spec, sep, weight = text.rpartition("@")
    if not sep:
        spec, weight = text, "1"
    try:
        value = float(weight)
    except ValueError:
        raise TableFreeError(f"source {text!r}: weight {weight!r} is not a number (form: SPEC[@WEIGHT])") from None
    if value <= 0:
        raise TableFreeError(f"source {text!r}: weight must be positive, got {value}")
    return Source(spec=spec, weight=value, streaming=streaming)


def iter_documents(source: Source) -> Iterator[str]:
    """The documents of one source, in their stored order."""
    from .corpus import embedded_documents, read_local_file

    if source.kind == "embedded":
        yield from embedded_documents()
    elif source.kind == "file":
        yield from read_local_file(Path(source.spec), text_field=source.text_field)
    else:
        yield from _hub_documents(source)


def _hub_documents(source: Source) -> Iterator[str]:
    from datasets import load_dataset

    name, _, config = source.spec[3:].partition(":")
    try:
        dataset = load_dataset(name, config or None, split=source.split, streaming=source.streaming)
    except Exception as exc:  # datasets raises many types (not found, offline, bad config); all mean "cannot read it"
        where = "streamed" if source.streaming else "from the local cache"
        raise TableFreeError(
            f"cannot read dataset {name!r}{f' config {config!r}' if config else ''} ({where}): "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from None
    for row in dataset:
        if source.text_field not in row:
            raise TableFreeError(f"dataset {name} has no {source.text_field!r} field; its fields are {', '.join(row)}")
        if row[source.text_field]:
            yield row[source.text_field]


def is_validation(source_index: int, doc_index: int, val_fraction: float, seed: int) -> bool:
    """Whether a document is held out; a hash of its position, so the split never depends on timing."""
    digest = hashlib.blake2b(f"{seed}:{source_index}:{doc_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < val_fraction


@dataclass
class PrepareSettings:
    sources: list[Source]
    budget_tokens: int | None = None  # train tokens over the whole mixture; None = every document
    val_fraction: float = 0.01
    shard_tokens: int = 1 << 24
    seed: int = 0
    batch_documents: int = 256

    def fingerprint(self, tokenizer_hash: str) -> dict:
        return {**asdict(self), "tokenizer_hash": tokenizer_hash, "format": FORMAT_VERSION}


def quotas(settings: PrepareSettings) -> list[int | None]:
    """Train tokens each source contributes: its share of the budget by weight."""
    weights = [s.weight for s in settings.sources]
    if settings.budget_tokens is None:
        if len(set(weights)) > 1:
            raise TableFreeError("mixture weights need a token budget (--budget-tokens) to take effect")
        return [None] * len(weights)
    total = sum(weights)
    return [int(settings.budget_tokens * w / total) for w in weights]


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _write_json(path: Path, payload: dict) -> None:
    _write_atomic(path, (json.dumps(payload, indent=2) + "\n").encode())


def prepare(settings: PrepareSettings, out_dir: str | Path, tokenizer, progress: bool = True) -> dict:
    """Tokenise the mixture into `out_dir`; resumes an interrupted run with the same settings."""
    from tqdm.auto import tqdm

    from .tokenizer import tokenizer_hash

    out = Path(out_dir)
    if len(tokenizer) > 1 << 16:
        raise TableFreeError(f"the tokenizer has {len(tokenizer):,} ids; uint16 shards hold at most 65,536")
    if not settings.sources:
        raise TableFreeError("no sources given; use `embedded`, a local file, or hf:NAME[:CONFIG]")
    if not 0 < settings.val_fraction < 1:
        raise TableFreeError(f"val_fraction must be in (0, 1), got {settings.val_fraction}")
    limits = quotas(settings)
    fingerprint = settings.fingerprint(tokenizer_hash(tokenizer))
    if (out / MANIFEST).is_file():
        manifest = json.loads((out / MANIFEST).read_text())
        if manifest.get("settings") != json.loads(json.dumps(fingerprint)):
            raise TableFreeError(f"{out} already holds data prepared with other settings; choose another --out or delete it")
        return manifest
    state = _start_or_resume(out, fingerprint, len(settings.sources))
    tokenizer.save_pretrained(str(out / "tokenizer"))
    backend = tokenizer.backend_tokenizer
    train_buf: list[np.ndarray] = []
    val_buf: list[np.ndarray] = []
    counts = state["counts"]
    bar = tqdm(total=settings.budget_tokens, initial=sum(c["train_tokens"] for c in counts),
               unit="tok", unit_scale=True, desc="tokenising", disable=not progress)

    def flush() -> None:
        for split, buf in (("train", train_buf), ("val", val_buf)):
            if buf:
                ids = np.concatenate(buf).astype("<u2")
                name = f"{split}-{sum(s['split'] == split for s in state['shards']):05d}.bin"
                _write_atomic(out / name, ids.tobytes())
                state["shards"].append({"file": name, "split": split, "tokens": int(ids.size)})
                buf.clear()
        _write_json(out / PROGRESS, state)  # after the shards: a resumed run never sees a half shard

    for index in range(state["source"], len(settings.sources)):
        source, limit, count = settings.sources[index], limits[index], counts[index]
        documents = itertools.islice(iter_documents(source), count["documents"], None)
        pending = sum(b.size for b in train_buf)
        while limit is None or count["train_tokens"] < limit:
            batch = list(itertools.islice(documents, settings.batch_documents))
            if not batch:
                break
            encoded = backend.encode_batch(batch, add_special_tokens=False)  # runs on all cores (Rust threads)
            for text, enc in zip(batch, encoded):
                doc_index = count["documents"]
                count["documents"] += 1
                ids = np.fromiter(itertools.chain(enc.ids, (EOS_ID,)), dtype=np.uint16, count=len(enc.ids) + 1)
                if is_validation(index, doc_index, settings.val_fraction, settings.seed):
                    val_buf.append(ids)
                    count["val_tokens"] += ids.size
                    count["val_documents"] += 1
                    count["val_bytes"] += len(text.encode("utf-8"))
                else:
                    if limit is not None and count["train_tokens"] >= limit:
                        count["documents"] -= 1  # over quota: leave it unread, so counts stay exact
                        break
                    train_buf.append(ids)
                    count["train_tokens"] += ids.size
                    count["train_bytes"] += len(text.encode("utf-8"))
                    pending += ids.size
                    bar.update(ids.size)
                if pending >= settings.shard_tokens:
                    state["source"] = index
                    flush()
                    pending = 0
        count["exhausted"] = limit is None or count["train_tokens"] < limit
        state["source"] = index + 1
        flush()
        pending = 0
    bar.close()
    return _finish(out, state, settings, fingerprint)


def _start_or_resume(out: Path, fingerprint: dict, n_sources: int) -> dict:
    fresh = {
        "settings": fingerprint,
        "source": 0,
        "shards": [],
        "counts": [dict(documents=0, train_tokens=0, train_bytes=0, val_tokens=0, val_documents=0, val_bytes=0)
                   for _ in range(n_sources)],
    }
    if (out / PROGRESS).is_file():
        state = json.loads((out / PROGRESS).read_text())
        if state.get("settings") != json.loads(json.dumps(fingerprint)):
            raise TableFreeError(f"{out} holds an unfinished preparation with other settings; choose another --out or delete it")
        return state
    if out.exists() and any(out.iterdir()):
        raise TableFreeError(f"{out} exists and is not a prepared-data directory; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    return fresh


def _finish(out: Path, state: dict, settings: PrepareSettings, fingerprint: dict) -> dict:
    counts = state["counts"]
    train_tokens = sum(c["train_tokens"] for c in counts)
    val_tokens = sum(c["val_tokens"] for c in counts)
    if train_tokens == 0:
        raise TableFreeError(f"the corpus is empty: no document came from {', '.join(s.spec for s in settings.sources)}")
    if val_tokens == 0:
        raise TableFreeError(
            f"the validation split is empty ({sum(c['documents'] for c in counts)} documents, val_fraction "
            f"{settings.val_fraction}); give more documents or a larger --val-fraction"
        )
    manifest = {
        "format": FORMAT_VERSION,
        "settings": fingerprint,
        "tokenizer_hash": fingerprint["tokenizer_hash"],
        "sources": [{**asdict(s), **c} for s, c in zip(settings.sources, counts)],
        "train_tokens": train_tokens,
        "val_tokens": val_tokens,
        "train_bytes": sum(c["train_bytes"] for c in counts),
        "val_bytes": sum(c["val_bytes"] for c in counts),
        "shards": state["shards"],
    }
    _write_json(out / MANIFEST, manifest)
    (out / PROGRESS).unlink()
    return manifest


class TokenShards:
    """The shards of one split as memory maps; windows are read without loading a split into memory."""

    def __init__(self, data_dir: str | Path, split: str, expected_tokenizer_hash: str | None = None):
        self.dir = Path(data_dir)
        manifest_path = self.dir / MANIFEST
        if not manifest_path.is_file():
            hint = " (preparation was interrupted; rerun `tablefree data prepare`)" if (self.dir / PROGRESS).exists() else ""
            raise TableFreeError(f"no prepared data at {self.dir}: {MANIFEST} is missing{hint}")
        self.manifest = json.loads(manifest_path.read_text())
        if expected_tokenizer_hash is not None and self.manifest["tokenizer_hash"] != expected_tokenizer_hash:
            raise TableFreeError(
                f"the shards in {self.dir} were made with tokenizer {self.manifest['tokenizer_hash']}, but the "
                f"model uses tokenizer {expected_tokenizer_hash}: prepare the data with the model's tokenizer"
            )
        self.arrays = []
        for shard in self.manifest["shards"]:
            if shard["split"] != split:
                continue
            path = self.dir / shard["file"]
            if not path.is_file() or path.stat().st_size != 2 * shard["tokens"]:
                raise TableFreeError(f"shard {path} is missing or has the wrong size; prepare the data again")
            self.arrays.append(np.memmap(path, dtype="<u2", mode="r"))
        if not self.arrays:
            raise TableFreeError(f"{self.dir} has no {split} shards")
        self.tokens = sum(a.size for a in self.arrays)

    def window_starts(self, length: int) -> np.ndarray:
        """Per shard, how many windows of `length` tokens start in it (a window never spans two shards)."""
        return np.array([max(0, a.size - length + 1) for a in self.arrays], dtype=np.int64)

    def windows(self, indices: np.ndarray, length: int) -> np.ndarray:
        """Windows number `indices` (over all shards, in order) of `length` tokens, as int64 rows."""
        counts = self.window_starts(length)
        if counts.sum() == 0:
            raise TableFreeError(f"no shard in {self.dir} holds {length} tokens; use a shorter seq_len")
        bounds = np.cumsum(counts)
        shard = np.searchsorted(bounds, indices, side="right")
        offset = indices - (bounds[shard] - counts[shard])
        return np.stack([self.arrays[s][o : o + length].astype(np.int64) for s, o in zip(shard, offset)])

    def sequential(self, length: int, max_tokens: int | None = None) -> Iterator[np.ndarray]:
        """Non-overlapping windows in order (for evaluation), up to `max_tokens` predicted tokens."""
        used = 0
        for array in self.arrays:
            for start in range(0, array.size - 1, length):
                chunk = np.asarray(array[start : start + length + 1], dtype=np.int64)
                if chunk.size < 2:
                    break
                if max_tokens is not None and used + chunk.size - 1 > max_tokens:
                    chunk = chunk[: max_tokens - used + 1]
                    if chunk.size < 2:
                        return
                yield chunk
                used += chunk.size - 1
                if max_tokens is not None and used >= max_tokens:
                    return


def prepare_command(args) -> int:
    from .tokenizer import as_transformers, build_tokenizer, load_tokenizer

    sources = [
        Source(s.spec, s.weight, split=args.split, text_field=args.text_field, streaming=not args.from_cache)
        for s in (parse_source(text) for text in args.source)
    ]
    settings = PrepareSettings(
        sources=sources,
        budget_tokens=args.budget_tokens,
        val_fraction=args.val_fraction,
        shard_tokens=args.shard_tokens,
        seed=args.seed,
    )
    out = Path(args.out)
    if args.tokenizer:
        tokenizer = load_tokenizer(args.tokenizer)
    elif (out / "tokenizer" / "tokenizer.json").is_file():
        tokenizer = load_tokenizer(out / "tokenizer")  # a resumed run keeps the tokenizer it started with
    else:
        tokenizer = as_transformers(build_tokenizer(mixture_text(sources, args.tokenizer_chars)))
    manifest = prepare(settings, out, tokenizer, progress=not args.quiet)
    print(describe(manifest, out))
    return 0


def mixture_text(sources: list[Source], limit_chars: int) -> Iterator[str]:
    """The first `limit_chars` characters of the mixture, split across sources by weight (to learn n-grams)."""
    total = sum(s.weight for s in sources)
    for source in sources:
        budget, used = limit_chars * source.weight / total, 0
        for doc in iter_documents(source):
            yield doc
            used += len(doc)
            if used >= budget:
                break


def describe(manifest: dict, out: Path) -> str:
    lines = [f"prepared {out}: {manifest['train_tokens']:,} train + {manifest['val_tokens']:,} val tokens, "
             f"tokenizer {manifest['tokenizer_hash']}"]
    for s in manifest["sources"]:
        note = " (exhausted before its share)" if s["exhausted"] and manifest["settings"]["budget_tokens"] else ""
        lines.append(f"  {s['spec']} weight {s['weight']:g}: {s['documents']:,} documents, {s['train_tokens']:,} train tokens{note}")
    return "\n".join(lines)


def add_cli(subparsers) -> None:
    data = subparsers.add_parser("data", help="prepare token shards from a mixture of sources")
    verbs = data.add_subparsers(dest="data_command", metavar="VERB", required=True)
    prep = verbs.add_parser("prepare", help="tokenise a weighted mixture into uint16 shards + manifest")
    prep.add_argument("--source", action="append", default=None, metavar="SPEC[@WEIGHT]",
                      help="`embedded`, a .txt/.jsonl/.parquet file, or hf:NAME[:CONFIG] "
                           "(e.g. hf:HuggingFaceFW/fineweb-edu:sample-10BT@0.7); repeat for a mixture")
    prep.add_argument("--out", required=True, help="output directory")
    prep.add_argument("--tokenizer", help="tokenizer directory or tokenizer.json (default: build the code-point tokenizer)")
    prep.add_argument("--tokenizer-chars", type=int, default=20_000_000, help="characters to learn n-gram slots from")
    prep.add_argument("--budget-tokens", type=int, default=None, help="train tokens over the mixture (default: all)")
    prep.add_argument("--val-fraction", type=float, default=0.01, help="fraction of documents held out")
    prep.add_argument("--shard-tokens", type=int, default=1 << 24)
    prep.add_argument("--split", default="train", help="dataset split of hf: sources")
    prep.add_argument("--text-field", default="text")
    prep.add_argument("--from-cache", action="store_true", help="read hf: sources from the local cache instead of streaming")
    prep.add_argument("--seed", type=int, default=0, help="seed of the validation split")
    prep.add_argument("--quiet", action="store_true")
    prep.set_defaults(run=lambda a: prepare_command(_default_sources(a)))


def _default_sources(args):
    args.source = args.source or ["embedded"]
    return args
