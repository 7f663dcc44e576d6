"""Batch surgery and the scoring layout, on hand-made micro-batches: no model, no Trainer."""

from __future__ import annotations

import torch

from trl_qtuning.step.batch import LOSS_WEIGHT_COLUMN, apply_decisions, has_rows, placeholder, runnable_micro_batches
from trl_qtuning.step.scoring import RowLayout, Scorer


def _padded() -> dict:
    # Three right-padded rows; labels -100 on the prompt (first token) and on padding.
    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0], [1, 2, 3, 4]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    labels = torch.where(mask.bool(), ids, -100)
    labels[:, 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _flat() -> dict:
    # Two segments (lengths 3 and 2) plus one padding token that restarts at position 0 (pad_to_multiple_of).
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0]])
    ids = torch.tensor([[5, 6, 7, 8, 9, 0]])
    labels = torch.tensor([[-100, 6, 7, -100, 9, -100]])
    return {"input_ids": ids, "labels": labels, "position_ids": position_ids}


def _layout_only(batch: dict, padding_free: bool, n: int | None = None):
    scorer = Scorer(lambda: None, padding_free=padding_free, needs_statistics=False)
    ids = None if n is None else torch.arange(n)
    return scorer.score(None, batch, ids, inference_mode=True)


def test_padded_layout_maps_columns_to_label_positions():
    scored = _layout_only(_padded(), padding_free=False)
    assert scored.layout.positions.tolist() == [[1, 2, 3]] * 3
    assert scored.response.tolist() == [[True, True, False], [True, False, False], [True, True, True]]
    assert not scored.measured and scored.ppl.tolist() == [0.0, 0.0, 0.0]


def test_padding_free_layout_round_trips_and_ignores_trailing_padding():
    batch = _flat()
    scored = _layout_only(batch, padding_free=True, n=2)
    layout = scored.layout
    assert layout.token_segments.tolist() == [0, 0, 0, 1, 1, -1]
    assert layout.positions.tolist() == [[1, 2], [1, 0]]
    assert scored.response.tolist() == [[True, True], [True, False]]
    shifted = torch.arange(1.0, 6.0)[None]  # the flat row's shifted positions 1..5
    rows = layout.to_rows(shifted, fill=-1.0)
    assert rows.tolist() == [[1.0, 2.0], [4.0, -1.0]]
    assert layout.to_flat(rows, fill=0.0).tolist() == [1.0, 2.0, 0.0, 4.0, 0.0]


def test_a_layout_that_contradicts_the_trainer_setting_names_padding_free():
    import pytest

    with pytest.raises(ValueError, match="`padding_free=True`"):
        _layout_only(_flat(), padding_free=False)
    with pytest.raises(ValueError, match="`padding_free=False`"):
        _layout_only(_padded(), padding_free=True)


def test_apply_drops_rows_masks_labels_and_trims_padding_columns():
    batch = _padded()
    scored = _layout_only(batch, padding_free=False)
    keep = torch.tensor([True, True, False])
    label_keep = torch.tensor([[False, True, False], [True, False, False], [False, False, False]])
    out = apply_decisions(batch, scored, keep, label_keep)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]], "row 2 dropped, the all-padding column trimmed"
    assert out["labels"].tolist() == [[-100, -100, 7], [-100, 9, -100]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"][0, 1] == 6, "the fetched batch is not modified"


def test_apply_padding_free_drops_segments_and_rebuilds_metadata():
    batch = {**_flat(), "cu_seq_lens_q": None, "cu_seq_lens_k": None, "max_length_q": 0, "max_length_k": 0}
    scored = _layout_only(batch, padding_free=True, n=2)
    keep = torch.tensor([False, True])
    out = apply_decisions(batch, scored, keep, torch.tensor([[False, False], [True, False]]))
    assert out["input_ids"].tolist() == [[8, 9]] and out["position_ids"].tolist() == [[0, 1]]
    assert out["labels"].tolist() == [[-100, 9]]
    assert out["cu_seq_lens_q"].tolist() == [0, 2] and out["max_length_q"] == 2
    masked = apply_decisions(batch, scored, torch.tensor([True, True]), torch.tensor([[True, False], [True, False]]))
    assert masked["labels"].tolist() == [[-100, 6, -100, -100, 9]], "pruned label masked, padding token dropped"


def test_loss_weights_follow_their_samples():
    batch = _padded()
    scored = _layout_only(batch, padding_free=False)
    weight = torch.tensor([2.0, 0.5, 1.0])
    out = apply_decisions(batch, scored, torch.tensor([True, False, True]), scored.response, weight)
    assert out[LOSS_WEIGHT_COLUMN].tolist() == [[2.0] * 4, [1.0] * 4]
    flat = _flat()
    flat_scored = _layout_only(flat, padding_free=True, n=2)
    out = apply_decisions(flat, flat_scored, torch.tensor([True, True]), flat_scored.response, torch.tensor([3.0, 0.25]))
    assert out[LOSS_WEIGHT_COLUMN].tolist() == [[3.0, 3.0, 3.0, 0.25, 0.25]]


def test_placeholder_is_one_fully_masked_row():
    for batch, padding_free, n in ((_padded(), False, None), (_flat(), True, 2)):
        scored = _layout_only(batch, padding_free=padding_free, n=n)
        out = placeholder(batch, padding_free)
        assert has_rows(out) and bool((out["labels"] == -100).all())
        rows = int((out["position_ids"] == 0).sum()) if padding_free else out["input_ids"].shape[0]
        assert rows == 1
        first = apply_decisions(batch, scored, torch.arange(scored.num_samples) == 0, torch.zeros_like(scored.response))
        assert out["input_ids"].tolist() == first["input_ids"].tolist(), "the first row, trimmed like a kept one"


def test_row_layout_of_a_padded_batch_has_no_segments():
    layout = RowLayout.of(_padded(), padding_free=False)
    assert not layout.padding_free and layout.num_samples == 3
    values = torch.ones(3, 3)
    assert layout.to_rows(values) is values


def _emptied(batch: dict, scored, keep: list[bool]) -> dict:
    return apply_decisions(batch, scored, torch.tensor(keep), scored.response)


def _rows(batches: list[dict]) -> list[int]:
    return [mb["input_ids"].shape[0] for mb in batches]


def test_runnable_one_process_skips_emptied_micro_batches_but_runs_a_synchronising_last():
    batch = _padded()
    scored = _layout_only(batch, padding_free=False)
    pruned = [_emptied(batch, scored, [True, False, True]), _emptied(batch, scored, [False] * 3)]
    options = {"pack_size": None, "padding_free": False, "pad_token_id": 0, "most_across_ranks": None}
    skipped = runnable_micro_batches(pruned, [batch] * 2, run_last=False, **options)
    assert _rows(skipped) == [2, 0] and skipped[0] is pruned[0]
    kept_last = runnable_micro_batches(pruned, [batch] * 2, run_last=True, **options)
    assert _rows(kept_last) == [2, 1] and bool((kept_last[1]["labels"] == -100).all())
    assert not has_rows(pruned[1]), "the caller's list is not modified"


def test_runnable_several_processes_run_every_slot_and_pack_to_the_busiest_rank():
    batch = _padded()
    scored = _layout_only(batch, padding_free=False)
    pruned = [_emptied(batch, scored, [False] * 3), _emptied(batch, scored, [True, False, False])]
    fetched = [batch] * 2
    unpacked = runnable_micro_batches(
        pruned, fetched, pack_size=None, padding_free=False, pad_token_id=0, run_last=True,
        most_across_ranks=lambda n: n,
    )  # fmt: skip
    assert _rows(unpacked) == [1, 1] and bool((unpacked[0]["labels"] == -100).all())
    asked = []
    packed = runnable_micro_batches(
        pruned, fetched, pack_size=3, padding_free=False, pad_token_id=0, run_last=True,
        most_across_ranks=lambda n: asked.append(n) or 2,  # another rank needs two micro-batches
    )  # fmt: skip
    assert asked == [1], "this rank's kept row fits one packed micro-batch"
    assert _rows(packed) == [1, 1], "a masked placeholder first, then the packed row: as many as the busiest rank"
    assert bool((packed[0]["labels"] == -100).all()) and packed[1]["input_ids"].tolist() == [[5, 6, 7]]
