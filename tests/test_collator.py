"""QTuningDataCollator carries sample ids through TRL's collator, padded and padding-free."""

from __future__ import annotations

import torch
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from trl_qtuning import QTuningDataCollator
from trl_qtuning.core import segment_ids_from_position_ids

EXAMPLES = [
    {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "qtuning_sample_id": 41},
    {"input_ids": [8, 9], "labels": [-100, 9], "qtuning_sample_id": 7},
]


def test_padded_batch_keeps_ids_in_row_order():
    batch = QTuningDataCollator(DataCollatorForLanguageModeling(pad_token_id=0))(EXAMPLES)
    assert batch["qtuning_sample_id"].tolist() == [41, 7]
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, 9, -100]]


def test_padding_free_batch_keeps_ids_in_segment_order():
    inner = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True, pad_to_multiple_of=8)
    collator = QTuningDataCollator(inner)
    batch = collator(EXAMPLES)
    assert batch["qtuning_sample_id"].tolist() == [41, 7]
    assert batch["input_ids"].shape == (1, 8)  # 5 real tokens padded to a multiple of 8
    # Padding restarts positions at 0; capping the segment count at the number of ids marks it as -1.
    segments = segment_ids_from_position_ids(batch["position_ids"], num_segments=2)[0]
    assert segments.tolist() == [0, 0, 0, 1, 1, -1, -1, -1]
    assert collator.padding_free is True  # settings of the wrapped collator stay readable


def test_examples_without_ids_pass_through_unchanged():
    plain = [{k: v for k, v in e.items() if k != "qtuning_sample_id"} for e in EXAMPLES]
    batch = QTuningDataCollator(DataCollatorForLanguageModeling(pad_token_id=0))(plain)
    assert "qtuning_sample_id" not in batch
    assert torch.equal(batch["input_ids"], torch.tensor([[5, 6, 7], [8, 9, 0]]))


def test_wrapping_twice_does_not_nest():
    inner = DataCollatorForLanguageModeling(pad_token_id=0)
    assert QTuningDataCollator(QTuningDataCollator(inner)).collator is inner
