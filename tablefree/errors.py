"""The one exception type for user errors: the CLI prints its message, never a traceback."""


class TableFreeError(Exception):
    """Bad input or a state the user can fix; the message names the problem and what would be accepted."""


class WriteError(TableFreeError):
    """A write the environment refused (a full disk, a read-only file system): exit status 1, as for an OSError."""


def summary(exc: BaseException, typed: bool = False, limit: int = 200) -> str:
    """What a library's exception said, on one line for a TableFreeError: its first two lines, or its type if it said nothing."""
    text = " ".join(" ".join(str(exc).split("\n")[:2]).split())[:limit]
    if not text:
        return type(exc).__name__
    return f"{type(exc).__name__}: {text}" if typed else text
