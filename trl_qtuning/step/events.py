"""What the trainer emits each optimizer step; the ledger and tracking integrations listen to it.

The trainer knows nothing of files or tracking servers: it hands one :class:`StepDecisions` per step to every
listener registered with ``QTuningSFTTrainer.add_decision_listener``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["StepDecisions", "DecisionListener"]


@dataclass(frozen=True)
class StepDecisions:
    """Every sample's statistics and decision for one optimizer step, of every rank (gathered to the main process)."""

    step: int
    """The optimizer step these decisions train (1-based, equal to ``state.global_step`` once it completes)."""
    columns: dict[str, list[Any]]
    """One value per sample, keyed like ``trl_qtuning.ledger.LEDGER_SCHEMA`` (``epoch``, ``rank`` and
    ``pruned_positions`` included)."""
    thresholds: list[dict[str, float]]
    """``q``, ``ppl_lo``, ``ppl_hi``, ``ent_lo``, ``ent_hi`` of each triage group of the step."""
    scoring_seconds: float


DecisionListener = Callable[[StepDecisions], None]
