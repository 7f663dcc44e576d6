"""Paired statistics over seeds: every method against each baseline, seed by seed.

Under one seed every method shares the data order and the LoRA initialisation, so the per-seed difference
``metric(method) - metric(baseline)`` removes the seed's own luck. Its mean over seeds gets a 95% Student t
interval; a method "wins" against a baseline only where the interval excludes 0 (lower NLL is better).
"""

from __future__ import annotations

import math
import statistics
from typing import Any

__all__ = ["paired_difference", "t_interval", "t_quantile"]


def t_quantile(p: float, df: int) -> float:
    """The Student t quantile (scipy's; the bench's intervals need the ``bench`` extra)."""
    try:
        from scipy.stats import t
    except ImportError:
        raise ImportError("the bench's 95% intervals need scipy: pip install 'trl-qtuning[bench]'") from None
    return float(t.ppf(p, df))


def t_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float, float] | None:
    """``(mean, low, high)`` of the Student t interval for the mean of ``values`` (None with fewer than 2)."""
    clean = [v for v in values if v is not None and math.isfinite(v)]
    if len(clean) < 2:
        return None
    mean = statistics.fmean(clean)
    half = t_quantile(0.5 + confidence / 2, len(clean) - 1) * statistics.stdev(clean) / math.sqrt(len(clean))
    return mean, mean - half, mean + half


def paired_difference(method: dict[int, float], baseline: dict[int, float], *, lower_is_better: bool = True) -> dict[str, Any] | None:
    """The per-seed differences ``method - baseline`` over the seeds both have, with their t interval and verdict."""
    seeds = sorted(set(method) & set(baseline))
    if not seeds:
        return None
    diffs = [method[s] - baseline[s] for s in seeds]
    interval = t_interval(diffs)
    verdict = "n < 2"
    if interval is not None:
        _, low, high = interval
        better = high < 0 if lower_is_better else low > 0
        worse = low > 0 if lower_is_better else high < 0
        verdict = "better" if better else "worse" if worse else "no difference"
    return {
        "seeds": seeds, "differences": diffs, "mean": statistics.fmean(diffs),
        "low": interval[1] if interval else None, "high": interval[2] if interval else None, "verdict": verdict,
    }  # fmt: skip
