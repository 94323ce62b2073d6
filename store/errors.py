"""The one error type pathloop raises for bad input.

The CLI prints ``pathloop: error: <message>`` and exits non-zero; the message names the
file or value and says what was expected.
"""


class PathloopError(Exception):
    """Bad input or state the user can fix: one line naming the thing and what was expected."""


class PathloopWarning(UserWarning):
    """Input pathloop repaired or worked around: one line naming the thing and what was done.

    Raised through ``warnings.warn``; the CLI prints it as ``pathloop: warning: <message>``.
    """
