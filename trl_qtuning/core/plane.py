"""The axes of the Error-Uncertainty plane, and a decorrelated variant (beyond the paper).

On small models log PPL and mean token entropy correlate strongly (~0.8), so the anti-diagonal quadrants Q2/Q4 that
Q-Tuning keeps are thin and the fill rule picks much of the kept set. :func:`decorrelated_entropy` replaces the
entropy axis of one triage group by its least-squares residual on log PPL, ``ent - (a + b * log(ppl))``, fitted over
the group's valid samples: the uncertainty left once the error explains what it can. The fit absorbs a constant, so
the residual does not change when every PPL is multiplied by the same factor. :func:`plane_correlation` measures how
correlated a plane's axes are (the ``qtuning/eu_correlation`` and ``qtuning/plane_correlation`` metrics).

A sample is valid when its PPL is finite and positive (its log is finite) and its entropy is finite; the others get a
NaN residual, so the triage keeps treating them as invalid.
"""

from __future__ import annotations

import math

import torch

__all__ = ["decorrelated_entropy", "plane_correlation"]


def _centred_axes(ppl: torch.Tensor, entropy: torch.Tensor):
    """Centred ``(log ppl, entropy)`` over the valid samples (0 elsewhere), the valid mask and the count."""
    if ppl.shape != entropy.shape:
        raise ValueError(f"ppl and entropy must have the same shape, got {tuple(ppl.shape)} and {tuple(entropy.shape)}")
    p, e = ppl.double(), entropy.double()
    valid = torch.isfinite(p) & torch.isfinite(e) & (p > 0)
    zero = torch.zeros_like(p)
    x = torch.where(valid, torch.log(torch.where(valid, p, torch.ones_like(p))), zero)
    y = torch.where(valid, e, zero)
    n = valid.sum()
    count = n.clamp(min=1).double()
    dx = torch.where(valid, x - x.sum() / count, zero)
    dy = torch.where(valid, y - y.sum() / count, zero)
    return dx, dy, valid, n


def _constant(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """True when the valid entries all share one value (exactly; no valid entry counts as constant)."""
    values, valid = values.reshape(-1), valid.reshape(-1)
    inf = torch.full((values.numel() + 1,), math.inf, dtype=values.dtype, device=values.device)
    valid = torch.cat([valid, valid.new_zeros(1)])  # one never-valid sentinel: the reductions never see no entry
    values = torch.cat([values, values.new_zeros(1)])
    return torch.where(valid, values, -inf).amax() <= torch.where(valid, values, inf).amin()


def decorrelated_entropy(ppl: torch.Tensor, entropy: torch.Tensor) -> torch.Tensor:
    """Entropy minus its least-squares fit on log PPL over the valid samples: ``ent - (a + b * log(ppl))``.

    ``(a, b)`` is the ordinary least-squares fit over the valid samples; with fewer than two of them, or when their
    log PPL is constant, ``b = 0`` and ``a`` is their mean entropy. Returns float64 of the input's shape, NaN where
    the sample is invalid (non-finite or non-positive PPL, non-finite entropy).
    """
    dx, dy, valid, n = _centred_axes(ppl, entropy)
    degenerate = (n < 2) | _constant(dx, valid)
    sxx = (dx * dx).sum()
    slope = torch.where(degenerate, torch.zeros_like(sxx), (dx * dy).sum() / torch.where(degenerate, 1.0, sxx))
    return torch.where(valid, dy - slope * dx, torch.full_like(dx, math.nan))


def plane_correlation(ppl: torch.Tensor, entropy: torch.Tensor) -> float:
    """Pearson correlation of log PPL and ``entropy`` over the valid samples.

    NaN with fewer than two valid samples or when either axis is constant over them.
    """
    dx, dy, valid, n = _centred_axes(ppl, entropy)
    if int(n) < 2 or bool(_constant(dx, valid)) or bool(_constant(dy, valid)):
        return math.nan
    r = float((dx * dy).sum() / torch.sqrt((dx * dx).sum() * (dy * dy).sum()))
    return max(-1.0, min(1.0, r))
