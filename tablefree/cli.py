"""`tablefree <verb>`: each verb is one module's entry function; user errors print one line, no traceback.

`tablefree --help` reads the verb table alone, and `tablefree VERB ...` imports only VERB's module, whose
own imports of torch and transformers wait until the verb runs: help answers without loading them.
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys

from . import __version__, register_auto_classes
from .errors import TableFreeError, WriteError
from .runtime import SLEEPING_THREAD_VERBS, prefer_sleeping_threads

# verb -> (the module whose `add_cli(subparsers)` defines it, what it does)
VERBS = {
    "quickstart": ("quickstart", "train affine vs learned on the embedded corpus and compare (a few CPU minutes)"),
    "new": ("presets", "initialise a model from a preset and save it"),
    "verify": ("presets", "check a code is injective and invertible over all V ids"),
    "tokenizer": ("tokenizer", "build the code-point tokenizer"),
    "data": ("data", "prepare token shards from a mixture of sources"),
    "train": ("train", "train a model on prepared data (CPU, or GPUs via torchrun)"),
    "compare": ("compare", "the matched comparison: variants x seeds, results table and plots"),
    "study": ("study", "a matched comparison at several points: the gap against tokens, table share or size"),
    "eval": ("evaluate", "validation loss, perplexity and bits per byte of a saved model"),
    "generate": ("generate", "generate text from a model, streamed to the terminal"),
    "export": ("export", "write a stock GPT-NeoX checkpoint (code table as embed_in) or a GGUF file for llama.cpp"),
    "serve": ("serve", "serve a model over an OpenAI-compatible HTTP API (port 30000)"),
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, unless the help already says it or there is none to say."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, argparse.SUPPRESS) or action.nargs == 0 or action.required:
            return text
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    """The command line; only `verb`'s module is imported (the others are listed from the table)."""
    parser = Parser(
        prog="tablefree",
        description="Language models without a trainable input embedding table (arXiv 2605.09751).",
    )
    parser.add_argument("--version", action="version", version=f"tablefree {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    if verb in VERBS:
        importlib.import_module(f"tablefree.{VERBS[verb][0]}").add_cli(subparsers)
    for name, (_, summary) in VERBS.items():
        if name in subparsers.choices:
            subparsers.choices[name].description = subparsers.choices[name].description or summary
        else:
            subparsers.add_parser(name, help=summary, description=summary)
    return parser


def chosen_verb(argv: list[str]) -> str | None:
    """The verb of a command line: its first word that is not an option."""
    return next((word for word in argv if not word.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    verb = chosen_verb(argv)
    if verb in SLEEPING_THREAD_VERBS:
        prefer_sleeping_threads()  # before anything imports torch
    parser = build_parser(verb)
    args = parser.parse_args(argv)
    args.command_line = "tablefree " + shlex.join(argv)  # what a published result says made it
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    try:
        register_auto_classes()  # a verb runs: saved models load through the Auto classes
        quiet_libraries()
        result = args.run(args)
    except TableFreeError as exc:
        print(f"error: {one_line(str(exc))}", file=sys.stderr)
        return 1 if isinstance(exc, WriteError) else 2
    except OSError as exc:  # the environment, not the input: a full disk, a name too long, a permission
        where = f": {exc.filename}" if exc.filename else ""
        print(f"error: {one_line(f'{exc.strerror or exc}{where}')}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


def quiet_libraries() -> None:
    """transformers' and the hub's own progress bars and advice stay off: each verb says what it does, once."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # "Loading weights", "Writing model shards", hub downloads
    transformers_logging.set_verbosity_error()


def one_line(message: str) -> str:
    """`message` with every line break escaped: user input quoted in it (a file name with a newline) stays on one line."""
    return "".join(repr(c)[1:-1] if len(f"{c}x".splitlines()) > 1 else c for c in message)


if __name__ == "__main__":
    sys.exit(main())
