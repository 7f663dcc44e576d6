"""Stage 2 of Q-Tuning: neighbour-aware token pruning of "valuable misconception" (Q2) samples.

Each response token is scored with its own perplexity and its neighbours' (Wang et al., arXiv:2509.23873, Eq. 6):
``s_i = (1 - lam) * tppl_i + lam * (tppl_{i-1} + tppl_{i+1})``; a neighbour outside the response counts 0. The tokens
of lowest score stay; the high-scoring ones (locally hard, likely noisy) lose their label but stay in the input as
context.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

__all__ = ["token_scores", "prune_tokens", "token_keep_counts"]

NeighborMode = Literal["sum", "mean"]


def token_keep_counts(response_counts: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """``max(1, floor(r * |T|))`` per row, 0 for rows without response tokens.

    A tiny epsilon absorbs float error (0.7 * 10 is 7.000000000000001, 0.29 * 100 is 28.999999999999996).
    """
    kept = torch.floor(response_counts.double() * keep_ratio + 1e-9).long().clamp(min=1)
    return torch.where(response_counts > 0, kept, torch.zeros_like(kept))


def token_scores(
    token_ppl: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    neighbor_lambda: float = 0.5,
    neighbor: NeighborMode = "sum",
) -> torch.Tensor:
    """Neighbour-aware score of every position, shape ``(B, L)``; +inf outside the response.

    ``neighbor="sum"`` follows the paper's equation and algorithm; ``"mean"`` (its prose) averages the neighbours
    that lie inside the response (an edge token's single neighbour counts whole).
    """
    mask = response_mask.to(torch.bool)
    ppl = torch.where(mask, token_ppl.double(), torch.zeros((), dtype=torch.float64, device=token_ppl.device))
    left = torch.nn.functional.pad(ppl[:, :-1], (1, 0))
    right = torch.nn.functional.pad(ppl[:, 1:], (0, 1))
    neighbours = left + right
    if neighbor == "mean":
        left_in = torch.nn.functional.pad(mask[:, :-1], (1, 0))
        right_in = torch.nn.functional.pad(mask[:, 1:], (0, 1))
        neighbours = neighbours / (left_in.double() + right_in.double()).clamp(min=1.0)
    elif neighbor != "sum":
        raise ValueError(f"neighbor must be 'sum' or 'mean', got {neighbor!r}")
    # A zero-weight term is left out rather than multiplied by 0, so an infinite perplexity cannot turn into NaN.
    if neighbor_lambda == 0.0:
        scores = ppl
    elif neighbor_lambda == 1.0:
        scores = neighbours
    else:
        scores = (1.0 - neighbor_lambda) * ppl + neighbor_lambda * neighbours
    # A NaN score (NaN log-prob) ranks as the hardest token, so it is pruned first.
    scores = torch.nan_to_num(scores, nan=math.inf, posinf=math.inf)
    return torch.where(mask, scores, torch.full_like(scores, math.inf))


def _ranked_response_first(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Positions of each row in ascending score, every ``mask`` position before every other; ties keep their order."""
    order = torch.sort(scores, dim=-1, stable=True).indices
    outside = (~mask).gather(-1, order).to(torch.int8)
    return order.gather(-1, torch.sort(outside, dim=-1, stable=True).indices)


def prune_tokens(
    token_ppl: torch.Tensor,
    response_mask: torch.Tensor,
    keep_ratio: float,
    *,
    neighbor_lambda: float = 0.5,
    neighbor: NeighborMode = "sum",
    keep_highest: bool = False,
    budget: Literal["sample", "batch"] = "sample",
    batch_keep: int | None = None,
) -> torch.Tensor:
    """Response tokens to keep, as a BoolTensor of shape ``(B, L)`` (False outside the response).

    Args:
        token_ppl: per-token perplexity ``exp(-log p)``, shape ``(B, L)``.
        response_mask: True on response positions.
        keep_ratio: token budget r in (0, 1]: each row keeps ``max(1, floor(r * |T|))`` tokens.
        neighbor_lambda: weight of the neighbours in the score, in [0, 1] (0 scores by the token's own PPL).
        neighbor: ``"sum"`` (paper's equation) or ``"mean"`` of the in-response neighbours.
        keep_highest: keep the highest-scoring tokens instead (the paper's "reversed" ablation).
        budget: ``"sample"`` applies the budget to each row; ``"batch"`` keeps the ``floor(r * total)`` lowest-scored
            tokens of all rows together, while still keeping each row's best token.
        batch_keep: with ``budget="batch"``, the number of tokens to keep over all rows instead of
            ``floor(r * total)`` (a budget sized elsewhere, e.g. a share of a whole run's answer tokens); each row
            still keeps its best token, and the rows never keep more than they hold.
    """
    if token_ppl.dim() != 2 or token_ppl.shape != response_mask.shape:
        raise ValueError(
            f"token_ppl and response_mask must be (batch, length) of equal shape, got {tuple(token_ppl.shape)} "
            f"and {tuple(response_mask.shape)}"
        )
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    if not 0.0 <= neighbor_lambda <= 1.0:
        raise ValueError(f"neighbor_lambda must be in [0, 1], got {neighbor_lambda}")
    mask = response_mask.to(torch.bool)
    scores = token_scores(token_ppl, mask, neighbor_lambda=neighbor_lambda, neighbor=neighbor)
    if keep_highest:
        scores = torch.where(mask, -scores, torch.full_like(scores, math.inf))
    counts = mask.sum(dim=-1)
    # Rank every position within its row by score (stable: ties go to the earlier position), response positions
    # before all others: a +inf response score must not lose its slot to an (also +inf) prompt or padding position.
    order = _ranked_response_first(scores, mask)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    if budget == "sample":
        return mask & (rank < token_keep_counts(counts, keep_ratio).unsqueeze(-1))
    if budget != "batch":
        raise ValueError(f"budget must be 'sample' or 'batch', got {budget!r}")
    best_of_row = mask & (rank == 0)
    if batch_keep is None:
        total = int(token_keep_counts(counts.sum().view(1), keep_ratio).item())
    else:
        total = int(batch_keep)
    extra = max(0, total - int(best_of_row.sum()))
    flat_scores = torch.where(best_of_row, torch.full_like(scores, math.inf), scores).reshape(1, -1)
    eligible = (mask & ~best_of_row).reshape(1, -1)
    flat_order = _ranked_response_first(flat_scores, eligible)[0, :extra]
    chosen = torch.zeros(flat_scores.shape[1:], dtype=torch.bool, device=scores.device)
    chosen[flat_order] = True
    return mask & (best_of_row | chosen.view_as(mask))
