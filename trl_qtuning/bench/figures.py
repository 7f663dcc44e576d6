"""Learning-curve figures: held-out (and transfer) NLL against optimizer step and against counted compute, one line
per (method, budget) with the mean over seeds and a band from the lowest to the highest seed."""

from __future__ import annotations

import contextlib
import importlib.util
from pathlib import Path
from typing import Any

from .matrix import Matrix, budget_label

__all__ = ["curve_series", "draw_curves"]

FIGURES = (("eval/nll", "step", "curves_nll_by_step.png"), ("eval/nll", "compute", "curves_nll_by_compute.png"),
           ("eval/nll_transfer", "step", "curves_transfer_by_step.png"),
           ("eval/nll_transfer", "compute", "curves_transfer_by_compute.png"))  # fmt: skip


def curve_series(results: list[dict[str, Any]], metric: str, axis: str) -> dict[str, list[tuple[float, float]]]:
    """Per row label, every seed's curve as ``[(x, value), ...]`` (x: step or compute)."""
    series: dict[str, list[list[tuple[float, float]]]] = {}
    for result in results:
        points = [(p[axis], p[metric]) for p in result.get("curve") or [] if p.get(metric) is not None]
        if len(points) < 2:
            continue
        budget = result.get("budget")
        label = f" {budget_label((budget['sample_keep_ratio'], budget['token_keep_ratio']))}" if budget else ""
        series.setdefault(result["method"] + label, []).append(points)
    return series


def _band(curves: list[list[tuple[float, float]]]):
    """Mean, low and high over seeds on a common x grid (each seed interpolated; the grid ends where the
    shortest seed ends, so the band never extrapolates)."""
    import numpy as np

    end = min(c[-1][0] for c in curves)
    grid = np.unique(np.concatenate([[x for x, _ in c if x <= end] for c in curves]))
    values = np.stack([np.interp(grid, [x for x, _ in c], [v for _, v in c]) for c in curves])
    return grid, values.mean(axis=0), values.min(axis=0), values.max(axis=0)


def draw_curves(matrix: Matrix, results: list[dict[str, Any]], folder: Path) -> list[str]:
    """Write the figures that have data next to results.md; returns their file names (none without matplotlib)."""
    if importlib.util.find_spec("matplotlib") is None:
        return []
    from ..tracking.figures import new_figure

    written = []
    for metric, axis, name in FIGURES:
        series = curve_series(results, metric, axis)
        if not series:
            continue
        fig = new_figure(7, 4.2)
        ax = fig.add_subplot()
        for label, curves in series.items():
            grid, mean, low, high = _band(curves)
            (line,) = ax.plot(grid, mean, label=f"{label} (n={len(curves)})")
            if len(curves) > 1:
                ax.fill_between(grid, low, high, color=line.get_color(), alpha=0.15, linewidth=0)
        ax.set_xlabel("optimizer step" if axis == "step" else "compute (forward-token equivalents)")
        ax.set_ylabel("held-out answer NLL" if metric == "eval/nll" else "transfer answer NLL")
        ax.set_title(f"{matrix.experiment}: mean over seeds, band = min..max")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        with contextlib.suppress(OSError):
            fig.savefig(folder / name, dpi=110)
            written.append(name)
    return written
