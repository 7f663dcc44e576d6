"""Batch surgery: what a step's decisions do to its micro-batches, as plain functions of tensors.

Pruned labels become -100, dropped samples' rows (padded) or segments (padding-free) are physically removed, padding
columns no kept row needs are trimmed, InfoBatch's loss weights ride along as a column, and a one-row fully masked
placeholder stands in where a micro-batch must still run. Re-packing the kept rows is in :mod:`trl_qtuning.step.packing`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .packing import empty_like, pack_padded, pack_padding_free, refresh_flat_metadata
from .scoring import FusedCausalLMOutput, ScoredMicroBatch

__all__ = [
    "LOSS_WEIGHT_COLUMN", "WeightedLogProbs", "apply_decisions", "has_rows", "placeholder", "runnable_micro_batches",
]  # fmt: skip

LOSS_WEIGHT_COLUMN = "qtuning_loss_weight"
"""Per-token loss factor added to micro-batches by reweighting policies (InfoBatch); read by ``compute_loss``."""

_PER_TOKEN_FLAT_KEYS = ("input_ids", "labels", "position_ids", "shift_labels", LOSS_WEIGHT_COLUMN)


def has_rows(batch: dict[str, Any]) -> bool:
    return batch["input_ids"].numel() > 0


def apply_decisions(
    batch: dict[str, Any],
    scored: ScoredMicroBatch,
    keep_rows: torch.Tensor,
    label_keep: torch.Tensor,
    loss_weight: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Mask pruned labels, attach loss weights, and physically drop the rows (segments) of dropped samples.

    ``keep_rows`` (n,) and ``label_keep`` (n, W) are in ``scored``'s per-sample layout; ``batch`` is not modified.
    """
    device = batch["labels"].device
    layout = scored.layout
    keep_rows, label_keep = keep_rows.to(device), label_keep.to(device)
    masked = scored.response.to(device) & ~label_keep
    labels = batch["labels"].clone()
    out = {**batch, "labels": labels}  # labels are masked in place below
    if layout.padding_free:
        token_segment = layout.token_segments.to(device)
        if loss_weight is not None:
            weight = loss_weight.to(device=device, dtype=torch.float32)
            out[LOSS_WEIGHT_COLUMN] = weight[token_segment.clamp(min=0)][None]
        labels[0, 1:][layout.to_flat(masked, fill=False)] = -100
        keep_tokens = (token_segment >= 0) & keep_rows[token_segment.clamp(min=0)]
        for key in _PER_TOKEN_FLAT_KEYS:
            if key in out:
                out[key] = out[key][:, keep_tokens]
        return refresh_flat_metadata(out)
    if loss_weight is not None:
        out[LOSS_WEIGHT_COLUMN] = loss_weight.to(device=device, dtype=torch.float32)[:, None].expand_as(labels).contiguous()
    labels[:, 1:][masked] = -100
    return _take_rows(out, keep_rows.nonzero().squeeze(-1))


def _take_rows(batch: dict[str, Any], rows: torch.Tensor | slice) -> dict[str, Any]:
    """The ``rows`` of a padded ``batch`` (in every tensor with a row per sample), without the columns none of them
    attends to."""
    batch_size, seq_len = batch["labels"].shape
    width = seq_len
    if "attention_mask" in batch:
        attended = batch["attention_mask"][rows].bool()
        if attended.numel() and bool(attended.any()):
            # Right padding (TRL's collator): drop the columns no kept row attends to.
            width = int(attended.any(dim=0).nonzero().max()) + 1
    out = dict(batch)
    for key, value in batch.items():
        if torch.is_tensor(value) and value.dim() >= 1 and value.shape[0] == batch_size:
            value = value[rows]
            out[key] = value[:, :width] if value.dim() >= 2 and value.shape[1] == seq_len else value
    return out


def placeholder(batch: dict[str, Any], padding_free: bool) -> dict[str, Any]:
    """The first row (segment, when ``padding_free``) of a fetched ``batch`` with every label masked: a forward and
    backward that add exactly zero, where a micro-batch must run but kept nothing."""
    if padding_free:
        starts = [*(batch["position_ids"][0] == 0).nonzero().flatten().tolist(), batch["position_ids"].shape[1]]
        first = slice(starts[0], starts[1])
        out = refresh_flat_metadata({k: v[:, first] if k in _PER_TOKEN_FLAT_KEYS else v for k, v in batch.items()})
    else:
        out = _take_rows(batch, slice(0, 1))
    out["labels"] = torch.full_like(out["labels"], -100)
    return out


def runnable_micro_batches(
    pruned: list[dict[str, Any]],
    fetched: list[dict[str, Any]],
    *,
    pack_size: int | None,
    padding_free: bool,
    pad_token_id: int,
    run_last: bool,
    most_across_ranks: Callable[[int], int] | None,
) -> list[dict[str, Any]]:
    """The micro-batches to run (as many as were fetched; emptied ones are skipped by the trainer).

    ``pack_size``: re-pack the kept rows into full micro-batches of that many rows (None: keep them in place).
    ``run_last``: the last micro-batch synchronises (DDP all-reduces in its backward, DeepSpeed steps its optimizer
    there), so it must run. ``most_across_ranks`` (several processes; None for one): the largest of every rank's
    value; every rank then runs the same micro-batches, so collectives stay matched, and an emptied one runs one fully
    label-masked row (:func:`placeholder`) instead of being skipped.
    """
    several = most_across_ranks is not None
    if pack_size is not None:
        packed = pack_padding_free(pruned, pack_size) if padding_free else pack_padded(pruned, pack_size, pad_token_id)
        filled = [mb for mb in packed if has_rows(mb)]
        needed = max(len(filled), 1) if run_last or several else len(filled)
        if several:  # as many as the rank that needs the most; all ranks skip the same freed slots
            needed = most_across_ranks(needed)
        filled = [placeholder(fetched[0], padding_free) for _ in range(needed - len(filled))] + filled
        return [empty_like(pruned[0]) for _ in range(len(pruned) - len(filled))] + filled
    if several:
        return [mb if has_rows(mb) else placeholder(f, padding_free) for mb, f in zip(pruned, fetched, strict=True)]
    runnable = list(pruned)
    if run_last and not has_rows(runnable[-1]):
        runnable[-1] = placeholder(fetched[-1], padding_free)
    return runnable


class WeightedLogProbs:
    """Calls the model and multiplies its fused per-token log-probs by a loss weight, so TRL's own loss (``-sum
    log_probs / num_items``) becomes the weighted sum. Everything else is the wrapped model's."""

    def __init__(self, model: torch.nn.Module, weights: torch.Tensor):
        self._model = model
        self._weights = weights

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = self._model(*args, **kwargs)
        if isinstance(out, FusedCausalLMOutput) and out.log_probs is not None:
            out.log_probs = out.log_probs * self._weights[..., 1:].to(out.log_probs.dtype)
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)
