"""Per-sample statistics of the Error-Uncertainty (EU) plane.

The scoring forward gives, for every trainable label position, the log-probability of the label and the entropy of
the predicted distribution. Q-Tuning places each sample on the EU plane by its perplexity (error axis) and its mean
token entropy (uncertainty axis), both averaged over the sample's response tokens only.
"""

from __future__ import annotations

import torch

__all__ = ["eu_plane_stats", "segment_ids_from_position_ids", "flat_to_padded", "padded_to_flat"]


def eu_plane_stats(
    token_logps: torch.Tensor, token_entropy: torch.Tensor, response_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample perplexity ``exp(mean NLL)`` and mean entropy over the response tokens.

    Args:
        token_logps: log p(label) per position, shape ``(B, L)``, one row per sample (a padding-free row is
            scattered into this layout first, :func:`flat_to_padded`).
        token_entropy: entropy of the next-token distribution per position, same shape.
        response_mask: True where the position is a response (trainable) token, same shape.

    Returns:
        ``(ppl, entropy)``, float32 tensors of shape ``(B,)``. A sample without response tokens gets NaN on both axes,
        so the triage can never keep it by accident.
    """
    if token_logps.shape != token_entropy.shape or token_logps.shape != response_mask.shape:
        raise ValueError(
            "token_logps, token_entropy and response_mask must have the same shape, got "
            f"{tuple(token_logps.shape)}, {tuple(token_entropy.shape)} and {tuple(response_mask.shape)}"
        )
    if token_logps.dim() != 2:
        raise ValueError(f"statistics need (batch, length) tensors, got shape {tuple(token_logps.shape)}")
    mask = response_mask.to(torch.bool)
    nll = torch.where(mask, -token_logps.float(), torch.zeros((), device=token_logps.device))
    ent = torch.where(mask, token_entropy.float(), torch.zeros((), device=token_logps.device))
    count = mask.sum(dim=-1).float()
    has_tokens = count > 0
    denom = count.clamp(min=1.0)
    nan = torch.full_like(denom, float("nan"))
    ppl = torch.where(has_tokens, torch.exp(nll.sum(dim=-1) / denom), nan)
    entropy = torch.where(has_tokens, ent.sum(dim=-1) / denom, nan)
    return ppl, entropy


def segment_ids_from_position_ids(position_ids: torch.Tensor, num_segments: int | None = None) -> torch.Tensor:
    """Sample index of every position of a padding-free row, from its ``position_ids`` (a 0 starts a sample).

    ``num_segments`` caps the count: positions of later segments (the padding that ``pad_to_multiple_of`` appends,
    which also restarts at position 0) get id -1.
    """
    flat = position_ids.reshape(-1)
    seg = torch.cumsum((flat == 0).long(), dim=0) - 1
    if num_segments is not None:
        seg = torch.where(seg < num_segments, seg, torch.full_like(seg, -1))
    return seg.view_as(position_ids)


def flat_to_padded(
    values: torch.Tensor, segment_ids: torch.Tensor, columns: torch.Tensor, num_segments: int, fill: float | bool = 0
) -> torch.Tensor:
    """Scatter a padding-free row ``(N,)`` into a ``(num_segments, max_column + 1)`` matrix, one sample per row.

    ``columns`` gives each position's column (its offset inside its sample); positions with a negative segment id
    or column are dropped. Lets row-wise rules (neighbour scores, per-row budgets) serve padding-free batches too.
    """
    seg, col, vals = segment_ids.reshape(-1).long(), columns.reshape(-1).long(), values.reshape(-1)
    valid = (seg >= 0) & (col >= 0)
    width = int(col[valid].max().item()) + 1 if bool(valid.any()) else 1
    out = torch.full((num_segments, width), fill, dtype=values.dtype, device=values.device)
    out[seg[valid], col[valid]] = vals[valid]
    return out


def padded_to_flat(matrix: torch.Tensor, segment_ids: torch.Tensor, columns: torch.Tensor, fill: float | bool = 0):
    """Inverse of :func:`flat_to_padded`: read each flat position's value back from its ``(segment, column)``."""
    seg, col = segment_ids.reshape(-1).long(), columns.reshape(-1).long()
    valid = (seg >= 0) & (col >= 0) & (col < matrix.shape[1])
    out = torch.full(seg.shape, fill, dtype=matrix.dtype, device=matrix.device)
    out[valid] = matrix[seg[valid], col[valid]]
    return out.view(segment_ids.shape)
