"""Kept rows are re-packed into as few micro-batches as possible; the count of micro-batches and the loss stay."""

from __future__ import annotations

import pytest
import torch

from tests.trainer_helpers import GradCapture, build_trainer
from trl_qtuning.step.packing import empty_like, pack_padded, pack_padding_free


def _padded(rows: list[list[int]], first_label: int = -100) -> dict:
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    labels[:, 0] = first_label
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_pack_padded_moves_rows_forward_and_keeps_the_count():
    batches = [_padded([[5, 6]]), empty_like(_padded([[1]])), _padded([[7, 8, 9], [3, 4]]), _padded([[2, 2, 2, 2]])]
    packed = pack_padded(batches, rows_per_batch=2, pad_token_id=0)
    assert len(packed) == 4
    assert [b["input_ids"].shape[0] for b in packed] == [2, 2, 0, 0]
    assert packed[0]["input_ids"].tolist() == [[5, 6, 0], [7, 8, 9]]
    assert packed[0]["attention_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]
    assert packed[0]["labels"].tolist() == [[-100, 6, -100], [-100, 8, 9]]
    assert packed[1]["input_ids"].tolist() == [[3, 4, 0, 0], [2, 2, 2, 2]]
    # Every label token survives packing exactly once.
    count = lambda bs: sum(int((b["labels"] != -100).sum()) for b in bs)  # noqa: E731
    assert count(packed) == count(batches)


def test_pack_padded_trims_to_the_longest_row_of_each_chunk():
    packed = pack_padded([_padded([[1, 2, 3, 4, 5]]), _padded([[6, 7]]), _padded([[8]])], 2, pad_token_id=0)
    assert packed[0]["input_ids"].shape == (2, 5) and packed[1]["input_ids"].shape == (1, 1)


def test_pack_padding_free_merges_whole_micro_batches():
    def flat(lengths: list[int], start: int) -> dict:
        positions = torch.cat([torch.arange(n) for n in lengths])[None]
        ids = torch.arange(start, start + positions.shape[1])[None]
        return {"input_ids": ids, "labels": ids.clone(), "position_ids": positions,
                "cu_seq_lens_q": None, "cu_seq_lens_k": None, "max_length_q": 0, "max_length_k": 0, "seq_idx": None}

    batches = [flat([2, 3], 0), flat([4], 10), flat([1, 1, 1], 20)]
    packed = pack_padding_free(batches, samples_per_batch=3)
    assert len(packed) == 3
    assert packed[0]["input_ids"].tolist() == [[0, 1, 2, 3, 4, 10, 11, 12, 13]]
    assert packed[0]["cu_seq_lens_q"].tolist() == [0, 2, 5, 9] and packed[0]["max_length_q"] == 4
    assert packed[0]["seq_idx"].tolist() == [[0, 0, 1, 1, 1, 2, 2, 2, 2]]
    assert packed[1]["input_ids"].tolist() == [[20, 21, 22]]
    assert packed[2]["input_ids"].shape == (1, 0)


@pytest.mark.parametrize("padding_free", [False, True])
def test_packing_runs_fewer_forwards_with_the_same_gradient(tmp_path, padding_free):
    grads, forwards = [], []
    for pack in (True, False):
        capture = GradCapture()
        extra = {"padding_free": True, "max_length": None} if padding_free else {}
        trainer = build_trainer(
            tmp_path / str(pack), callbacks=[capture], per_device_train_batch_size=4, gradient_accumulation_steps=4,
            sample_keep_ratio=0.25, token_keep_ratio=0.5, pack_kept_rows=pack, **extra,
        )
        calls = []
        original = trainer.compute_loss

        def counting(model, inputs, *args, _calls=calls, _original=original, **kwargs):
            _calls.append(int(inputs["input_ids"].numel()))
            return _original(model, inputs, *args, **kwargs)

        trainer.compute_loss = counting
        trainer.train()
        grads.append(capture.grads[0])
        forwards.append(len(calls))
    assert forwards[0] == 1, "4 kept rows of 16 fit in one micro-batch of 4"
    assert forwards[1] >= 2
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-7)


@pytest.fixture
def keep_first_samples():
    """A sample policy that keeps the first samples of the step: all kept rows sit in the first micro-batch."""
    from trl_qtuning.core.triage import TriageResult
    from trl_qtuning.policies import SAMPLE_POLICIES, SampleDecision, SamplePolicy, register_sample_policy

    @register_sample_policy
    class KeepFirst(SamplePolicy):
        name = "keep_first_test"

        def select_samples(self, batch, generator):
            keep = torch.zeros(batch.size, dtype=torch.bool)
            keep[: self.target(batch)] = True
            return SampleDecision(TriageResult.without_plane(keep, ~batch.valid, int(keep.sum())), keep)

    yield KeepFirst.name
    SAMPLE_POLICIES.pop(KeepFirst.name)


def _record_micro_batches(trainer) -> list[dict]:
    seen = []
    original = trainer.training_step

    def recording(model, inputs, *args, **kwargs):
        seen.append({"rows": int(inputs["input_ids"].shape[0]), "labels": int((inputs["labels"] != -100).sum())})
        return original(model, inputs, *args, **kwargs)

    trainer.training_step = recording
    return seen


@pytest.mark.parametrize("pack", [True, False])
def test_the_last_micro_batch_runs_when_the_backend_steps_there(tmp_path, keep_first_samples, pack):
    """DeepSpeed steps its optimizer in the last micro-batch's backward, so that one is never an empty skip."""
    grads, runs = [], []
    for deepspeed_like in (False, True):
        capture = GradCapture()
        trainer = build_trainer(
            tmp_path / f"{pack}{deepspeed_like}", callbacks=[capture], per_device_train_batch_size=4,
            gradient_accumulation_steps=4, sample_keep_ratio=0.25, token_keep_ratio=0.5, pack_kept_rows=pack,
            sample_policy=keep_first_samples, token_policy="random",
        )
        if deepspeed_like:
            trainer._must_run_last_micro_batch = lambda: True
        runs.append(_record_micro_batches(trainer))
        trainer.train()
        grads.append(capture.grads[0])
    plain, deepspeed_like = runs
    assert len(plain) == len(deepspeed_like) == 4
    if pack:
        # The packed micro-batch goes last either way; the freed slots come first.
        assert [mb["rows"] for mb in plain] == [0, 0, 0, 4] and deepspeed_like == plain
    else:
        assert [mb["rows"] for mb in plain] == [4, 0, 0, 0]
        assert [mb["rows"] for mb in deepspeed_like] == [4, 0, 0, 1] and deepspeed_like[-1]["labels"] == 0
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-8)
