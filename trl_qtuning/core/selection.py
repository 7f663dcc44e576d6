"""The pieces of a selection: which samples of a triage group stay and which of their labels are kept.

Policies (:mod:`trl_qtuning.policies`) assemble them; :func:`trl_qtuning.select_qtuning` is Q-Tuning's whole
decision for one group. Pure tensor code over a padded ``(samples, positions)`` layout, so padded and padding-free batches, one micro-batch or
a whole optimizer step, all go through the same rules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch

from .plane import decorrelated_entropy
from .triage import FillRule, TriageResult

__all__ = [
    "SelectionParams",
    "Selection",
    "assemble_selection",
    "qtuning_token_rows",
    "share_of_tokens",
    "token_budget",
    "triage_axes",
]


@dataclass(frozen=True)
class SelectionParams:
    """The knobs of the method (see ``QTuningConfig`` for their meaning)."""

    sample_keep_ratio: float = 0.25
    token_keep_ratio: float = 0.5
    neighbor_lambda: float = 0.5
    neighbor_mode: Literal["sum", "mean"] = "sum"
    enforce_sample_budget: bool = True
    prune_filled_q2_like: bool = False
    token_prune_q4: bool = False
    reverse_token_score: bool = False
    token_budget_scope: Literal["sample", "batch", "run"] = "sample"
    triage_max_iter: int = 10
    triage_tol: float = 0.01
    eu_plane: Literal["paper", "decorrelated"] = "paper"
    fill_rule: FillRule = "paper"


def triage_axes(ppl: torch.Tensor, entropy: torch.Tensor, params: SelectionParams) -> tuple[torch.Tensor, torch.Tensor]:
    """The two axes the triage runs on: ``(ppl, entropy)``, or ``(ppl, residual entropy)`` for ``"decorrelated"``."""
    if params.eu_plane == "decorrelated":
        return ppl, decorrelated_entropy(ppl, entropy)
    return ppl, entropy


@dataclass(frozen=True)
class Selection:
    """Decisions for a group of B samples, with their pre-pruning statistics."""

    ppl: torch.Tensor
    entropy: torch.Tensor
    triage: TriageResult
    token_pruned: torch.Tensor
    """(B,) kept samples that lost at least one label (Q2, and Q2-like fills when asked)."""
    label_keep: torch.Tensor
    """(B, L) True on response positions that keep their label (all False on dropped samples)."""
    loss_weight: torch.Tensor | None = None
    """(B,) factor on each kept sample's token losses (InfoBatch's rescaling); None means 1 everywhere."""

    @property
    def keep(self) -> torch.Tensor:
        return self.triage.keep


def share_of_tokens(ratio: float, tokens: int) -> int:
    """``round(ratio * tokens)``, halves up: the token count of a share, unbiased (``floor`` would lose a token a step)."""
    return math.floor(ratio * tokens + 0.5 + 1e-9) if tokens > 0 else 0


def token_budget(params: SelectionParams, budget_tokens: int | None) -> dict:
    """``prune_tokens``' budget arguments for ``params.token_budget_scope``.

    ``"run"`` is one budget of ``budget_tokens`` over the rows handed to the token policy: the trainer sizes it so
    that the run, step after step, keeps ``token_keep_ratio`` of every answer token it has seen (dropped samples
    included), as far as the kept samples allow. That is how the bench trains a baseline at another method's
    realised label-token share, whichever samples the baseline draws.
    """
    if params.token_budget_scope == "run":
        return {"budget": "batch", "batch_keep": budget_tokens}
    return {"budget": params.token_budget_scope}


def qtuning_token_rows(triage: TriageResult, params: SelectionParams) -> torch.Tensor:
    """Kept samples whose tokens Q-Tuning prunes: Q2, plus Q2-leaning fills and Q4 when the options ask."""
    rows = triage.keep & (triage.quadrant == 2)
    if params.prune_filled_q2_like:
        rows = rows | (triage.keep & triage.q2_like)
    if params.token_prune_q4:  # ablation: calibration samples lose tokens too
        rows = rows | (triage.keep & (triage.quadrant == 4))
    return rows


def assemble_selection(
    ppl: torch.Tensor,
    entropy: torch.Tensor,
    response_mask: torch.Tensor,
    triage: TriageResult,
    token_rows: torch.Tensor,
    keep_tokens: Callable[[torch.Tensor], torch.Tensor] | None,
    loss_weight: torch.Tensor | None = None,
) -> Selection:
    """Labels of kept samples stay, except on ``token_rows`` where ``keep_tokens(row_indices)`` decides.

    ``keep_tokens`` returns the (rows, L) kept-label mask of the given rows; None keeps every token. A row counts
    as token-pruned only where at least one of its labels was removed (a Q2 sample at ``token_keep_ratio=1.0``, or
    with a one-token answer, is simply kept).
    """
    if triage.keep.shape != ppl.shape:
        raise ValueError(f"triage covers {triage.keep.numel()} samples, the group has {ppl.numel()}")
    mask = response_mask.to(torch.bool)
    token_rows = token_rows & triage.keep if keep_tokens is not None else torch.zeros_like(triage.keep)
    label_keep = mask & triage.keep.unsqueeze(-1)
    if keep_tokens is not None and bool(token_rows.any()):
        rows = token_rows.nonzero().squeeze(-1)
        label_keep[rows] = keep_tokens(rows) & mask[rows]
    # Token-pruned means a label was removed: a one-token answer, or a run budget with room to spare, keeps every
    # label, and such a sample is simply kept (the ledger and the token keep ratio must not count it).
    token_rows = token_rows & (mask & ~label_keep).any(dim=-1)
    return Selection(
        ppl=ppl, entropy=entropy, triage=triage, token_pruned=token_rows, label_keep=label_keep, loss_weight=loss_weight
    )
