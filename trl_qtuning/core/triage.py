"""Stage 1 of Q-Tuning: sample triage on the Error-Uncertainty plane (Wang et al., arXiv:2509.23873, Sec. 3).

Thresholds are batch quantiles with one level ``q`` on both axes; ``q`` is found by bisection so that the kept set
Q2 (high PPL, low entropy: "valuable misconception") union Q4 (low PPL, high entropy: "calibration data") matches the
sample budget. Q1 (harmful noise) and Q3 (redundant knowledge) are dropped. Rules:

* ``ppl_hi = Quantile(PPL, 1-q)``, ``ppl_lo = Quantile(PPL, q)``, ``ent_lo = Quantile(ENT, q)``,
  ``ent_hi = Quantile(ENT, 1-q)`` (linear interpolation, numpy's default);
* ``Q2 = PPL > ppl_hi & ENT <= ent_lo``; ``Q4 = PPL <= ppl_lo & ENT > ent_hi``;
  ``Q1 = PPL > ppl_hi & ENT > ent_hi``; ``Q3 = PPL <= ppl_lo & ENT <= ent_lo``; everything else is the mid band (0);
* bisection on ``q`` in ``[0, 0.49]``, at most ``max_iter`` steps, stopping once ``|kept/B - r| < tol``;
* target ``K = max(1, round_half_up(r * B))``; too few kept: fill from the non-kept samples by the ``fill_rule``
  (:data:`FILL_RULES`; the paper's takes the largest ``|norm(PPL) - norm(ENT)|``, min-max normalised); too many (and
  ``enforce_budget``): keep the K best, ranking Q2 by ``norm(PPL) - norm(ENT)`` and Q4 by ``norm(ENT) - norm(PPL)``.

Samples with a non-finite statistic (no response token, NaN/inf log-probs) are never kept: they get quadrant 0 and
``invalid=True``. Ties are broken by position in the batch (earlier first), so decisions are deterministic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

__all__ = [
    "FILL_RULES",
    "TriageResult",
    "average_ranks",
    "fill_scores",
    "triage_samples",
    "assign_quadrants",
    "target_keep_count",
    "minmax_normalise",
    "top_k_mask",
]

MAX_QUANTILE_LEVEL = 0.49

FillRule = Literal["paper", "q1_last", "least_suspect"]
FILL_RULES: tuple[str, ...] = ("paper", "q1_last", "least_suspect")
"""How an under-full Q2 u Q4 is topped up to K (docs/policies.md#the-fill-rule-fill_rule):

* ``"paper"``: largest ``|norm(PPL) - norm(ENT)|`` first (the paper's rule: the samples that lean most towards Q2 or
  Q4);
* ``"q1_last"``: the same order, but Q1 ("harmful noise") samples only once every other candidate is taken;
* ``"least_suspect"``: lowest ``rank(PPL) + rank(ENT)`` first (average ranks over the group's valid samples): the
  candidates farthest from the Q1 corner, by the score that ranks corrupted rows highest.
"""


@dataclass(frozen=True)
class TriageResult:
    """Decisions of one triage. All tensors have shape ``(B,)``."""

    quadrant: torch.Tensor
    """1..4 for Q1..Q4, 0 for the mid band (and for invalid samples)."""
    keep: torch.Tensor
    """Samples that stay in the batch."""
    filled: torch.Tensor
    """Samples kept by the fill rule (not in Q2 or Q4 at the final ``q``)."""
    trimmed: torch.Tensor
    """Q2/Q4 samples dropped to enforce the budget."""
    invalid: torch.Tensor
    """Samples with a non-finite PPL or entropy; never kept."""
    q2_like: torch.Tensor
    """Filled samples whose ``norm(PPL) >= norm(ENT)`` (they lean towards Q2)."""
    q: float
    """The quantile level found by bisection."""
    target: int
    """K, the number of samples the budget asks for."""
    thresholds: dict[str, float]
    """``ppl_lo``, ``ppl_hi``, ``ent_lo``, ``ent_hi`` at the final ``q`` (NaN when no sample is valid)."""
    iterations: int
    """Bisection steps taken."""

    @classmethod
    def without_plane(cls, keep: torch.Tensor, invalid: torch.Tensor, target: int) -> TriageResult:
        """Decisions of a selection rule that does not use the EU plane (baselines): no quadrant, no threshold."""
        none = torch.zeros_like(keep)
        nan = float("nan")
        return cls(
            quadrant=torch.zeros(keep.shape, dtype=torch.long, device=keep.device), keep=keep, filled=none,
            trimmed=none.clone(), invalid=invalid, q2_like=none.clone(), q=nan, target=target,
            thresholds={"ppl_lo": nan, "ppl_hi": nan, "ent_lo": nan, "ent_hi": nan}, iterations=0,
        )

    def rows(self, index: slice | torch.Tensor) -> TriageResult:
        """The decisions of some samples of the group (e.g. one rank's share of a cross-rank triage)."""
        per_sample = {
            name: getattr(self, name)[index] for name in ("quadrant", "keep", "filled", "trimmed", "invalid", "q2_like")
        }
        return TriageResult(
            **per_sample, q=self.q, target=self.target, thresholds=self.thresholds, iterations=self.iterations
        )


def target_keep_count(batch_size: int, keep_ratio: float) -> int:
    """K = max(1, round(r * B)), rounding halves up (so 0.5 -> 1, 2.5 -> 3), capped at B."""
    if batch_size <= 0:
        return 0
    return min(batch_size, max(1, math.floor(keep_ratio * batch_size + 0.5 + 1e-9)))


def minmax_normalise(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Min-max scale to [0, 1] over the valid entries; constant inputs map to 0; invalid entries map to 0."""
    if not bool(valid.any()):
        return torch.zeros_like(values)
    v = values[valid]
    lo, hi = v.min(), v.max()
    span = hi - lo
    scaled = (values - lo) / span if bool(span > 0) else torch.zeros_like(values)
    return torch.where(valid, scaled, torch.zeros_like(values))


def _thresholds(ppl: torch.Tensor, ent: torch.Tensor, q: float) -> dict[str, torch.Tensor]:
    levels = torch.tensor([q, 1.0 - q], dtype=torch.float64, device=ppl.device)
    ppl_lo, ppl_hi = torch.quantile(ppl.double(), levels, interpolation="linear")
    ent_lo, ent_hi = torch.quantile(ent.double(), levels, interpolation="linear")
    return {"ppl_lo": ppl_lo, "ppl_hi": ppl_hi, "ent_lo": ent_lo, "ent_hi": ent_hi}


def assign_quadrants(ppl: torch.Tensor, ent: torch.Tensor, thresholds: dict[str, torch.Tensor]) -> torch.Tensor:
    """Quadrant of each sample (1..4, 0 for the mid band) for the given thresholds."""
    p, e = ppl.double(), ent.double()
    high_p, low_p = p > thresholds["ppl_hi"], p <= thresholds["ppl_lo"]
    high_e, low_e = e > thresholds["ent_hi"], e <= thresholds["ent_lo"]
    quadrant = torch.zeros(ppl.shape, dtype=torch.long, device=ppl.device)
    quadrant[high_p & high_e] = 1
    quadrant[high_p & low_e] = 2
    quadrant[low_p & low_e] = 3
    quadrant[low_p & high_e] = 4
    return quadrant


def top_k_mask(scores: torch.Tensor, eligible: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` eligible entries of highest score (fewer if fewer are eligible); ties go to the earlier index."""
    mask = torch.zeros_like(eligible)
    if k <= 0:
        return mask
    masked = torch.where(eligible, scores.double(), torch.full_like(scores, -math.inf, dtype=torch.float64))
    order = torch.sort(masked, descending=True, stable=True).indices[:k]
    mask[order] = True
    return mask & eligible


def average_ranks(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """1-based ranks among the valid entries, ties sharing their average rank (scipy's ``rankdata``); 0 where invalid.

    ``#{smaller} + (#{equal} + 1) / 2`` over the valid entries, by one (B, B) comparison: triage groups are small.
    """
    v = values.double()
    other = torch.where(valid, v, torch.full_like(v, math.nan)).unsqueeze(0)
    smaller = (other < v.unsqueeze(1)).sum(1)
    equal = (other == v.unsqueeze(1)).sum(1)
    return torch.where(valid, smaller + (equal + 1) / 2, torch.zeros_like(v))


def fill_scores(
    rule: str, norm_ppl: torch.Tensor, norm_ent: torch.Tensor, quadrant: torch.Tensor, ppl: torch.Tensor,
    entropy: torch.Tensor, valid: torch.Tensor,
) -> torch.Tensor:
    """The order in which under-fill candidates are taken, highest first (:data:`FILL_RULES`)."""
    paper = (norm_ppl - norm_ent).abs().double()
    if rule == "paper":
        return paper
    if rule == "q1_last":  # |diff| <= 1, so the offset puts every non-Q1 candidate above every Q1 one
        return torch.where(quadrant == 1, paper - 2.0, paper)
    if rule == "least_suspect":
        return -(average_ranks(ppl, valid) + average_ranks(entropy, valid))
    raise ValueError(f"fill_rule must be one of {', '.join(map(repr, FILL_RULES))}; got {rule!r}")


def triage_samples(
    ppl: torch.Tensor,
    entropy: torch.Tensor,
    keep_ratio: float,
    *,
    enforce_budget: bool = True,
    max_iter: int = 10,
    tol: float = 0.01,
    fill_rule: FillRule = "paper",
) -> TriageResult:
    """Triage a batch into quadrants and decide which samples stay.

    Args:
        ppl: per-sample perplexity, shape ``(B,)``.
        entropy: per-sample mean token entropy, shape ``(B,)``.
        keep_ratio: the sample budget r in (0, 1].
        enforce_budget: trim an over-full Q2 u Q4 to exactly K (default). ``False`` is the paper's behaviour: every
            Q2 and Q4 sample stays even when they exceed the budget.
        max_iter: bisection steps at most.
        tol: stop bisecting once the kept share is within ``tol`` of ``keep_ratio``.
        fill_rule: which non-kept samples top up an under-full Q2 u Q4 (:data:`FILL_RULES`).
    """
    if ppl.dim() != 1 or ppl.shape != entropy.shape:
        raise ValueError(f"ppl and entropy must be 1-D of equal length, got {tuple(ppl.shape)} and {tuple(entropy.shape)}")
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    if fill_rule not in FILL_RULES:
        raise ValueError(f"fill_rule must be one of {', '.join(map(repr, FILL_RULES))}; got {fill_rule!r}")
    batch = ppl.numel()
    device = ppl.device
    valid = torch.isfinite(ppl) & torch.isfinite(entropy)
    n_valid = int(valid.sum())
    false = torch.zeros(batch, dtype=torch.bool, device=device)
    nan = float("nan")
    if n_valid == 0:
        return TriageResult(
            quadrant=torch.zeros(batch, dtype=torch.long, device=device), keep=false, filled=false.clone(),
            trimmed=false.clone(), invalid=~valid, q2_like=false.clone(), q=0.0, target=0,
            thresholds={"ppl_lo": nan, "ppl_hi": nan, "ent_lo": nan, "ent_hi": nan}, iterations=0,
        )
    target = min(target_keep_count(batch, keep_ratio), n_valid)
    vp, ve = ppl[valid], entropy[valid]

    lo, hi = 0.0, MAX_QUANTILE_LEVEL
    iterations = 0
    for iterations in range(1, max_iter + 1):
        q = (lo + hi) / 2
        thresholds = _thresholds(vp, ve, q)
        valid_quadrant = assign_quadrants(vp, ve, thresholds)
        share = int(((valid_quadrant == 2) | (valid_quadrant == 4)).sum()) / batch
        if abs(share - keep_ratio) < tol:
            break
        if share < keep_ratio:
            lo = q
        else:
            hi = q

    quadrant = torch.zeros(batch, dtype=torch.long, device=device)
    quadrant[valid] = valid_quadrant
    in_q2_q4 = (quadrant == 2) | (quadrant == 4)
    norm_p, norm_e = minmax_normalise(ppl, valid), minmax_normalise(entropy, valid)
    keep, filled, trimmed = in_q2_q4.clone(), false.clone(), false.clone()
    n_kept = int(in_q2_q4.sum())
    if n_kept < target:
        order = fill_scores(fill_rule, norm_p, norm_e, quadrant, ppl, entropy, valid)
        filled = top_k_mask(order, valid & ~in_q2_q4, target - n_kept)
        keep = keep | filled
    elif n_kept > target and enforce_budget:
        rank = torch.where(quadrant == 2, norm_p - norm_e, norm_e - norm_p)
        keep = top_k_mask(rank, in_q2_q4, target)
        trimmed = in_q2_q4 & ~keep
    return TriageResult(
        quadrant=quadrant,
        keep=keep,
        filled=filled,
        trimmed=trimmed,
        invalid=~valid,
        q2_like=filled & (norm_p >= norm_e),
        q=q,
        target=target,
        thresholds={name: float(value) for name, value in thresholds.items()},
        iterations=iterations,
    )
