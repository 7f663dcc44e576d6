"""The label-noise audit: from a cell's ledger, how corrupted and clean samples were treated.

The paper reads Q1 (high perplexity, high entropy) as "harmful noise" and drops it. With a seeded share of training
rows given another row's answer, the ledger says directly where those rows landed: per quadrant and per decision,
how many sample-steps were corrupted vs clean, and what share of the corrupted sample-steps each method trained on
(full data 100%, random pruning about its keep ratio).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from ..vocabulary import QUADRANT_SHORT_LABELS, TRAINED_DECISIONS

__all__ = ["audit_ledger", "audit_rows", "full_data_audit"]


def audit_rows(
    sample_ids: list[int], quadrants: list[int], decisions: list[str], steps: list[int], corrupted: set[int],
    *, max_step: int | None = None,
) -> dict[str, Any]:
    """The audit over ledger rows (one row per sample and step), up to ``max_step`` (the equal-steps point)."""
    by_quadrant: dict[str, Counter] = {}
    by_decision: dict[str, Counter] = {}
    totals: Counter = Counter()
    for sample, quadrant, decision, step in zip(sample_ids, quadrants, decisions, steps, strict=True):
        if max_step is not None and step > max_step:
            continue
        kind = "corrupted" if sample in corrupted else "clean"
        by_quadrant.setdefault(QUADRANT_SHORT_LABELS.get(int(quadrant), str(quadrant)), Counter())[kind] += 1
        by_decision.setdefault(decision, Counter())[kind] += 1
        totals[kind] += 1
        if decision in TRAINED_DECISIONS:
            totals[f"{kind}_trained"] += 1

    def table(groups: dict[str, Counter]) -> dict[str, dict[str, Any]]:
        return {
            name: {"corrupted": c["corrupted"], "clean": c["clean"],
                   "corrupted_share": c["corrupted"] / (c["corrupted"] + c["clean"]) if c["corrupted"] + c["clean"] else None}
            for name, c in sorted(groups.items())
        }  # fmt: skip

    return {
        "sample_steps": {"corrupted": totals["corrupted"], "clean": totals["clean"]},
        "by_quadrant": table(by_quadrant),
        "by_decision": table(by_decision),
        "trained_share_corrupted": totals["corrupted_trained"] / totals["corrupted"] if totals["corrupted"] else None,
        "trained_share_clean": totals["clean_trained"] / totals["clean"] if totals["clean"] else None,
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
