"""The command line explains itself: one verb table, every option with help and default, help without the heavy imports."""

import argparse
import json
import os
import subprocess
import sys
from dataclasses import MISSING, fields

import pytest

import tablefree
from tablefree.cli import VERBS, HelpFormatter, build_parser, main
from tablefree.train import TrainConfig

def _verb_parser(verb: str) -> argparse.ArgumentParser:
    parser = build_parser(verb)
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[verb]


def _leaf_parsers(parser: argparse.ArgumentParser):
    """The parser itself, or its sub-verbs' parsers (`data prepare`, `tokenizer build`)."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield parser
    for sub in subs:
        for child in sub.choices.values():
            yield from _leaf_parsers(child)


def _help_of(verb: str, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        main([verb, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_answers_help_with_its_options_and_their_defaults(verb, capsys):
    text = _help_of(verb, capsys)
    assert text.startswith(f"usage: tablefree {verb}") and VERBS[verb][1] in text  # the table's summary
    for leaf in _leaf_parsers(_verb_parser(verb)):
        page = " ".join(leaf.format_help().split())
        for action in leaf._actions:
            if not action.option_strings or action.dest == "help":
                continue
            assert action.help, f"{verb}: {action.option_strings[0]} has no help"
            if action.default not in (None, False) and not action.required:  # a default to state
                stated = HelpFormatter(leaf.prog)._get_help_string(action) % {"default": action.default}
                assert "default" in stated and " ".join(stated.split()) in page, f"{verb}: {action.option_strings[0]}"


def test_top_level_help_lists_every_verb_from_the_table_alone(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for verb, (_, summary) in VERBS.items():
        assert verb in text and " ".join(summary.split()[:4]) in " ".join(text.split())


def test_train_help_lists_every_setting_with_its_default_and_meaning(capsys):
    text = " ".join(_help_of("train", capsys).split())
    for spec in fields(TrainConfig):
        default = spec.default_factory() if spec.default is MISSING else spec.default
        shown = ("null" if default is None else str(default).lower() if isinstance(default, bool)
                 else "{}" if default == {} else default)
        assert f"{spec.name}={shown}" in text, spec.name
        assert " ".join(spec.metadata["help"].split()) in text, spec.name


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"tablefree {tablefree.__version__}"


def test_an_unknown_verb_is_a_usage_error_listing_the_verbs(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["trian"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "invalid choice: 'trian'" in err and "train" in err


def _modules_after(*commands: list[str]) -> list[list[str]]:
    """The tablefree verb modules, torch and transformers imported after each help command, in one fresh process."""
    script = (
        "import json, sys\n"
        "from tablefree.cli import main\n"
        "seen = []\n"
        f"for argv in {[list(c) for c in commands]!r}:\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "    seen.append(sorted(m for m in sys.modules if m in ('torch', 'transformers') or m.startswith('tablefree.')))\n"
        "print(json.dumps(seen), file=sys.stderr)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    return json.loads(done.stderr.strip().splitlines()[-1])


def test_help_imports_only_the_verb_asked_about():
    top, train = _modules_after(["--help"], ["train", "--help"])
    verb_modules = {f"tablefree.{module}" for module, _ in VERBS.values()}
    assert not verb_modules & set(top)
    # train's settings name the sizes and variants of presets, which names the tokenizer's special ids
    assert "tablefree.train" in train
    assert not (verb_modules - {"tablefree.train", "tablefree.presets", "tablefree.tokenizer"}) & set(train)


def test_serve_and_prepare_limits_default_to_their_owners():
    from tablefree.data import PrepareSettings
    from tablefree.serve import ServeLimits

    serve = build_parser("serve").parse_args(["serve", "m"])
    assert {spec.name: getattr(serve, spec.name) for spec in fields(ServeLimits)} == vars(ServeLimits())
    prepare = build_parser("data").parse_args(["data", "prepare", "--out", "x"])
    owner = PrepareSettings(sources=[])
    assert (prepare.val_fraction, prepare.shard_tokens, prepare.seed) == (owner.val_fraction, owner.shard_tokens, owner.seed)


# Verbs whose help still needs torch.
HEAVY_MODULES = {"generate"}  # its --help reads SamplingParams, which lives beside torch code


def test_help_does_not_import_torch_or_transformers():
    verbs = [verb for verb, (module, _) in VERBS.items() if module not in HEAVY_MODULES]
    commands = [["--help"], ["--version"], *([verb, "--help"] for verb in verbs)]
    for command, modules in zip(commands, _modules_after(*commands)):
        assert not {"torch", "transformers"} & set(modules), command


def test_import_tablefree_is_light_and_its_model_classes_register_the_auto_classes(saved_tiny_model):
    script = (
        "import sys, tablefree\n"
        "light = 'torch' not in sys.modules and 'transformers' not in sys.modules\n"
        "from transformers import AutoModelForCausalLM\n"
        "assert tablefree.TableFreeForCausalLM.__name__ == 'TableFreeForCausalLM'\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(saved_tiny_model[0])!r})\n"
        "print(light, type(model).__module__)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.stdout.split() == ["True", "tablefree.modeling_tablefree"], done.stderr[-2000:]


def test_training_verbs_let_waiting_threads_sleep_unless_the_user_chose(monkeypatch, capsys):
    from tablefree.cli import main

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert main(["serve", "--port", "-5", "missing-model"]) == 2  # serving keeps OpenMP's default
    assert "OMP_WAIT_POLICY" not in os.environ
    assert main(["train", "no_such_setting=1"]) == 2
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert main(["quickstart", "--steps", "0"]) == 2
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
    capsys.readouterr()
