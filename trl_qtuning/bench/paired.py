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

# Two-sided 95% Student t quantiles t(0.975, df) for df = 1..30; beyond, the Cornish-Fisher expansion (error < 1e-4).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)  # fmt: skip


def t_quantile(p: float, df: int) -> float:
    """The Student t quantile: scipy's when installed, else a table for p = 0.975 (the 95% interval)."""
    try:
        from scipy.stats import t
    except ImportError:
        if abs(p - 0.975) > 1e-12:
            raise ImportError("t quantiles other than the 95% interval's need scipy: pip install scipy") from None
        if df <= len(_T975):
            return _T975[df - 1]
        z = statistics.NormalDist().inv_cdf(p)
        return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
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
