"""`tablefree new` / `verify` with any override: a model or a one-line error, never a traceback."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tablefree.cli import main
from tablefree.errors import TableFreeError
from tablefree.presets import build_config, parse_overrides

FIELDS = ["hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "max_position_embeddings",
          "vocab_size", "code_family", "code_bits", "code_seed", "affine_preset", "affine_rows", "affine_offset",
          "code_layout", "code_values", "code_scale", "variant", "layer_norm_eps", "hidden_act", "hiden_size", "dtype",
          "pad_token_id", "eos_token_id", "hidden_dropout", "rope_parameters", "tie_word_embeddings"]
# Extremes that must be refused fast, and small sizes that build in a moment (mid-sized models would build for minutes).
NUMBERS = st.one_of(st.integers(-(2**70), 2**70), st.integers(1, 96), st.sampled_from([0, -1, 2**63, 2**64, 1e400, -0.0]),
                    st.floats(allow_nan=True, allow_infinity=True))
TEXT = st.one_of(st.text(max_size=12), st.sampled_from(["abc", "[1, 2]", "{a: 1}", "[", "!!python/object:os.system",
                                                          "null", "true", "\udcff", "1e30", "0x40", "affine", "tile"]))
VALUE = st.one_of(NUMBERS.map(repr), TEXT)


def _assert_clean_exit(call, capsys) -> None:
    try:
        code = call()
    except SystemExit as exc:  # argparse's usage error
        code = exc.code
    captured = capsys.readouterr()
    assert code in (0, 2), captured.err
    if code:
        lines = captured.err.strip().splitlines()
        assert lines and (lines[-1].startswith("error: ") or "usage:" in captured.err), captured.err


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pairs=st.lists(st.tuples(st.sampled_from(FIELDS), VALUE), max_size=3),
       preset=st.sampled_from(["tiny-affine", "tiny-learned", "tiny-hashed", "tiny-minimal", "paper-affne"]))
def test_random_overrides_to_new_never_give_a_traceback(tmp_path_factory, capsys, pairs, preset):
    out = tmp_path_factory.mktemp("new") / "m"
    args = ["new", preset, str(out), *(f"{k}={v}" for k, v in pairs)]
    _assert_clean_exit(lambda: main(args), capsys)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pairs=st.lists(st.tuples(st.sampled_from(FIELDS), VALUE), max_size=3))
def test_random_overrides_to_verify_never_give_a_traceback(capsys, pairs):
    _assert_clean_exit(lambda: main(["verify", "tiny-affine", *(f"{k}={v}" for k, v in pairs)]), capsys)


@pytest.mark.parametrize("pair,message", [
    ("hidden_size=abc", "hidden_size must be a positive integer up to 2,147,483,647, got 'abc'"),
    ("hidden_size=18446744073709551616", "hidden_size must be a positive integer up to 2,147,483,647"),
    ("hidden_act=inf", "hidden_act 'inf' is not one of .*gelu"),
    ("hidden_size=65", "hidden_size 65 is not divisible by num_attention_heads 2"),
    ("num_attention_heads=3", "hidden_size 64 is not divisible by num_attention_heads 3"),
    ("num_hidden_layers=0", "num_hidden_layers must be a positive integer up to 2,147,483,647, got 0"),
    ("code_seed=x", "Field 'code_seed' expected int, got str"),
    ("code_scale=.nan", "code_scale must be a finite non-zero number"),
    ("code_family=[1]", "unknown code family [1]"),
    ("hidden_size=[", "is not a YAML scalar or list"),
    ("dtype=evil", "dtype 'evil' is not one of float32, bfloat16, float16, float64"),
    ("layer_norm_eps=-1.0", r"layer_norm_eps must be a number in \(0, 1\], got -1.0"),
    ("pad_token_id=70000", "pad_token_id must be a token id below vocab_size 65536"),
    ("rope_parameters={rope_type: yarn}", "rope_type 'yarn' is not supported"),
])
def test_observed_bad_overrides_name_the_problem(pair, message):
    with pytest.raises(TableFreeError, match=message.replace("[", r"\[")):
        build_config("tiny-affine", **parse_overrides([pair]))


def test_a_model_too_large_for_this_machine_is_refused_before_allocating():
    from tablefree.presets import build_model

    with pytest.raises(TableFreeError, match=r"cannot build the model: .*(GiB|overflow)"):
        build_model(build_config("tiny-affine", hidden_size=2**17, num_attention_heads=1))


def test_a_preset_names_a_size_and_a_variant_and_the_variant_is_no_model_field():
    from tablefree.presets import sized_config, split_preset

    assert split_preset("paper-gray") == ("paper", "gray")
    config = sized_config("tiny", "gray")
    assert (config.num_hidden_layers, config.hidden_size, config.affine_preset) == (2, 64, "gray")
    with pytest.raises(TableFreeError, match="variant is not a model field"):
        build_config("tiny-affine", variant="minimal")
    with pytest.raises(TableFreeError, match="unknown size 'huge'; choose one of paper, small, tiny"):
        sized_config("huge", "affine")
