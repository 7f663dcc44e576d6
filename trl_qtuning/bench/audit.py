"""The label-noise audit: from a cell's ledger, how corrupted and clean samples were treated.

The paper reads Q1 (high perplexity, high entropy) as "harmful noise" and drops it. With a seeded share of training
rows given another row's answer, the ledger says directly where those rows landed: per quadrant and per decision,
how many sample-steps were corrupted vs clean, and what share of the corrupted sample-steps each method trained on
(full data 100%, random pruning about its keep ratio).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from ..vocabulary import QUADRANT_SHORT_LABELS, TRAINED_DECISIONS

__all__ = ["audit_ledger", "audit_rows", "full_data_audit"]


def audit_rows(
    sample_ids: list[int], quadrants: list[int], decisions: list[str], steps: list[int], corrupted: set[int],
    *, max_step: int | None = None,
) -> dict[str, Any]:
    """The audit over ledger rows (one row per sample and step), up to ``max_step`` (the equal-steps point)."""
    rows = pd.DataFrame({"sample": sample_ids, "quadrant": quadrants, "decision": decisions, "step": steps})
    rows = rows[rows["step"] <= max_step] if max_step is not None else rows
    rows = rows.assign(quadrant=[QUADRANT_SHORT_LABELS.get(int(q), str(q)) for q in rows["quadrant"]],
                       corrupted=rows["sample"].isin(corrupted), trained=rows["decision"].isin(TRAINED_DECISIONS))
    by_kind = rows.groupby("corrupted")["trained"].agg(["count", "sum"])

    def count(kind: bool, column: str = "count") -> int:
        return int(by_kind[column].get(kind, 0))

    def table(column: str) -> dict[str, dict[str, Any]]:
        counts = rows.groupby(column)["corrupted"].agg(["sum", "count"])
        return {name: {"corrupted": int(c), "clean": int(n - c), "corrupted_share": float(c / n)}
                for name, (c, n) in counts.iterrows()}  # fmt: skip

    return {
        "sample_steps": {"corrupted": count(True), "clean": count(False)},
        "by_quadrant": table("quadrant"),
        "by_decision": table("decision"),
        "trained_share_corrupted": count(True, "sum") / count(True) if count(True) else None,
        "trained_share_clean": count(False, "sum") / count(False) if count(False) else None,
        "max_step": max_step,
    }


def audit_ledger(ledger_dir: Path, corrupted: list[int], *, max_step: int | None = None) -> dict[str, Any]:
    """:func:`audit_rows` over a ledger folder."""
    from ..ledger import read_ledger

    table = read_ledger(ledger_dir)
    if table.num_rows == 0:
        raise ValueError(f"no ledger rows under {ledger_dir}: the noise audit needs qtuning_ledger summary or full")
    columns = table.select(["sample_id", "quadrant", "decision", "step"]).to_pydict()
    return audit_rows(columns["sample_id"], columns["quadrant"], columns["decision"], columns["step"], set(corrupted),
                      max_step=max_step)  # fmt: skip


def full_data_audit(rows: int, corrupted: list[int]) -> dict[str, Any]:
    """Plain fine-tuning trains on every sample of every step: 100% of the corrupted ones, by definition."""
    return {
        "sample_steps": None, "by_quadrant": {}, "by_decision": {},
        "trained_share_corrupted": 1.0 if corrupted else None, "trained_share_clean": 1.0,
        "rows": rows, "corrupted_rows": len(corrupted), "note": "full data: no ledger, every sample is trained on",
    }  # fmt: skip
