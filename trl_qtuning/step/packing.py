"""Re-pack the rows that survive pruning into as few micro-batches as possible.

Dropping 75% of the samples from each of 4 micro-batches leaves 4 forwards of one row each; one forward of 4 rows
uses the hardware far better. The step's loss does not change: the normaliser counts the kept tokens of the whole
step, wherever they sit. The number of micro-batches must stay what transformers fetched, so the freed slots are
returned empty (``training_step`` skips them).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["pack_padded", "pack_padding_free", "empty_like"]

_PAD_VALUES = {"labels": -100, "attention_mask": 0, "position_ids": 0}


def _rows(batch: dict[str, Any]) -> int:
    return int(batch["input_ids"].shape[0])


def empty_like(batch: dict[str, Any]) -> dict[str, Any]:
    """The same keys with no sample: 0 rows (padded) or 0 tokens (padding-free)."""
    if "attention_mask" not in batch and "position_ids" in batch:
        return refresh_flat_metadata(
            {k: (v[:, :0] if torch.is_tensor(v) and v.dim() == 2 and v.shape[0] == 1 else v) for k, v in batch.items()}
        )
    n = _rows(batch)
    return {k: (v[:0] if torch.is_tensor(v) and v.dim() >= 1 and v.shape[0] == n else v) for k, v in batch.items()}


def pack_padded(batches: list[dict[str, Any]], rows_per_batch: int, pad_token_id: int) -> list[dict[str, Any]]:
    """Right-padded micro-batches -> the same number of micro-batches, the kept rows filling the first ones.

    Rows keep their order. Each packed micro-batch is trimmed to the longest row it holds.
    """
    if rows_per_batch < 1:
        raise ValueError(f"rows_per_batch must be >= 1, got {rows_per_batch}")
    non_empty = [b for b in batches if _rows(b) > 0]
    if len(non_empty) <= 1:
        return batches
    template = non_empty[0]
    row_keys = [k for k, v in template.items() if torch.is_tensor(v) and v.dim() >= 2 and v.shape[0] == _rows(template)]
    width = max(int(b["input_ids"].shape[1]) for b in non_empty)
    pad_values = {**_PAD_VALUES, "input_ids": pad_token_id}
    stacked = {
        key: torch.cat(
            [torch.nn.functional.pad(b[key], (0, width - b[key].shape[1]), value=pad_values.get(key, 0)) for b in non_empty]
        )
        for key in row_keys
    }
    total = stacked["input_ids"].shape[0]
    packed = []
    for start in range(0, total, rows_per_batch):
        chunk = {key: value[start : start + rows_per_batch] for key, value in stacked.items()}
        if "attention_mask" in chunk:
            used = int(chunk["attention_mask"].any(dim=0).nonzero().max()) + 1 if bool(chunk["attention_mask"].any()) else 1
            chunk = {key: value[:, :used] for key, value in chunk.items()}
        packed.append({**{k: v for k, v in template.items() if k not in row_keys}, **chunk})
    if len(packed) > len(batches):
        raise ValueError("packing produced more micro-batches than it was given; rows_per_batch is too small")
    return [*packed, *[empty_like(template) for _ in range(len(batches) - len(packed))]]


def _segments(batch: dict[str, Any]) -> int:
    return int((batch["position_ids"][0] == 0).sum()) if batch["position_ids"].numel() else 0


def pack_padding_free(batches: list[dict[str, Any]], samples_per_batch: int) -> list[dict[str, Any]]:
    """Padding-free (one flat row) micro-batches -> concatenated while each holds at most ``samples_per_batch``.

    Whole pruned micro-batches are merged (first fit, in order), so no sample is split; varlen metadata is rebuilt.
    """
    bins: list[list[dict[str, Any]]] = []
    counts: list[int] = []
    for batch in batches:
        n = _segments(batch)
        if n == 0:
            continue
        for i, count in enumerate(counts):
            if count + n <= samples_per_batch:
                bins[i].append(batch)
                counts[i] += n
                break
        else:
            bins.append([batch])
            counts.append(n)
    merged = []
    for group in bins:
        if len(group) == 1:
            merged.append(group[0])
            continue
        out = dict(group[0])
        for key, value in group[0].items():
            if torch.is_tensor(value) and value.dim() == 2 and value.shape[0] == 1 and key != "seq_idx":
                out[key] = torch.cat([b[key] for b in group], dim=1)
        merged.append(refresh_flat_metadata(out))
    return [*merged, *[empty_like(batches[0]) for _ in range(len(batches) - len(merged))]]


def refresh_flat_metadata(batch: dict[str, Any]) -> dict[str, Any]:
    """Recompute the varlen metadata TRL's collator adds to a padding-free row, after its segments changed.

    transformers' ``prepare_fa_kwargs_from_position_ids`` finds the boundaries; a row left with no token (every sample
    of the micro-batch dropped) has none, which that helper cannot take.
    """
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    position_ids = batch["position_ids"]
    if position_ids.numel():
        (cu_seq_lens, _), (longest, _) = prepare_fa_kwargs_from_position_ids(position_ids)
    else:
        cu_seq_lens, longest = torch.zeros(1, dtype=torch.int32, device=position_ids.device), 0
    if "cu_seq_lens_q" in batch:
        batch["cu_seq_lens_q"] = batch["cu_seq_lens_k"] = cu_seq_lens
    if "max_length_q" in batch:
        batch["max_length_q"] = batch["max_length_k"] = int(longest)
    if "seq_idx" in batch:
        segments = torch.arange(cu_seq_lens.numel() - 1, dtype=torch.int32, device=position_ids.device)
        batch["seq_idx"] = torch.repeat_interleave(segments, cu_seq_lens.diff())[None]
    return batch
