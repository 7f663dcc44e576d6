"""The method's words, defined once: quadrant names and decision names.

The ledger, the step metrics, tracking (summary, figures, report), the demo, the bench audit and the dataset audit
all name quadrants and decisions; they read them from here so a name cannot drift between a metric, a ledger
column and a page. The pure core (:mod:`trl_qtuning.core`) keeps the integer quadrant codes (0 mid band, 1..4 for
Q1..Q4) that :class:`Quadrant` names.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "DECISIONS", "Decision", "QUADRANTS", "QUADRANT_KEYS", "QUADRANT_LABELS", "QUADRANT_SHORT_LABELS", "Quadrant",
    "TRAINED_DECISIONS",
]  # fmt: skip


@dataclass(frozen=True)
class Quadrant:
    """One region of the Error-Uncertainty plane, under each name it is shown by."""

    code: int
    """The ledger's ``quadrant`` value (what :func:`trl_qtuning.core.assign_quadrants` returns)."""
    key: str
    """Metric and summary key (``qtuning/<key>_share``, the summary's ``quadrants``)."""
    label: str
    """The paper's reading, for figures, the demo and the dataset audit."""
    short: str
    """The bench audit's row label (the committed study pages show it)."""


QUADRANTS: tuple[Quadrant, ...] = (
    Quadrant(0, "mid_band", "mid band", "mid band / none"),
    Quadrant(1, "q1", "Q1 harmful noise", "Q1 harmful noise"),
    Quadrant(2, "q2", "Q2 valuable misconception", "Q2 misconception"),
    Quadrant(3, "q3", "Q3 redundant knowledge", "Q3 redundant"),
    Quadrant(4, "q4", "Q4 calibration data", "Q4 calibration"),
)
"""Indexed by code: ``QUADRANTS[code]``."""

QUADRANT_KEYS: tuple[str, ...] = tuple(q.key for q in QUADRANTS)
"""Keys by code (0..4)."""
QUADRANT_LABELS: dict[int, str] = {q.code: q.label for q in (*QUADRANTS[1:], QUADRANTS[0])}
"""Labels by code, the paper's four first and the mid band last (the order pages and summaries list them in)."""
QUADRANT_SHORT_LABELS: dict[int, str] = {q.code: q.short for q in QUADRANTS}


class Decision:
    """The ledger's ``decision`` values: what happened to one sample at one step."""

    KEPT = "kept"
    """Trained on with all its answer tokens (Q2/Q4)."""
    TOKEN_PRUNED = "token_pruned"
    """Trained on with some answer labels masked."""
    FILLED = "filled"
    """Kept by the under-fill rule (outside Q2/Q4)."""
    DROPPED = "dropped"
    """Not trained on."""
    TRIMMED = "trimmed"
    """A Q2/Q4 sample dropped to enforce the sample budget."""
    INVALID = "invalid"
    """Non-finite statistics: never trained on."""


DECISIONS: tuple[str, ...] = (
    Decision.KEPT, Decision.TOKEN_PRUNED, Decision.FILLED, Decision.DROPPED, Decision.TRIMMED, Decision.INVALID,
)  # fmt: skip
"""Every decision, in the order summaries and reports list them."""
TRAINED_DECISIONS: tuple[str, ...] = (Decision.KEPT, Decision.TOKEN_PRUNED, Decision.FILLED)
"""Decisions whose sample was trained on (with all or some of its answer tokens)."""
