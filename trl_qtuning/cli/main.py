"""``trl-qtuning``: the console entry point. Dispatches to one subcommand, imported only when it runs.

    trl-qtuning sft --config recipes/<model>/qtuning/config_<name>.yaml [--any_field value ...]
    trl-qtuning demo [...]
    trl-qtuning compare --experiment NAME [--tracking-uri URI]
    trl-qtuning audit --model NAME|PATH|demo --dataset NAME|PATH|demo --output_dir DIR [...]

Every subcommand is a ``main(argv: list[str] | None) -> int`` function; add one by adding a line to ``COMMANDS``.
A :class:`~trl_qtuning.errors.CliError` it raises is reported as one line with its exit code.
Runs in-process, so ``accelerate launch -m trl_qtuning.cli.main sft ...`` works for multi-GPU training.
"""

from __future__ import annotations

import argparse
import pkgutil
import sys
from collections.abc import Callable
from dataclasses import dataclass

from .. import __version__
from ..errors import run_reporting_errors

__all__ = ["COMMANDS", "main"]

PROG = "trl-qtuning"


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    target: str
    """``"module:function"``; the function takes the arguments after the subcommand name and returns an exit code."""

    def load(self) -> Callable[[list[str] | None], int | None]:
        return pkgutil.resolve_name(self.target)


COMMANDS: tuple[Command, ...] = (
    Command("sft", "Train with Q-Tuning from a YAML recipe and/or --flags, like `trl sft`.",
            "trl_qtuning.cli.sft:main"),
    Command("demo", "Run the fully offline Q-Tuning demo (small pretrained model, math data).",
            "trl_qtuning.demo.run:main"),
    Command("compare", "Compare the runs of an MLflow experiment (Q-Tuning and plain SFT): table and figure.",
            "trl_qtuning.tracking.compare:main"),
    Command("bench", "Run a benchmark matrix (methods x budgets x seeds) and tabulate it.", "trl_qtuning.bench:main"),
    Command("audit", "Score every row of a dataset once on the EU plane: table, figure, most suspected rows, summary.",
            "trl_qtuning.audit.cli:main"),
)  # fmt: skip


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Q-Tuning (joint dynamic sample and token pruning for SFT) on top of TRL.",
        epilog=f"Run `{PROG} <command> --help` for the options of one command.",
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    subparsers = parser.add_subparsers(title="commands", dest="command", metavar="<command>")
    for command in COMMANDS:
        # The subcommand parses its own arguments (including -h), so its parser here only names it.
        subparsers.add_parser(command.name, help=command.help, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``trl-qtuning``; returns the process exit code (the console script exits with it)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _build_parser()
    try:
        args, _ = parser.parse_known_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error argparse already printed
        return int(exc.code or 0)
    if args.command is None:
        parser.print_help()
        return 0
    command = next(c for c in COMMANDS if c.name == args.command)
    rest = argv[argv.index(command.name) + 1 :]
    try:
        run = command.load()
    except ImportError as exc:
        print(
            f"{PROG} {command.name}: this command is not available in this installation "
            f"(cannot import {command.target.partition(':')[0]}: {exc}).",
            file=sys.stderr,
        )
        return 1
    return run_reporting_errors(f"{PROG} {command.name}", lambda: run(rest))


if __name__ == "__main__":
    raise SystemExit(main())
