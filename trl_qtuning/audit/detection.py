"""How well a per-row score finds known bad rows: AUROC and precision among the top-ranked rows.

The audit does not know which rows are bad; where noise was injected (the bench's swapped answers, or any list of
row ids), these measure each candidate score against it. NaN scores (rows without an answer token) are left out of
the measurement, and said so in the count.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pandas as pd

__all__ = ["CANDIDATE_SCORES", "RECOMMENDED_SCORE", "auroc", "candidate_scores", "detection_table", "precision_at"]

CANDIDATE_SCORES = ("ppl", "entropy", "rank_sum", "decorrelated", "suspicion")
"""The scores measured: PPL; mean entropy; rank(PPL) + rank(entropy); the entropy's residual after a least-squares fit
on log PPL (:func:`trl_qtuning.core.decorrelated_entropy`); the recommended ``suspicion``."""
RECOMMENDED_SCORE = "rank_sum"
"""What the ``suspicion`` column is: the rank sum (see docs/audit.md for the measurements behind the choice)."""


def _finite(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=bool)
    if scores.shape != labels.shape:
        raise ValueError(f"scores and labels must have the same shape, got {scores.shape} and {labels.shape}")
    keep = np.isfinite(scores)
    return scores[keep], labels[keep]


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Probability that a random bad row scores above a random good one (ties count one half): Mann-Whitney U over
    average ranks, divided by ``n_bad n_good``. NaN when either class is empty (after leaving out non-finite scores).
    """
    scores, labels = _finite(scores, labels)
    n_bad = int(labels.sum())
    n_good = labels.size - n_bad
    if n_bad == 0 or n_good == 0:
        return math.nan
    u = pd.Series(scores).rank().to_numpy()[labels].sum() - n_bad * (n_bad + 1) / 2.0
    return float(u / (n_bad * n_good))


def precision_at(scores: np.ndarray, labels: np.ndarray, share: float = 0.1) -> float:
    """Share of bad rows among the ``ceil(share * n)`` highest-scored rows (ties: the earlier row first); NaN when no
    row has a finite score."""
    if not 0.0 < share <= 1.0:
        raise ValueError(f"share must be in (0, 1], got {share}")
    scores, labels = _finite(scores, labels)
    if scores.size == 0:
        return math.nan
    count = max(1, math.ceil(share * scores.size - 1e-9))
    return float(labels[np.argsort(-scores, kind="stable")[:count]].mean())


def candidate_scores(ppl: np.ndarray, entropy: np.ndarray) -> dict[str, np.ndarray]:
    """Every candidate noise score of :data:`CANDIDATE_SCORES` (higher = more suspect; NaN where a row has none)."""
    import torch

    from ..core.plane import decorrelated_entropy

    ppl = np.asarray(ppl, dtype=np.float64)
    entropy = np.asarray(entropy, dtype=np.float64)
    valid = np.isfinite(ppl) & np.isfinite(entropy) & (ppl > 0)
    axes = pd.DataFrame({"ppl": np.where(valid, ppl, np.nan), "entropy": np.where(valid, entropy, np.nan)})
    ranks = axes.rank()  # average ranks; NaN rows stay NaN
    scores = {
        "ppl": axes["ppl"].to_numpy(),
        "entropy": axes["entropy"].to_numpy(),
        # Percentile ranks in (0, 1], so the sum is in (0, 2] whatever the row count.
        "rank_sum": ((ranks["ppl"] + ranks["entropy"]) / max(1, valid.sum())).to_numpy(),
        "decorrelated": decorrelated_entropy(torch.from_numpy(ppl.copy()), torch.from_numpy(entropy.copy())).numpy(),
    }
    scores["suspicion"] = scores[RECOMMENDED_SCORE].copy()
    return scores


def detection_table(
    scores: Mapping[str, np.ndarray], bad: np.ndarray, *, top_share: float = 0.1
) -> list[dict[str, float | int | str]]:
    """One row per score: AUROC, precision in the top ``top_share``, the base rate and the rows measured."""
    bad = np.asarray(bad, dtype=bool)
    rows = []
    for name, values in scores.items():
        finite = np.isfinite(np.asarray(values, dtype=np.float64))
        rows.append({
            "score": name, "auroc": auroc(values, bad), f"precision_top{round(top_share * 100)}": precision_at(
                values, bad, top_share) if finite.any() else math.nan,
            "base_rate": float(bad[finite].mean()) if finite.any() else math.nan,
            "rows": int(finite.sum()), "bad_rows": int(bad[finite].sum()),
        })  # fmt: skip
    return rows
