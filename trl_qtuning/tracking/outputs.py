"""A run's tracking outputs in its ``output_dir``, and how a fresh run keeps an earlier run's (moved aside, never
overwritten or deleted), the way :mod:`trl_qtuning.ledger` keeps an earlier ledger.

A run tracked with MLflow writes ``qtuning_tracking/`` (figures, the samples page, its MLflow run id and, while the
server is unreachable, its unsent queue ``pending.jsonl``), ``qtuning_summary.json``, ``qtuning_report.md`` and
``qtuning_selection/``. When a fresh run starts (a ``train()`` call that does not resume), an earlier run's are moved
to ``<name>.previous-<tag>`` (``qtuning_summary.previous-<tag>.json`` for a file), the tag being the earlier ledger's
run id[:8] where a ledger was moved aside with them, so one run's files sort together; else the earlier MLflow run
id[:8]; else the time they were last written. The queued artifact paths of a moved queue are rewritten to the files'
new places (the ledger's too), so ``python -m trl_qtuning.tracking sync OUTPUT_DIR`` sends the earlier run's own
files to the earlier run. Nothing here imports mlflow.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..ledger import aside_path, modified_tag
from .sink import PENDING_FILE, RUN_FILE, queue_files, recorded_run_id, rewrite_queue_paths

__all__ = [
    "TRACKING_DIR", "SUMMARY_FILE", "REPORT_FILE", "SELECTION_DIR", "RUN_OUTPUTS", "set_aside_earlier_outputs",
    "tracking_folders",
]  # fmt: skip

logger = logging.getLogger("trl_qtuning.tracking")

TRACKING_DIR = "qtuning_tracking"
"""Folder under ``output_dir`` with figures, the samples page, the run id and the unsent queue."""
SUMMARY_FILE = "qtuning_summary.json"
REPORT_FILE = "qtuning_report.md"
SELECTION_DIR = "qtuning_selection"
RUN_OUTPUTS = (TRACKING_DIR, SUMMARY_FILE, REPORT_FILE, SELECTION_DIR)
"""What one run writes at the top of ``output_dir`` besides its ledger and checkpoints."""


def tracking_folders(output_dir: str | os.PathLike) -> list[Path]:
    """The run's tracking folder and those of earlier runs moved aside (``qtuning_tracking.previous-*``)."""
    output_dir = Path(output_dir)
    return [output_dir / TRACKING_DIR, *sorted(output_dir.glob(f"{TRACKING_DIR}.previous-*"))]


def set_aside_earlier_outputs(
    output_dir: str | os.PathLike, moved_ledger: tuple[Path, Path] | None = None, *, keep: tuple[str, ...] = ()
) -> dict[Path, Path]:
    """Move an earlier run's :data:`RUN_OUTPUTS` aside before a fresh run writes its own; returns old -> new path.

    ``moved_ledger``: (old, new) folder of the earlier run's ledger, already moved aside; its tag names these too,
    and the moved queue's ledger shards point at it. ``keep``: outputs this run has already started (the tracking
    folder of a run whose MLflow tracking began with a ``trainer.evaluate()`` before ``train()``: its setup had
    already moved the earlier run's queue aside inside it).
    """
    output_dir = Path(output_dir)
    present = [output_dir / name for name in RUN_OUTPUTS if name not in keep and (output_dir / name).exists()]
    if not present:
        return {}
    if moved_ledger is not None:
        tag = moved_ledger[1].name.split(".previous-", 1)[1]
    else:
        spool = output_dir / TRACKING_DIR
        run_id = recorded_run_id(spool / RUN_FILE) or recorded_run_id(spool / PENDING_FILE)
        tag = run_id[:8] if run_id else modified_tag(max(present, key=lambda p: p.stat().st_mtime))
    moves = {}
    for path in present:
        target = aside_path(path, tag)
        path.rename(target)
        moves[path] = target
    tracking = moves.get(output_dir / TRACKING_DIR)
    if tracking is not None:
        for queue in queue_files([tracking]):
            rewrite_queue_paths(queue, {**moves, **dict([moved_ledger] if moved_ledger else [])})
    logger.warning(
        "Q-Tuning: %s held the tracking outputs of an earlier run; this fresh run writes its own, so they were moved "
        "aside (nothing is deleted): %s.%s", output_dir,
        ", ".join(f"{old.name} -> {new.name}" for old, new in moves.items()),
        f" Its unsent MLflow queue can be sent with `python -m trl_qtuning.tracking sync {output_dir}`."
        if tracking is not None and queue_files([tracking]) else "",
    )  # fmt: skip
    return moves
