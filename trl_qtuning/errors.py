"""The one-line errors every ``trl-qtuning`` command reports: a mistake the user can fix gets one line naming the
field and the fix, and an exit code, not a traceback (``TRL_QTUNING_DEBUG=1`` shows the traceback).

Outside ``cli/`` so that library modules (the audit's and the bench's checks) can raise it without importing a
command.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import NoReturn

__all__ = [
    "ArgumentParser", "CliError", "OneLineErrors", "debug_enabled", "one_line", "quiet_libraries", "run_reporting_errors",
]  # fmt: skip

DEBUG_ENV = "TRL_QTUNING_DEBUG"


class CliError(Exception):
    """A mistake the user can fix (arguments, recipe, inputs); ``code`` is 2 for arguments, 1 for inputs."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


class OneLineErrors:
    """Mixin for an ``argparse.ArgumentParser``: a usage error raises :class:`CliError` instead of printing the usage
    of every option (``trl-qtuning sft`` has hundreds) and exiting."""

    prog: str

    def error(self, message: str) -> NoReturn:
        raise CliError(f"{message} (see `{self.prog} --help`)")


class ArgumentParser(OneLineErrors, argparse.ArgumentParser):
    """``argparse.ArgumentParser`` with one-line usage errors."""


def one_line(exc: BaseException | str) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def run_reporting_errors(prog: str, body: Callable[[], int | None]) -> int:
    """Run a command and return its exit code: a :class:`CliError` becomes one ``prog: error: ...`` line (a traceback
    only with ``TRL_QTUNING_DEBUG=1``), argparse's ``--help`` exit a code, an interruption 130.

    A ``SystemExit`` carrying a message (not a code) goes on, so that Python prints it.
    """
    try:
        return int(body() or 0)
    except CliError as exc:
        if debug_enabled() and exc.__cause__ is not None:
            raise
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return exc.code
    except SystemExit as exc:
        if isinstance(exc.code, str):
            raise
        return exc.code or 0
    except KeyboardInterrupt:
        print(f"{prog}: interrupted.", file=sys.stderr)
        return 130


def quiet_libraries(warnings_from: str = "") -> None:
    """For a command that prints its own progress (the demo, the bench): no Hub telemetry, no tokenizers fork
    warning, no progress bars or info logs of datasets and transformers, and no warnings from the modules
    ``warnings_from`` matches (a regex, as for ``warnings.filterwarnings``; every module by default)."""
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    import datasets
    import transformers

    warnings.filterwarnings("ignore", module=warnings_from)
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
