"""The serving engine in process, without HTTP: one sequence's fault never changes what the others produce.

Last, models whose forward takes token ids alone: the engine's uncached path, and one real server over such a model.
"""

from __future__ import annotations

import asyncio
import copy
import json
import sys
import threading

import httpx
import pytest
import torch
import torch.nn.functional as F
from plain_forward_model import PlainForwardConfig, PlainForwardLM
from serve_process import ServerProcess
from starlette.requests import Request

from tablefree.hub import load_model
from tablefree.serve.decoder import MIN_CAPACITY, SlotDecoder
from tablefree.serve.drafts import NgramDrafts, drafts_for
from tablefree.serve.engine import Engine, LoopSink, Sequence, output_logits
from tablefree.serve.precision import (Int8Head, PackedLinear, choose_precision, integer_product, lower_activation,
                                      measure, onednn_int8_exact, packed_products, without_onednn)
from tablefree.serve.metrics import ServerMetrics
from tablefree.serve.protocol import APIError, CompletionRequest
from tablefree.serve.responses import RequestRun
from tablefree.serve.params import SamplingParams
from tablefree.serve.sampling import NonFiniteLogits, TokenSampler, draw, filter_logits, first_argmax
from tablefree.serve.server import context_length, load_for_serving
from tablefree.serve.text import IncrementalText

GREEDY = dict(temperature=0.0, max_tokens=8)
SEEDED = dict(temperature=0.9, top_k=40, seed=11, max_tokens=8)


@pytest.fixture(scope="module")
def served(saved_tiny_model):
    model, tokenizer = load_model(saved_tiny_model[0])
    return model.eval(), tokenizer


@pytest.fixture
def engine(served):
    model, tokenizer = served
    return Engine(model, tokenizer, max_model_len=64, seed=0)


class Recorder(list):
    """A sequence's sink: keeps every event it is handed; `done` is set by the last."""

    def __init__(self):
        super().__init__()
        self.done = threading.Event()

    def __call__(self, event):
        self.append(event)
        if event.finish_reason:
            self.done.set()

    @property
    def ids(self) -> list[int]:
        return [t for event in self for t in event.token_ids]

    @property
    def text(self) -> str:
        return "".join(event.text for event in self)

    @property
    def final(self):
        """The one event with a finish_reason, which must also be the last."""
        finals = [e for e in self if e.finish_reason]
        assert len(finals) == 1 and finals[0] is self[-1], [e.finish_reason for e in self]
        return finals[0]


def sequence(engine: Engine, prompt: list[int], tokenizer=None, **params) -> Sequence:
    return Sequence(prompt, SamplingParams(**params), tokenizer or engine.tokenizer, Recorder(), set())


def run(engine: Engine, schedule: dict[int, list[Sequence]]) -> None:
    """Steps the engine until every sequence has ended, submitting schedule[k] before step k."""
    everyone = [s for group in schedule.values() for s in group]
    for step in range(200):
        if step in schedule:
            engine.submit(schedule[step])
        if all(s.finished for s in everyone) and step >= max(schedule):
            return
        engine.step()
    raise AssertionError("the engine did not finish these sequences in 200 steps")


def alone(engine: Engine, prompt: list[int], **params) -> list[int]:
    seq = sequence(engine, prompt, **params)
    run(engine, {0: [seq]})
    assert seq.sink.final.error is None
    return seq.sink.ids


def prompt(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


class NanIntoRow:
    """Output-head hook: on its `call`-th forward pass, NaN replaces the logits of batch row `row`."""

    def __init__(self, row: int, call: int):
        self.row, self.call, self.calls = row, call, 0

    def __call__(self, module, args, output):
        self.calls += 1
        if self.calls == self.call:
            output = output.clone()
            output[self.row] = float("nan")
        return output


@pytest.fixture
def hooks(served):
    handles = []
    yield handles
    for handle in handles:
        handle.remove()


def test_scoring_request_batched_with_others_does_not_fail_them(engine, served):
    tokenizer = served[1]
    text = prompt(tokenizer, "The quick brown fox jumps over the lazy dog.")
    score = sequence(engine, text, max_tokens=0)
    score_logprobs = sequence(engine, text, max_tokens=0, logprobs=2, prompt_logprobs=True)
    greedy = sequence(engine, text[:5], **GREEDY)
    seeded = sequence(engine, text[:7], **SEEDED)
    run(engine, {0: [score, score_logprobs, greedy, seeded]})
    assert score.sink.final.finish_reason == "length" and score.sink.ids == []
    scores = score_logprobs.sink.final.prompt_logprobs
    assert [s.token for s in scores] == text and scores[0].logprob is None
    assert all(s.logprob <= 0 and s.top[0] == (s.token, s.logprob) and len(s.top) in (2, 3) for s in scores[1:])
    assert greedy.sink.final.error is None and greedy.sink.ids == alone(engine, text[:5], **GREEDY)
    assert seeded.sink.final.error is None and seeded.sink.ids == alone(engine, text[:7], **SEEDED)


def test_first_token_finish_gets_one_final_event(engine, served):
    """A sequence done at prefill (max_tokens=1) is never decoded again nor told twice that it ended."""
    text = prompt(served[1], "one token only, please")
    short, longer = sequence(engine, text, max_tokens=1, temperature=0), sequence(engine, text[:4], **GREEDY)
    run(engine, {0: [short, longer]})
    assert len(short.sink.ids) == 1 and short.sink.final.finish_reason == "length"
    assert longer.sink.ids == alone(engine, text[:4], **GREEDY)


@pytest.mark.parametrize("call", [1, 3], ids=["prefill", "decode"])
def test_nan_logits_end_only_their_row(engine, served, hooks, call):
    tokenizer = served[1]
    prompts = [prompt(tokenizer, t) for t in ("Hello there", "A row that breaks", "Some other text, longer")]
    expected = [alone(engine, prompts[0], **GREEDY), alone(engine, prompts[2], **SEEDED)]
    first, victim, third = (sequence(engine, prompts[0], **GREEDY), sequence(engine, prompts[1], **GREEDY),
                            sequence(engine, prompts[2], **SEEDED))
    hooks.append(engine.model.get_output_embeddings().register_forward_hook(NanIntoRow(row=1, call=call)))
    run(engine, {0: [first, victim, third]})
    assert victim.sink.final.finish_reason == "error"
    assert "non-finite logits" in victim.sink.final.error
    assert len(victim.sink.ids) == call - 1  # the tokens it got before the fault, none after
    assert [first.sink.ids, third.sink.ids] == expected
    assert first.sink.final.error is None and third.sink.final.error is None


class DecodeFailsAfter:
    """A tokenizer whose decode works `calls` times, then raises."""

    def __init__(self, tokenizer, calls: int):
        self.tokenizer, self.calls = tokenizer, calls

    def decode(self, ids, **kwargs):
        self.calls -= 1
        if self.calls < 0:
            raise RuntimeError("injected detokeniser fault")
        return self.tokenizer.decode(ids, **kwargs)


def test_detokeniser_fault_ends_only_its_sequence(engine, served):
    tokenizer = served[1]
    prompts = [prompt(tokenizer, t) for t in ("Stop strings are checked", "on decoded text", "every step")]
    expected = [alone(engine, p, stop=["zz"], **SEEDED) for p in prompts]
    seqs = [sequence(engine, p, stop=["zz"], **SEEDED) for p in prompts]
    seqs[1] = sequence(engine, prompts[1], DecodeFailsAfter(tokenizer, 5), stop=["zz"], **SEEDED)
    run(engine, {0: seqs})
    assert "injected detokeniser fault" in seqs[1].sink.final.error
    assert [seqs[0].sink.ids, seqs[2].sink.ids] == [expected[0], expected[2]]


def test_failed_prefill_group_is_retried_one_by_one(engine, served, hooks):
    tokenizer = served[1]
    poison = ord("\u2603")  # a snowman, in the victim's prompt only
    good = [prompt(tokenizer, t) for t in ("First good prompt", "the second")]
    expected = [alone(engine, good[0], **GREEDY), alone(engine, good[1], **SEEDED)]
    assert poison not in expected[0] + expected[1]

    def refuse_poison(module, args, kwargs):
        if (kwargs["input_ids"] == poison).any():
            raise RuntimeError("injected forward fault")

    hooks.append(engine.model.register_forward_pre_hook(refuse_poison, with_kwargs=True))
    victim = sequence(engine, prompt(tokenizer, "snow \u2603 man"), **GREEDY)
    assert poison in victim.prompt_ids
    seqs = [sequence(engine, good[0], **GREEDY), victim, sequence(engine, good[1], **SEEDED)]
    run(engine, {0: seqs})
    assert "forward pass over the prompt failed" in victim.sink.final.error
    assert [seqs[0].sink.ids, seqs[2].sink.ids] == expected


@pytest.mark.parametrize("slots", [True, False], ids=["slot-decoder", "model-forward"])
def test_failed_decode_step_is_retried_one_by_one(served, hooks, slots):
    """The fault strikes the shortest row mid-generation; the batch's KV cache stays right for the rest, on either
    decode path: SlotDecoder's step, or the model's own forward."""
    model, tokenizer = served
    engine = Engine(model, tokenizer, max_model_len=64, seed=0, slots=slots)
    assert (engine._slots is not None) == slots
    short = prompt(tokenizer, "a, b; c")[:3]
    assert len(short) == 3
    longer = [prompt(tokenizer, t) for t in ("a much longer prompt, with more words in it", "and another long one, which goes on and on")]
    assert all(len(p) > len(short) + 3 for p in longer)
    expected = [alone(engine, longer[0], **GREEDY), alone(engine, longer[1], **SEEDED)]
    doomed_length = len(short) + 3  # the short row's 3rd decode step; longer rows never hold so few tokens

    if slots:
        step = engine._slots.step

        def refuse_length(ids, positions, first=0, head=None, slots=None):  # in a step with drafts too
            if (positions == doomed_length - 1).any():
                raise RuntimeError("injected decode fault")
            return step(ids, positions, first, head, slots)

        engine._slots.step = refuse_length
    else:
        def refuse_mask(module, args, kwargs):
            if kwargs["input_ids"].shape[1] == 1 and (kwargs["attention_mask"].sum(-1) == doomed_length).any():
                raise RuntimeError("injected decode fault")

        hooks.append(engine.model.register_forward_pre_hook(refuse_mask, with_kwargs=True))
    victim = sequence(engine, short, **GREEDY)
    seqs = [sequence(engine, longer[0], **GREEDY), victim, sequence(engine, longer[1], **SEEDED)]
    run(engine, {0: seqs})
    assert "injected decode fault" in victim.sink.final.error and len(victim.sink.ids) == 3
    assert [seqs[0].sink.ids, seqs[2].sink.ids] == expected


def test_sequences_the_engine_cannot_serve_are_refused_alone(engine, served):
    tokenizer = served[1]
    text = prompt(tokenizer, "a fine prompt")
    refused = [sequence(engine, [], **GREEDY), sequence(engine, [70000], **GREEDY),
               sequence(engine, list(range(100, 170)), **GREEDY),
               sequence(engine, text, temperature=float("nan")), sequence(engine, text, top_p=1.5),
               sequence(engine, text, max_tokens=None)]
    fine = sequence(engine, text, **GREEDY)
    run(engine, {0: refused + [fine]})
    messages = [s.sink.final.error for s in refused]
    assert "empty" in messages[0] and "70000" in messages[1] and "context of 64" in messages[2]
    assert "temperature=nan" in messages[3] and "top_p=1.5" in messages[4] and "TypeError" in messages[5]
    assert fine.sink.ids == alone(engine, text, **GREEDY)


JOIN_TEXTS = ["Short", "A much longer prompt that starts later", "x", "Middle length text", "Equal", "equal"]
JOIN_LENGTHS = [12, 5, 9, 7, 6, 10]
# When each of the six sequences above joins (step -> indices): all at once, staggered, and joining a batch
# in mid-decode just as others leave it (so the cache is trimmed and re-padded on the same step).
JOIN_SCHEDULES = {"together": {0: [0, 1, 2, 3, 4, 5]}, "staggered": {0: [0], 2: [1], 3: [2], 8: [3, 4], 9: [5]},
                  "as-others-leave": {0: [1, 4], 5: [0, 2], 6: [3], 12: [5]}}


@pytest.mark.parametrize("schedule", JOIN_SCHEDULES.values(), ids=JOIN_SCHEDULES.keys())
@pytest.mark.parametrize("params", [GREEDY, SEEDED, dict(SEEDED, repetition_penalty=1.3, top_p=0.9)],
                         ids=["greedy", "seeded", "seeded-penalized"])
def test_joining_a_running_batch_matches_running_alone(engine, served, params, schedule):
    """Token ids and text are the same whenever a sequence joins, whatever the others' prompt lengths."""
    tokenizer = served[1]
    prompts = [prompt(tokenizer, t) for t in JOIN_TEXTS]
    fields = [{**params, "max_tokens": n} for n in JOIN_LENGTHS]
    expected = []
    for p, f in zip(prompts, fields):
        seq = sequence(engine, p, **f)
        run(engine, {0: [seq]})
        expected.append((seq.sink.ids, seq.sink.text))
    seqs = [sequence(engine, p, **f) for p, f in zip(prompts, fields)]
    run(engine, {step: [seqs[i] for i in members] for step, members in schedule.items()})
    assert [(s.sink.ids, s.sink.text) for s in seqs] == expected
    assert all(len(s.sink.ids) == n and s.sink.final.finish_reason == "length" for s, n in zip(seqs, JOIN_LENGTHS))


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_streamed_text_equals_the_whole_decode(engine, served, params):
    """What a stream hands out piece by piece is what a non-stream body decodes at once, stop strings included."""
    tokenizer = served[1]
    text = prompt(tokenizer, "Streaming and non-streaming agree")
    whole = sequence(engine, text, **{**params, "max_tokens": 16})
    run(engine, {0: [whole]})
    decoded = tokenizer.decode(whole.sink.ids, skip_special_tokens=True)
    assert whole.sink.text == decoded and len(whole.sink) == 16  # one event per token, the last one final
    stop = decoded[5:7]
    assert len(stop) == 2
    stopped = sequence(engine, text, stop=[stop], **{**params, "max_tokens": 16})
    run(engine, {0: [stopped]})
    assert stopped.sink.final.finish_reason == "stop" and stopped.sink.text == decoded[: decoded.find(stop)]


def test_n_choices_with_a_seed_repeat_and_differ(engine, served):
    """Choice i of a seeded request draws from seed + i: a repeat gives the same n texts, and they are not all one."""
    tokenizer = served[1]
    text = prompt(tokenizer, "Pick a word:")

    def request(n: int = 3) -> list[list[int]]:
        seqs = [Sequence(text, SamplingParams(**SEEDED), tokenizer, Recorder(), set(), choice=i) for i in range(n)]
        run(engine, {0: seqs})
        return [s.sink.ids for s in seqs]

    first = request()
    assert request() == first and len({tuple(ids) for ids in first}) > 1
    assert first[0] == alone(engine, text, **SEEDED)
    assert first[1] == alone(engine, text, **{**SEEDED, "seed": SEEDED["seed"] + 1})


def test_tiny_temperature_is_greedy(engine, served):
    text = prompt(served[1], "temperature near zero")
    assert alone(engine, text, temperature=1e-50, max_tokens=8) == alone(engine, text, **GREEDY)
    assert alone(engine, text, temperature=1e-50, top_k=5, seed=3, max_tokens=8) == alone(engine, text, **GREEDY)


def row(**params):
    class Row:
        prompt_ids, output_ids, generator, penalties = [5, 6], [7], None, None

    Row.params = SamplingParams(**params)
    return Row


def test_sampler_reports_non_finite_rows_and_never_overflows():
    sampler = TokenSampler(0)
    logits = torch.zeros(5, 50)
    logits[:, 17] = 3e38  # scaling by any temperature below 1 overflows float32
    logits[1, 3] = float("nan")
    logits[2, 4] = float("inf")
    rows = [row(temperature=1e-4), row(), row(), row(temperature=1e-3, top_p=0.5), row(temperature=0.5, top_k=3)]
    chosen = sampler.sample(logits, rows)
    assert isinstance(chosen[1], NonFiniteLogits) and isinstance(chosen[2], NonFiniteLogits)
    assert [chosen[0], chosen[3], chosen[4]] == [17, 17, 17]


@pytest.mark.parametrize("case", ["nan", "+inf", "all -inf", "some -inf"])
def test_a_row_alone_is_screened_as_in_a_batch(case):
    """One row takes the sampler's one-row paths (its block read as a view): a NaN, +inf or all -inf row still fails
    alone with NonFiniteLogits, and a row whose ruled-out ids are -inf is sampled among the rest, greedy or not."""
    logits = torch.randn(1, 1000)
    logits[0, 300] = 9.0
    if case == "nan":
        logits[0, 7] = float("nan")
    elif case == "+inf":
        logits[0, 999] = float("inf")
    elif case == "all -inf":
        logits[:] = float("-inf")
    else:
        logits[0, :300] = float("-inf")
    for params in (dict(temperature=0), dict(temperature=1e-3)):
        chosen = TokenSampler(0).sample(logits.clone(), [row(**params)])
        if case == "some -inf":
            assert chosen == [300], params
        else:
            assert isinstance(chosen[0], NonFiniteLogits), (case, params)


def test_sampler_penalty_overflow_fails_only_that_row():
    sampler = TokenSampler(0)
    logits = torch.randn(2, 50)
    logits[:, 5] = 10.0
    chosen = sampler.sample(logits, [row(repetition_penalty=1e-45), row(temperature=0)])
    assert isinstance(chosen[0], NonFiniteLogits) and chosen[1] == int(logits[1].argmax())


def test_top_p_zero_is_greedy():
    logits = torch.randn(1, 50)
    assert TokenSampler(0).sample(logits.clone(), [row(top_p=0.0)]) == [int(logits.argmax())]


@pytest.mark.parametrize("vocab", [65536, 1000, 7])
def test_blockwise_argmax_is_argmax(vocab):
    """Ties (the first id wins), -inf, and widths that are no multiple of the block."""
    logits = torch.randint(0, 4, (9, vocab)).float()
    logits[1] = float("-inf")
    logits[1, vocab - 1] = 0.0
    logits[2, vocab // 2 :] = 9.0
    assert torch.equal(first_argmax(logits), logits.argmax(-1))
    for r in range(len(logits)):  # one row takes its own path (a view of its block, no gather)
        assert torch.equal(first_argmax(logits[r : r + 1]), logits[r : r + 1].argmax(-1)), r


def test_two_level_draw_picks_the_first_id_past_its_target():
    """With integer weights every sum is exact, so the draw must equal a full-width inverse CDF, and an id of zero
    weight (the zero tail here) is never drawn, even for a uniform number just below 1."""
    weights = torch.randint(0, 4, (4, 1000)).float()
    weights[:, 700:] = 0
    weights[3, 1:] = 0
    weights[3, 0] = 1
    totals = weights.sum(-1)
    cdf = weights.cumsum(-1)
    for step in range(0, int(totals[:3].min()), 13):
        uniform = ((step + 0.5) / totals).clamp(max=0.999)
        expected = torch.searchsorted(cdf, (uniform * totals)[:, None], right=True)[:, 0]
        assert torch.equal(draw(weights, uniform)[:3], expected[:3])
    last = draw(weights, torch.full((4,), 1 - 2**-24))
    assert all(weights[i, last[i]] > 0 for i in range(4)) and last[3] == 0


@pytest.mark.parametrize("fields", [dict(top_k=40), dict(top_k=40, top_p=0.6), dict(top_k=40, min_p=0.2, temperature=0.7)])
def test_top_k_candidates_give_the_full_row_distribution(fields):
    """Top-k keeps its k candidates only; their probabilities are those of the whole row cut the plain way."""
    torch.manual_seed(0)
    line = torch.randn(5000) * 3
    params = SamplingParams(**fields)
    logits, ids = filter_logits(line.clone(), params)
    assert ids is not None and len(ids) == 40
    full = (line - line.max()) / params.temperature
    full = full.masked_fill(full < torch.topk(full, 40).values[-1], float("-inf"))
    if params.top_p < 1 or params.min_p > 0:  # the reference cut: every id, sorted, as before candidates existed
        ordered, order = torch.sort(full, descending=True)
        probs = torch.softmax(ordered, -1)
        drop = (probs.cumsum(-1) - probs) >= params.top_p
        drop[0] = False
        full = full.scatter(-1, order, ordered.masked_fill(drop, float("-inf")))
        probs = torch.softmax(full, -1)
        full = full.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    reference = torch.softmax(full, -1)
    assert torch.allclose(torch.softmax(logits, -1), reference[ids], atol=1e-6)
    assert reference.sum() - reference[ids].sum() < 1e-6  # nothing outside the candidates had any mass


def test_top_k_tie_at_the_cut_keeps_every_tied_id():
    line = torch.zeros(100)
    line[:3] = torch.tensor([5.0, 4.0, 4.0])
    logits, ids = filter_logits(line, SamplingParams(top_k=2))
    assert ids is None and torch.isfinite(logits).sum() == 3


def test_batched_sampling_draws_what_each_row_would():
    """The batched paths (greedy: blockwise argmax; temperature only: one softmax and one draw for all rows) pick what
    a plain per-row computation picks with the same uniform numbers (full-width float64 inverse CDF)."""
    torch.manual_seed(1)
    logits = torch.randn(6, 65536) * 4
    rows = [row(temperature=0.0), row(temperature=0.5), row(temperature=1.3), row(temperature=0.0), row(temperature=0.8),
            row(temperature=2.0)]
    chosen = TokenSampler(7).sample(logits.clone(), rows)
    uniform = torch.rand(4, generator=torch.Generator().manual_seed(7)).double()
    sampled = [1, 2, 4, 5]
    for i in (0, 3):
        assert chosen[i] == int(logits[i].argmax())
    for j, i in enumerate(sampled):
        weights = torch.softmax((logits[i].double() - logits[i].max()) / rows[i].params.temperature, -1)
        cdf = weights.cumsum(-1)
        assert chosen[i] == int(torch.searchsorted(cdf, uniform[j] * cdf[-1], right=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_head_gives_the_heads_logits(served, dtype):
    """The head's product from oneDNN's prepacked copy of its weight equals the head's own, for 1 to 64 rows, each row
    as in its batch; the engine decodes through it and puts the model's head back after each pass. Only float32 and
    bfloat16 linear layers are packed."""
    model, tokenizer = served
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size).to(dtype).requires_grad_(False)
    head.weight.copy_(model.get_output_embeddings().weight)
    packed = PackedLinear.of(head)
    assert packed is not None and packed_products()
    hidden = torch.randn(64, 1, head.in_features).to(dtype)
    with torch.no_grad():
        together, own = packed(hidden), head(hidden)
        assert together.shape == (64, 1, head.out_features) and together.dtype == dtype
        assert torch.allclose(together.float(), own.float(), atol=1e-5 if dtype == torch.float32 else 2e-2)
        for first, rows in ((0, 1), (5, 3), (8, 8), (3, 17)):
            assert torch.allclose(packed(hidden[first : first + rows]).float(), together[first : first + rows].float(),
                                  atol=1e-5 if dtype == torch.float32 else 2e-2)
    assert PackedLinear.of(torch.nn.Linear(4, 4).half()) is None and PackedLinear.of(torch.nn.Identity()) is None
    engine = Engine(model, tokenizer, max_model_len=64, seed=0)
    assert isinstance(engine._packed_head, PackedLinear)
    run(engine, {0: [sequence(engine, prompt(tokenizer, "one row"), **GREEDY)]})
    assert "forward" not in vars(model.get_output_embeddings())


def test_int8_head_is_row_independent_close_to_float32_and_a_quarter_of_its_bytes(served):
    """Each row's int8-head logits are the same alone or in any batch (bitwise), within the quantisation's bound of
    the float32 head's, from int8 weights with one scale per vocabulary row (and, where oneDNN's integer product is
    exact, int8 activations with one scale per row); a NaN or infinite row gives non-finite logits, for the sampler."""
    model, _ = served
    head = model.get_output_embeddings()
    int8 = Int8Head.of(model)
    kernels = "native up to 16 rows, then oneDNN" if int8.native is not None else "oneDNN"
    assert int8.kind == (f"int8 weights and activations ({kernels})" if onednn_int8_exact() else "int8 weights")
    stored = int8.packed if int8.packed is not None else int8.weight
    assert stored.dtype == torch.int8 and stored.numel() == head.weight.numel() and int8.scales.shape == (head.out_features,)
    hidden = torch.randn(32, 1, head.in_features)
    with torch.no_grad():
        together, exact = int8(hidden), head(hidden)
        assert all(torch.equal(int8(hidden[i : i + rows]), together[i : i + rows]) for i, rows in ((0, 1), (5, 3), (8, 8), (3, 17)))
        # A weight is off by half a step (scale / 2) at most; an activation by half its row's step, or by bfloat16's
        # rounding for the weight-only kernel.
        weights = hidden.abs().sum(-1, keepdim=True) * int8.scales.float() / 2
        if int8.packed is not None:
            step = hidden.abs().amax(-1, keepdim=True) / 127
            activations = head.weight.abs().sum(-1) * step / 2 + head.in_features * int8.scales * step / 4
        else:
            activations = exact.abs() * 2**-7
        assert together.dtype == torch.float32 and bool((together - exact).abs().le(weights + activations + 1e-3).all())
        hidden[3, 0, 5], hidden[4, 0, 0] = float("nan"), float("inf")
        assert torch.isfinite(int8(hidden)).all(-1)[:, 0].tolist() == [True] * 3 + [False] * 2 + [True] * 27


def test_onednn_int8_product_is_used_only_where_exact():
    """The check behind the int8 head's kernel: where it says yes, the integer product of extreme and random codes is
    the exact sum for 1 to 64 rows (where it says no, the weight-only kernel runs, tested above)."""
    if not onednn_int8_exact():
        assert Int8Head(torch.nn.Linear(8, 16)).packed is None
        return
    generator = torch.Generator().manual_seed(1)
    weight = torch.randint(-127, 128, (300, 64), dtype=torch.int8, generator=generator)
    weight[0] = 127
    packed = torch.ops.onednn.qlinear_prepack(weight, [1, 64])
    for rows in (1, 2, 7, 64):
        codes = torch.randint(0, 256, (rows, 64), dtype=torch.uint8, generator=generator)
        codes[0] = 255
        got = integer_product(codes, packed, torch.ones(300), torch.zeros(300, dtype=torch.long))
        assert torch.equal(got.double(), (codes.double() - 128) @ weight.double().t())


@pytest.mark.parametrize("body", [False, True], ids=["int8-head", "int8-head-and-body"])
@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_int8_engine_is_batch_invariant(served, params, body):
    """With the int8 head (and int8 body weights), a sequence's tokens are the same whenever it joins and whoever it
    runs beside; the int8 weights are swapped in for each pass only, the model's own linear layers are untouched."""
    model, tokenizer = served
    engine = Engine(model, tokenizer, max_model_len=64, seed=0, head=Int8Head.of(model), lower_body=body)
    prompts = [prompt(tokenizer, t) for t in JOIN_TEXTS]
    fields = [{**params, "max_tokens": n} for n in JOIN_LENGTHS]
    expected = [alone(engine, p, **f) for p, f in zip(prompts, fields)]
    for schedule in JOIN_SCHEDULES.values():
        seqs = [sequence(engine, p, **f) for p, f in zip(prompts, fields)]
        run(engine, {step: [seqs[i] for i in members] for step, members in schedule.items()})
        assert [s.sink.ids for s in seqs] == expected
    assert all("forward" not in vars(linear) for linear in model.modules() if isinstance(linear, torch.nn.Linear))


def test_precision_choice_is_measured_and_named(served, plain_served):
    """float32 keeps the model's weights, int8 gives what was asked, auto measures over 512 held-out positions and says
    what it found; an unknown name, or int8 body weights for a model the decode step cannot run, is one line naming
    what is accepted. The model against itself agrees everywhere; with int8 weights, the measure is taken."""
    model, tokenizer = served
    own = choose_precision(model, tokenizer)
    assert own.head is None and not own.lower_body and own.why == "the model's own weights"
    asked = choose_precision(model, tokenizer, "int8", "int8")
    assert isinstance(asked.head, Int8Head) and asked.lower_body and asked.why == "int8 head, int8 body: asked for"
    assert choose_precision(model, tokenizer, "float32", "int8").why == "int8 body: asked for"
    auto = choose_precision(model, tokenizer, "auto", "auto")
    assert "512 held-out positions" in auto.why and ("int8 head" in auto.why.split(":")[0]) == (auto.head is not None)
    assert ("int8 body" in auto.why.split(":")[0]) == auto.lower_body
    with pytest.raises(ValueError, match=r"^unknown head precision 'int4'; choose float32, int8, auto$"):
        choose_precision(model, tokenizer, "int4")
    with pytest.raises(ValueError, match=r"^unknown body precision 'bf16'; choose float32, int8, auto$"):
        choose_precision(model, tokenizer, "float32", "bf16")
    with pytest.raises(ValueError, match=r"^int8 body weights need the engine's GPT-NeoX decode step, and it is "):
        choose_precision(model, tokenizer, "float32", "int8", body_possible="it is nanoGPT-shaped")
    with pytest.raises(ValueError, match=r"int8 body weights need the engine's GPT-NeoX decode step, and its forward takes no KV cache"):
        Engine(plain_served[0], plain_served[1], max_model_len=64, lower_body=True)
    same = measure(model, tokenizer, model.get_output_embeddings())
    assert same.positions == 512 and same.top1_agreement == 1.0 and same.bits_per_byte_change == 0.0 and same.equal
    lower = measure(model, tokenizer, Int8Head.of(model), lower_body=True)
    assert lower.positions == 512 and lower.bits_per_byte == same.bits_per_byte and lower.bits_per_byte_lower != same.bits_per_byte
    assert "forward" not in vars(model.gpt_neox.layers[0].mlp.dense_h_to_4h)  # the int8 linears were swapped in for it only


@pytest.mark.parametrize("lower_body", [False, True], ids=["float32-body", "int8-body"])
def test_slot_decoder_steps_give_the_models_own_logits(served, lower_body):
    """SlotDecoder's steps for rows of different lengths, added at different times, with a row dropped between steps
    and the cache grown past its first capacity, give each row the logits the model's own forward gives its whole
    sequence (float32: to rounding; int8 block linears: within quantisation's reach, the same top choice)."""
    model, tokenizer = served
    head = model.get_output_embeddings()
    decoder = SlotDecoder(model, max_rows=4, max_len=3 * MIN_CAPACITY, lower_body=lower_body)
    texts = ["One, two, three", "Two words here", "A third, longer prompt of several words", "Four, five and six"]
    rows = [prompt(tokenizer, t) for t in texts]
    assert all(len(r) >= 2 for r in rows)

    def prefill(ids_list):
        with torch.no_grad():
            for ids in ids_list:
                out = model(input_ids=torch.tensor([ids]), use_cache=True)
                decoder.add([(layer.keys, layer.values) for layer in out.cache.layers], [len(ids)])

    def step(live):
        nonlocal rows
        ids = torch.tensor([rows[i][-1] for i in live])
        positions = torch.tensor([len(rows[i]) - 1 for i in live])
        with torch.no_grad():
            got = decoder.step(ids, positions, head=head)[:, -1]
            for row, i in enumerate(live):
                want = model(input_ids=torch.tensor([rows[i]])).logits[0, -1]
                if lower_body:
                    assert int(got[row].argmax()) == int(want.argmax()) or (got[row] - want).abs().max() < 0.05
                else:
                    assert torch.allclose(got[row], want, atol=1e-4), (row, (got[row] - want).abs().max())
                rows[i] = rows[i] + [int(want.argmax())]

    # The cache holds each prompt but its last token, which the first step feeds (as after a prefill and a sample).
    prefill([r[:-1] for r in rows[:2]])
    live = [0, 1]
    for _ in range(3):
        step(live)
    prefill([r[:-1] for r in rows[2:]])
    live = [0, 1, 2, 3]
    step(live)
    order = decoder.keep([0, 2, 3])  # row 1 leaves; the last row fills its slot
    assert order == [0, 3, 2] and decoder.rows == 3
    live = [live[i] for i in order]
    while len(rows[live[0]]) < MIN_CAPACITY + 8:  # past the first capacity
        step(live)
    assert decoder.keys[0].shape[1] == 2 * MIN_CAPACITY


def test_a_one_row_step_reads_its_tables_as_views_and_checks_the_id(served):
    """A step of one row reads its code values and rotation as views of their tables: the entries indexing reads,
    the model's own logits, and an id outside the vocabulary is an IndexError, as indexing the table would raise."""
    model, tokenizer = served
    ids = prompt(tokenizer, "One, two, three")
    decoder = SlotDecoder(model, max_rows=2, max_len=MIN_CAPACITY)
    for token, position in ((ids[-1], len(ids) - 1), (0, 0), (model.config.vocab_size - 1, MIN_CAPACITY - 1)):
        x = decoder._embed([token])
        assert torch.equal(x, decoder._embed(torch.tensor([token])))
        for view, gathered in zip(decoder._rotation(x, [position]), decoder._rotation(x, torch.tensor([position]))):
            assert torch.equal(view, gathered)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids[:-1]]), use_cache=True)
        decoder.add([(layer.keys, layer.values) for layer in out.cache.layers], [len(ids) - 1])
        position = torch.tensor([len(ids) - 1])
        for bad in (model.config.vocab_size, -1):
            with pytest.raises(IndexError, match="out of bounds"):
                decoder.step(torch.tensor([bad]), position, head=model.get_output_embeddings())
        got = decoder.step(torch.tensor(ids[-1:]), position, head=model.get_output_embeddings())[0, -1]
        want = model(input_ids=torch.tensor([ids])).logits[0, -1]
    assert torch.allclose(got, want, atol=1e-4)


def test_int8_body_activation_runs_without_onednn_and_restores_it():
    """The int8 body's gelu is ATen's own kernel (oneDNN switched off around it, also for the quality measurement),
    and torch's switch is as it was afterwards, even when the call fails."""
    x = torch.randn(3, 1024) * 4
    gelu = lower_activation(F.gelu)
    with without_onednn():
        want = F.gelu(x)
        assert not torch.backends.mkldnn.enabled
    assert torch.equal(gelu(x), want)
    before = torch.backends.mkldnn.enabled
    with pytest.raises(TypeError):
        gelu("not a tensor")
    assert torch.backends.mkldnn.enabled == before


def test_attention_without_a_mask_is_attention_under_a_mask_of_all_true():
    """SlotDecoder drops the mask when every row reads every position: the kernel gives the same bits either way, so a
    row's output does not depend on whether its batch needed a mask."""
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for end in (1, 7, 64, 513):
            for n, heads, size in ((1, 4, 64), (3, 2, 16)):
                q, k, v = (torch.randn(n, heads, length, size, dtype=dtype) for length in (1, end, end))
                every = torch.ones(n, 1, 1, end, dtype=torch.bool)
                masked = F.scaled_dot_product_attention(q, k, v, attn_mask=every, scale=0.125)
                assert torch.equal(masked, F.scaled_dot_product_attention(q, k, v, scale=0.125)), (dtype, end, n)


@pytest.mark.parametrize("shape", [dict(use_parallel_residual=True, partial_rotary_factor=0.25),
                                   dict(use_parallel_residual=False, rope_type="dynamic")], ids=["pythia-like", "dynamic-rope"])
def test_slot_decoder_follows_other_gpt_neox_shapes(shape):
    """Stock GPT-NeoX with a parallel residual and a quarter of each head rotated (Pythia's shape), or a rope that
    rescales with the length seen: SlotDecoder's steps give the model's own logits at every position."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    rope = {"rope_type": shape.get("rope_type", "default"), "rope_theta": 10000.0,
            "partial_rotary_factor": shape.get("partial_rotary_factor", 1.0)}
    if rope["rope_type"] == "dynamic":
        rope["factor"] = 2.0
    config = GPTNeoXConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=128, max_position_embeddings=32, rope_parameters=rope,
                           use_parallel_residual=shape["use_parallel_residual"])
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(config).eval()
    decoder = SlotDecoder(model, max_rows=2, max_len=32)
    assert (decoder._table is None) == (rope["rope_type"] == "dynamic")
    ids = [[3, 14, 15, 92, 65], [35, 89]]
    with torch.no_grad():
        for row in ids:
            out = model(input_ids=torch.tensor([row[:-1]]), use_cache=True)
            decoder.add([(layer.keys, layer.values) for layer in out.cache.layers], [len(row) - 1])
        for _ in range(6):
            got = decoder.step(torch.tensor([r[-1] for r in ids]), torch.tensor([len(r) - 1 for r in ids]),
                               head=model.get_output_embeddings())[:, -1]
            for row, r in enumerate(ids):
                want = model(input_ids=torch.tensor([r])).logits[0, -1]
                assert torch.allclose(got[row], want, atol=1e-5), (row, (got[row] - want).abs().max())
                r.append(int(want.argmax()))


def test_greedy_serving_equals_generate_past_the_first_cache_capacity(served):
    """Greedy tokens from the engine (SlotDecoder, its cache grown as the sequences lengthen) are those of transformers'
    generate, for a batch of different prompts, each alone and all together."""
    model, tokenizer = served
    engine = Engine(model, tokenizer, max_model_len=model.config.max_position_embeddings, seed=0)
    assert engine._slots is not None
    prompts = [prompt(tokenizer, t) for t in ("Once upon a time", "x", "The third prompt, the longest of them")]
    new = MIN_CAPACITY + 16
    with torch.no_grad():
        expected = [model.generate(torch.tensor([p]), max_new_tokens=new, do_sample=False, eos_token_id=None,
                                   pad_token_id=0)[0, len(p):].tolist() for p in prompts]
    fields = dict(temperature=0.0, max_tokens=new, ignore_eos=True)
    assert [alone(engine, p, **fields) for p in prompts] == expected
    seqs = [sequence(engine, p, **fields) for p in prompts]
    run(engine, {0: seqs[:2], 7: seqs[2:]})
    assert [s.sink.ids for s in seqs] == expected


def test_engine_thread_keeps_serving_after_faults(engine, served, hooks):
    tokenizer = served[1]
    text = prompt(tokenizer, "serve me after a fault")
    expected = alone(engine, text, **GREEDY)

    def refuse(event):  # a consumer that is gone: its sequence ends, the worker does not
        raise RuntimeError("consumer gone")

    hooks.append(engine.model.get_output_embeddings().register_forward_hook(NanIntoRow(row=0, call=1)))
    nan_victim = sequence(engine, text, **GREEDY)
    refused = Sequence(text, SamplingParams(**GREEDY), tokenizer, refuse, set())
    later = sequence(engine, text, **GREEDY)
    engine.start()
    try:
        engine.submit([nan_victim, refused])
        assert nan_victim.sink.done.wait(60)
        engine.submit([later])
        assert later.sink.done.wait(60), "the engine stopped serving after a fault"
    finally:
        engine.stop()
    assert "non-finite" in nan_victim.sink.final.error and refused.finished
    assert later.sink.ids == expected and later.sink.final.error is None


def _completion_run(engine, tokenizer, events, loop, sampling=None, **body):
    sampling = sampling or {"max_tokens": 8, "temperature": 0}
    request = CompletionRequest(prompt="Hello there", **sampling, **body)
    ids = prompt(tokenizer, "Hello there")
    params = SamplingParams(**sampling)
    sequences = []
    for index in range(request.n):
        sequences.append(Sequence(ids, params, tokenizer, LoopSink(loop, events, index), set(), choice=index))
    run_ = RequestRun(tokenizer, "m", ServerMetrics(engine), request, [(ids, params)], sequences, events, False, 0.0)
    return run_, sequences


def _never_disconnects() -> Request:
    async def receive():
        await asyncio.Event().wait()

    return Request({"type": "http", "method": "POST", "headers": []}, receive)


@pytest.mark.parametrize("stream", [False, True], ids=["body", "stream"])
def test_a_failed_choice_ends_its_request_and_cancels_the_siblings(engine, served, hooks, stream):
    tokenizer = served[1]
    hooks.append(engine.model.get_output_embeddings().register_forward_hook(NanIntoRow(row=1, call=3)))

    async def serve():
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        request_run, sequences = _completion_run(engine, tokenizer, events, loop, n=3, stream=stream)
        engine.submit(sequences)
        if stream:
            return [chunk async for chunk in request_run.stream()], sequences
        with pytest.raises(APIError) as failure:
            await request_run.collect(_never_disconnects())
        return failure.value, sequences

    engine.start()
    try:
        outcome, sequences = asyncio.run(serve())
    finally:
        engine.stop()
    if stream:
        assert outcome[-1] == "data: [DONE]\n\n"
        assert '"code": 500' in outcome[-2] and "generation failed for choice 1" in outcome[-2]
        assert "non-finite logits" in outcome[-2]
    else:
        assert outcome.status == 500 and outcome.type == "server_error"
        assert "generation failed for choice 1: " in outcome.message and "non-finite logits" in outcome.message
    assert all(seq.cancelled for seq in sequences)
    assert all(seq.finished for seq in sequences)  # the engine stopped them too, not only the request


def test_a_streamed_request_says_what_its_body_says(engine, served):
    """The same seeded n=3 request, streamed and not: each choice's text is the same, and so is its finish."""
    tokenizer = served[1]
    sampling = {"max_tokens": 12, "temperature": 0.9, "top_k": 40, "seed": 5}

    async def serve(stream: bool):
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        request_run, sequences = _completion_run(engine, tokenizer, events, loop, sampling, n=3, stream=stream)
        engine.submit(sequences)
        if not stream:
            body = await request_run.collect(_never_disconnects())
            return [(c.text, c.finish_reason) for c in body.choices]
        texts, finishes = ["", "", ""], [None] * 3
        async for chunk in request_run.stream():
            if chunk.startswith("data: {"):
                for choice in json.loads(chunk[6:])["choices"]:
                    texts[choice["index"]] += choice["text"]
                    finishes[choice["index"]] = choice["finish_reason"] or finishes[choice["index"]]
        return list(zip(texts, finishes))

    engine.start()
    try:
        body, streamed = asyncio.run(serve(False)), asyncio.run(serve(True))
    finally:
        engine.stop()
    assert streamed == body and len({text for text, _ in body}) > 1


class OneCharacterPerId:
    def decode(self, ids, **kwargs):
        return "".join(map(chr, ids))


@pytest.mark.parametrize("stop", [["abcd"], ["abcd", "bcx"], ["x" * 5000 + "abcd", "abcd"]])
def test_stop_strings_never_leak_into_the_stream(stop):
    """Text is released in pieces, each before the next arrives; a stop string's start is never among them."""
    text = IncrementalText(OneCharacterPerId(), stop)
    released, hit = [], False
    for char in "zzabxabcabcdzz":
        piece, hit = text.add(ord(char))
        released.append(piece)
        if hit:
            break
    assert hit and "".join(released) == "zzabxabc"


# ---- models whose forward takes token ids alone: the uncached path ----
def save_plain_forward(path, tokenizer):
    """A remote-code model directory: config.json with auto_map, the modeling file, weights and a tokenizer."""
    PlainForwardConfig.register_for_auto_class()
    PlainForwardLM.register_for_auto_class("AutoModelForCausalLM")
    torch.manual_seed(0)
    PlainForwardLM(PlainForwardConfig()).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def plain_forward_dir(tmp_path_factory, code_point_tokenizer):
    return save_plain_forward(tmp_path_factory.mktemp("models") / "plain-forward", code_point_tokenizer)


@pytest.fixture(scope="module")
def plain_served(plain_forward_dir):
    return load_for_serving(str(plain_forward_dir), torch.float32, "cpu", trust_remote_code=True)


def argmax_loop(model, ids: list[int], steps: int) -> list[int]:
    """Greedy decoding the plainest way: the whole sequence through forward, argmax of the last position."""
    out = []
    for _ in range(steps):
        with torch.no_grad():
            out.append(int(model(torch.tensor([ids + out]))[0, -1].argmax()))
    return out


def test_engine_keeps_a_kv_cache_only_for_a_forward_that_takes_one(engine, plain_served):
    assert engine.cached
    model, tokenizer = plain_served
    assert not Engine(model, tokenizer, max_model_len=64).cached


def test_plain_forward_model_generates_what_an_argmax_loop_does(plain_served):
    """Greedy tokens equal the argmax loop alone and batched (equal and unequal lengths, joining at several steps);
    seeded rows equal themselves alone; a prompt is scored from every position's logits."""
    model, tokenizer = plain_served
    engine = Engine(model, tokenizer, max_model_len=context_length(model.config, None), seed=0)
    assert engine.max_model_len == 64  # nanoGPT's block_size
    prompts = [prompt(tokenizer, t) for t in ("Hello there", "Other", "Equal", "a much longer prompt than the rest")]
    expected = [argmax_loop(model, p, 9) for p in prompts]
    assert len({tuple(e) for e in expected}) > 1
    assert [alone(engine, p, **{**GREEDY, "max_tokens": 9}) for p in prompts] == expected
    greedy = [sequence(engine, p, **{**GREEDY, "max_tokens": 9}) for p in prompts]
    seeded = sequence(engine, prompts[0], **SEEDED)
    scored = sequence(engine, prompts[3], max_tokens=2, temperature=0, logprobs=1, prompt_logprobs=True)
    run(engine, {0: greedy[:2], 1: [seeded, scored], 3: greedy[2:]})
    assert [s.sink.ids for s in greedy] == expected
    assert seeded.sink.ids == alone(engine, prompts[0], **SEEDED)
    scores = scored.sink.final.prompt_logprobs or scored.sink[0].prompt_logprobs
    with torch.no_grad():
        reference = torch.log_softmax(model(torch.tensor([prompts[3]]))[0, :-1], -1)
    picked = reference.gather(-1, torch.tensor(prompts[3][1:])[:, None])[:, 0].tolist()
    assert [s.logprob for s in scores[1:]] == pytest.approx(picked, abs=1e-5)
    assert scored.sink.ids == expected[3][:2]


def test_plain_forward_model_stops_at_its_context(plain_served):
    model, tokenizer = plain_served
    engine = Engine(model, tokenizer, max_model_len=20, seed=0)
    long_prompt = list(range(200, 215))
    seq = sequence(engine, long_prompt, **{**GREEDY, "max_tokens": 50})
    run(engine, {0: [seq]})
    assert seq.sink.final.finish_reason == "length" and len(seq.sink.ids) == 5
    assert seq.sink.ids == argmax_loop(model, long_prompt, 5)


class LastPositionOnly(torch.nn.Module):
    """nanoGPT at inference: `(logits of the last position, None)`."""

    def __init__(self, model):
        super().__init__()
        self.inner = model
        self.config = model.config

    def forward(self, idx):
        return self.inner(idx)[:, -1:], None


def test_last_position_logits_serve_but_cannot_score_a_prompt(plain_served):
    model, tokenizer = plain_served
    engine = Engine(LastPositionOnly(model), tokenizer, max_model_len=64, seed=0)
    text = prompt(tokenizer, "Hello there")
    scored = sequence(engine, text, max_tokens=2, temperature=0, logprobs=0, prompt_logprobs=True)
    plain = sequence(engine, text, **GREEDY)
    run(engine, {0: [scored, plain]})
    assert "cannot score a prompt" in scored.sink.final.error
    assert plain.sink.ids == argmax_loop(model, text, 8)


def test_forward_outputs_are_read_as_logits_or_refused():
    logits = torch.zeros(1, 2, 5)
    assert output_logits(logits) is logits and output_logits((logits, None)) is logits
    assert output_logits(type("Out", (), {"logits": logits})()) is logits
    for bad in (None, (), torch.zeros(2, 5), {"logits": logits}):
        with pytest.raises(TypeError, match="expected logits of shape"):
            output_logits(bad)


def test_plain_forward_fault_ends_only_its_row(plain_served, hooks):
    """A forward that fails for one row's ids (batched with an equal-length row) ends that row alone, mid-decode."""
    model, tokenizer = plain_served
    engine = Engine(model, tokenizer, max_model_len=64, seed=0)
    poison = ord("\u2603")
    victim_prompt, twin, other = [poison, 65, 66], [67, 68, 69], prompt(tokenizer, "a longer prompt")
    expected = [argmax_loop(model, twin, 8), argmax_loop(model, other, 8)]

    def refuse_poison_late(module, args):
        if args[0].shape[1] > len(victim_prompt) + 2 and (args[0] == poison).any():
            raise RuntimeError("injected forward fault")

    hooks.append(model.register_forward_pre_hook(refuse_poison_late))
    victim, good = sequence(engine, victim_prompt, **GREEDY), [sequence(engine, p, **GREEDY) for p in (twin, other)]
    run(engine, {0: [victim, *good]})
    assert "injected forward fault" in victim.sink.final.error and len(victim.sink.ids) == 3
    assert [s.sink.ids for s in good] == expected and all(s.sink.final.error is None for s in good)


def test_serve_trust_remote_code_answers_with_the_argmax_loop(plain_forward_dir, plain_served, tmp_path):
    model, tokenizer = plain_served
    ids = prompt(tokenizer, "Hello there")
    server = ServerProcess(plain_forward_dir, tmp_path / "serve.log", "--trust-remote-code", "--served-model-name", "m")
    try:
        body = {"model": "m", "prompt": "Hello there", "max_tokens": 8, "temperature": 0}
        answer = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120).json()
    finally:
        server.stop()
    assert "choices" in answer, answer
    assert answer["choices"][0]["text"] == tokenizer.decode(argmax_loop(model, ids, 8), skip_special_tokens=True)
    assert "context 64, uncached: forward takes token ids alone" in (tmp_path / "serve.log").read_text()


# ---- what one request costs the others, and the sampled token among top_logprobs ----
EVERY_ID = {i: 0.5 for i in range(65536)}
HEAVY_FIELDS = {
    "logit_bias": dict(logit_bias=EVERY_ID),
    "stop": dict(stop=[f"{j:02d}" + "\x7f" * 20_000 for j in range(16)]),
    "penalties": dict(presence_penalty=2.0, frequency_penalty=2.0, repetition_penalty=10.0),
    "filters": dict(top_k=65535, top_p=0.999, min_p=1e-9),
    "seed": dict(seed=1),
    "logprobs": dict(logprobs=20),
    "all of them": dict(logit_bias=EVERY_ID, stop=[f"{j:02d}" + "\x7f" * 20_000 for j in range(16)], presence_penalty=2.0,
                        frequency_penalty=2.0, repetition_penalty=10.0, top_k=65535, top_p=0.999, min_p=1e-9, seed=1,
                        logprobs=20),
}


def calls_per_decode_step(engine: Engine, ids: list[int], fields: dict, steps: int = 4) -> float:
    """Python and C function calls per decode step of a batch of n=4 choices of one request and a greedy neighbour:
    the Python work a request's fields add to the shared step, counted rather than timed."""
    params = SamplingParams(max_tokens=16, temperature=1.0, ignore_eos=True, **fields)
    choices = [Sequence(ids, params, engine.tokenizer, Recorder(), set(), choice=i) for i in range(4)]
    neighbour = sequence(engine, ids[:3], max_tokens=16, temperature=0.0, ignore_eos=True)
    engine.submit(choices)
    engine.submit([neighbour])
    engine.step()  # prefill, and each sequence's one-off setup
    engine.step()
    calls = 0

    def count(frame, event, arg):
        nonlocal calls
        calls += 1

    sys.setprofile(count)
    try:
        for _ in range(steps):
            engine.step()
    finally:
        sys.setprofile(None)
    assert engine.running == 5, "a sequence ended early"
    for seq in [*choices, neighbour]:
        seq.cancel()
    engine.step()
    return calls / steps


@pytest.mark.parametrize("field", HEAVY_FIELDS)
def test_a_requests_fields_add_the_same_work_to_a_decode_step_however_large(engine, served, field):
    """Each field at the most the server accepts (a logit_bias of every id, 16 long stop strings, every penalty, top-k
    of V-1, ...) adds a bounded number of vectorised operations per row, never a Python loop over its entries: the
    calls per step stay within a fixed margin of a plain request of the same shape (a plain step of 5 rows makes ~1,600;
    all the fields together add about as many; a loop over a full logit_bias alone made ~800,000)."""
    ids = prompt(served[1], "The same request shape, a field at its largest: ")
    plain = calls_per_decode_step(engine, ids, {})
    heavy = calls_per_decode_step(engine, ids, HEAVY_FIELDS[field])
    assert heavy < plain + 2_500, (field, heavy, plain)


def test_a_request_of_many_sequences_leaves_room_for_the_next(served):
    """One request holds at most half the batch: more choices than the batch has rows cannot keep a request that
    comes after them waiting for their rows to finish; the later one joins at the next step, as it would alone."""
    model, tokenizer = served
    engine = Engine(model, tokenizer, max_model_len=64, seed=0, max_batch_size=4)
    params = SamplingParams(max_tokens=12, temperature=1.0, ignore_eos=True)
    many = [Sequence(prompt(tokenizer, "Many choices"), params, tokenizer, Recorder(), set(), choice=i) for i in range(6)]
    later = sequence(engine, prompt(tokenizer, "Later"), **GREEDY)
    engine.submit(many)
    engine.step()
    assert (engine.running, engine.waiting) == (2, 4)
    engine.submit([later])
    engine.step()
    assert len(later.sink.ids) >= 1, "the later request waited behind the first one's rows"
    while not all(s.finished for s in [*many, later]):
        engine.step()
    assert all(len(s.sink.ids) == 12 for s in many)
    assert later.sink.ids == alone(engine, prompt(tokenizer, "Later"), **GREEDY)


@pytest.mark.parametrize("scored", [False, True], ids=["generate", "echo-logprobs"])
def test_choices_of_one_prompt_share_one_prefill_and_one_scoring(engine, served, hooks, scored):
    """n choices of a prompt are prefilled (and, with echo and logprobs, scored) once, then decoded as n rows; each
    gets what it would alone."""
    tokenizer = served[1]
    text = prompt(tokenizer, "Four choices of this prompt")
    shapes = []
    hooks.append(engine.model.get_output_embeddings().register_forward_hook(lambda m, a, out: shapes.append(out.shape[:2])))
    fields = dict(max_tokens=3, temperature=0.0, logprobs=2, prompt_logprobs=scored)
    params = SamplingParams(**fields)
    choices = [Sequence(text, params, tokenizer, Recorder(), set(), choice=i) for i in range(4)]
    run(engine, {0: choices})
    assert shapes == [(1, len(text) if scored else 1), (4, 1), (4, 1)]
    expected = sequence(engine, text, **fields)
    run(engine, {0: [expected]})
    for seq in choices:
        assert seq.sink.ids == expected.sink.ids
        assert [(s.token, s.logprob, s.top) for s in seq.sink[0].prompt_logprobs or []] == \
            [(s.token, s.logprob, s.top) for s in expected.sink[0].prompt_logprobs or []]


def test_the_chosen_token_heads_its_top_logprobs_even_outside_the_top_k(engine, served):
    """As vLLM reports them: each token's list starts with the token itself, then the k likeliest others, so k + 1
    entries when the token is not among the k likeliest (here forced by a logit_bias, which logprobs do not see)."""
    tokenizer = served[1]
    text = prompt(tokenizer, "Forced tokens")
    forced = prompt(tokenizer, "Z")[0]
    seq = sequence(engine, text, max_tokens=4, temperature=0.0, logprobs=2, logit_bias={forced: 100.0}, prompt_logprobs=True)
    run(engine, {0: [seq]})
    scored = [s for event in seq.sink for s in event.logprobs or []]
    assert [s.token for s in scored] == [forced] * 4
    for s in scored:
        assert s.top[0] == (forced, s.logprob) and len(s.top) == 3 and forced not in [t for t, _ in s.top[1:]]
        assert s.top[1][1] >= s.top[2][1] > s.logprob
    prompt_scores = seq.sink[0].prompt_logprobs
    assert [s.top[0] for s in prompt_scores[1:]] == [(s.token, s.logprob) for s in prompt_scores[1:]]
    assert all(len(s.top) in (2, 3) for s in prompt_scores[1:])


# ---- drafts: greedy rows guess their next tokens from their own text, checked in one step ----
def drafted_and_plain(served, draft_tokens: int = 7, **engine_fields) -> tuple[Engine, Engine]:
    model, tokenizer = served
    return tuple(Engine(model, tokenizer, max_model_len=model.config.max_position_embeddings, seed=0, draft_tokens=n,
                        **engine_fields) for n in (draft_tokens, 0))


def guesses(monkeypatch) -> list[tuple[int, int]]:
    """(guessed, held) of every draft the engine checks from now on."""
    seen, checked = [], NgramDrafts.checked
    monkeypatch.setattr(NgramDrafts, "checked", lambda self, guessed, held: (seen.append((guessed, held)),
                                                                               checked(self, guessed, held))[1])
    return seen


def events(seq: Sequence) -> list[tuple]:
    return [(e.text, e.token_ids, e.logprobs, e.finish_reason, e.error) for e in seq.sink]


def steps_to_finish(engine: Engine, seqs: list[Sequence]) -> int:
    engine.submit(seqs)
    steps = 0
    while not all(s.finished for s in seqs):
        engine.step()
        steps += 1
    return steps


@pytest.mark.parametrize("fields", [dict(), dict(logprobs=3), dict(max_tokens=37), dict(stop="cut")],
                         ids=["greedy", "logprobs", "length", "stop-string"])
def test_drafts_give_what_one_token_a_step_gives_in_fewer_steps(served, monkeypatch, fields):
    """The tiny model's greedy text falls into a loop; the drafted engine guesses it and hands out the same events
    (ids, text, logprobs, finish) as the plain engine, in fewer steps, ending where a plain run ends."""
    drafted, plain = drafted_and_plain(served)
    tokenizer = served[1]
    ids = prompt(tokenizer, "Once upon a time")
    fields = {"temperature": 0.0, "max_tokens": 48, "ignore_eos": True, **fields}
    if fields.get("stop") == "cut":
        whole = sequence(plain, ids, **{**fields, "stop": []})
        steps_to_finish(plain, [whole])
        text = whole.sink.text  # from before the loop to near its end: first seen late, after guesses were checked
        fields["stop"] = [text[len(text) // 4 : -5]]
    seen = guesses(monkeypatch)
    a, b = sequence(drafted, ids, **fields), sequence(plain, ids, **fields)
    fewer, plain_steps = steps_to_finish(drafted, [a]), steps_to_finish(plain, [b])
    assert events(a) == events(b) and len(b.sink.ids) >= 2
    assert any(held for _, held in seen) and fewer < plain_steps, (seen, fewer, plain_steps)
    assert len(a.sink) == len(a.sink.ids)  # one event per token, as a plain run hands out


def test_drafts_stop_at_an_end_of_sequence_token_inside_a_guess(served, monkeypatch):
    drafted, plain = drafted_and_plain(served)
    ids = prompt(served[1], "x")
    fields = dict(temperature=0.0, max_tokens=40)
    free = sequence(plain, ids, **fields)
    steps_to_finish(plain, [free])
    end = free.sink.ids[-3]  # a token of the loop, guessed before the run first chooses it
    a, b = (Sequence(ids, SamplingParams(**fields), served[1], Recorder(), {end}) for _ in range(2))
    steps_to_finish(drafted, [a])
    steps_to_finish(plain, [b])
    assert events(a) == events(b) and a.sink.final.finish_reason == "stop" and a.sink.ids[-1] == end


def test_drafted_rows_leave_their_neighbours_output_alone(served, monkeypatch):
    """Greedy rows that draft beside seeded, top-k and penalised rows (which never draft): every row's output is what
    it is without drafts."""
    drafted, plain = drafted_and_plain(served)
    tokenizer = served[1]
    mixes = [dict(temperature=0.0), dict(temperature=0.8, top_k=50), dict(SEEDED),
             dict(temperature=0.0, repetition_penalty=1.3), dict(temperature=0.0, logprobs=2)]
    texts = ["Once upon a time", "x", "abcabcabc", "Once upon a time", "A fourth"]

    def outputs(engine):
        seqs = [sequence(engine, prompt(tokenizer, t), **{**f, "max_tokens": 30, "ignore_eos": True})
                for t, f in zip(texts, mixes)]
        steps_to_finish(engine, seqs)
        return [events(s) for s in seqs]

    seen = guesses(monkeypatch)
    assert outputs(drafted) == outputs(plain)
    assert seen and any(held for _, held in seen)


def test_guesses_that_always_fail_change_nothing_and_back_off(served, monkeypatch):
    drafted, plain = drafted_and_plain(served)
    proposed = []
    real = NgramDrafts.propose

    def wrong(self, prompt_ids, output_ids, room):
        draft = [(t + 1) % served[0].config.vocab_size for t in real(self, prompt_ids, output_ids, room)]
        proposed.append(len(draft))
        return draft

    monkeypatch.setattr(NgramDrafts, "propose", wrong)
    ids = prompt(served[1], "Once upon a time")
    a, b = (sequence(e, ids, temperature=0.0, max_tokens=60, ignore_eos=True) for e in (drafted, plain))
    drafted_steps, plain_steps = steps_to_finish(drafted, [a]), steps_to_finish(plain, [b])
    assert events(a) == events(b) and drafted_steps == plain_steps
    guessed = [n for n in proposed if n]
    assert guessed and guessed[1:] == [1] * (len(guessed) - 1), proposed  # one token at a time after the first miss
    assert len(guessed) < len(proposed) / 3  # pausing longer after each miss


def test_a_failed_drafted_step_is_stepped_again_without_drafts(served, monkeypatch, caplog):
    drafted, plain = drafted_and_plain(served)

    def broken(rows, drafts):
        raise RuntimeError("injected fault in a drafted step")

    monkeypatch.setattr(drafted, "_drafted_step", broken)
    ids = prompt(served[1], "Once upon a time")
    a, b = (sequence(e, ids, temperature=0.0, max_tokens=40, ignore_eos=True) for e in (drafted, plain))
    with caplog.at_level("WARNING", logger="tablefree.serve"):
        steps_to_finish(drafted, [a])
    steps_to_finish(plain, [b])
    assert events(a) == events(b) and a.sink.final.error is None
    assert "stepping without drafts" in caplog.text


@pytest.mark.parametrize("lower_body", [False, True], ids=["float32-body", "int8-body"])
def test_rows_sharing_a_slot_get_what_steps_one_by_one_give(served, lower_body):
    """A step whose rows are one sequence's next tokens in its slot (and another sequence's one token beside them)
    gives each row the logits that stepping its tokens one at a time gives it: the same top choice, to rounding."""
    model, tokenizer = served
    head = model.get_output_embeddings()
    texts = [prompt(tokenizer, t) for t in ("Once upon a time, there", "Another prompt")]

    def decoder_after_prefill():
        decoder = SlotDecoder(model, max_rows=2, max_len=128, lower_body=lower_body)
        with torch.no_grad():
            for ids in texts:
                out = model(input_ids=torch.tensor([ids[:-1]]), use_cache=True)
                decoder.add([(layer.keys, layer.values) for layer in out.cache.layers], [len(ids) - 1])
        return decoder

    following = torch.randint(0, model.config.vocab_size, (5,), generator=torch.Generator().manual_seed(0)).tolist()
    one_by_one = decoder_after_prefill()
    want = []
    with torch.no_grad():
        for offset, token in enumerate([texts[0][-1], *following]):
            at = torch.tensor([len(texts[0]) - 1 + offset])
            want.append(one_by_one.step(torch.tensor([token]), at, head=head)[0, -1])
        beside = one_by_one.step(torch.tensor([texts[1][-1]]), torch.tensor([len(texts[1]) - 1]), first=1,
                                 head=head)[0, -1]
        shared = decoder_after_prefill()
        start = len(texts[0]) - 1
        got = shared.step(torch.tensor([texts[0][-1], *following, texts[1][-1]]),
                          torch.tensor([start + i for i in range(6)] + [len(texts[1]) - 1]), head=head,
                          slots=[0] * 6 + [1])[:, -1]
    for row, expected in enumerate([*want, beside]):
        assert int(got[row].argmax()) == int(expected.argmax())
        assert torch.allclose(got[row], expected, atol=1e-4), (row, (got[row] - expected).abs().max())
    with pytest.raises(ValueError, match="2 rows and 1 slots"):
        shared.step(torch.tensor([1, 2]), torch.tensor([3, 4]), slots=[0])
    with pytest.raises(ValueError, match="consecutive"):
        shared.step(torch.tensor([1, 2, 3]), torch.tensor([3, 4, 5]), slots=[1, 0, 1])


def test_ngram_drafts_guess_what_followed_the_latest_earlier_match():
    drafts = NgramDrafts(most=4)
    # "7 8" occurred twice before; the latest earlier occurrence was followed by 9 10 11 7.
    assert drafts.propose([1, 7, 8, 2, 7, 8, 9, 10, 11], [7, 8], room=4) == [9, 10, 11, 7]
    assert drafts.propose([1, 7, 8, 2, 7, 8, 9, 10, 11], [7, 8, 3], room=4) == []  # "8 3" never occurred before
    loop = NgramDrafts(most=7)
    assert loop.propose([5, 6, 5, 6], [5], room=7) == [6, 5, 6, 5, 6, 5, 6]  # the guess continues through itself
    assert loop.propose([5, 6, 5, 6], [5, 6], room=2) == [5, 6]  # room bounds it
    assert NgramDrafts(most=3).propose([4], [], room=3) == []  # nothing before to match
    assert NgramDrafts(most=3).propose([4, 4, 4], [], room=0) == []
    single = NgramDrafts(most=4)
    assert single.propose([1, 2, 3, 9, 3], [], room=4) == []  # a 1-token match is not enough


def test_ngram_drafts_adapt_to_how_their_guesses_fare():
    drafts = NgramDrafts(most=6)
    text = [1, 2, 3] * 4
    assert len(drafts.propose(text, [], room=9)) == 6
    drafts.checked(6, 2)  # two held: guess three next
    assert len(drafts.propose(text, [], room=9)) == 3
    drafts.checked(3, 3)  # all held: two more
    assert len(drafts.propose(text, [], room=9)) == 5
    pauses = []
    for _ in range(6):  # every guess fails: a pause after each, doubling up to MOST_PAUSE
        drafts.checked(1, 0)
        pauses.append(drafts.pause)
        while drafts.pause:
            assert drafts.propose(text, [], room=9) == []
        assert drafts.propose(text, [], room=9) == [1]
    assert pauses == [1, 3, 7, 15, 16, 16]
    drafts.checked(1, 1)
    assert drafts.backoff == 0 and len(drafts.propose(text, [], room=9)) == 3


def test_ngram_drafts_index_a_long_prompts_end_only(monkeypatch):
    monkeypatch.setattr("tablefree.serve.drafts.PROMPT_WINDOW", 8)
    drafts = NgramDrafts(most=2)
    early = [1, 2, 3, 4]  # followed by 3 4 once, far before the window
    assert drafts.propose(early + [9] * 20 + [7, 1, 2], [], room=2) == []
    assert len(drafts.follows) <= 2 * 8
    assert NgramDrafts(most=2).propose(early + [9] * 2 + [1, 2], [], room=2) == [3, 4]  # inside it: found


def test_which_sequences_draft():
    assert drafts_for(SamplingParams(temperature=0.0), alone=True)
    assert drafts_for(SamplingParams(temperature=0.7), alone=True)
    assert drafts_for(SamplingParams(temperature=0.0, logprobs=3), alone=True)
    for fields in (dict(seed=1), dict(top_p=0.9), dict(top_k=5), dict(min_p=0.1), dict(presence_penalty=0.5),
                   dict(repetition_penalty=1.1), dict(logit_bias={3: 1.0})):
        assert not drafts_for(SamplingParams(temperature=0.7, **fields), alone=True), fields


def test_speculative_sampling_gives_each_token_its_own_distribution():
    """A plain row's guesses are kept with the probability the model gives them and the rest of the distribution is
    drawn from otherwise: over many draws the first token follows p0, the second (after the first guess held) p1,
    the third (after both held) p2, within 5 standard errors; a refused guess is never the token drawn in its place."""
    logits = torch.tensor([[1.0, 0.2, 2.0, -1.0, 0.5, 0.0], [0.3, 0.3, -0.5, 1.5, 1.0, 0.2],
                           [2.0, -2.0, 0.0, 0.0, 1.0, 0.4]])
    draft, temperature, trials = [2, 4], 0.8, 20_000
    p = torch.softmax(logits / temperature, dim=-1)
    sampler = TokenSampler(seed=5)
    counts = [torch.zeros(6) for _ in range(3)]
    for _ in range(trials):
        choices = sampler.speculate(logits.clone(), [(draft, temperature)])
        counts[0][choices[0]] += 1
        if choices[0] == draft[0]:
            counts[1][choices[1]] += 1
            if choices[1] == draft[1]:
                counts[2][choices[2]] += 1
    for row in range(3):
        n = counts[row].sum()
        assert n > 1000, (row, n)
        error = (p[row] * (1 - p[row]) / n).sqrt()
        assert ((counts[row] / n - p[row]).abs() <= 5 * error + 1e-9).all(), (row, counts[row] / n, p[row])
    broken = logits.clone()
    broken[1, 0] = float("nan")
    seen = {type(c) for _ in range(200) for c in sampler.speculate(broken.clone(), [(draft, temperature)])[1:2]}
    assert NonFiniteLogits in seen  # a non-finite row ends the sequence when the step reaches it
    # Sequences speculated together: each gets its own rows' choices, the same law as alone.
    both = sampler.speculate(torch.cat([logits, logits[:1]]), [(draft, temperature), ([], 1.0)])
    assert len(both) == 4 and all(isinstance(c, int) and 0 <= c < 6 for c in both)


def test_sampled_rows_draft_alone_and_keep_a_servers_seed(served, monkeypatch):
    """A plain sampled sequence decoding alone guesses too (its text is drawn, not fixed, so it is checked for what
    can be): an engine seeded alike gives the same text twice, guesses were kept, and the sequence ends at its length.
    Beside another sequence it does not guess. The tiny model's head is scaled up so that its distributions are
    peaked, as a trained model's are, and its text loops."""
    model, tokenizer = served
    peaked = copy.deepcopy(model)
    with torch.no_grad():
        peaked.get_output_embeddings().weight.mul_(300)
    seen = guesses(monkeypatch)

    def texts(*prompts):
        engine = Engine(peaked, tokenizer, max_model_len=model.config.max_position_embeddings, seed=3)
        seqs = [sequence(engine, prompt(tokenizer, t), temperature=0.5, max_tokens=40, ignore_eos=True) for t in prompts]
        steps = steps_to_finish(engine, seqs)
        assert all(len(s.sink.ids) == 40 and s.sink.final.finish_reason == "length" for s in seqs)
        return [s.sink.ids for s in seqs], steps

    first, steps = texts("x")
    assert texts("x") == (first, steps)
    assert any(held for _, held in seen) and steps < 39, (seen, steps)  # 39: one token a step (the first with the prefill)
    seen.clear()
    texts("Once upon a time", "x")
    assert not seen


def test_drafts_end_at_the_context_as_one_token_a_step_does(served, monkeypatch):
    """Guesses never run past the context: a looping greedy sequence that meets it ends there with 'length', as
    without drafts, and three greedy choices of one request share a step's room."""
    seen = guesses(monkeypatch)
    drafted, plain = drafted_and_plain(served)
    for engine in (drafted, plain):
        engine.max_model_len = 40
    ids = prompt(served[1], "Once upon a time")
    params = SamplingParams(temperature=0.0, max_tokens=100)

    def run_choices(engine):
        seqs = [Sequence(ids, params, served[1], Recorder(), set(), choice=i) for i in range(3)]
        steps_to_finish(engine, seqs)
        return [events(s) for s in seqs]

    got, want = run_choices(drafted), run_choices(plain)
    assert got == want and all(len(ids) + len(e) == 40 and e[-1][3] == "length" for e in got)
    assert any(held for _, held in seen)
