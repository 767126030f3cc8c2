"""The one error type for a user's mistake.

``UserError`` says what is wrong with the input and how to fix it, in one sentence (a bit width
the grid cannot hold, a recipe that does not exist, a file that is not there). The command-line
entry points print it as one line and exit with status 2; any other exception is a bug of ours
and keeps its traceback. It subclasses ``ValueError``, so library code that catches bad values
as ``ValueError`` keeps working.

    >>> from qat.errors import UserError
    >>> try:
    ...     raise UserError("bits=1: a grid needs 2 to 8 bits; for two levels use quant=ternary_absmean")
    ... except ValueError as e:
    ...     print(e)
    bits=1: a grid needs 2 to 8 bits; for two levels use quant=ternary_absmean
"""

from __future__ import annotations

import os
import sys


class UserError(ValueError):
    """A mistake in the input (configuration, arguments, files): the message names the problem and the fix."""


def exit_on_user_error(prog: str, error: UserError) -> None:
    """Print ``prog: error: MESSAGE`` on stderr and exit with status 2 (``QAT_TRACEBACK=1`` re-raises instead)."""
    if os.environ.get("QAT_TRACEBACK") == "1":
        raise error
    print(f"{prog}: error: {error}", file=sys.stderr)
    sys.exit(2)
