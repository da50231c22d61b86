"""The one error type every layer raises for user-facing failures.

The CLI prints ``str(error)`` on one line and exits 1; anything else is a bug.
"""


class KilnError(Exception):
    """A failure the user can act on: its message says what and where."""
