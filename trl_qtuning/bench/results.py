"""A cell's result on disk: ``<output_dir>/<cell folder>/result.json``, written atomically, read back for resuming."""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

from ..files import write_json
from .matrix import Cell, Matrix
from .provenance import code_state, fingerprint, git_state, library_versions, machine_summary

__all__ = ["RESULT_FILE", "RESULT_FORMAT", "cell_record", "read_result", "write_json"]

RESULT_FILE = "result.json"
RESULT_FORMAT = 2
"""Results carry the learning curve, the compute and (with label noise) the noise audit."""


def read_result(cell_dir: Path, cell: Cell | None = None) -> dict[str, Any] | None:
    """The cell's result if its ``result.json`` is complete (else None)."""
    path = cell_dir / RESULT_FILE
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(result, dict) or result.get("status") != "complete" or not isinstance(result.get("metrics"), dict):
        return None
    if cell is not None and result.get("cell_id") != cell.id:
        return None
    return result


def cell_record(matrix: Matrix, cell: Cell, **fields: Any) -> dict[str, Any]:
    """The result of a finished cell: ``git`` is the code the process started with; ``git_at_finish`` is added
    when the checkout has moved since (the cell still ran the code of ``git``)."""
    code, now = code_state(), git_state()
    return {
        "format": RESULT_FORMAT,
        "status": "complete",
        "cell_id": cell.id,
        "cell_dir": cell.dirname,
        "method": cell.method,
        "budget": None if cell.budget is None else {"sample_keep_ratio": cell.budget[0], "token_keep_ratio": cell.budget[1]},
        "seed": cell.seed,
        "fingerprint": fingerprint(matrix, cell),
        **fields,
        "git": code,
        **({"git_at_finish": now} if now != code else {}),
        "versions": library_versions(),
        "machine": machine_summary(),  # a study outlives a session, and sessions may land on other machines
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
