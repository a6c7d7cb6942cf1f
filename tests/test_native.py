"""The native body and head (tablefree/serve/native.py, native_step.c): built here, batch-invariant bit for bit,
the same logits as oneDNN's int8 head, the same sums on every instruction set's path, bounds checked before anything
is written, and a clear fallback where no compiler works."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import tiny_config

from tablefree.presets import build_model
from tablefree.serve import native
from tablefree.serve.decoder import SlotDecoder
from tablefree.serve.native import FLAGS, NativeHead, blocked, build, load, native_problem
from tablefree.serve.precision import NATIVE_HEAD_ROWS, Int8Head, integer_product, per_row_int8


@pytest.fixture(scope="module")
def model():
    """Wide enough for every path of the products: several groups of output blocks and a partial one."""
    config = tiny_config("affine", hidden_size=80, num_attention_heads=5, intermediate_size=176, num_hidden_layers=2)
    return build_model(config, seed=3).eval()


def test_the_library_builds_on_this_machine(model):
    assert native.native_unavailable() is None
    assert native_problem(model) is None
    vectorised = native._build().library.tf_head_vectorised()
    assert native.native_head_unavailable() == (None if vectorised else "no AVX-512 VNNI on this CPU")


def run_rows(decoder: SlotDecoder, ids: torch.Tensor, first_slot: int = 0) -> list[torch.Tensor]:
    """Each step's hidden states, feeding ids[:, p] to rows in slots first_slot.. at position p."""
    outs = []
    with torch.no_grad():
        for p in range(ids.shape[1]):
            outs.append(decoder.step(ids[:, p], torch.full((len(ids),), p), first_slot)[:, 0])
    return outs


def test_a_rows_hidden_state_is_the_same_bit_for_bit_alone_and_in_any_batch(model):
    """Rows stepped together (6 and 9 rows: whole and partial groups of rows) get the hidden states each gets alone."""
    generator = torch.Generator().manual_seed(0)
    for rows in (6, 9):
        ids = torch.randint(0, model.config.vocab_size, (rows, 7), generator=generator)
        together = SlotDecoder(model, max_rows=rows, max_len=64, lower_body=True)
        assert together._native is not None
        batched = run_rows(together, ids)
        for row in range(rows):
            alone = run_rows(SlotDecoder(model, max_rows=1, max_len=64, lower_body=True), ids[row : row + 1])
            for step, (a, b) in enumerate(zip(alone, batched)):
                assert torch.equal(a[0], b[row]), (rows, row, step)


def test_native_steps_stay_close_to_the_models_own_forward(model):
    """int8 weights with float32 sums: the final hidden state within quantisation's reach of the model's own."""
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    got = run_rows(SlotDecoder(model, max_rows=2, max_len=64, lower_body=True), ids)[-1]
    with torch.no_grad():
        want = model.gpt_neox(input_ids=ids).last_hidden_state[:, -1]
    assert (got - want).abs().max() < 0.05 * want.abs().max()
    assert not torch.equal(got, want)  # the int8 arithmetic ran, not the model's own


def test_a_slot_or_position_outside_the_cache_is_refused_before_anything_is_written(model):
    decoder = SlotDecoder(model, max_rows=2, max_len=64, lower_body=True)
    run_rows(decoder, torch.tensor([[5, 6, 7], [8, 9, 10]]))
    keys, values = decoder.keys, decoder.values
    before = [t.clone() for t in keys + values]
    x = torch.randn(2, model.config.hidden_size)
    rows, capacity = keys[0].shape[0], keys[0].shape[1]
    for slots, positions in (([0, rows], [3, 3]), ([0, 1], [3, capacity]), ([0, -1], [3, 3]), ([0, 1], [-1, 3])):
        with pytest.raises(IndexError, match="outside the cache"):
            decoder._native(x, slots, positions, keys, values)
    assert all(torch.equal(a, b) for a, b in zip(before, keys + values))


def onednn_logits(codes: torch.Tensor, scales: torch.Tensor, rows: torch.Tensor, bias) -> torch.Tensor:
    """Int8Head's oneDNN product of `rows`, quantised by torch's own operations."""
    packed = torch.ops.onednn.qlinear_prepack(codes, [1, codes.shape[1]])
    scale = (torch.linalg.vector_norm(rows, float("inf"), dim=1, keepdim=True) / 127).clamp_(
        min=torch.finfo(torch.float32).tiny)
    quantised = torch.round(rows / scale).add_(128).to(torch.uint8)
    out = integer_product(quantised, packed, scales, torch.zeros(len(codes), dtype=torch.long)).mul_(scale)
    return out if bias is None else out + bias


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_the_native_head_gives_onednns_logits_bit_for_bit(bias):
    """For 1 to 20 rows and 33 (past NATIVE_HEAD_ROWS), a vocabulary not a multiple of the head's groups, rows of
    every scale (one of zeros, one at float32's extremes), Int8Head's logits are oneDNN's, bit for bit."""
    generator = torch.Generator().manual_seed(2)
    head = torch.nn.Linear(96, 1000, bias=bias)
    int8 = Int8Head(head)
    assert int8.native is not None and "native" in int8.kind
    codes, scales = per_row_int8(head.weight, torch.float32)
    for n in [*range(1, 21), 33]:
        rows = torch.randn(n, 96, generator=generator) * torch.logspace(-3, 3, n)[:, None]
        rows[0] = 0
        if n > 2:
            rows[1, :3] = torch.tensor([3e38, -3e38, 1e-38])
        want = onednn_logits(codes, scales, rows, int8.bias)
        got = int8(rows[:, None])[:, 0]
        assert got.shape == (n, 1000) and torch.equal(got, want), n
    assert NATIVE_HEAD_ROWS < 33


def test_a_non_finite_row_gets_non_finite_logits_and_its_neighbours_their_own():
    head = torch.nn.Linear(64, 128, bias=False)
    int8 = Int8Head(head)
    rows = torch.randn(3, 64, generator=torch.Generator().manual_seed(4))
    alone = int8(rows[1:2])
    rows[0, 5], rows[2, 7] = float("nan"), float("inf")
    got = int8(rows)
    assert not got[0].isfinite().any() and not got[2].isfinite().all()
    assert torch.equal(got[1], alone[0])


def variant(flags: list[str]):
    """The library built with `flags` added (another instruction set's path)."""
    return load(build([*FLAGS, *flags]))


def test_every_instruction_sets_path_gives_the_same_sums():
    """x86's AVX-512 and AVX2 paths give the same int8 linear outputs (each output a chain of fused multiply-adds over
    its inputs in order), and every path, the generic C one too, the same head logits (exact integer sums)."""
    generator = torch.Generator().manual_seed(5)
    weight = torch.randn(96, 80, generator=generator)
    codes, scales = per_row_int8(weight, torch.float32)
    bias = torch.randn(96, generator=generator)
    x = torch.randn(7, 80, generator=generator)
    head_codes = torch.randint(-127, 128, (200, 80), dtype=torch.int8, generator=generator)
    head = NativeHead(head_codes, torch.rand(200, generator=generator), None)
    quantised, row_scales = NativeHead.quantize(x)
    libraries = {"native": native._build().library, "avx2": variant(["-mno-avx512f"]),
                 "generic": variant(["-mno-avx512f", "-mno-avx2", "-mno-fma"])}

    def linear(library):
        lanes = library.tf_lanes()
        out = torch.empty(7, 96)
        w = codes.view(96 // lanes, lanes, 80).transpose(1, 2).contiguous()
        library.tf_linear(x.data_ptr(), 7, 80, w.data_ptr(), scales.data_ptr(), bias.data_ptr(), 96, out.data_ptr())
        return out

    def logits(library):
        out = torch.empty(7, 200)
        library.tf_head(quantised.data_ptr(), 7, 80, head.weight.data_ptr(), head.sums.data_ptr(),
                        head.scales.data_ptr(), row_scales.data_ptr(), None, 200, out.data_ptr())
        return out

    assert torch.equal(linear(libraries["native"]), linear(libraries["avx2"]))
    assert torch.allclose(linear(libraries["generic"]), linear(libraries["native"]), rtol=1e-5, atol=1e-5)
    want = (quantised.int() - 128) @ head_codes.int().t()
    assert torch.equal(logits(libraries["native"]), want.float() * head.scales[:200] * row_scales[:, None])
    for name in ("avx2", "generic"):
        assert torch.equal(logits(libraries[name]), logits(libraries["native"])), name
    assert blocked(codes).shape == (96 // native._build().lanes, 80, native._build().lanes)


FALLBACK = """
import json, sys, torch
from conftest import tiny_config
from tablefree.presets import build_model
from tablefree.serve.decoder import SlotDecoder
from tablefree.serve.precision import Int8Head
model = build_model(tiny_config("affine"), seed=1).eval()
decoder = SlotDecoder(model, max_rows=1, max_len=16, lower_body=True)
with torch.no_grad():
    out = decoder.step(torch.tensor([3]), torch.tensor([0]), head=Int8Head.of(model))
print(json.dumps({"problem": decoder.native_problem, "kind": Int8Head.of(model).kind,
                  "finite": bool(out.isfinite().all())}))
"""


@pytest.mark.parametrize("env, problem", [
    ({"TABLEFREE_NATIVE": "0"}, "TABLEFREE_NATIVE=0"),
    ({"CC": "no-such-compiler"}, "no C compiler (no-such-compiler) on PATH; set CC to one"),
    ({"CC": "false"}, "false failed (exit status 1)"),
], ids=["switched-off", "no-compiler", "compiler-fails"])
def test_without_the_library_int8_runs_on_torchs_kernels_and_says_why(tmp_path, env, problem):
    done = subprocess.run([sys.executable, "-c", FALLBACK], check=False, capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(__file__),
                          env={**os.environ, "TABLEFREE_CACHE": str(tmp_path), **env})
    assert done.returncode == 0, done.stderr
    facts = json.loads(done.stdout.strip().splitlines()[-1])
    assert facts == {"problem": problem, "kind": "int8 weights and activations (oneDNN)", "finite": True}
    assert not list(tmp_path.rglob("*.so"))


def test_the_library_is_built_once_and_a_damaged_copy_is_built_again(tmp_path, monkeypatch):
    monkeypatch.setenv("TABLEFREE_CACHE", str(tmp_path))
    path = build()
    assert path.parent == tmp_path / "native" and path.stat().st_size > 0
    stamp = path.stat().st_mtime_ns
    assert build() == path and path.stat().st_mtime_ns == stamp  # found, not built again
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # nothing left of the work
    path.write_bytes(b"\x7fELF truncated")
    monkeypatch.setattr(native, "_build", native._build.__wrapped__)
    rebuilt = native._build()
    assert rebuilt.problem is None and rebuilt.library.tf_lanes() in (8, 16)
    assert path.stat().st_size > 100


def test_inputs_of_the_wrong_shape_are_refused_not_read_past(model):
    """The C code reads what the shapes say: a row, code or cache of another shape is a ValueError first."""
    linear = native.NativeLinear(model.gpt_neox.layers[0].mlp.dense_h_to_4h)
    with pytest.raises(ValueError, match="rows of 79 values for a layer of 80 inputs"):
        linear(torch.randn(2, 79))
    head = NativeHead(torch.ones(64, 16, dtype=torch.int8), torch.ones(64), None)
    with pytest.raises(ValueError, match="codes of shape"):
        head(torch.zeros(2, 12, dtype=torch.uint8), torch.ones(2))
    with pytest.raises(ValueError, match="contiguous float32"):
        NativeHead.quantize(torch.randn(16, 2).t())
    decoder = SlotDecoder(model, max_rows=1, max_len=64, lower_body=True)
    decoder._reserve(1, 8)
    with pytest.raises(ValueError, match="a cache of 1 layers"):
        decoder._native(torch.randn(1, 80), [0], [0], decoder.keys[:1], decoder.values[:1])
    with pytest.raises(ValueError, match="the cache must be contiguous float32"):
        decoder._native(torch.randn(1, 80), [0], [0], [k.transpose(0, 1) for k in decoder.keys], decoder.values)


def test_both_engines_serve_int8_natively_and_one_thread_or_two_give_the_same_text(saved_tiny_model, tmp_path):
    """`tablefree serve --head-precision int8 --body-precision int8` says the body runs natively, in the server's
    process and in an engine process alike, and greedy text does not depend on the thread count (each sum runs in one
    order however the work is split)."""
    import httpx
    from serve_process import ServerProcess

    texts = {}
    for engine, threads in (("thread", "1"), ("process", "2")):
        log = tmp_path / f"{engine}.log"
        server = ServerProcess(saved_tiny_model[0], log, "--engine", engine, "--threads", threads, "--head-precision",
                               "int8", "--body-precision", "int8", "--served-model-name", "m")
        try:
            body = {"model": "m", "prompt": "One, two, three", "max_tokens": 40, "temperature": 0, "ignore_eos": True}
            reply = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120)
            assert reply.status_code == 200, reply.text
            texts[engine] = reply.json()["choices"][0]["text"]
        finally:
            server.stop()
        assert "int8 head, int8 body: asked for; the head: int8 weights and activations (native up to 16 rows, then " \
               "oneDNN); the body: native" in log.read_text()
    assert texts["thread"] == texts["process"] and len(texts["thread"]) > 0


def test_native_steps_match_the_models_forward_through_the_same_int8_products(model):
    """Past the cache's first capacity (64 positions), native steps give the hidden states of the model's own forward
    run through the same int8 products (NativeLinear): what differs is attention, its exponentials, the activation and
    the norms, each within float32's rounding."""
    from tablefree.serve.precision import int8_body

    ids = torch.randint(0, model.config.vocab_size, (1, 90), generator=torch.Generator().manual_seed(6))
    decoder = SlotDecoder(model, max_rows=1, max_len=256, lower_body=True)
    with torch.no_grad():
        with int8_body(model):  # the first position's key and value from the same products
            out = model(input_ids=ids[:, :1], use_cache=True)
            want = model.gpt_neox(input_ids=ids).last_hidden_state[0, 1:]
        decoder.add([(layer.keys, layer.values) for layer in out.cache.layers], [1])
        got = torch.cat([decoder.step(ids[:, p], torch.tensor([p]))[:, 0] for p in range(1, 90)])
    assert decoder.keys[0].shape[1] == 128
    assert (got - want).abs().max() < 1e-4 * want.abs().max()


def test_the_softmaxs_exponentials_are_within_a_few_units_of_float32s_last_place():
    """exp_shifted, which attention's softmax runs, against exp in float64: relative error below 3e-7 wherever the
    result is a normal float32 (from -87.3 to 0, past the end of whole vectors too), below float32's smallest normal
    beneath that, and the sum it returns is theirs."""
    library = native._build().library
    for n in (1, 15, 16, 100_003):
        x = torch.linspace(-90.0, 2.5, n) if n > 16 else torch.rand(n) * -5
        got = x.clone()
        total = library.tf_exp_shifted(got.data_ptr(), n, 2.5 if n > 16 else 0.0, 1.0)
        want = torch.exp((x - (2.5 if n > 16 else 0.0)).double())  # of the float32 difference, as the kernel takes it
        normal = want > torch.finfo(torch.float32).tiny
        assert bool((((got.double() - want).abs() / want)[normal] < 3e-7).all()), n
        assert bool((got[~normal] < 2 * torch.finfo(torch.float32).tiny).all())
        assert abs(total - float(got.double().sum())) <= 1e-6 * float(want.sum())


def test_the_native_draw_follows_the_distribution_and_never_draws_a_zero_weight():
    """tf_draw over 20,000 rows: each id's frequency within 5 standard errors of its probability at the row's
    temperature (a width that is not whole vectors, -inf logits never drawn); the uniform number's ends give the
    first and the last ids of non-zero weight."""
    from tablefree.serve.native import native_draw

    generator = torch.Generator().manual_seed(8)
    line = torch.randn(37, generator=generator) * 2
    line[[0, 36, 20]] = float("-inf")
    draws, temperature = 20_000, 0.7
    logits = line.repeat(draws, 1)
    uniform = torch.rand(draws, generator=generator)
    top = float(line.max())
    chosen = torch.tensor(native_draw(logits, list(range(draws)), [top] * draws, [temperature] * draws, uniform))
    p = torch.softmax(line.double() / temperature, -1)
    counts = torch.bincount(chosen, minlength=37).double()
    assert counts[[0, 20, 36]].sum() == 0
    assert bool(((counts / draws - p).abs() <= 5 * (p * (1 - p) / draws).sqrt() + 1e-12).all())
    ends = line.repeat(2, 1)
    assert native_draw(ends, [0, 1], [top] * 2, [1.0] * 2, torch.tensor([0.0, 1 - 2**-24])) == [1, 35]


def test_without_the_library_the_sampler_draws_through_softmax(monkeypatch):
    """Where the native library does not run, plain rows are drawn as before (softmax and `draw`): the same choices
    as a float64 inverse CDF with the same uniform numbers."""
    from tablefree.serve.params import SamplingParams
    from tablefree.serve.sampling import TokenSampler

    unavailable = native._Build.__new__(native._Build)
    unavailable.library, unavailable.problem, unavailable.lanes = None, "TABLEFREE_NATIVE=0", 0
    monkeypatch.setattr(native, "_build", lambda: unavailable)
    logits = torch.randn(3, 65536, generator=torch.Generator().manual_seed(9)) * 4

    class Row:
        prompt_ids, output_ids, generator, penalties = [5], [6], None, None
        params = SamplingParams(temperature=0.8)

    chosen = TokenSampler(3).sample(logits.clone(), [Row] * 3)
    uniform = torch.rand(3, generator=torch.Generator().manual_seed(3)).double()
    for i in range(3):
        cdf = torch.softmax((logits[i].double() - logits[i].max()) / 0.8, -1).cumsum(-1)
        assert chosen[i] == int(torch.searchsorted(cdf, uniform[i] * cdf[-1], right=True))
