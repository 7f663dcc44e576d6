"""Pure tensor core of Q-Tuning: statistics -> quadrants -> masks. No Trainer, no I/O."""

from .plane import decorrelated_entropy, plane_correlation
from .selection import Selection, SelectionParams
from .stats import (
    eu_plane_stats,
    flat_to_padded,
    padded_to_flat,
    segment_ids_from_position_ids,
)
from .tokens import prune_tokens, token_keep_counts, token_scores
from .triage import TriageResult, assign_quadrants, target_keep_count, triage_samples

__all__ = [
    "Selection",
    "SelectionParams",
    "TriageResult",
    "assign_quadrants",
    "decorrelated_entropy",
    "eu_plane_stats",
    "flat_to_padded",
    "padded_to_flat",
    "plane_correlation",
    "prune_tokens",
    "segment_ids_from_position_ids",
    "target_keep_count",
    "token_keep_counts",
    "token_scores",
    "triage_samples",
]
