"""Paired statistics over seeds: every method against each baseline, seed by seed.

Under one seed every method shares the data order and the LoRA initialisation, so the per-seed difference
``metric(method) - metric(baseline)`` removes the seed's own luck. Its mean over seeds gets a 95% Student t
interval; a method "wins" against a baseline only where the interval excludes 0 (lower NLL is better).
"""

from __future__ import annotations

from typing import Any

import pandas as pd

__all__ = ["paired_difference"]


def paired_difference(method: dict[int, float], baseline: dict[int, float], *, lower_is_better: bool = True) -> dict[str, Any] | None:
    """The per-seed differences ``method - baseline`` over the seeds both have, with their t interval and verdict."""
    seeds = sorted(set(method) & set(baseline))
    if not seeds:
        return None
    diffs = pd.Series(method)[seeds] - pd.Series(baseline)[seeds]
    finite = diffs[diffs.abs() < float("inf")]
    low = high = None
    verdict = "n < 2"
    if len(finite) > 1:
        try:
            from scipy.stats import t
        except ImportError:
            raise ImportError("the bench's 95% intervals need scipy: pip install 'trl-qtuning[bench]'") from None
        half = float(t.ppf(0.975, len(finite) - 1) * finite.sem())
        low, high = float(finite.mean()) - half, float(finite.mean()) + half
        better, worse = (high < 0, low > 0) if lower_is_better else (low > 0, high < 0)
        verdict = "better" if better else "worse" if worse else "no difference"
    return {"seeds": seeds, "differences": diffs.tolist(), "mean": float(diffs.mean(skipna=False)), "low": low,
            "high": high, "verdict": verdict}  # fmt: skip
