"""``trl-qtuning audit``: score every row of a dataset once and write what the EU plane sees in it.

    trl-qtuning audit --model demo --dataset demo --output_dir audit-demo
    trl-qtuning audit --model ./my-run/checkpoint-200 --dataset data.jsonl --output_dir audit-run
    accelerate launch -m trl_qtuning.cli.main audit --model NAME --dataset NAME --output_dir DIR   # several processes

Mistakes in the arguments or inputs are one line (exit code 2 for arguments, 1 for inputs that cannot be loaded),
as for ``trl-qtuning sft``; ``TRL_QTUNING_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import ArgumentParser, CliError, run_reporting_errors

__all__ = ["build_parser", "main"]

PROG = "trl-qtuning audit"


def _optional_int(value: str) -> int | None:
    return None if value.strip().lower() in ("none", "null", "0") else int(value)


def _bool(value: str) -> bool:
    """true/false as ``trl-qtuning sft`` reads them (transformers' ``string_to_bool``); a typo is an error."""
    text = value.strip().lower()
    if text not in ("true", "yes", "y", "t", "1", "false", "no", "n", "f", "0"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")
    return text in ("true", "yes", "y", "t", "1")


def build_parser() -> argparse.ArgumentParser:
    from .api import AuditSettings

    d = AuditSettings()
    p = ArgumentParser(prog=PROG, allow_abbrev=False, description=(
        "Score every row of an SFT dataset once with a model (the trainer's own scoring forward) and write a table of "
        "PPL, entropy, quadrant and a noise-suspicion score per row (Parquet), the EU plane figure, a page of the most "
        "suspected rows and a summary. An interrupted audit resumes where it stopped when run again with the same "
        "arguments. Under `accelerate launch` each process scores a share of the rows."))  # fmt: skip
    p.add_argument("--model", "--model_name_or_path", dest="model", required=True,
                   help="Hub name, local folder, a LoRA run's output/checkpoint folder, or 'demo' (embedded "
                        "SmolLM2-135M-Instruct).")  # fmt: skip
    p.add_argument("--adapter", default=None, help="A PEFT adapter folder to put on --model.")
    p.add_argument("--dataset", "--dataset_name", dest="dataset", required=True,
                   help="Hub id or local path as for `trl-qtuning sft` (save_to_disk folder, data folder, "
                        ".json/.jsonl/.parquet/.csv file), or 'demo' (the demo's MATH pool).")  # fmt: skip
    p.add_argument("--dataset_config", default=None)
    p.add_argument("--dataset_split", default="train")
    p.add_argument("--dataset_streaming", type=_bool, default=False, help="Stream the dataset (never held whole).")
    p.add_argument("--dataset_text_field", default=d.dataset_text_field)
    p.add_argument("--output_dir", required=True, help="Folder for the shards and outputs (resumes a same audit).")
    p.add_argument("--overwrite", action="store_true", help="Start over in an output_dir holding another audit.")
    p.add_argument("--max_length", type=_optional_int, default=d.max_length,
                   help=f"Truncate longer rows as SFTTrainer does (default {d.max_length}; none: no limit).")
    p.add_argument("--truncation_mode", default=d.truncation_mode, choices=["keep_start", "keep_end"])
    p.add_argument("--batch_size", type=int, default=d.batch_size, help="Rows per forward (length-sorted).")
    p.add_argument("--max_batch_tokens", type=_optional_int, default=d.max_batch_tokens,
                   help="Also cap rows x longest row per forward.")
    p.add_argument("--chunk_size", type=int, default=d.chunk_size, help="Rows per shard (the unit of resumption).")
    p.add_argument("--keep_ratio", type=float, default=d.keep_ratio,
                   help="Sample budget whose quadrants the table reports (the trainer's triage over all rows).")
    p.add_argument("--top_k", type=int, default=d.top_k, help="Suspected rows marked and listed.")
    p.add_argument("--completion_only_loss", type=_bool, default=None)
    p.add_argument("--assistant_only_loss", type=_bool, default=False)
    p.add_argument("--dtype", default="float32", help="Model weights' dtype (float32, bfloat16, float16).")
    p.add_argument("--bf16", type=_bool, default=False, help="Score under bf16 autocast (a GPU with bf16).")
    p.add_argument("--noisy_rows", default=None,
                   help="A JSON file with a list of row ids known to be bad: the summary measures detection.")
    p.add_argument("--report_to", default="none", choices=["none", "mlflow"])
    p.add_argument("--tracking_uri", default=None, help="MLflow tracking URI (default: MLflow's own).")
    p.add_argument("--experiment_name", default="trl-qtuning-audit")
    p.add_argument("--no_progress", action="store_true", help="No progress bar.")
    return p


def _noisy_rows(path: str | None) -> list[int] | None:
    if path is None:
        return None
    file = Path(path).expanduser()
    if not file.is_file():
        raise CliError(f"--noisy_rows file not found: {path}", code=1)
    try:
        rows = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise CliError(f"--noisy_rows {path} is not JSON: {exc}", code=1) from exc
    if isinstance(rows, dict):  # e.g. {"corrupted_ids": [...]}, as the bench writes
        lists = [v for v in rows.values() if isinstance(v, list)]
        rows = lists[0] if len(lists) == 1 else None
    if not isinstance(rows, list) or not all(isinstance(r, int) and not isinstance(r, bool) for r in rows):
        raise CliError(f"--noisy_rows {path} must hold a JSON list of integer row ids", code=1)
    return rows


def main(argv: list[str] | None = None) -> int:
    """``trl-qtuning audit --model M --dataset D --output_dir DIR [...]``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)

    def body() -> int:
        args = build_parser().parse_args(argv)
        from .api import AuditSettings, audit_dataset
        from .outputs import describe

        settings = AuditSettings(
            max_length=args.max_length, truncation_mode=args.truncation_mode, batch_size=args.batch_size,
            max_batch_tokens=args.max_batch_tokens, chunk_size=args.chunk_size, keep_ratio=args.keep_ratio,
            top_k=args.top_k, dataset_text_field=args.dataset_text_field,
            completion_only_loss=args.completion_only_loss, assistant_only_loss=args.assistant_only_loss,
            bf16=args.bf16,
        )  # fmt: skip
        result = audit_dataset(
            args.model, args.dataset, adapter=args.adapter, output_dir=args.output_dir, settings=settings,
            noisy_rows=_noisy_rows(args.noisy_rows), dataset_config=args.dataset_config,
            dataset_split=args.dataset_split, streaming=args.dataset_streaming, dtype=args.dtype,
            overwrite=args.overwrite, progress=not args.no_progress, report_to=args.report_to,
            tracking_uri=args.tracking_uri, experiment_name=args.experiment_name,
        )  # fmt: skip
        from accelerate import PartialState

        if PartialState().is_main_process:
            for line in describe(result.summary, result.files):
                print(line, flush=True)
        return 0

    return run_reporting_errors(PROG, body)


if __name__ == "__main__":
    raise SystemExit(main())
