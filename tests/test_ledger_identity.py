"""The ledger never mixes runs, never loses one, traces ids to rows, and `read_ledger` finds it or says why not."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from tests.trainer_helpers import build_trainer
from trl_qtuning import read_ledger
from trl_qtuning.step.collator import QTuningDataCollator
from trl_qtuning.ledger import DecisionLedger
from trl_qtuning.testing import make_arithmetic_dataset

CHECKPOINTS = dict(per_device_train_batch_size=4, save_strategy="steps", save_steps=2, sample_keep_ratio=0.5)


def _ledger(path: Path):
    return read_ledger(path / "qtuning_ledger").to_pandas()


def _ledger_id(folder: Path) -> str:
    return json.loads((folder / "_ledger.json").read_text())["run_id"]


def _checkpoint_id(checkpoint: Path) -> str:
    return json.loads((checkpoint / "qtuning_ledger_id.json").read_text())["run_id"]


def _previous(output_dir: Path) -> list[Path]:
    return sorted(output_dir.glob("qtuning_ledger.previous-*"))


# ---------------------------------------------------------------------------------------------------- run identity
def test_fresh_run_moves_the_old_ledger_aside_and_a_resume_of_the_old_run_is_refused(tmp_path, caplog):
    run_a = build_trainer(tmp_path, max_steps=4, **CHECKPOINTS)
    run_a.train()
    a_rows = _ledger(tmp_path)

    # A fresh run B into the same output_dir: A's ledger is moved aside, whole, and a log line says where.
    run_b = build_trainer(tmp_path, max_steps=2, per_device_train_batch_size=4, sample_keep_ratio=0.5, model_seed=1)
    with caplog.at_level(logging.WARNING, logger="trl_qtuning.trainer"):
        run_b.train()
    (aside,) = _previous(tmp_path)
    a_id = _ledger_id(aside)
    assert len(a_id) == 32
    assert _checkpoint_id(tmp_path / "checkpoint-2") == _checkpoint_id(tmp_path / "checkpoint-4") == a_id
    assert aside.name == f"qtuning_ledger.previous-{a_id[:8]}" and str(aside) in caplog.text
    assert read_ledger(aside).to_pandas().equals(a_rows)
    b_rows = _ledger(tmp_path)
    b_id = _ledger_id(tmp_path / "qtuning_ledger")
    assert b_id != a_id and sorted(b_rows.step.unique()) == [1, 2]

    # A resumed from its checkpoint would write into B's ledger: refused, with the way out, and nothing is touched.
    resumed = build_trainer(tmp_path, max_steps=4, **CHECKPOINTS)
    with pytest.raises(ValueError, match=rf"belongs to run {a_id[:8]}.*holds the ledger of run {b_id[:8]}") as error:
        resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert str(aside) in str(error.value)
    assert _ledger(tmp_path).equals(b_rows) and _ledger_id(tmp_path / "qtuning_ledger") == b_id
    assert _previous(tmp_path) == [aside]

    # The way out the message names: put B's ledger aside, A's back, and resume. A's ledger then holds A alone.
    (tmp_path / "qtuning_ledger").rename(tmp_path / f"qtuning_ledger.previous-{b_id[:8]}")
    aside.rename(tmp_path / "qtuning_ledger")
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    ledger = _ledger(tmp_path)
    assert ledger.groupby("step").size().to_dict() == {1: 4, 2: 4, 3: 4, 4: 4}
    columns = ["step", "sample_id", "quadrant", "decision", "kept_tokens"]
    ordered = lambda frame: frame[columns].sort_values(["step", "sample_id"]).reset_index(drop=True)  # noqa: E731
    assert ordered(ledger).equals(ordered(a_rows))
    assert _ledger_id(tmp_path / "qtuning_ledger") == a_id == _checkpoint_id(tmp_path / "checkpoint-4")


def test_a_second_train_call_is_a_fresh_run_and_keeps_the_first_ledger(tmp_path):
    trainer = build_trainer(tmp_path, max_steps=2, per_device_train_batch_size=4, sample_keep_ratio=0.5)
    trainer.train()
    first = _ledger(tmp_path)
    first_id = _ledger_id(tmp_path / "qtuning_ledger")
    trainer.train()
    (aside,) = _previous(tmp_path)
    assert read_ledger(aside).to_pandas().equals(first)
    assert _ledger_id(tmp_path / "qtuning_ledger") != first_id
    assert _ledger(tmp_path).groupby("step").size().to_dict() == {1: 4, 2: 4}


def test_resume_from_a_checkpoint_without_a_run_id_truncates_and_warns(tmp_path, caplog):
    build_trainer(tmp_path, max_steps=3, **CHECKPOINTS).train()
    (tmp_path / "checkpoint-2" / "qtuning_ledger_id.json").unlink()  # a checkpoint saved by an older version
    resumed = build_trainer(tmp_path, max_steps=3, **CHECKPOINTS)
    with caplog.at_level(logging.WARNING, logger="trl_qtuning.trainer"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert "cannot check" in caplog.text
    assert _ledger(tmp_path).groupby("step").size().to_dict() == {1: 4, 2: 4, 3: 4}
    assert not _previous(tmp_path)


def test_resume_into_an_output_dir_without_its_ledger_warns_that_earlier_steps_are_elsewhere(tmp_path, caplog):
    build_trainer(tmp_path / "a", max_steps=3, **CHECKPOINTS).train()
    a_id = _ledger_id(tmp_path / "a" / "qtuning_ledger")
    resumed = build_trainer(tmp_path / "b", max_steps=3, **CHECKPOINTS)
    with caplog.at_level(logging.WARNING, logger="trl_qtuning.trainer"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    assert "starts at step 3" in caplog.text
    assert _ledger(tmp_path / "b").groupby("step").size().to_dict() == {3: 4}
    assert _ledger_id(tmp_path / "b" / "qtuning_ledger") == a_id


def test_resume_true_without_a_checkpoint_leaves_the_ledger_alone(tmp_path):
    trainer = build_trainer(tmp_path, max_steps=1, per_device_train_batch_size=4)
    trainer.train()
    rows = _ledger(tmp_path)
    with pytest.raises(ValueError, match="No valid checkpoint"):  # transformers' own error
        trainer.train(resume_from_checkpoint=True)
    assert _ledger(tmp_path).equals(rows) and not _previous(tmp_path)


# ---------------------------------------------------------------------------------------------------- sample ids
def test_shuffled_stream_without_ids_warns_that_ids_are_stream_positions(tmp_path, caplog):
    stream = make_arithmetic_dataset(24, seed=1).to_iterable_dataset().shuffle(seed=0, buffer_size=16)
    with caplog.at_level(logging.WARNING, logger="trl_qtuning.trainer"):
        build_trainer(tmp_path, dataset=stream, max_steps=2)
    assert "stream positions, not row ids" in caplog.text and "qtuning_sample_id" in caplog.text


def test_shuffled_stream_with_own_ids_traces_back_to_rows_without_warning(tmp_path, caplog):
    rows = make_arithmetic_dataset(24, seed=1)
    rows = rows.add_column("qtuning_sample_id", [1000 + i for i in range(len(rows))])
    stream = rows.to_iterable_dataset().shuffle(seed=0, buffer_size=16)
    with caplog.at_level(logging.WARNING, logger="trl_qtuning.trainer"):
        trainer = build_trainer(tmp_path, dataset=stream, max_steps=8, per_device_train_batch_size=4)
    assert "stream positions" not in caplog.text
    trainer.train()
    ledger = _ledger(tmp_path)
    # 8 steps of 4 = 32 samples over a stream of 24 rows: every id is a row's own, each row seen at most twice.
    assert len(ledger) == 32 and set(ledger.sample_id) <= set(range(1000, 1024))
    assert ledger.sample_id.value_counts().max() <= 2


@pytest.mark.parametrize("bad", [["a", "b"], [0.5, 1.5]], ids=["strings", "floats"])
def test_non_integer_sample_ids_fail_at_construction(tmp_path, bad):
    rows = make_arithmetic_dataset(8, seed=1)
    rows = rows.add_column("qtuning_sample_id", bad * (len(rows) // 2))
    with pytest.raises(ValueError, match=r"`qtuning_sample_id` column .* integer"):
        build_trainer(tmp_path, dataset=rows)
    with pytest.raises(ValueError, match=r"`qtuning_sample_id` column .* integer"):
        build_trainer(tmp_path, dataset=rows.to_iterable_dataset())


def test_collator_rejects_non_integer_ids_with_a_clear_error():
    collator = QTuningDataCollator(lambda examples: {})
    assert collator([{"qtuning_sample_id": 3}])["qtuning_sample_id"].tolist() == [3]
    with pytest.raises(ValueError, match=r"`qtuning_sample_id`.*'x'.*integer"):
        collator([{"qtuning_sample_id": 3}, {"qtuning_sample_id": "x"}])


def test_duplicated_sample_ids_are_reported(tmp_path, caplog):
    rows = make_arithmetic_dataset(8, seed=1)
    rows = rows.add_column("qtuning_sample_id", [0, 1, 2, 2, 4, 5, 5, 5])
    with caplog.at_level(logging.WARNING, logger="trl_qtuning.trainer"):
        build_trainer(tmp_path, dataset=rows)
    expected = "2 value(s) of the `qtuning_sample_id` column appear on more than one row (5 rows; e.g. id 5 on 3 rows)"
    assert expected in caplog.text


# ---------------------------------------------------------------------------------------------------- read_ledger
def _write_ledger(folder: Path, steps: list[int]) -> DecisionLedger:
    ledger = DecisionLedger(folder, rows_per_shard=1)
    for step in steps:
        ledger.append({
            "step": [step], "epoch": [0.0], "rank": [0], "micro_batch": [0], "sample_id": [step], "quadrant": [2],
            "ppl": [1.0], "entropy": [1.0], "decision": ["kept"], "response_tokens": [3], "kept_tokens": [3],
        })  # fmt: skip
    return ledger


def test_read_ledger_accepts_the_folder_the_output_dir_and_one_shard(tmp_path):
    _write_ledger(tmp_path / "qtuning_ledger", [1, 2, 3])
    (tmp_path / "qtuning_ledger" / "_ledger.json").write_text(json.dumps({"run_id": "0" * 32}))
    assert read_ledger(tmp_path / "qtuning_ledger")["step"].to_pylist() == [1, 2, 3]
    assert read_ledger(tmp_path)["step"].to_pylist() == [1, 2, 3]
    shard = tmp_path / "qtuning_ledger" / "ledger-rank0-000001.parquet"
    assert read_ledger(shard)["step"].to_pylist() == [2]
    assert read_ledger(str(shard)).num_rows == pq.read_metadata(shard).num_rows == 1
    assert len(pd.read_parquet(tmp_path / "qtuning_ledger")) == 3  # the identity file does not get in the way


def test_read_ledger_raises_on_a_path_without_a_ledger(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_ledger(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no ledger .*qtuning_ledger"):
        read_ledger(tmp_path / "empty")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="not a ledger shard"):
        read_ledger(tmp_path / "notes.txt")
    # A ledger a run has created but not written a row into yet is an empty ledger, not a missing one.
    (tmp_path / "run" / "qtuning_ledger").mkdir(parents=True)
    (tmp_path / "run" / "qtuning_ledger" / "_ledger.json").write_text(json.dumps({"run_id": "0" * 32}))
    assert read_ledger(tmp_path / "run").num_rows == 0


def test_a_copied_ledger_folder_without_ledger_json_still_reads(tmp_path):
    _write_ledger(tmp_path / "ledger", [1, 2])
    shutil.copytree(tmp_path / "ledger", tmp_path / "copy")
    assert read_ledger(tmp_path / "copy").num_rows == 2


# ---------------------------------------------------------------------------------------------------- positions
class _LeftPadding:
    """TRL's collator with the padding moved to the left of each row (as a left-padding collator gives it)."""

    def __init__(self, collator):
        self.collator = collator
        self.pad_token_id = collator.pad_token_id

    def __call__(self, examples):
        import torch

        batch = self.collator(examples)
        width = batch["input_ids"].shape[1]
        padding = (batch["attention_mask"] == 0).sum(dim=1, keepdim=True)
        order = (torch.arange(width) - padding) % width  # each row rolled right by its padding
        return {k: v.gather(1, order) if v.dim() == 2 and v.shape[1] == width else v for k, v in batch.items()}


def test_pruned_positions_are_offsets_in_the_sample_under_left_padding(tmp_path):
    """Issue 27: under a left-padding collator the ledger recorded positions in the padded row, so they named prompt
    or padding tokens and the samples page struck nothing. They are offsets in the sample's input_ids."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from tests.trainer_helpers import tiny_config
    from trl_qtuning import QTuningSFTTrainer
    from trl_qtuning.testing import make_tiny_model, make_tiny_tokenizer

    tokenizer = make_tiny_tokenizer()
    trainer = QTuningSFTTrainer(
        model=make_tiny_model(tokenizer, seed=0),
        args=tiny_config(tmp_path, per_device_train_batch_size=8, max_steps=2, sample_keep_ratio=0.5),
        train_dataset=make_arithmetic_dataset(48, seed=1),
        processing_class=tokenizer,
        data_collator=_LeftPadding(DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)),
    )
    trainer.train()
    ledger = _ledger(tmp_path)
    pruned = ledger[ledger.decision == "token_pruned"]
    assert len(pruned) > 0
    index_of = {int(sid): i for i, sid in enumerate(trainer.train_dataset["qtuning_sample_id"])}
    for row in pruned.itertuples():
        labels = trainer.train_dataset[index_of[int(row.sample_id)]]["labels"]
        assert all(0 < p < len(labels) and labels[p] != -100 for p in row.pruned_positions), row
    assert (pruned.response_tokens - pruned.kept_tokens == pruned.pruned_positions.apply(len)).all()
