"""How a command talks to the user: one line on stderr, ``mvar-dist <command>: <message>``, and an
exit code, with no traceback for errors whose message already says what to do; and the
``--help`` layout every command shares. A command declares its errors with :func:`reports`; the
CLI (:func:`mvar_dist.cli.main`) catches and reports them, so no wrapper stands between the CLI
and the command's own code.

Exit codes (docs/troubleshooting.md#exit-codes): 0 success; 1 a run that failed or a check that
found bad data; 2 a user error in the input (a path, a flag value, a config, the data given),
reported before any work where it can be; argparse's usage errors are 2 as well.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, Sequence

Main = Callable[[Sequence[str]], int]

FAILED = 1
USER_ERROR = 2
_DECLARED = "_mvar_dist_reports"


def reports(command: str, *errors: type[BaseException],
            failures: tuple[type[BaseException], ...] = ()) -> Callable[[Main], Main]:
    """Declare what a command's ``main`` reports instead of raising: ``errors`` (what the user can
    fix in the input) exit :data:`USER_ERROR`, ``failures`` (a run or check that failed) exit
    :data:`FAILED`; both as one line on stderr. ``mvar_dist.cli.main`` does the reporting (see
    :func:`declared`), so the function itself is returned unwrapped: called directly (a test, a
    script), it raises as any function does."""
    def declare(main: Main) -> Main:
        main.__dict__[_DECLARED] = (command, tuple(errors), tuple(failures))
        return main
    return declare


def declared(main: Any) -> tuple[str, tuple[type[BaseException], ...], tuple[type[BaseException], ...]] | None:
    """(command, user errors, failures) that ``@reports`` declared for ``main``, or None."""
    return getattr(main, _DECLARED, None)


def report(command: str, error: BaseException, code: int) -> int:
    print(f"mvar-dist {command}: {_one_line(error)}", file=sys.stderr)
    return code


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """``--help`` of every command: the description and epilog as written (paragraphs and
    examples kept), and ``(default: X)`` after each option whose default means something. Left
    out: defaults of None, False and empty lists (an unset option, a flag), and help that
    already states its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default: Any = action.default
        unset = default is None or default is False or default is argparse.SUPPRESS or (
            isinstance(default, (list, tuple, dict)) and not default)
        takes_default = bool(action.option_strings) or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE)
        if unset or not takes_default or "default" in text:
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"
