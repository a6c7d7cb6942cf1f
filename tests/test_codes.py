import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tablefree.codes import (
    CodeError,
    CodeLift,
    affine_preset,
    build_code,
    draw_affine,
    gf2_inverse,
    verify_code,
)

V = 65_536


@pytest.mark.parametrize(
    "family, kwargs",
    [
        ("minimal", {}),
        ("affine", {"seed": 0}),
        ("affine", {"seed": 1}),
        ("affine", {"affine_preset_name": "identity"}),
        ("affine", {"affine_preset_name": "gray"}),
        ("hashed", {"seed": 0}),
        ("hashed", {"seed": 7, "bits": 24}),
        ("hashed", {"seed": 3, "bits": 62}),
    ],
)
def test_every_code_is_injective_and_invertible_on_all_65536_ids(family, kwargs):
    code = build_code(family, V, **kwargs)
    verify_code(code)  # raises on the first collision or wrong inverse
    ids = torch.arange(V)
    packed = code.encode(ids)
    assert packed.shape == (V, kwargs.get("bits", 16))
    assert torch.equal(code.decode(packed), ids)


def test_minimal_code_is_the_ids_bits_msb_first():
    code = build_code("minimal", V)
    assert code.encode(torch.tensor([ord("A")])).tolist() == [[int(b) for b in f"{ord('A'):016b}"]]


def test_identity_preset_equals_minimal_and_gray_is_t_xor_t_shift_1():
    ids = torch.arange(V)
    identity, minimal = build_code("affine", V, affine_preset_name="identity"), build_code("minimal", V)
    assert torch.equal(identity.encode(ids), minimal.encode(ids))
    gray = build_code("affine", V, affine_preset_name="gray")
    assert torch.equal(gray.encode(ids), minimal.encode(ids ^ (ids >> 1)))


def test_affine_draw_is_recorded_by_its_seed():
    assert draw_affine(16, 5) == draw_affine(16, 5)
    assert draw_affine(16, 5) != draw_affine(16, 6)
    rows, offset = draw_affine(16, 5)
    assert gf2_inverse(rows, 16) is not None and 0 <= offset < 2**16
    code = build_code("affine", V, seed=5)
    ids = torch.arange(V)
    assert not torch.equal(code.encode(ids), build_code("minimal", V).encode(ids))


def test_affine_code_is_a_c_xor_b_over_gf2():
    code = build_code("affine", V, seed=11)
    ids = torch.randint(0, V, (200,))
    bits = build_code("minimal", V).encode(ids)  # (n, K), c_j = bit K-1-j
    matrix = torch.tensor([[(row >> (15 - j)) & 1 for j in range(16)] for row in code.rows])
    offset = torch.tensor([(code.offset >> (15 - i)) & 1 for i in range(16)])
    expected = ((bits @ matrix.T) % 2) ^ offset
    assert torch.equal(code.encode(ids), expected)


def test_singular_affine_matrix_is_refused_with_its_rank():
    rows, _ = affine_preset("identity", 16)
    rows[3] = rows[2]
    with pytest.raises(CodeError, match="singular over GF\\(2\\) \\(rank 15 < 16\\)"):
        build_code("affine", V, rows=rows, offset=0)


def test_code_too_narrow_for_the_vocabulary_is_refused():
    with pytest.raises(CodeError, match="too small for vocab_size 65536: needs at least K = 16"):
        build_code("hashed", V, bits=15)
    with pytest.raises(CodeError, match="unknown code family 'ternary'"):
        build_code("ternary", V)


@settings(max_examples=30, deadline=None)
@given(
    vocab=st.integers(2, 300_000),
    extra=st.integers(0, 20),
    seed=st.integers(0, 2**32),
    family=st.sampled_from(["affine", "hashed"]),
)
def test_codes_round_trip_for_any_vocabulary_width_and_seed(vocab, extra, seed, family):
    k = max(1, (vocab - 1).bit_length())
    code = build_code(family, vocab, k + extra, seed=seed)
    ids = torch.randint(0, vocab, (512,))
    assert torch.equal(code.decode(code.encode(ids)), ids)


def test_lift_has_no_parameters_no_buffers_and_no_state():
    lift = CodeLift(build_code("affine", V, seed=0), 1024)
    assert list(lift.parameters()) == [] and list(lift.buffers()) == [] and lift.state_dict() == {}


def test_tile_and_interleave_are_one_fixed_permutation_apart():
    code = build_code("affine", V, seed=2)
    d, k = 128, 16
    tile = CodeLift(code, d, "tile").table()
    interleave = CodeLift(code, d, "interleave").table()
    # Coordinate j of tile carries bit j mod K, of interleave bit floor(j K / d): match occurrences in order.
    tile_slots = {b: [j for j in range(d) if j % k == b] for b in range(k)}
    perm = [0] * d
    for j in range(d):
        b, r = j * k // d, j % (d // k)
        perm[j] = tile_slots[b][r]
    assert sorted(perm) == list(range(d))
    assert torch.equal(tile[:, perm], interleave)
    assert not torch.equal(tile, interleave)


def test_tile_repeats_the_whole_code_and_values_map_to_binary_or_bipolar():
    code = build_code("minimal", V)
    ids = torch.tensor([0b1000_0000_0000_0001])
    binary = CodeLift(code, 40, "tile")(ids)[0]
    assert binary.tolist() == ([1.0] + [0.0] * 14 + [1.0]) * 2 + [1.0] + [0.0] * 7
    bipolar = CodeLift(code, 32, "interleave", "bipolar", scale=0.5)(ids)[0]
    assert bipolar.tolist() == [0.5, 0.5] + [-0.5] * 28 + [0.5, 0.5]


def test_interleave_needs_a_width_divisible_by_k():
    with pytest.raises(CodeError, match="interleave' needs hidden_size divisible by the code width: 72 % 16 = 8"):
        CodeLift(build_code("minimal", V), 72, "interleave")
    with pytest.raises(CodeError, match="unknown code_layout 'spiral'"):
        CodeLift(build_code("minimal", V), 64, "spiral")
