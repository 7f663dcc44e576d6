"""Aggregates of the trainer's per-sample decisions: per step (for the figures) and per sample (for the summary and
the pruned-dataset export). Fed live from ``StepDecisions`` events or rebuilt from the Parquet ledger."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..events import StepDecisions
from ..vocabulary import DECISIONS, QUADRANT_KEYS, TRAINED_DECISIONS, Decision

__all__ = ["StepStats", "DecisionAccumulator", "epoch_index"]


def epoch_index(epoch: float) -> int:
    """The 0-based epoch a step belongs to (the ledger stores ``state.epoch`` as it was before the step)."""
    return int(math.floor(float(epoch) + 1e-9))


@dataclass
class StepStats:
    step: int
    epoch: float
    samples: int = 0
    quadrants: dict[str, int] = field(default_factory=dict)
    decisions: dict[str, int] = field(default_factory=dict)
    response_tokens: int = 0
    label_tokens: int = 0
    """Response tokens trained on (kept samples, after token pruning)."""
    token_pruned_response: int = 0
    token_pruned_kept: int = 0
    scoring_seconds: float | None = None
    thresholds: list[dict[str, float]] = field(default_factory=list)

    @property
    def kept_samples(self) -> int:
        return sum(self.decisions.get(d, 0) for d in TRAINED_DECISIONS)

    @property
    def sample_keep_ratio(self) -> float:
        return self.kept_samples / self.samples if self.samples else float("nan")

    @property
    def token_keep_ratio(self) -> float:
        return self.token_pruned_kept / self.token_pruned_response if self.token_pruned_response else float("nan")

    def share(self, quadrant: str) -> float:
        return self.quadrants.get(quadrant, 0) / self.samples if self.samples else float("nan")


class DecisionAccumulator:
    """Per-step statistics plus per-(epoch, sample) counters ``[seen, kept, token_pruned, dropped]``."""

    def __init__(self) -> None:
        self.steps: dict[int, StepStats] = {}
        self.per_sample: dict[tuple[int, int], list[int]] = defaultdict(lambda: [0, 0, 0, 0])

    def __call__(self, event: StepDecisions) -> None:  # a decision listener
        self.ingest(event.columns, thresholds=event.thresholds, scoring_seconds=event.scoring_seconds)

    def ingest(
        self,
        columns: dict[str, Any],
        *,
        thresholds: list[dict[str, float]] | None = None,
        scoring_seconds: float | None = None,
    ) -> None:
        steps = np.asarray(columns["step"], dtype=np.int64)
        if steps.size == 0:
            return
        epochs = np.asarray(columns["epoch"], dtype=np.float64)
        sample_ids = np.asarray(columns["sample_id"], dtype=np.int64)
        quadrants = np.asarray(columns["quadrant"], dtype=np.int64)
        decisions = np.asarray(columns["decision"], dtype=object)
        response = np.asarray(columns["response_tokens"], dtype=np.int64)
        kept_tokens = np.asarray(columns["kept_tokens"], dtype=np.int64)
        kept = np.isin(decisions, TRAINED_DECISIONS)
        token_pruned = decisions == Decision.TOKEN_PRUNED
        for step in np.unique(steps):
            rows = steps == step
            stats = self.steps.get(int(step))
            if stats is None:
                stats = self.steps[int(step)] = StepStats(step=int(step), epoch=float(epochs[rows][0]))
            stats.samples += int(rows.sum())
            for code, name in enumerate(QUADRANT_KEYS):
                stats.quadrants[name] = stats.quadrants.get(name, 0) + int((quadrants[rows] == code).sum())
            for name in DECISIONS:
                stats.decisions[name] = stats.decisions.get(name, 0) + int((decisions[rows] == name).sum())
            stats.response_tokens += int(response[rows].sum())
            stats.label_tokens += int(kept_tokens[rows & kept].sum())
            stats.token_pruned_response += int(response[rows & token_pruned].sum())
            stats.token_pruned_kept += int(kept_tokens[rows & token_pruned].sum())
            if scoring_seconds is not None:
                stats.scoring_seconds = (stats.scoring_seconds or 0.0) + float(scoring_seconds)
            if thresholds:
                stats.thresholds.extend(thresholds)
        for epoch, sid, is_kept, is_tp in zip(epochs.tolist(), sample_ids.tolist(), kept.tolist(), token_pruned.tolist()):
            counts = self.per_sample[(epoch_index(epoch), sid)]
            counts[0] += 1
            counts[1] += int(is_kept)
            counts[2] += int(is_tp)
            counts[3] += int(not is_kept)

    @classmethod
    def from_ledger(cls, directory: str | Path, live: DecisionAccumulator | None = None) -> DecisionAccumulator:
        """Rebuild from the Parquet ledger (covers steps of earlier processes of a resumed run); scoring times and
        thresholds, which the ledger does not store, are taken from ``live`` where it saw the step."""
        from ..ledger import read_ledger

        table = read_ledger(directory)
        acc = cls()
        if table.num_rows:
            acc.ingest(table.drop_columns(["pruned_positions"]).to_pydict())
        if live is not None:
            for step, stats in acc.steps.items():
                seen = live.steps.get(step)
                if seen is not None:
                    stats.scoring_seconds = seen.scoring_seconds
                    stats.thresholds = list(seen.thresholds)
        return acc

    def ordered_steps(self) -> list[StepStats]:
        return [self.steps[s] for s in sorted(self.steps)]
