"""absl flag parsing that fails with one line instead of absl's two-line FATAL."""

from __future__ import annotations

import sys

from absl import flags


def parse_flags(argv: list[str], prog: str) -> list[str]:
    """Parse ``argv`` into absl's FLAGS; on a bad flag print one line and exit 2."""
    try:
        rest = flags.FLAGS(argv)
    except flags.Error as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    if len(rest) > 1:
        print(f"{prog}: error: unexpected arguments: {' '.join(rest[1:])} (flags look like --name=value)", file=sys.stderr)
        sys.exit(2)
    return rest


def fail(prog: str, message: object, code: int = 1) -> NoReturn:  # noqa: F821
    print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(code)
