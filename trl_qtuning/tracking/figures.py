"""Matplotlib figures (Agg canvas, no pyplot global state): the EU plane of one step, quadrant shares and realised
budgets over training, and the comparison of several runs."""

from __future__ import annotations

import functools
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..vocabulary import QUADRANTS, TRAINED_DECISIONS

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["eu_plane_figure", "quadrant_shares_figure", "budgets_figure", "new_figure", "save_figure", "matplotlib_available"]

QUADRANT_COLORS = ("#9e9e9e", "#d62728", "#ff7f0e", "#1f77b4", "#2ca02c")
"""By quadrant code (0 mid band, 1..4 for Q1..Q4)."""


@functools.cache
def matplotlib_available() -> bool:
    """Figures are optional: without matplotlib, say so once and draw none."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        logging.getLogger("trl_qtuning.tracking").warning(
            "trl-qtuning: matplotlib is missing, so no figures are drawn (pip install 'trl-qtuning[mlflow]')."
        )
        return False
    return True


def new_figure(width: float = 7.0, height: float = 5.0):
    """A figure on its own Agg canvas: no pyplot, so no global backend switch or figure registry in the caller's
    process (the audit and the bench are Python APIs too)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    return path


def eu_plane_figure(step: int, columns: dict[str, Any], thresholds: list[dict[str, float]]):
    """PPL (log x axis when it spans more than a decade) against mean entropy, one point per sample, coloured by
    quadrant; filled markers were trained on, crosses were dropped; dashed lines are the step's thresholds."""
    fig = new_figure()
    ax = fig.add_subplot(1, 1, 1)
    ppl = np.asarray(columns["ppl"], dtype=np.float64)
    ent = np.asarray(columns["entropy"], dtype=np.float64)
    quadrant = np.asarray(columns["quadrant"], dtype=np.int64)
    kept = np.isin(np.asarray(columns["decision"], dtype=object), TRAINED_DECISIONS)
    finite = np.isfinite(ppl) & np.isfinite(ent)
    for q in QUADRANTS:
        sel = finite & (quadrant == q.code)
        if not sel.any():
            continue
        color = QUADRANT_COLORS[q.code]
        ax.scatter(ppl[sel & kept], ent[sel & kept], c=color, s=28, label=f"{q.label} ({int(sel.sum())})")
        ax.scatter(ppl[sel & ~kept], ent[sel & ~kept], c=color, s=28, marker="x")
    positive = ppl[finite & (ppl > 0)]
    if positive.size and positive.max() / max(positive.min(), 1e-12) > 10:
        ax.set_xscale("log")
    for i, group in enumerate(thresholds):
        label = "thresholds" if i == 0 else None
        for key in ("ppl_lo", "ppl_hi"):
            if math.isfinite(group.get(key, math.nan)):
                ax.axvline(group[key], color="black", ls="--", lw=0.8, alpha=0.7, label=label)
                label = None
        for key in ("ent_lo", "ent_hi"):
            if math.isfinite(group.get(key, math.nan)):
                ax.axhline(group[key], color="black", ls=":", lw=0.8, alpha=0.7)
    levels = [g["q"] for g in thresholds if math.isfinite(g.get("q", math.nan))]  # baselines have no q
    q = float(np.mean(levels)) if levels else math.nan
    ax.ticklabel_format(axis="y", useOffset=False)
    ax.set_xlabel("perplexity of the answer (PPL)")
    ax.set_ylabel("mean predictive entropy")
    ax.set_title(f"EU plane, step {step}" + (f" (q = {q:.3f})" if math.isfinite(q) else "") + "; x = dropped")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return fig


def quadrant_shares_figure(steps: pd.DataFrame):
    """Stacked share of each quadrant per optimizer step (before pruning); ``steps``: ``per_step()``'s frame."""
    fig = new_figure(8.0, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    shares = [steps[q.key] / steps["samples"] for q in QUADRANTS]
    colors = [QUADRANT_COLORS[q.code] for q in QUADRANTS]
    ax.stackplot(steps.index, *shares, labels=[q.label for q in QUADRANTS], colors=colors)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("share of the step's samples")
    ax.set_ylim(0, 1)
    ax.set_title("Quadrant shares over training")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def budgets_figure(steps: pd.DataFrame, sample_target: float | None, token_target: float | None):
    """Realised sample keep ratio, token keep ratio (token-pruned samples) and trained label-token share per step."""
    fig = new_figure(8.0, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    import pandas as pd

    from .recorder import step_budgets

    budgets = pd.DataFrame([step_budgets(row) for row in steps.to_dict("records")], index=steps.index).astype(float)
    for name, color, label in (
        ("sample_keep_ratio", "#1f77b4", "sample keep ratio"),
        ("token_keep_ratio", "#ff7f0e", "token keep ratio (Q2 pruned)"),
        ("label_token_share", "#2ca02c", "label tokens trained / all"),
    ):
        ax.plot(budgets.index, budgets[name], marker=".", color=color, label=label)
    if sample_target is not None:
        ax.axhline(sample_target, color="#1f77b4", ls="--", lw=1, label=f"sample_keep_ratio = {sample_target:g}")
    if token_target is not None:
        ax.axhline(token_target, color="#ff7f0e", ls="--", lw=1, label=f"token_keep_ratio = {token_target:g}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("ratio")
    ax.set_ylim(0, 1.05)
    ax.set_title("Realised budgets over training")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig
