"""The one exception type for user errors: the CLI prints its message, never a traceback."""


class TableFreeError(Exception):
    """Bad input or a state the user can fix; the message names the problem and what would be accepted."""


def summary(exc: BaseException, typed: bool = False, limit: int = 200) -> str:
    """What a library's exception said, on one line for a TableFreeError: its first two lines, or its type if it said nothing."""
    text = " ".join(" ".join(str(exc).split("\n")[:2]).split())[:limit]
    if not text:
        return type(exc).__name__
    return f"{type(exc).__name__}: {text}" if typed else text
