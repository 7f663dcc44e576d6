"""``trl-qtuning bench``'s command line: a parser and ``main``."""

from __future__ import annotations

import argparse
import sys

from ..errors import ArgumentParser, CliError, run_reporting_errors
from .matrix import PROG, BenchConfigError, load_matrix
from .tables import collect_rows, render_results

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog=PROG,
        description="Run a benchmark matrix (methods x budgets x seeds), one MLflow run per cell, resumable; then "
        "print and write the comparison tables (equal steps, equal compute, paired intervals, noise audit). "
        "Relative paths in the matrix resolve against the current directory.",
    )
    parser.add_argument("--config", required=True, metavar="MATRIX.yaml", help="The matrix file.")
    parser.add_argument("--table-only", action="store_true",
                        help="Only re-render the tables from the cells' result.json files (nothing is run).")
    parser.add_argument("--only", nargs="+", metavar="METHOD",
                        help="Run only these methods ('base' for the untrained model's row); the table shows all.")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``trl-qtuning bench --config MATRIX.yaml [--table-only] [--only METHOD ...]``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)

    def body() -> int:
        args = build_parser().parse_args(argv)
        command = " ".join([PROG, *argv])
        try:
            matrix = load_matrix(args.config, check_inputs=not args.table_only)
            if args.table_only:
                _, _, results = collect_rows(matrix)
                if not results:
                    raise CliError(f"no finished cells under {matrix.output_dir} (run `{PROG} --config {args.config}`)", 1)
                render_results(matrix, command=command)
                return 0
            from .runner import run_bench  # the trainer's imports, only when cells run

            return run_bench(matrix, only=args.only, command=command)
        except BenchConfigError as exc:  # a field of the matrix: say which file
            if str(exc).startswith(("matrix file not found", "--only")):
                raise
            raise BenchConfigError(f"{args.config}: {exc}") from exc

    return run_reporting_errors(PROG, body)
