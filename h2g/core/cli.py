"""Shared command-line plumbing: H2GError -> exit code 2 and one line on stderr."""
from __future__ import annotations

import sys

from h2g.core.errors import H2GError


def run_cli(main, argv=None) -> int:
    """Run ``main(argv)``; an :class:`H2GError` becomes exit code 2 and its message on
    stderr without a traceback.  Returns the exit code (``main``'s return or 0)."""
    try:
        code = main(argv)
    except H2GError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0 if code is None else int(code)
