"""`tablefree data prepare`: a weighted mixture of sources -> token shards + a manifest (docs/safety.md).

Layout of a prepared directory:
    tokenizer/              the tokenizer the ids belong to (its hash is in the manifest)
    train-00000.bin ...     raw little-endian token ids, documents separated by the tokenizer's end-of-text id
    val-00000.bin ...       the validation split, held out by document
    manifest.json           sources, weights, tokenizer hash, id width and separator, token counts, what
                            reading replaced or skipped, and every shard's size
    progress.json           while preparing: what is done, so an interrupted run resumes

Ids are uint16 when every id of the tokenizer fits (V <= 65,536), else uint32. V = 65,536 fills uint16
exactly, so no id is free for a sentinel: shard sizes live in the manifest.
Deterministic: the same sources, settings and tokenizer give byte-identical shards.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from . import files
from .corpus import BUILTIN_CORPORA, ReadCounts, ReadOptions, has_text, leading_text, pieces, record_text
from .errors import TableFreeError, WriteError, summary

MANIFEST = "manifest.json"
PROGRESS = "progress.json"
TOKENIZER_DIR = "tokenizer"
FORMAT_VERSION = 2  # 2 records the id width and the separator; format 1 shards are uint16
SHARD_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
BATCH_CHARS = 1 << 19  # characters per tokenizer call: bounds the memory its encodings take (as fast as 1 << 21)
_SHARD_NAME = re.compile(r"^(train|val)-\d{5,}\.bin$")
_OUTPUT_NAME = re.compile(rf"^({re.escape(MANIFEST)}|{re.escape(PROGRESS)}|{TOKENIZER_DIR}|(train|val)-\d{{5,}}\.bin)$")
_DATASET_NAME = re.compile(r"^[\w.-]+(/[\w.-]+)?$")
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class Source:
    """One entry of a mixture: `embedded`, `prose`, a local .txt/.jsonl/.parquet path, or `hf:NAME[:CONFIG]`."""

    spec: str
    weight: float = 1.0
    split: str = "train"
    text_field: str = "text"
    streaming: bool = True

    @property
    def kind(self) -> str:
        if self.spec in BUILTIN_CORPORA:
            return "builtin"
        return "hub" if self.spec.startswith("hf:") else "file"


def parse_source(text: str, streaming: bool = True) -> Source:
    """`SPEC[@WEIGHT]`, e.g. `hf:HuggingFaceFW/fineweb-edu:sample-10BT@0.7` or `notes.jsonl@0.3`."""
    spec, sep, weight = text.rpartition("@")
    if not sep:
        spec, weight = text, "1"
    try:
        value = float(weight)
    except ValueError:
        raise TableFreeError(
            f"source {text!r}: weight {weight!r} is not a number (form: SPEC[@WEIGHT]; "
            f"a path that contains @ needs an explicit weight, e.g. PATH@1)"
        ) from None
    if not math.isfinite(value) or value <= 0:
        raise TableFreeError(f"source {text!r}: the weight must be a positive finite number, got {weight!r}")
    if not spec:
        raise TableFreeError(f"source {text!r} names no source before its weight")
    return Source(spec=spec, weight=value, streaming=streaming)


def iter_documents(source: Source, options: ReadOptions = ReadOptions(), counts: ReadCounts | None = None) -> Iterator[str]:
    """The documents of one source, in their stored order; what reading replaced or skipped goes to `counts`."""
    from .corpus import read_local_file

    counts = ReadCounts() if counts is None else counts
    if source.kind == "builtin":
        yield from BUILTIN_CORPORA[source.spec]()
    elif source.kind == "file":
        yield from read_local_file(Path(source.spec), text_field=source.text_field, options=options, counts=counts)
    else:
        yield from _hub_documents(source, options, counts)


def _hub_documents(source: Source, options: ReadOptions, counts: ReadCounts) -> Iterator[str]:
    name, _, config = source.spec[3:].partition(":")
    if not _DATASET_NAME.match(name):
        raise TableFreeError(f"source {source.spec!r}: {name!r} is not a dataset name (form: hf:OWNER/NAME[:CONFIG])")
    if source.streaming:
        dataset = _streamed_dataset(name, config, source.split)
    else:
        dataset = _cached_dataset(name, config, source.split)
    row = 0
    try:
        for row, record in enumerate(dataset, start=1):
            text = record_text(record, source.text_field, f"hf:{name} row {row:,}", options, counts)
            if text is None:
                continue
            if has_text(text):
                yield text
            else:
                counts.empty_documents += 1
    except TableFreeError:
        raise
    except Exception as exc:  # datasets raises many types mid-stream (network, damaged files); all mean "stopped here"
        raise TableFreeError(f"reading hf:{name} failed after row {row:,}: {summary(exc, typed=True)}") from None


def _streamed_dataset(name: str, config: str, split: str):
    import datasets.config
    from datasets import load_dataset

    if datasets.config.HF_HUB_OFFLINE:
        raise TableFreeError(
            f"cannot stream hf:{name}: offline mode is on (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set); pass "
            f"--from-cache to read a copy in the local datasets cache, or unset HF_HUB_OFFLINE to stream it"
        )
    _check_on_hub(name)
    try:
        return load_dataset(name, config or None, split=split, streaming=True)
    except Exception as exc:  # datasets raises many types (no such config or split, damaged card); all mean "cannot stream it"
        raise TableFreeError(f"cannot stream hf:{name}{f' config {config!r}' if config else ''}: {summary(exc, typed=True)}") from None


def _check_on_hub(name: str) -> None:
    """One request without retries, so an unreachable Hub is named in seconds (a download retries for ~25 s)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError

    try:
        HfApi().dataset_info(name, timeout=10)
    except GatedRepoError:
        raise TableFreeError(f"hf:{name} is gated: accept its terms on the Hub, then log in (`hf auth login`)") from None
    except RepositoryNotFoundError:
        raise TableFreeError(f"no dataset hf:{name} on the Hugging Face Hub (if it is private, log in: `hf auth login`)") from None
    except HFValidationError as exc:
        raise TableFreeError(f"hf:{name} is not a dataset name: {summary(exc, typed=True)}") from None
    except Exception as exc:  # DNS, refused, timeout, proxy: every way of not reaching the Hub means the same here
        raise TableFreeError(
            f"cannot reach the Hugging Face Hub to stream hf:{name} ({summary(exc, typed=True)}); to work offline, set "
            f"HF_HUB_OFFLINE=1 and pass --from-cache to read a copy in the local datasets cache"
        ) from None


def _cached_dataset(name: str, config: str, split: str):
    """The dataset as `load_dataset` saved it in the local datasets cache, read without any connection."""
    import datasets.config
    from datasets.packaged_modules.cache.cache import Cache  # the reader load_dataset itself uses offline

    try:
        builder = Cache(repo_id=name, dataset_name=name.split("/")[-1], config_name=config or None, version="auto", hash="auto")
        return builder.as_streaming_dataset(split=split)
    except Exception as exc:  # datasets raises many types for a missing or partial cache; all mean "not cached"
        call = f"datasets.load_dataset({name!r}{f', {config!r}' if config else ''})"
        raise TableFreeError(
            f"hf:{name}{f':{config}' if config else ''} (split {split!r}) is not in the local datasets cache "
            f"{datasets.config.HF_DATASETS_CACHE} ({summary(exc, typed=True)}); download it once where there is network "
            f"with {call}, or stream it without --from-cache"
        ) from None


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
    bad_text: str = ReadOptions.bad_text
    bad_records: str = ReadOptions.bad_records

    def read_options(self) -> ReadOptions:
        return ReadOptions(bad_text=self.bad_text, bad_records=self.bad_records)

    def check(self) -> None:
        if not self.sources:
            raise TableFreeError("no sources given; use `embedded`, a local file, or hf:NAME[:CONFIG]")
        if not 0 < self.val_fraction < 1:
            raise TableFreeError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        for name in ("shard_tokens", "batch_documents") + (("budget_tokens",) if self.budget_tokens is not None else ()):
            if getattr(self, name) < 1:
                raise TableFreeError(f"{name} must be a positive number, got {getattr(self, name)}")
        self.read_options()
        for source in self.sources:
            for value in (source.spec, source.split, source.text_field):
                if _SURROGATE.search(value):  # an undecodable file name or argument arrives with lone surrogates
                    raise TableFreeError(f"{value!r} is not valid UTF-8 text, and the manifest records it as text; rename it")

    def fingerprint(self, tokenizer_hash: str, separator_id: int, dtype: str) -> dict:
        """What determines the shards' bytes, as JSON: a resumed or repeated run must match it exactly."""
        fields = {**asdict(self), "tokenizer_hash": tokenizer_hash, "separator_id": separator_id, "dtype": dtype,
                  "format": FORMAT_VERSION}
        return json.loads(files.json_text(fields))


def quotas(settings: PrepareSettings) -> list[int | None]:
    """Train tokens each source contributes: its share of the budget by weight."""
    weights = [s.weight for s in settings.sources]
    if settings.budget_tokens is None:
        if len(set(weights)) > 1:
            raise TableFreeError("mixture weights need a token budget (--budget-tokens) to take effect")
        return [None] * len(weights)
    total = sum(weights)
    return [int(settings.budget_tokens * w / total) for w in weights]


def shard_dtype(tokenizer) -> np.dtype:
    """uint16 when every id of the tokenizer fits in it (V <= 65,536), else uint32."""
    ids = max(len(tokenizer), max(tokenizer.get_vocab().values(), default=-1) + 1)
    return SHARD_DTYPES["uint16" if ids <= 1 << 16 else "uint32"]


def _fitted(ids: list[int], dtype: np.dtype) -> np.ndarray:
    """`ids` as `dtype`, checked first: an id too wide for the shards is an error, never wrapped."""
    array = np.array(ids, dtype=np.int64)
    if array.size and array.max() > np.iinfo(dtype).max:
        raise TableFreeError(
            f"the tokenizer produced id {int(array.max()):,}, beyond the {dtype.name} shards its vocabulary "
            f"implies; its vocabulary and its ids disagree: fix the tokenizer"
        )
    return array.astype(dtype)


def encode_documents(backend, texts: list[str], dtype: np.dtype) -> list[np.ndarray]:
    """Token ids of each text as `dtype`; long texts go in pieces, at most BATCH_CHARS characters per call."""
    parts: list[list[np.ndarray]] = [[] for _ in texts]
    for group in piece_groups(texts):
        encodings = backend.encode_batch([piece for _, piece in group], add_special_tokens=False)  # all cores (Rust threads)
        for (owner, _), encoding in zip(group, encodings):
            parts[owner].append(_fitted(encoding.ids, dtype))
    return [np.concatenate(p) if p else np.zeros(0, dtype) for p in parts]


def piece_groups(texts: list[str]) -> Iterator[list[tuple[int, str]]]:
    """(text index, piece) pairs of `texts`, grouped into tokenizer calls of at most BATCH_CHARS characters."""
    group, size = [], 0
    for owner, text in enumerate(texts):
        for piece in pieces(text):
            if group and size + len(piece) > BATCH_CHARS:
                yield group
                group, size = [], 0
            group.append((owner, piece))
            size += len(piece)
    if group:
        yield group


def _take(documents: Iterator[str], read: ReadCounts, max_documents: int) -> list[tuple[str, dict]]:
    """The next documents, each with what reading had replaced or skipped up to it, within BATCH_CHARS."""
    batch, chars = [], 0
    for text in documents:
        batch.append((text, asdict(read)))
        chars += len(text)
        if len(batch) >= max_documents or chars >= BATCH_CHARS:
            break
    return batch


def claim_data_dir(out: Path, settings: PrepareSettings, force: bool, inputs: Iterable[str | Path | None] = ()) -> Path:
    """Check that `out` may hold this preparation (files.claim_output_dir), never over or inside an input."""
    local = [Path(s.spec) for s in settings.sources if s.kind == "file"]
    try:
        existing = [e.name for e in out.iterdir() if _OUTPUT_NAME.match(e.name)] if out.is_dir() else []
    except OSError as exc:
        raise TableFreeError(f"cannot read the output directory {out}: {exc.strerror or exc}") from None
    return files.claim_output_dir(out, "data", resumable=True, force=force, inputs=[*local, *inputs], writes=existing)


def prepare(settings: PrepareSettings, out_dir: str | Path, tokenizer, progress: bool = True, force: bool = False,
            inputs: Iterable[str | Path | None] = ()) -> dict:
    """Tokenise the mixture into `out_dir`, whose lock (files.output_lock) the caller holds; resumes an
    interrupted run with the same settings.

    `force` replaces an earlier preparation with other settings (only files it wrote); `inputs` are
    paths the output must stay clear of besides the local sources (the tokenizer's, say).
    """
    from tqdm.auto import tqdm

    from .tokenizer import end_of_text_id, text_encoder, tokenizer_hash

    out = Path(out_dir)
    settings.check()
    limits = quotas(settings)
    separator = end_of_text_id(tokenizer, "given for the data")
    dtype = shard_dtype(tokenizer)
    fingerprint = settings.fingerprint(tokenizer_hash(tokenizer), separator, dtype.name)
    claim_data_dir(out, settings, force, inputs)
    finished = _finished(out, fingerprint, force)
    if finished is not None:
        return finished
    state = _start_or_resume(out, fingerprint, len(settings.sources), force)
    if not state["shards"] or not (out / TOKENIZER_DIR / "tokenizer.json").is_file():
        _save_tokenizer(tokenizer, out / TOKENIZER_DIR)
    backend = text_encoder(tokenizer)
    separator_ids = np.array([separator], dtype=dtype)
    options = settings.read_options()
    train_buf: list[np.ndarray] = []
    val_buf: list[np.ndarray] = []
    counts = state["counts"]
    bar = tqdm(total=settings.budget_tokens, initial=sum(c["train_tokens"] for c in counts),
               unit="tok", unit_scale=True, desc="tokenising", disable=not progress)

    def flush() -> None:
        for split, buf in (("train", train_buf), ("val", val_buf)):
            if buf:
                ids = np.concatenate(buf)
                name = f"{split}-{sum(s['split'] == split for s in state['shards']):05d}.bin"
                files.write_atomic(out / name, ids.tobytes())
                state["shards"].append({"file": name, "split": split, "tokens": int(ids.size)})
                buf.clear()
        files.write_json(out / PROGRESS, state)  # after the shards: a resumed run never sees a half shard

    try:
        for index in range(state["source"], len(settings.sources)):
            source, limit, count = settings.sources[index], limits[index], counts[index]
            read = ReadCounts()
            # A resumed run reads the documents done already again (and counts them again in `read`).
            documents = itertools.islice(iter_documents(source, options, read), count["documents"], None)
            pending = 0
            while limit is None or count["train_tokens"] < limit:
                batch = _take(documents, read, settings.batch_documents)
                if not batch:
                    count.update(asdict(read))  # read to the end: records skipped after the last document count too
                    break
                encoded = encode_documents(backend, [text for text, _ in batch], dtype)
                for (text, read_so_far), ids in zip(batch, encoded):
                    doc_index = count["documents"]
                    ids = np.concatenate([ids, separator_ids])
                    if is_validation(index, doc_index, settings.val_fraction, settings.seed):
                        val_buf.append(ids)
                        count["val_tokens"] += ids.size
                        count["val_documents"] += 1
                        count["val_bytes"] += len(text.encode("utf-8"))
                    else:
                        if limit is not None and count["train_tokens"] >= limit:
                            break  # over quota: leave it unread, so counts stay exact
                        train_buf.append(ids)
                        count["train_tokens"] += ids.size
                        count["train_bytes"] += len(text.encode("utf-8"))
                        pending += ids.size
                        bar.update(ids.size)
                    count["documents"] += 1
                    count.update(read_so_far)
                    if pending >= settings.shard_tokens:
                        state["source"] = index
                        flush()
                        pending = 0
            count["exhausted"] = limit is None or count["train_tokens"] < limit
            state["source"] = index + 1
            flush()
        bar.close()
        return _finish(out, state, settings, fingerprint, tokenizer)
    except WriteError:
        raise  # the disk, not the input: the same command resumes once there is room
    except TableFreeError as exc:
        _mark_failed(out, str(exc))
        raise


def _fresh_state(fingerprint: dict, n_sources: int) -> dict:
    count = dict(documents=0, train_tokens=0, train_bytes=0, val_tokens=0, val_documents=0, val_bytes=0,
                 **asdict(ReadCounts()))
    return {"settings": fingerprint, "source": 0, "shards": [], "counts": [dict(count) for _ in range(n_sources)]}


def _finished(out: Path, fingerprint: dict, force: bool) -> dict | None:
    """The manifest of a finished preparation with these settings; another one is refused, or with force removed."""
    if not (out / MANIFEST).exists():
        return None
    manifest = _read_own(out / MANIFEST, "data manifest", force, _manifest_problem)
    if manifest is not None and manifest.get("settings") == fingerprint:
        return manifest
    if not force:
        raise TableFreeError(
            f"{out} already holds data prepared with other settings ({_differences(manifest['settings'], fingerprint)}); "
            f"choose another --out, or pass --force to replace it"
        )
    _remove_outputs(out)
    return None


def _start_or_resume(out: Path, fingerprint: dict, n_sources: int, force: bool) -> dict:
    """The progress of an unfinished preparation with these settings, or a fresh start.

    An unfinished one with other settings is replaced when it failed, wrote no shard yet, or `force`
    says so; otherwise it is refused, since replacing it would lose work."""
    if (out / PROGRESS).exists():
        state = _read_own(out / PROGRESS, "preparation progress file", force)
        if state is not None and state["settings"] == fingerprint:
            state.pop("failed", None)
            return state
        if state is not None and state["shards"] and "failed" not in state and not force:
            raise TableFreeError(
                f"{out} holds an unfinished preparation with other settings ({_differences(state['settings'], fingerprint)}; "
                f"{len(state['shards'])} shards written): rerun the command that started it to resume, or pass --force "
                f"to discard it"
            )
    _remove_outputs(out)  # what an earlier run that stopped before its first progress left
    return _fresh_state(fingerprint, n_sources)


def _read_own(path: Path, what: str, force: bool, problem=lambda value: None) -> dict | None:
    """A manifest or progress file this module wrote; a damaged one is an error, or with force None."""
    try:
        value = files.read_json(path, what)
        if not isinstance(value, dict) or not isinstance(value.get("settings"), dict) or not isinstance(value.get("shards"), list):
            raise TableFreeError(f"the {what} {path} is damaged: it is not what tablefree writes")
        if problem(value):
            raise TableFreeError(f"the {what} {path} is damaged ({problem(value)})")
    except TableFreeError as exc:
        if force:
            return None
        raise TableFreeError(f"{exc}; or pass --force to discard it and prepare again") from None
    return value


def _differences(old: dict, new: dict) -> str:
    keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return f"{', '.join(keys)} differ" if keys else "they differ"


def _remove_outputs(out: Path) -> None:
    """Remove what this module writes in `out` (a directory marked as prepared data), nothing else."""
    for entry in out.iterdir():
        if _OUTPUT_NAME.match(entry.name):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()


def _mark_failed(out: Path, message: str) -> None:
    """Note in the progress file that the run stopped on bad input, so a corrected command may replace it."""
    try:
        state = json.loads((out / PROGRESS).read_text())
    except (OSError, ValueError):
        return  # no progress yet: the next run starts afresh anyway
    if isinstance(state, dict):
        state["failed"] = message
        files.write_json(out / PROGRESS, state)


def _save_tokenizer(tokenizer, target: Path) -> None:
    """Save the tokenizer directory whole or not at all (built beside it, then renamed into place)."""
    files.refuse_symlink(target)
    try:
        staging = files.new_temporary_dir(target)
        try:
            tokenizer.save_pretrained(str(staging))
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    except Exception as exc:
        if files.refused_write(exc):
            raise files.write_error(f"the tokenizer to {target}", exc) from None
        raise


def _finish(out: Path, state: dict, settings: PrepareSettings, fingerprint: dict, tokenizer) -> dict:
    counts = state["counts"]
    totals = {key: sum(c[key] for c in counts) for key in ("train_tokens", "val_tokens", "train_bytes", "val_bytes",
                                                            *asdict(ReadCounts()))}
    if totals["train_tokens"] == 0:
        left_out = f" ({totals['empty_documents']:,} empty documents, {totals['skipped_records']:,} records skipped)"
        raise TableFreeError(f"the corpus is empty: no document came from {', '.join(s.spec for s in settings.sources)}{left_out}")
    if totals["val_tokens"] == 0:
        raise TableFreeError(
            f"the validation split is empty ({sum(c['documents'] for c in counts)} documents, val_fraction "
            f"{settings.val_fraction}); give more documents or a larger --val-fraction"
        )
    manifest = {
        "format": FORMAT_VERSION,
        "settings": fingerprint,
        "tokenizer_hash": fingerprint["tokenizer_hash"],
        "dtype": fingerprint["dtype"],
        "separator_id": fingerprint["separator_id"],
        "separator_token": tokenizer.convert_ids_to_tokens(fingerprint["separator_id"]),
        "sources": [{**asdict(s), **c} for s, c in zip(settings.sources, counts)],
        **totals,
        "shards": state["shards"],
    }
    files.write_json(out / MANIFEST, manifest)
    (out / PROGRESS).unlink()
    return manifest


def read_manifest(data_dir: Path) -> dict:
    """The manifest of a prepared directory, checked; a missing or damaged one is a clear error."""
    path = data_dir / MANIFEST
    if not path.is_file():
        hint = " (preparation was interrupted; rerun `tablefree data prepare`)" if (data_dir / PROGRESS).exists() else ""
        raise TableFreeError(f"no prepared data at {data_dir}: {MANIFEST} is missing{hint}")
    manifest = files.read_json(path, "data manifest")
    problem = _manifest_problem(manifest)
    if problem:
        raise TableFreeError(f"the data manifest {path} is damaged ({problem}); prepare the data again")
    return manifest


def _manifest_problem(manifest) -> str | None:
    if not isinstance(manifest, dict):
        return "not a JSON object"
    if manifest.get("format", 1) not in (1, FORMAT_VERSION):
        return f"format {manifest.get('format')!r}; this tablefree reads formats 1 and {FORMAT_VERSION}"
    if manifest.get("dtype", "uint16") not in SHARD_DTYPES:
        return f"dtype {manifest.get('dtype')!r} is not one of {', '.join(SHARD_DTYPES)}"
    if not isinstance(manifest.get("tokenizer_hash"), str):
        return "no tokenizer_hash"
    if not isinstance(manifest.get("shards"), list):
        return "no shard list"
    for shard in manifest["shards"]:
        valid = (isinstance(shard, dict) and isinstance(shard.get("file"), str) and _SHARD_NAME.match(shard["file"])
                 and shard.get("split") in ("train", "val") and type(shard.get("tokens")) is int and shard["tokens"] > 0)
        if not valid:
            return f"shard entry {str(shard)[:200]} is not a shard file name, split and positive token count"
    return None


class TokenShards:
    """The shards of one split as memory maps; windows are read without loading a split into memory."""

    def __init__(self, data_dir: str | Path, split: str, expected_tokenizer_hash: str | None = None):
        self.dir = Path(data_dir)
        self.manifest = read_manifest(self.dir)
        if expected_tokenizer_hash is not None and self.manifest["tokenizer_hash"] != expected_tokenizer_hash:
            raise TableFreeError(
                f"the shards in {self.dir} were made with tokenizer {self.manifest['tokenizer_hash']}, but the "
                f"model uses tokenizer {expected_tokenizer_hash}: prepare the data with the model's tokenizer"
            )
        self.dtype = SHARD_DTYPES[self.manifest.get("dtype", "uint16")]  # format 1 wrote uint16 only
        self.arrays = []
        for shard in self.manifest["shards"]:
            if shard["split"] != split:
                continue
            path = self.dir / shard["file"]
            if not path.is_file() or path.stat().st_size != self.dtype.itemsize * shard["tokens"]:
                raise TableFreeError(f"shard {path} is missing or has the wrong size; prepare the data again")
            self.arrays.append(np.memmap(path, dtype=self.dtype, mode="r"))
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
    from .tokenizer import as_transformers, build_tokenizer, load_tokenizer, set_end_of_text

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
        bad_text=args.bad_text,
        bad_records=args.bad_records,
    )
    settings.check()
    if args.tokenizer_chars < 1:
        raise TableFreeError(f"--tokenizer-chars must be positive, got {args.tokenizer_chars}")
    out = Path(args.out)
    local = [Path(s.spec) for s in sources if s.kind == "file"]
    with files.output_lock(out, inputs=[*local, args.tokenizer]):  # before the slow part: a refusal comes at once
        claim_data_dir(out, settings, args.force, inputs=[args.tokenizer])
        earlier = _earlier_tokenizer(out, settings)
        if args.tokenizer:
            tokenizer = load_tokenizer(args.tokenizer)
        elif earlier is not None:
            tokenizer = load_tokenizer(earlier)  # a resumed run keeps the tokenizer it started with
        else:
            tokenizer = as_transformers(build_tokenizer(mixture_text(sources, args.tokenizer_chars, settings.read_options())))
        if args.eos_token is not None:
            set_end_of_text(tokenizer, args.eos_token)
        manifest = prepare(settings, out, tokenizer, progress=not args.quiet, force=args.force, inputs=[args.tokenizer])
    print(describe(manifest, out))
    return 0


def _earlier_tokenizer(out: Path, settings: PrepareSettings) -> Path | None:
    """The tokenizer directory of an earlier run of these very settings in `out`, or None."""
    wanted = json.loads(files.json_text(asdict(settings)))
    for name in (PROGRESS, MANIFEST):
        try:
            recorded = json.loads((out / name).read_text())["settings"]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # none, or damaged: prepare() names a damaged one
        if isinstance(recorded, dict) and all(recorded.get(k) == v for k, v in wanted.items()):
            if (out / TOKENIZER_DIR / "tokenizer.json").is_file():
                return out / TOKENIZER_DIR
    return None


def mixture_text(sources: list[Source], limit_chars: int, options: ReadOptions = ReadOptions()) -> Iterator[str]:
    """The first `limit_chars` characters of the mixture, split across sources by weight (to learn n-grams)."""
    total = sum(s.weight for s in sources)
    for source in sources:
        yield from leading_text(iter_documents(source, options), max(1, int(limit_chars * source.weight / total)))


def describe(manifest: dict, out: Path) -> str:
    lines = [f"prepared {out}: {manifest['train_tokens']:,} train + {manifest['val_tokens']:,} val tokens "
             f"({manifest.get('dtype', 'uint16')}), tokenizer {manifest['tokenizer_hash']}"]
    for s in manifest["sources"]:
        note = " (exhausted before its share)" if s["exhausted"] and manifest["settings"]["budget_tokens"] else ""
        left_out = [f"{s[key]:,} {what}" for key, what in (("replaced_characters", "characters replaced by U+FFFD"),
                                                           ("skipped_records", "records skipped"),
                                                           ("empty_documents", "empty documents left out"))
                    if s.get(key)]
        lines.append(f"  {s['spec']} weight {s['weight']:g}: {s['documents']:,} documents, {s['train_tokens']:,} "
                     f"train tokens{note}" + (f"; {', '.join(left_out)}" if left_out else ""))
    return "\n".join(lines)


def add_cli(subparsers) -> None:
    from .corpus import add_reading_options

    data = subparsers.add_parser("data")
    verbs = data.add_subparsers(dest="data_command", metavar="VERB", required=True)
    prep = verbs.add_parser("prepare", help="tokenise a weighted mixture into token shards + manifest")
    prep.add_argument("--source", action="append", default=None, metavar="SPEC[@WEIGHT]",
                      help="`embedded` (Python's documentation), `prose` (English prose shipped with tablefree), "
                           "a .txt/.jsonl/.parquet file, or hf:NAME[:CONFIG] "
                           "(e.g. hf:HuggingFaceFW/fineweb-edu:sample-10BT@0.7); repeat for a mixture")
    prep.add_argument("--out", required=True, help="output directory")
    prep.add_argument("--force", action="store_true",
                      help="write into a non-empty --out, or replace an earlier preparation there with other settings "
                           "(files tablefree did not write are never touched)")
    prep.add_argument("--tokenizer", help="tokenizer directory or tokenizer.json (default: build the code-point tokenizer)")
    prep.add_argument("--eos-token", default=None,
                      help="the token that separates documents (default: the tokenizer's own eos_token)")
    prep.add_argument("--tokenizer-chars", type=int, default=20_000_000, help="characters to learn n-gram slots from")
    prep.add_argument("--budget-tokens", type=int, default=None, help="train tokens over the mixture (default: all)")
    prep.add_argument("--val-fraction", type=float, default=PrepareSettings.val_fraction, help="fraction of documents held out")
    prep.add_argument("--shard-tokens", type=int, default=PrepareSettings.shard_tokens, help="tokens per shard file")
    prep.add_argument("--split", default="train", help="dataset split of hf: sources")
    add_reading_options(prep)
    prep.add_argument("--from-cache", action="store_true",
                      help="read hf: sources from the local datasets cache only, never the network")
    prep.add_argument("--seed", type=int, default=PrepareSettings.seed, help="seed of the validation split")
    prep.add_argument("--quiet", action="store_true", help="no progress bar")
    prep.set_defaults(run=lambda a: prepare_command(_default_sources(a)))


def _default_sources(args):
    args.source = args.source or ["embedded"]
    return args
