"""`tablefree <verb>`: each verb is one module's entry function; user errors print one line, no traceback."""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import TableFreeError

# Each module registers its own verb(s) through `add_cli(subparsers)`.
COMMAND_MODULES = ["presets", "tokenizer", "export", "generate", "data", "train", "compare", "evaluate", "quickstart", "serve"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tablefree",
        description="Language models without a trainable input embedding table (arXiv 2605.09751).",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"tablefree.{name}").add_cli(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    try:
        result = args.run(args)
    except TableFreeError as exc:
        print(f"error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except OSError as exc:  # the environment, not the input: a full disk, a name too long, a permission
        where = f": {exc.filename}" if exc.filename else ""
        print(f"error: {one_line(f'{exc.strerror or exc}{where}')}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


def one_line(message: str) -> str:
    """`message` with every line break escaped: user input quoted in it (a file name with a newline) stays on one line."""
    return "".join(repr(c)[1:-1] if len(f"{c}x".splitlines()) > 1 else c for c in message)


if __name__ == "__main__":
    sys.exit(main())
