"""The one exception type for user errors: the CLI prints its message as a single line, no traceback."""

import re

# How a DataLoader worker's traceback names a user error of any medseg subclass ("medseg.data.io.FileError: ").
_WORKER_PREFIX = re.compile(r"^medseg(\.\w+)+: ")


class MedsegError(Exception):
    """Bad input from the user: the message says what is wrong, which file, and what to do."""


def user_message(exc: BaseException) -> str:
    """The one line to show for a user error, also when a DataLoader worker wrapped it with its traceback."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    last = lines[-1] if lines else type(exc).__name__
    return _WORKER_PREFIX.sub("", last)
