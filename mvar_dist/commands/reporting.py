"""How a command reports what the user can fix: one line on stderr, ``mvar-dist <command>:
<message>``, and an exit code; no traceback for errors whose message already says what to do."""

from __future__ import annotations

import functools
import sys
from typing import Callable, Sequence

Main = Callable[[Sequence[str]], int]


def reports(command: str, *errors: type[BaseException], code: int = 1) -> Callable[[Main], Main]:
    """Decorate a command's ``main``: ``errors`` become a message on stderr and exit ``code``."""
    def decorate(main: Main) -> Main:
        @functools.wraps(main)
        def run(argv: Sequence[str]) -> int:
            try:
                return main(argv)
            except errors as error:
                print(f"mvar-dist {command}: {error}", file=sys.stderr)
                return code
        return run
    return decorate
