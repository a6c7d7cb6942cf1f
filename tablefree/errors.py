"""The one exception type for user errors: the CLI prints its message, never a traceback."""


class TableFreeError(Exception):
    """Bad input or a state the user can fix; the message names the problem and what would be accepted."""
