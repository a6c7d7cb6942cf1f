"""Continuous batching: one worker thread runs every forward pass; sequences join and leave between decode steps.

The running batch is one left-padded KV cache: every row's tokens sit right-aligned, so after each
step a row's real length alone gives its attention mask and next position. New sequences are
prefilled together, then their caches are padded to the batch's length and concatenated; finished or
cancelled rows are dropped and all-padding columns trimmed, so the cache never outgrows the longest
live sequence. Own scheduler, not transformers' continuous batching: with transformers 5.24,
`transformers serve --continuous-batching` on a GPT-NeoX model answers every request with
"PagedAttentionCache.update() missing 1 required positional argument: 'kwargs'" (checked again here).

Models whose `forward` takes token ids alone (nanoGPT-style research checkpoints: no cache, mask or
positions) run uncached instead: each step recomputes every whole, unpadded sequence, batching rows of
equal length, which is correct for any such model but costs O(n^2) per sequence.
"""

from __future__ import annotations

import collections
import contextlib
import inspect
import logging
import secrets
import threading
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from . import DRAFT_TOKENS, ServeLimits
from .decoder import SlotDecoder, unsupported
from .drafts import NgramDrafts, drafts_for
from .params import SamplingParams
from .precision import Int8Head, PackedLinear, output_head
from .sampling import NonFiniteLogits, Penalties, TokenSampler, finite_rows, top_logprobs
from .text import IncrementalText

log = logging.getLogger("tablefree.serve")

# Rows of a decode step that drafts may fill up to (`Engine._drafts`): at 1 to 8 rows a step reads about the same
# weights, so it costs little more than one row's (small-affine, int8: 1.49 ms at 1 row, 1.84 at 4, 2.33 at 8; float32
# 2.86, 3.67, 4.47); beyond that, rows of other sequences are the better use of a step.
DRAFT_STEP_ROWS = 8


class QueueFull(Exception):
    """The waiting queue is at its bound; the client should retry later."""


@dataclass
class TokenLogprob:
    token: int
    logprob: float | None  # None for a prompt's first token, which nothing predicts
    # (id, logprob): this token first, then the k most likely others (k + 1 pairs when it is outside the top k)
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class SequenceEvent:
    """What one step produced for one sequence; the last event of a sequence has a finish_reason."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    prompt_logprobs: list[TokenLogprob] | None = None
    error: str | None = None


class LoopSink:
    """A sequence's sink on an asyncio queue: each event goes on `queue` as (index, event), on the queue's loop.

    The engine hands over one step's events for one loop in one call, so the loop wakes once per step, not once per
    sequence (a wake-up is a write to the loop's socket, ~5% of a step of 8 rows of the tiny model).
    """

    def __init__(self, loop, queue, index: int):
        self.loop, self.queue, self.index = loop, queue, index

    def __call__(self, event: SequenceEvent) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (self.index, event))


def _put_all(items: list[tuple[LoopSink, SequenceEvent]]) -> None:
    for sink, event in items:
        sink.queue.put_nowait((sink.index, event))


def hand_over(outbox: list[tuple[Sequence, SequenceEvent]]) -> None:
    """Hands one step's events to their sequences' sinks: those on one event loop in one call, so a consumer on another
    thread (the server's event loop) wakes once per step, not once per row, and does not contend for the GIL while the
    rows are being handled. A sink that refuses an event ends its sequence: nobody is left to serve."""
    by_loop: dict = {}
    for seq, event in outbox:
        if isinstance(seq.sink, LoopSink):
            by_loop.setdefault(seq.sink.loop, []).append((seq, event))
            continue
        try:
            seq.sink(event)
        except Exception:  # the consumer is gone
            log.exception("a sequence's consumer refused an event; ending the sequence")
            seq.finished = True
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, [(seq.sink, event) for seq, event in items])
        except Exception:  # the loop is closed
            log.exception("an event loop refused %d events; ending their sequences", len(items))
            for seq, _ in items:
                seq.finished = True


class Sequence:
    """One choice of one request: its prompt, sampling fields, output so far and where its events go."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, tokenizer, sink, eos_ids: set[int], choice: int = 0):
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.sink = sink
        self.choice = choice
        self.eos_ids = set() if params.ignore_eos else set(eos_ids)
        self.stop_ids = set(params.stop_token_ids)
        self.output_ids: list[int] = []
        self.text = IncrementalText(tokenizer, params.stop, params.skip_special_tokens)
        # Choice i of a seeded request draws from seed + i, so n > 1 differs yet repeats exactly.
        self.generator = None if params.seed is None else torch.Generator().manual_seed((params.seed + choice) % 2**64)
        self.penalties: Penalties | None = None  # the sampler builds it on the first step that needs it
        self.drafts: NgramDrafts | None = None  # the engine builds it on the first decode step that may draft
        self.request: object | None = None  # what `Engine.submit` received it with: its request
        self.on_cancel = None  # called with the sequence by `cancel`: an engine in another process passes it on
        self.cancelled = False
        self.finished = False

    def cancel(self) -> None:
        self.cancelled = True
        if self.on_cancel is not None:
            self.on_cancel(self)

    @property
    def cached_tokens(self) -> int:
        """Tokens the model has read: all but the last output token, which the next decode step feeds."""
        return len(self.prompt_ids) + len(self.output_ids) - 1

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids


def cache_argument(model) -> str | None:
    """The keyword `model.forward` takes its KV cache by, or None when it cannot run the KV-cached batch.

    The batch needs a cache, an attention mask (left padding) and position ids; a forward without all three
    (say nanoGPT's `forward(idx)`) gets the uncached path.
    """
    params = inspect.signature(model.forward).parameters
    # transformers 5 names the cache argument `cache`; remote-code models may still say `past_key_values`.
    cache = next((name for name in ("cache", "past_key_values") if name in params), None)
    return cache if cache and "attention_mask" in params and "position_ids" in params else None


def why_not_slots(model) -> str | None:
    """Why the engine cannot decode `model` through SlotDecoder (it then runs the model's own forward), or None."""
    if cache_argument(model) is None:
        return "its forward takes no KV cache"
    return unsupported(model)


def output_logits(output) -> torch.Tensor:
    """The logits of a forward pass that returned them bare, first in a tuple (nanoGPT's `logits, loss`) or as `.logits`."""
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, (tuple, list)) and output:
        logits = output[0]
    if logits is None and isinstance(output, torch.Tensor):
        logits = output
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise TypeError(f"the model's forward returned {type(output).__name__}; expected logits of shape (batch, tokens, "
                        f"vocabulary), bare, first in a tuple or as .logits")
    return logits


def _rows_of(tensor: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """tensor[rows]: a view when the rows are consecutive (a step's logits are 256 KiB a row: a gather copies them)."""
    if rows == list(range(rows[0], rows[0] + len(rows))):
        return tensor[rows[0] : rows[0] + len(rows)]
    return tensor[rows]


def _prompt_key(seq: Sequence) -> tuple:
    """Sequences with equal keys share one prefill: the same prompt, scored (to the same depth) or not."""
    return tuple(seq.prompt_ids), seq.params.logprobs if seq.params.prompt_logprobs else None


def end_of_sequence_ids(model, tokenizer) -> set[int]:
    """The ids that end a sequence: the generation config's eos ids and the tokenizer's eos token."""
    config = getattr(model, "generation_config", None)
    eos = config.eos_token_id if config is not None else None
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


class Engine:
    """Owns the model; `submit` queues sequences from any thread, the worker thread streams their events back.

    A fault while serving one sequence ends that sequence alone with an error event: a batched forward pass
    that fails is retried row by row to find whose it is, and every other row goes on as if alone.
    One request holds at most `max_rows_per_request` rows of the batch (half of it by default), so a request of
    many sequences never keeps the next request waiting for its rows to finish.
    """

    def __init__(self, model, tokenizer, *, max_batch_size: int = ServeLimits.max_batch_size, max_model_len: int,
                 max_queue: int = ServeLimits.max_queue,
                 max_prefill_tokens: int = 4096, seed: int | None = None, threads: int | None = None,
                 max_rows_per_request: int | None = None, head: Int8Head | None = None, lower_body: bool = False,
                 slots: bool = True, draft_tokens: int = DRAFT_TOKENS, deliver=hand_over):
        """`deliver` receives each phase's events as one list of (sequence, event); by default `hand_over`.
        `lower_body`: decode steps run the body's linear layers as int8 weights (`choose_precision`).
        `slots`: GPT-NeoX-shaped models decode through SlotDecoder; False: through their own forward (the reference
        the benchmarks and tests hold it to).
        `draft_tokens`: tokens a greedy row, or a plain sampled one decoding alone, may guess from its own text and have
        checked in the step that feeds its last token (`drafts`), while a step has room (DRAFT_STEP_ROWS); 0: none.
        Through SlotDecoder only."""
        if draft_tokens < 0:
            raise ValueError(f"draft_tokens must be 0 or more, got {draft_tokens}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_rows_per_request = max_rows_per_request or max(1, max_batch_size // 2)
        self.max_model_len = max_model_len
        self.max_queue = max_queue
        self.max_prefill_tokens = max_prefill_tokens
        self.threads = threads
        self.vocab_size = model.config.vocab_size
        self.device = next(model.parameters()).device
        # Unseeded requests share one generator; its seed is drawn without reseeding torch's global one.
        self.sampler = TokenSampler(seed if seed is not None else secrets.randbits(63))
        self._cache_arg = cache_argument(model)  # None: the uncached path
        self._pending: collections.deque[Sequence] = collections.deque()
        self._wake = threading.Condition()
        self._stopping = False
        self._rows: list[Sequence] = []
        self._cache: DynamicCache | None = None
        # GPT-NeoX-shaped models decode through SlotDecoder (its KV cache of slots in place of self._cache).
        unfit = why_not_slots(model) if slots else "the engine was asked to decode through its forward"
        if lower_body and unfit:
            raise ValueError(f"int8 body weights need the engine's GPT-NeoX decode step, and {unfit}")
        self._slots = None if unfit else SlotDecoder(model, max_batch_size, max_model_len, lower_body)
        self.draft_tokens = draft_tokens if self._slots is not None else 0
        # Why int8 body weights run through torch's kernels rather than the native body (None: natively, or float32).
        self.native_problem = self._slots.native_problem if self._slots is not None else None
        self.guessed = self.held = 0  # draft tokens checked so far, and those that were the model's own choice
        self._outbox: list[tuple[Sequence, SequenceEvent]] = []  # this phase's events, handed out together
        self._deliver_events = deliver
        # The output head every pass runs: a lower-precision one when given (`choose_precision`), else the model's own,
        # prepacked for the passes that keep the last positions only (every decode step).
        self._head = head
        self._packed_head = None if head is not None else PackedLinear.of(output_head(model))
        self._thread = threading.Thread(target=self._run, name="tablefree-engine", daemon=True)

    # ---- any thread ----
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout=30)

    def submit(self, sequences: list[Sequence]) -> None:
        """Queues one request's sequences."""
        request = object()
        for seq in sequences:
            seq.request = request
        with self._wake:
            if len(sequences) > self.max_queue:
                raise ValueError(f"{len(sequences)} sequences in one request is over the queue's bound of {self.max_queue}")
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if len(self._pending) + len(sequences) > self.max_queue:
                raise QueueFull(f"{len(self._pending)} sequences are waiting (limit {self.max_queue})")
            self._pending.extend(sequences)
            self._wake.notify()

    @property
    def waiting(self) -> int:
        return len(self._pending)

    @property
    def running(self) -> int:
        return len(self._rows)

    @property
    def draft_counts(self) -> tuple[int, int]:
        """(tokens guessed by drafts and checked, those of them that held) since the engine started."""
        return self.guessed, self.held

    @property
    def cached(self) -> bool:
        """Whether the batch keeps a KV cache between steps (else every step recomputes whole sequences)."""
        return self._cache_arg is not None

    @property
    def failure(self) -> str | None:
        """Why the engine can serve no more, or None while it can (the worker thread ends only on `stop`)."""
        return None

    # ---- worker thread ----
    def _run(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)  # set here: OpenMP thread counts are per calling thread
        while True:
            with self._wake:
                while not self._pending and not self._rows and not self._stopping:
                    self._wake.wait()
                if self._stopping:
                    break
            self.step()
        for seq in list(self._pending) + self._rows:
            self._emit(seq, SequenceEvent("", [], finish_reason="abort", error="the server stopped"))
        self._deliver()

    @torch.inference_mode()  # no_grad, and no version counters or views tracked: 4-7% more tokens/s in process
    def step(self) -> None:
        """One round: admit waiting sequences and prefill them, then one decode step for every live row."""
        with self._wake:
            admitted = self._admit()
        try:
            for group in self._prefill_groups(admitted):
                self._prefill(group)
            self._deliver()  # first tokens go out before the decode step, not after it
            self._drop_done()
            if self._rows:
                self._decode()
                self._drop_done()
        except Exception as exc:  # a fault no single sequence explains (an engine bug): fail this batch, keep serving
            log.exception("engine step failed")
            for seq in self._rows + admitted:
                self._fail(seq, f"the engine step failed: {type(exc).__name__}: {exc}")
            self._rows, self._cache = [], None
            if self._slots is not None:
                self._slots.clear()
        finally:
            self._deliver()

    def _admit(self) -> list[Sequence]:
        """Waiting sequences in arrival order, within the batch, the prefill budget (a prompt already admitted this
        step is free: it is prefilled once) and each request's share of rows (its further sequences wait)."""
        admitted, budget, skipped = [], self.max_prefill_tokens, []
        rows = collections.Counter(seq.request for seq in self._rows)
        prompts = set()
        while self._pending and len(self._rows) + len(admitted) < self.max_batch_size:
            seq = self._pending[0]
            key = _prompt_key(seq)
            cost = 0 if key in prompts else len(seq.prompt_ids)
            if admitted and cost > budget:
                break
            self._pending.popleft()
            if rows[seq.request] >= self.max_rows_per_request and not seq.cancelled:
                skipped.append(seq)
                continue
            if self._admissible(seq):
                budget -= cost
                prompts.add(key)
                rows[seq.request] += 1
                admitted.append(seq)
        self._pending.extendleft(reversed(skipped))  # back at the front, in their order
        return admitted

    def _admissible(self, seq: Sequence) -> bool:
        """Whether `seq` can be served; one that cannot is ended here, with the reason."""
        if seq.cancelled:
            self._emit(seq, SequenceEvent("", [], finish_reason="abort"))
            return False
        with self._alone(seq, "checking the sequence"):
            problem = self._problem(seq)
            if problem is None:
                return True
            self._fail(seq, problem)
        return False

    def _problem(self, seq: Sequence) -> str | None:
        """Why this sequence cannot be served, if it cannot (the HTTP layer checks first; other callers may not)."""
        prompt = seq.prompt_ids
        if not prompt:
            return "the prompt is empty; give at least one token"
        bad = [t for t in prompt if not (isinstance(t, int) and 0 <= t < self.vocab_size)]
        if bad:
            return f"prompt token {bad[0]!r} is not an id in [0, {self.vocab_size})"
        room = self.max_model_len - (1 if seq.params.max_tokens > 0 else 0)
        if len(prompt) > room:
            return f"the prompt has {len(prompt)} tokens; the context of {self.max_model_len} leaves no room for it"
        try:
            seq.params.check()
        except ValueError as exc:
            return str(exc)
        return None

    def _prefill_groups(self, admitted: list[Sequence]) -> list[list[Sequence]]:
        # A prompt to score (echo + logprobs) needs every position's logits: prefill it alone (with its copies).
        scored: dict[tuple, list[Sequence]] = {}
        for seq in admitted:
            if seq.params.prompt_logprobs:
                scored.setdefault(_prompt_key(seq), []).append(seq)
        batched = [s for s in admitted if not s.params.prompt_logprobs]
        return list(scored.values()) + ([batched] if batched else [])

    def _forward(self, ids, mask, positions, cache, keep):
        kwargs = {self._cache_arg: cache}
        with self._head_for(last_only=keep == 1):
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                             logits_to_keep=keep, **kwargs)
        return out.logits, getattr(out, "cache", None) or out.past_key_values

    @contextlib.contextmanager
    def _head_for(self, last_only: bool):
        """The model's head runs the engine's lower-precision head, or its prepacked copy when `last_only`, for one
        pass."""
        instead = self._head or (self._packed_head if last_only else None)
        head = self.model.get_output_embeddings() if instead is not None else None
        if head is None:
            yield
            return
        head.forward = instead  # an instance attribute: the module still runs its hooks around it
        try:
            yield
        finally:  # outside this pass the model is as it was loaded
            del head.forward

    def _prefill(self, group: list[Sequence]) -> None:
        """Runs the prompts of `group` together, each distinct prompt once (the n choices of a request share theirs);
        if that fails, each alone, so only a prompt that fails by itself ends."""
        firsts, row_of = [], []  # one sequence per distinct prompt; the row of each sequence's prompt
        rows = {}
        for seq in group:
            row = rows.setdefault(_prompt_key(seq), len(firsts))
            if row == len(firsts):
                firsts.append(seq)
            row_of.append(row)
        try:
            logits, layers = self._prefill_forward(firsts)
        except Exception as exc:
            if len(firsts) == 1:
                log.exception("prefill failed for one prompt")
                for seq in group:
                    self._fail(seq, f"the forward pass over the prompt failed: {type(exc).__name__}: {exc}")
                return
            log.warning("a prefill of %d prompts failed (%s: %s); retrying them one by one", len(firsts), type(exc).__name__, exc)
            for row, first in enumerate(firsts):
                self._prefill([seq for seq, r in zip(group, row_of) if r == row])
            return
        scores = [None] * len(firsts)
        for row, first in enumerate(firsts):
            if first.params.prompt_logprobs:
                try:
                    scores[row] = self._score_prompt(first, logits[row])
                except Exception as exc:
                    log.exception("scoring the prompt failed")
                    for seq, r in zip(group, row_of):
                        if r == row:
                            self._fail(seq, f"scoring the prompt failed: {type(exc).__name__}: {exc}")
        last = logits[:, -1]
        if len(firsts) < len(group):  # copies of a prompt get its cache and last logits, not a forward of their own
            index = torch.tensor(row_of, device=last.device)
            last = last.index_select(0, index)
            if layers is not None:
                layers = [(k.index_select(0, index), v.index_select(0, index)) for k, v in layers]
        self._join(group, layers)
        self._next_tokens(group, last, [scores[r] for r in row_of])

    def _prefill_forward(self, group: list[Sequence]):
        """(logits, per-layer (keys, values)) of the left-padded prompts of `group`; no layers on the uncached path."""
        every_position = bool(group[0].params.prompt_logprobs)
        if not self.cached:
            return self._uncached_forward([s.prompt_ids for s in group], every_position), None
        width = max(len(s.prompt_ids) for s in group)
        ids = torch.full((len(group), width), self._pad_id(), dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for row, seq in enumerate(group):
            ids[row, width - len(seq.prompt_ids):] = torch.tensor(seq.prompt_ids)
            mask[row, width - len(seq.prompt_ids):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        keep = 0 if every_position else 1
        logits, cache = self._forward(ids.to(self.device), mask.to(self.device), positions.to(self.device), cache, keep)
        # Padded positions hold junk (even NaN) that a zero attention weight would still spread: clear it.
        real = mask.to(self.device).bool()[:, None, :, None]
        layers = [(torch.where(real, layer.keys, 0), torch.where(real, layer.values, 0)) for layer in cache.layers]
        return logits, layers

    def _uncached_forward(self, sequences: list[list[int]], every_position: bool = False) -> torch.Tensor:
        """Logits of whole unpadded sequences, one forward per length: (rows, 1, V), or every position of one row."""
        rows_by_length = collections.defaultdict(list)
        for row, ids in enumerate(sequences):
            rows_by_length[len(ids)].append(row)
        logits: list[torch.Tensor | None] = [None] * len(sequences)
        for length, rows in rows_by_length.items():
            ids = torch.tensor([sequences[row] for row in rows], dtype=torch.long, device=self.device)
            with self._head_for(last_only=False):
                out = output_logits(self.model(ids))
            if every_position and out.shape[1] != length:
                raise ValueError(f"the model returns logits for {out.shape[1]} of {length} positions, so it cannot "
                                 f"score a prompt (echo with logprobs)")
            for row, row_logits in zip(rows, out if every_position else out[:, -1:]):
                logits[row] = row_logits
        return torch.stack(logits)

    def _score_prompt(self, seq: Sequence, logits: torch.Tensor) -> list[TokenLogprob]:
        """Logprob of each prompt token given the ones before it (in chunks: V-wide rows are large)."""
        scores = [TokenLogprob(seq.prompt_ids[0], None)]
        targets = seq.prompt_ids[1:]
        for start in range(0, len(targets), 256):
            chunk = targets[start : start + 256]
            chunk_logits = logits[start : start + len(chunk)].float()
            if not all(finite_rows(chunk_logits)):
                raise NonFiniteLogits("the model produced non-finite logits (NaN or infinity) over this prompt")
            tops = top_logprobs(torch.log_softmax(chunk_logits, dim=-1), [seq.params.logprobs or 0] * len(chunk), chunk)
            scores.extend(TokenLogprob(token, top[0][1], top) for token, top in zip(chunk, tops))
        return scores

    def _join(self, group: list[Sequence], layers: list[tuple[torch.Tensor, torch.Tensor]] | None) -> None:
        if layers is None:  # uncached: nothing outlives a step
            self._rows = self._rows + group
            return
        if self._slots is not None:
            self._slots.add(layers, [len(seq.prompt_ids) for seq in group])
            self._rows = self._rows + group
            return
        if self._rows:
            old = [(layer.keys, layer.values) for layer in self._cache.layers]
            width = max(old[0][0].shape[-2], layers[0][0].shape[-2])
            pad = lambda t: F.pad(t, (0, 0, width - t.shape[-2], 0))  # noqa: E731  left-pad the sequence axis
            layers = [(torch.cat([pad(ok), pad(k)]), torch.cat([pad(ov), pad(v)])) for (ok, ov), (k, v) in zip(old, layers)]
        self._rows = self._rows + group
        self._cache = DynamicCache(ddp_cache_data=layers, config=self.model.config)

    def _drop_done(self) -> None:
        """Drops finished and cancelled rows (a cancelled one still gets an event, to release whoever awaits it)."""
        for seq in self._rows:
            if seq.cancelled and not seq.finished:
                self._emit(seq, SequenceEvent("", [], finish_reason="abort"))
        keep = [i for i, s in enumerate(self._rows) if not s.finished]
        if len(keep) == len(self._rows):
            return
        if self._slots is not None:
            self._rows = [self._rows[i] for i in self._slots.keep(keep)]
            return
        self._rows = [self._rows[i] for i in keep]
        if not self._rows or not self.cached:
            self._cache = None
            return
        width = max(s.cached_tokens for s in self._rows)
        index = torch.tensor(keep, device=self.device)
        layers = [(layer.keys[index, :, -width:], layer.values[index, :, -width:]) for layer in self._cache.layers]
        self._cache = DynamicCache(ddp_cache_data=layers, config=self.model.config)

    def _decode(self) -> None:
        if self._slots is not None:
            self._decode_slots()
            return
        # The forward appends new tensors to the cache and never edits these, so a failed step can restart from them.
        before = [(layer.keys, layer.values) for layer in self._cache.layers] if self.cached else None
        try:
            logits, self._cache = self._decode_forward(self._rows, self._cache)
        except Exception as exc:
            log.warning("a decode step of %d rows failed (%s: %s); retrying them one by one", len(self._rows),
                        type(exc).__name__, exc)
            logits = self._decode_one_by_one(before)
        self._next_tokens(self._rows, logits[:, -1])

    def _decode_slots(self) -> None:
        """One step of every row through SlotDecoder, with the rows' drafts when any has one; if it fails, each row
        alone without drafts (a step only writes each row's own new positions, so a retry reads the cache as it was),
        and rows that fail alone end."""
        rows = self._rows
        drafts = self._drafts(rows)
        if drafts is not None:
            try:
                logits = self._drafted_step(rows, drafts)
            except Exception as exc:
                log.warning("a decode step of %d rows and their drafts failed (%s: %s); stepping without drafts",
                            len(rows), type(exc).__name__, exc)
            else:
                self._next_tokens(rows, logits[:, -1], drafts=drafts)
                return
        ids = torch.tensor([s.output_ids[-1] for s in rows])
        positions = torch.tensor([s.cached_tokens for s in rows])
        try:
            logits = self._slot_step(ids, positions, 0)
        except Exception as exc:
            log.warning("a decode step of %d rows failed (%s: %s); retrying them one by one", len(rows),
                        type(exc).__name__, exc)
            survivors, parts = [], []
            for i, seq in enumerate(rows):
                try:
                    parts.append(self._slot_step(ids[i : i + 1], positions[i : i + 1], i))
                    survivors.append(i)
                except Exception as exc:
                    log.exception("decode failed for one sequence")
                    self._fail(seq, f"the forward pass failed: {type(exc).__name__}: {exc}")
            order = self._slots.keep(survivors)
            self._rows = [rows[i] for i in order]
            if not self._rows:
                return
            by_row = dict(zip(survivors, parts))
            logits = torch.cat([by_row[i] for i in order])
        self._next_tokens(self._rows, logits[:, -1])

    def _slot_step(self, ids: torch.Tensor, positions: torch.Tensor, first: int,
                   slots: list[int] | None = None) -> torch.Tensor:
        with self._head_for(last_only=True):
            return self._slots.step(ids, positions, first, head=self.model.get_output_embeddings(), slots=slots)

    def _drafts(self, rows: list[Sequence]) -> list[list[int]] | None:
        """Each row's guessed next tokens (`drafts`), within a step of DRAFT_STEP_ROWS rows shared out evenly; None when
        no row has one."""
        room = DRAFT_STEP_ROWS - len(rows)
        if not self.draft_tokens or room <= 0:
            return None
        share = max(1, room // len(rows))
        drafts: list[list[int]] = []
        for seq in rows:
            draft: list[int] = []
            if room > 0 and drafts_for(seq.params, alone=len(rows) == 1):
                if seq.drafts is None:
                    seq.drafts = NgramDrafts(self.draft_tokens)
                # Every token a guess could bring must fit the request's max_tokens and the context.
                fits = min(seq.params.max_tokens - len(seq.output_ids) - 1, self.max_model_len - 1 - seq.cached_tokens,
                           share, room)
                draft = seq.drafts.propose(seq.prompt_ids, seq.output_ids, fits)
                room -= len(draft)
            drafts.append(draft)
        return drafts if any(drafts) else None

    def _drafted_step(self, rows: list[Sequence], drafts: list[list[int]]) -> torch.Tensor:
        """Logits of one step whose rows are each sequence's last token, then its draft's tokens, all in its slot."""
        ids, positions, slots = [], [], []
        for slot, (seq, draft) in enumerate(zip(rows, drafts)):
            start = seq.cached_tokens
            for offset, token in enumerate([seq.output_ids[-1], *draft]):
                ids.append(token)
                positions.append(start + offset)
                slots.append(slot)
        return self._slot_step(torch.tensor(ids), torch.tensor(positions), 0, slots)

    def _decode_forward(self, rows: list[Sequence], cache: DynamicCache | None):
        """(logits, cache) of one step for `rows`: their last token through the cache, or whole sequences uncached."""
        if not self.cached:
            return self._uncached_forward([s.token_ids for s in rows]), None
        width = cache.get_seq_length() + 1
        lengths = torch.tensor([s.cached_tokens + 1 for s in rows])
        mask = (torch.arange(width)[None, :] >= (width - lengths)[:, None]).long()
        ids = torch.tensor([[s.output_ids[-1]] for s in rows])
        positions = torch.tensor([[s.cached_tokens] for s in rows])
        return self._forward(ids.to(self.device), mask.to(self.device), positions.to(self.device), cache, 1)

    def _decode_one_by_one(self, before: list[tuple[torch.Tensor, torch.Tensor]] | None) -> torch.Tensor:
        """Steps each row alone from the cache as it was; rows that fail alone end, the rest form the new batch."""
        survivors, logits, layers = [], [], []
        for i, seq in enumerate(self._rows):
            cache = None if before is None else DynamicCache(
                ddp_cache_data=[(k[i : i + 1], v[i : i + 1]) for k, v in before], config=self.model.config)
            try:
                row_logits, cache = self._decode_forward([seq], cache)
            except Exception as exc:
                log.exception("decode failed for one sequence")
                self._fail(seq, f"the forward pass failed: {type(exc).__name__}: {exc}")
                continue
            survivors.append(seq)
            logits.append(row_logits)
            if cache is not None:
                layers.append([(layer.keys, layer.values) for layer in cache.layers])
        self._rows = survivors
        if not survivors or before is None:
            self._cache = None
            return torch.cat(logits) if survivors else torch.empty(0, 1, self.vocab_size, device=self.device)
        joined = [(torch.cat([row[n][0] for row in layers]), torch.cat([row[n][1] for row in layers])) for n in range(len(before))]
        self._cache = DynamicCache(ddp_cache_data=joined, config=self.model.config)
        return torch.cat(logits)

    def _next_tokens(self, rows: list[Sequence], last: torch.Tensor, prompt_scores: list | None = None,
                     drafts: list[list[int]] | None = None) -> None:
        """Samples each row's next token from `last` and hands it out; a row that fails anywhere here ends alone.
        With `drafts`, sequence i has 1 + len(drafts[i]) rows of `last`, in order: its tokens are the choices at its
        rows up to the first row fed a guess that was not the choice before it (`drafts`)."""
        prompt_scores = prompt_scores or [None] * len(rows)
        drafts = drafts or [[]] * len(rows)
        for row, seq in enumerate(rows):
            if seq.params.max_tokens == 0 and not seq.finished:  # scoring only: the prompt was all it asked for
                self._emit(seq, SequenceEvent("", [], finish_reason="length", prompt_logprobs=prompt_scores[row]))
        first_row = [0]
        for draft in drafts:
            first_row.append(first_row[-1] + 1 + len(draft))
        live = [i for i, seq in enumerate(rows) if not seq.finished]
        if not live:
            return
        picked = [r for i in live for r in range(first_row[i], first_row[i + 1])]
        last = last if len(picked) == len(last) else _rows_of(last, picked)
        live_rows = [rows[i] for i in live for _ in range(1 + len(drafts[i]))]
        wanted = [j for j, s in enumerate(live_rows) if s.params.logprobs is not None]
        # Before sampling, which changes the logits in place: logprobs are the model's, as vLLM reports them.
        logprobs = torch.log_softmax(last[wanted].float(), dim=-1) if wanted else None
        choices = self._choices(last, live_rows, [drafts[i] for i in live])
        scores = self._token_logprobs(logprobs, wanted, live_rows, choices)
        j = 0
        for i in live:
            seq, draft = rows[i], drafts[i]
            held = 0
            for offset in range(1 + len(draft)):
                choice = choices[j + offset]
                if isinstance(choice, Exception):
                    self._fail(seq, f"sampling failed: {choice}")
                    break
                with self._alone(seq, "handing out the token"):
                    self._append(seq, choice, scores[j + offset], prompt_scores[i] if offset == 0 else None)
                if seq.finished or offset == len(draft) or choice != draft[offset]:
                    break
                held += 1
            if draft:
                seq.drafts.checked(len(draft), held)
                self.guessed += len(draft)
                self.held += held
            j += 1 + len(draft)

    def _choices(self, last: torch.Tensor, rows: list[Sequence], drafts: list[list[int]]) -> list:
        """The choice at each row of `last` (`rows`: each row's sequence; `drafts`: each sequence's draft, in order):
        the sampler's for every row but those of sampled sequences with a draft, which speculate."""
        spans, row = [], 0
        for draft in drafts:
            seq = rows[row]
            if draft and not seq.params.greedy:
                spans.append((row, seq, draft))
            row += 1 + len(draft)
        if not spans:
            return self.sampler.sample(last, rows)
        mine = [r for start, _, draft in spans for r in range(start, start + 1 + len(draft))]
        apart = set(mine)
        others = [r for r in range(len(rows)) if r not in apart]
        choices: list = [None] * len(rows)
        if others:
            for r, choice in zip(others, self.sampler.sample(_rows_of(last, others), [rows[r] for r in others])):
                choices[r] = choice
        try:
            groups = [(draft, seq.params.temperature) for _, seq, draft in spans]
            got = self.sampler.speculate(_rows_of(last, mine), groups)
        except Exception as exc:  # these sequences' draws failed (a bug: nothing here is one row's): they end
            log.exception("speculative sampling failed")
            got = [exc] * len(mine)
        for r, choice in zip(mine, got):
            choices[r] = choice
        return choices

    @staticmethod
    def _token_logprobs(logprobs, wanted: list[int], rows: list[Sequence], choices: list) -> list[TokenLogprob | None]:
        """The chosen token's logprob and top list for each row that asked for logprobs: one top-k over those rows."""
        out: list[TokenLogprob | None] = [None] * len(rows)
        ok = [j for j, i in enumerate(wanted) if not isinstance(choices[i], Exception)]
        if ok:
            picked = [choices[wanted[j]] for j in ok]
            tops = top_logprobs(logprobs[ok], [rows[wanted[j]].params.logprobs for j in ok], picked)
            for j, token, top in zip(ok, picked, tops):
                out[wanted[j]] = TokenLogprob(token, top[0][1], top)
        return out

    def _append(self, seq: Sequence, token: int, logprob: TokenLogprob | None, prompt_scores=None) -> None:
        seq.output_ids.append(token)
        finish = None
        if token in seq.eos_ids or token in seq.stop_ids:
            finish = "stop"
            text = seq.text.finish()
        else:
            text, hit = seq.text.add(token)
            if hit:
                finish = "stop"
            elif len(seq.output_ids) >= seq.params.max_tokens or len(seq.token_ids) >= self.max_model_len:
                finish = "length"
                text += seq.text.finish()
        self._emit(seq, SequenceEvent(text, [token], None if logprob is None else [logprob], finish, prompt_scores))

    @contextlib.contextmanager
    def _alone(self, seq: Sequence, what: str):
        """A fault inside this block is `seq`'s alone: it ends `seq` with an error event and the batch goes on."""
        try:
            yield
        except Exception as exc:
            log.exception("%s failed for one sequence", what)
            self._fail(seq, f"{what} failed: {type(exc).__name__}: {exc}")

    def _fail(self, seq: Sequence, message: str) -> None:
        if not seq.finished:
            self._emit(seq, SequenceEvent("", [], finish_reason="error", error=message))

    def _emit(self, seq: Sequence, event: SequenceEvent) -> None:
        """Queues `event` for the sequence's consumer; the one with a finish_reason is the last it ever gets."""
        if seq.finished:
            return
        if event.finish_reason:
            seq.finished = True
        self._outbox.append((seq, event))

    def _deliver(self) -> None:
        """Hands out this phase's queued events in one burst (`deliver`)."""
        outbox, self._outbox = self._outbox, []
        if outbox:
            self._deliver_events(outbox)

    def _pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id if self.tokenizer is not None else None
        return pad if pad is not None else 0
