"""The decision rows of a run, fed live from ``StepDecisions`` events or read back from the Parquet ledger, and their
pandas group-bys: per step (figures, summary) and per (epoch, sample) (summary, pruned-dataset selection)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from ..step.events import StepDecisions
from ..step.metrics import realised_budgets
from ..vocabulary import DECISIONS, QUADRANT_KEYS, TRAINED_DECISIONS, Decision

__all__ = ["DecisionAccumulator", "step_budgets"]

COLUMNS = ("step", "epoch", "sample_id", "quadrant", "decision", "response_tokens", "kept_tokens")
"""The ledger columns the aggregates read."""


def step_budgets(totals: Mapping[str, float]) -> dict[str, float | None]:
    """:func:`~trl_qtuning.step.metrics.realised_budgets` of :meth:`DecisionAccumulator.per_step`'s columns (one
    step's row, or their sum over steps)."""
    return realised_budgets({
        "samples": totals["samples"], "kept": totals["kept_samples"], "response_tokens": totals["response_tokens"],
        "kept_tokens": totals["label_tokens"], "pruned_response": totals["token_pruned_response"],
        "pruned_kept": totals["token_pruned_kept"],
    })  # fmt: skip


class DecisionAccumulator:
    """Decision rows, plus each step's scoring seconds (which the ledger does not store)."""

    def __init__(self) -> None:
        self._frames: list[pd.DataFrame] = []
        self._loose = 0  # frames appended since the last compaction
        self.scoring_seconds: dict[int, float] = {}

    def __call__(self, event: StepDecisions) -> None:  # a decision listener
        self._frames.append(pd.DataFrame({name: event.columns[name] for name in COLUMNS}))
        self._loose += 1
        if self._loose == 256:  # the last 256 steps as one frame: a long run's rows are copied once, not every time
            self._frames[-256:] = [pd.concat(self._frames[-256:], ignore_index=True)]
            self._loose = 0
        if event.scoring_seconds is not None:
            self.scoring_seconds[event.step] = self.scoring_seconds.get(event.step, 0.0) + float(event.scoring_seconds)

    @classmethod
    def from_ledger(cls, directory: str | Path, live: DecisionAccumulator | None = None) -> DecisionAccumulator:
        """The rows of the Parquet ledger (which covers the steps of earlier processes of a resumed run), with the
        scoring seconds of the steps ``live`` saw."""
        from ..ledger import read_ledger

        acc = cls()
        acc._frames = [read_ledger(directory).select(list(COLUMNS)).to_pandas()]
        if live is not None:
            acc.scoring_seconds = dict(live.scoring_seconds)
        return acc

    @property
    def empty(self) -> bool:
        return not any(len(frame) for frame in self._frames)

    def rows(self) -> pd.DataFrame:
        frames = [frame for frame in self._frames if len(frame)]
        if not frames:
            return pd.DataFrame({name: pd.Series(dtype=object if name == "decision" else "int64") for name in COLUMNS})
        return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]

    def per_step(self) -> pd.DataFrame:
        """One row per step (the index): ``samples``, ``kept_samples``, ``response_tokens``, ``label_tokens`` (kept
        samples' trained answer tokens), ``token_pruned_response``/``token_pruned_kept`` (answer tokens of the
        token-pruned samples, all and kept), a count per quadrant key and per decision, ``scoring_seconds``."""
        rows = self.rows()
        kept = rows["decision"].isin(TRAINED_DECISIONS)
        pruned = rows["decision"].eq(Decision.TOKEN_PRUNED)
        steps = rows.assign(
            kept=kept, label_tokens=rows["kept_tokens"].where(kept, 0),
            token_pruned_response=rows["response_tokens"].where(pruned, 0),
            token_pruned_kept=rows["kept_tokens"].where(pruned, 0),
        ).groupby("step").agg(
            samples=("sample_id", "size"), kept_samples=("kept", "sum"), response_tokens=("response_tokens", "sum"),
            label_tokens=("label_tokens", "sum"), token_pruned_response=("token_pruned_response", "sum"),
            token_pruned_kept=("token_pruned_kept", "sum"),
        )  # fmt: skip
        quadrants = pd.crosstab(rows["step"], rows["quadrant"].map(dict(enumerate(QUADRANT_KEYS))))
        decisions = pd.crosstab(rows["step"], rows["decision"].astype(str))
        steps = steps.join(quadrants.reindex(columns=QUADRANT_KEYS, fill_value=0))
        steps = steps.join(decisions.reindex(columns=DECISIONS, fill_value=0)).fillna(0).astype("int64")
        return steps.assign(scoring_seconds=pd.Series(self.scoring_seconds, dtype="float64"))

    def per_sample(self) -> pd.DataFrame:
        """One row per (epoch, sample_id): ``times_seen``, ``times_kept`` (trained on), ``times_token_pruned``,
        ``times_dropped`` and ``kept`` (trained on at least once). The epoch is 0-based (the ledger stores
        ``state.epoch`` as it was before the step)."""
        rows = self.rows()
        kept = rows["decision"].isin(TRAINED_DECISIONS)
        counts = pd.DataFrame({
            "epoch": np.floor(rows["epoch"].astype("float64") + 1e-9).astype("int32"), "sample_id": rows["sample_id"],
            "times_seen": 1, "times_kept": kept, "times_token_pruned": rows["decision"].eq(Decision.TOKEN_PRUNED),
            "times_dropped": ~kept,
        }).groupby(["epoch", "sample_id"], as_index=False).sum()  # fmt: skip
        counts = counts.astype({name: "int32" for name in counts.columns if name.startswith("times_")})
        return counts.assign(kept=counts["times_kept"] > 0)
