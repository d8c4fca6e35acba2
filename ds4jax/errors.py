"""The one exception type ds4jax raises for bad input.

Library calls raise ``DS4Error`` with a single-line message naming what is wrong
(a file, a tensor, a flag); the CLI prints that line and exits non-zero.
"""


class DS4Error(Exception):
    """Bad input: an unreadable or mismatched model file, a bad flag, an over-long prompt."""

    def __init__(self, message: str):
        # One line, always: the CLI prints it as-is.
        super().__init__(" ".join(str(message).split()))
