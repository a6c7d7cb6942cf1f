"""Continuous batching: one worker thread runs every forward pass; sequences join and leave between decode steps.

The running batch is one left-padded KV cache: every row's tokens sit right-aligned, so after each
step a row's real length alone gives its attention mask and next position. New sequences are
prefilled together, then their caches are padded to the batch's length and concatenated; finished or
cancelled rows are dropped and all-padding columns trimmed, so the cache never outgrows the longest
live sequence. Own scheduler, not transformers' continuous batching: with transformers 5.24,
`transformers serve --continuous-batching` on a GPT-NeoX model answers every request with
"PagedAttentionCache.update() missing 1 required positional argument: 'kwargs'" (checked again here).
"""

from __future__ import annotations

import collections
import inspect
import logging
import threading
import traceback
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from .sampling import SamplingParams, TokenSampler, top_logprobs
from .text import IncrementalText

log = logging.getLogger("tablefree.serve")


class QueueFull(Exception):
    """The waiting queue is at its bound; the client should retry later."""


@dataclass
class TokenLogprob:
    token: int
    logprob: float | None  # None for a prompt's first token, which nothing predicts
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


class Sequence:
    """One choice of one request: its prompt, sampling fields, output so far and where its events go."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, tokenizer, sink, eos_ids: set[int], choice: int = 0):
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.sink = sink
        self.eos_ids = set() if params.ignore_eos else set(eos_ids)
        self.stop_ids = set(params.stop_token_ids)
        self.output_ids: list[int] = []
        self.text = IncrementalText(tokenizer, params.stop, params.skip_special_tokens)
        # Choice i of a seeded request draws from seed + i, so n > 1 differs yet repeats exactly.
        self.generator = None if params.seed is None else torch.Generator().manual_seed((params.seed + choice) % 2**64)
        self.cache_len = 0
        self.cancelled = False
        self.finished = False

    def cancel(self) -> None:
        self.cancelled = True


class Engine:
    """Owns the model; `submit` queues sequences from any thread, the worker thread streams their events back."""

    def __init__(self, model, tokenizer, *, max_batch_size: int = 32, max_model_len: int, max_queue: int = 512,
                 max_prefill_tokens: int = 4096, eos_ids: set[int], seed: int | None = None, threads: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_model_len = max_model_len
        self.max_queue = max_queue
        self.max_prefill_tokens = max_prefill_tokens
        self.eos_ids = eos_ids
        self.threads = threads
        self.device = next(model.parameters()).device
        self.sampler = TokenSampler(seed if seed is not None else int(torch.seed() % 2**63))
        # transformers 5 names the cache argument `cache`; remote-code models may still say `past_key_values`.
        params = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._pending: collections.deque[Sequence] = collections.deque()
        self._wake = threading.Condition()
        self._stopping = False
        self._rows: list[Sequence] = []
        self._cache: DynamicCache | None = None
        self._thread = threading.Thread(target=self._run, name="tablefree-engine", daemon=True)
        self.steps = 0

    # ---- any thread ----
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout=30)

    def submit(self, sequences: list[Sequence]) -> None:
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

    # ---- worker thread ----
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        if self.threads:
            torch.set_num_threads(self.threads)  # set here: OpenMP thread counts are per calling thread
        while True:
            with self._wake:
                while not self._pending and not self._rows and not self._stopping:
                    self._wake.wait()
                if self._stopping:
                    break
                admitted = self._admit()
            try:
                self._drop_done()
                if admitted:
                    self._prefill(admitted)
                if self._rows:
                    self._decode()
                    self.steps += 1
            except Exception as exc:  # a bug or out-of-memory: fail these requests, keep serving the next ones
                log.error("engine step failed:\n%s", traceback.format_exc())
                for seq in self._rows + admitted:
                    if not seq.finished:
                        seq.finished = True
                        seq.sink(SequenceEvent("", [], finish_reason="error", error=f"{type(exc).__name__}: {exc}"))
                self._rows, self._cache = [], None
        for seq in list(self._pending) + self._rows:
            seq.sink(SequenceEvent("", [], finish_reason="abort", error="the server stopped"))

    def _admit(self) -> list[Sequence]:
        admitted, budget = [], self.max_prefill_tokens
        while self._pending and len(self._rows) + len(admitted) < self.max_batch_size:
            seq = self._pending[0]
            if admitted and len(seq.prompt_ids) > budget:
                break
            budget -= len(seq.prompt_ids)
            admitted.append(self._pending.popleft())
        return admitted

    def _forward(self, ids, mask, positions, cache, keep):
        kwargs = {self._cache_arg: cache}
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         logits_to_keep=keep, **kwargs)
        return out.logits, getattr(out, "cache", None) or out.past_key_values

    def _prefill(self, admitted: list[Sequence]) -> None:
        self._abort_cancelled(admitted)
        admitted = [s for s in admitted if not s.finished]
        # A prompt to score (echo + logprobs) needs every position's logits: prefill it alone.
        scored = [s for s in admitted if s.params.prompt_logprobs]
        batched = [s for s in admitted if not s.params.prompt_logprobs]
        for group in [[s] for s in scored] + ([batched] if batched else []):
            width = max(len(s.prompt_ids) for s in group)
            ids = torch.full((len(group), width), self._pad_id(), dtype=torch.long)
            mask = torch.zeros((len(group), width), dtype=torch.long)
            for row, seq in enumerate(group):
                ids[row, width - len(seq.prompt_ids):] = torch.tensor(seq.prompt_ids)
                mask[row, width - len(seq.prompt_ids):] = 1
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            cache = DynamicCache(config=self.model.config)
            logits, cache = self._forward(ids.to(self.device), mask.to(self.device), positions.to(self.device), cache,
                                          0 if group[0].params.prompt_logprobs else 1)
            for seq in group:
                seq.cache_len = len(seq.prompt_ids)
            layers = [(layer.keys, layer.values) for layer in cache.layers]
            # Padded positions hold junk (even NaN) that a zero attention weight would still spread: clear it.
            keep = mask.to(self.device).bool()[:, None, :, None]
            layers = [(torch.where(keep, k, 0), torch.where(keep, v, 0)) for k, v in layers]
            prompt_scores = self._score_prompt(group[0], logits[0]) if group[0].params.prompt_logprobs else None
            self._join(group, layers)
            last = logits[:, -1]
            logprobs = self._logprobs(last, group)  # before sampling, which scales the logits in place
            tokens = self.sampler.sample(last, group)
            for row, seq in enumerate(group):
                if seq.params.max_tokens == 0:
                    seq.finished = True
                    seq.sink(SequenceEvent("", [], finish_reason="length", prompt_logprobs=prompt_scores))
                    continue
                self._append(seq, int(tokens[row]), logprobs[row], prompt_scores)

    def _score_prompt(self, seq: Sequence, logits: torch.Tensor) -> list[TokenLogprob]:
        """Logprob of each prompt token given the ones before it (in chunks: V-wide rows are large)."""
        scores = [TokenLogprob(seq.prompt_ids[0], None)]
        targets = torch.tensor(seq.prompt_ids[1:], device=logits.device)
        for start in range(0, len(targets), 256):
            lp = torch.log_softmax(logits[start : start + 256][: len(targets) - start].float(), dim=-1)
            chunk = targets[start : start + 256]
            picked = lp.gather(-1, chunk[:, None])[:, 0].tolist()
            for i, (token, value) in enumerate(zip(chunk.tolist(), picked)):
                scores.append(TokenLogprob(token, value, top_logprobs(lp[i], seq.params.logprobs or 0)))
        return scores

    def _join(self, group: list[Sequence], layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        if self._rows:
            old = [(layer.keys, layer.values) for layer in self._cache.layers]
            width = max(old[0][0].shape[-2], layers[0][0].shape[-2])
            pad = lambda t: F.pad(t, (0, 0, width - t.shape[-2], 0))  # noqa: E731  left-pad the sequence axis
            layers = [(torch.cat([pad(ok), pad(k)]), torch.cat([pad(ov), pad(v)])) for (ok, ov), (k, v) in zip(old, layers)]
        self._rows = self._rows + group
        self._cache = DynamicCache(ddp_cache_data=layers, config=self.model.config)

    def _abort_cancelled(self, sequences: list[Sequence]) -> None:
        """A cancelled sequence still ends with an event, so whoever awaits it is released."""
        for seq in sequences:
            if seq.cancelled and not seq.finished:
                seq.finished = True
                seq.sink(SequenceEvent("", [], finish_reason="abort"))

    def _drop_done(self) -> None:
        self._abort_cancelled(self._rows)
        keep = [i for i, s in enumerate(self._rows) if not s.finished]
        if len(keep) == len(self._rows):
            return
        self._rows = [self._rows[i] for i in keep]
        if not self._rows:
            self._cache = None
            return
        width = max(s.cache_len for s in self._rows)
        index = torch.tensor(keep, device=self.device)
        layers = [(layer.keys[index, :, -width:], layer.values[index, :, -width:]) for layer in self._cache.layers]
        self._cache = DynamicCache(ddp_cache_data=layers, config=self.model.config)

    def _decode(self) -> None:
        rows = self._rows
        width = self._cache.get_seq_length() + 1
        lengths = torch.tensor([s.cache_len + 1 for s in rows])
        mask = (torch.arange(width)[None, :] >= (width - lengths)[:, None]).long()
        ids = torch.tensor([[s.output_ids[-1]] for s in rows])
        positions = torch.tensor([[s.cache_len] for s in rows])
        logits, self._cache = self._forward(ids.to(self.device), mask.to(self.device), positions.to(self.device), self._cache, 1)
        for seq in rows:
            seq.cache_len += 1
        last = logits[:, -1]
        logprobs = self._logprobs(last, rows)  # before sampling, which scales the logits in place
        tokens = self.sampler.sample(last, rows).tolist()
        for row, seq in enumerate(rows):
            if not seq.cancelled:
                self._append(seq, tokens[row], logprobs[row])

    def _logprobs(self, logits: torch.Tensor, rows: list[Sequence]) -> list[torch.Tensor | None]:
        wanted = [i for i, s in enumerate(rows) if s.params.logprobs is not None]
        out: list[torch.Tensor | None] = [None] * len(rows)
        if wanted:
            lp = torch.log_softmax(logits[wanted].float(), dim=-1).cpu()
            for j, i in enumerate(wanted):
                out[i] = lp[j]
        return out

    def _append(self, seq: Sequence, token: int, logprobs: torch.Tensor | None, prompt_scores=None) -> None:
        seq.output_ids.append(token)
        finish = None
        if token in seq.eos_ids or token in seq.stop_ids:
            finish = "stop"
            text = seq.text.finish()
        else:
            text, hit = seq.text.add(token)
            if hit:
                finish = "stop"
            elif len(seq.output_ids) >= seq.params.max_tokens or seq.cache_len + 1 >= self.max_model_len:
                finish = "length"
                text += seq.text.finish()
        scores = None
        if logprobs is not None:
            scores = [TokenLogprob(token, float(logprobs[token]), top_logprobs(logprobs, seq.params.logprobs))]
        if finish:
            seq.finished = True
        seq.sink(SequenceEvent(text, [token], scores, finish, prompt_scores))

    def _pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id if self.tokenizer is not None else None
        return pad if pad is not None else 0

