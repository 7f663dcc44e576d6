"""Compute accounting (``trl_qtuning.bench.compute``) against counts rebuilt by hand from the ledger and the tokenized
rows, and the scoring pass skipped for policies that read no statistics."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from trl_qtuning import read_ledger
from trl_qtuning.bench.compute import TRAIN_COST_FULL, TRAIN_COST_LORA, ComputeMeter

from .trainer_helpers import KEPT_DECISIONS, build_trainer


def _row_lengths(trainer) -> dict[int, int]:
    dataset = trainer.train_dataset
    return {int(sid): len(ids) for sid, ids in zip(dataset["qtuning_sample_id"], dataset["input_ids"])}


def _eval_mode_forwards(model) -> list[int]:
    """Counts forwards run in eval mode (the scoring pass; training forwards run in train mode)."""
    calls: list[int] = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1) if not module.training else None)
    return calls


def _train(tmp_path: Path, **overrides):
    trainer = build_trainer(tmp_path, include_num_input_tokens_seen="non_padding", **overrides)
    meter = ComputeMeter(trainer)
    trainer.callback_handler.callbacks.insert(0, meter)
    return trainer, meter


@pytest.mark.parametrize("lora", [True, False])
def test_qtuning_step_cost_is_scoring_plus_training_of_kept_rows(tmp_path, lora):
    trainer, meter = _train(tmp_path, lora=lora, max_steps=2, gradient_accumulation_steps=2,
                            sample_keep_ratio=0.5, token_keep_ratio=0.5)  # fmt: skip
    trainer.train()
    per_token = TRAIN_COST_LORA if lora else TRAIN_COST_FULL
    assert meter.per_token == per_token
    ledger = read_ledger(tmp_path / "qtuning_ledger").to_pandas()
    lengths = _row_lengths(trainer)
    cumulative = 0
    for cost in meter.history:
        rows = ledger[ledger.step == cost.step]
        scored = sum(lengths[int(s)] for s in rows.sample_id)  # every sample of the step is scored, padding excluded
        trained = sum(lengths[int(s)] for s, d in zip(rows.sample_id, rows.decision) if d in KEPT_DECISIONS)
        assert (cost.scored_tokens, cost.trained_tokens) == (scored, trained)
        cumulative += per_token * trained + scored
        assert cost.compute == per_token * trained + scored and cost.cumulative == cumulative
    assert [c.step for c in meter.history] == [1, 2] and meter.cumulative == cumulative
    logged = [e for e in trainer.state.log_history if "compute/forward_token_equivalents" in e]
    assert [e["compute/forward_token_equivalents"] for e in logged] == [float(c.cumulative) for c in meter.history]


def test_plain_fine_tuning_costs_three_per_token_and_no_scoring(tmp_path):
    trainer, meter = _train(tmp_path, qtuning_enabled=False, max_steps=2)
    calls = _eval_mode_forwards(trainer.model)
    trainer.train()
    assert calls == []
    seen = trainer.state.num_input_tokens_seen
    assert seen > 0 and meter.cumulative == TRAIN_COST_FULL * seen
    assert all(c.scored_tokens == 0 for c in meter.history)


@pytest.mark.parametrize(("sample_policy", "token_policy"), [("random", "random"), ("all", "random"), ("longest", "none")])
def test_policies_that_read_no_statistics_skip_the_scoring_forward(tmp_path, sample_policy, token_policy):
    trainer, meter = _train(tmp_path, max_steps=2, sample_policy=sample_policy, token_policy=token_policy,
                            sample_keep_ratio=0.5)  # fmt: skip
    assert not trainer._policy.needs_scoring
    calls = _eval_mode_forwards(trainer.model)
    trainer.train()
    assert calls == [] and trainer.qtuning_scored_tokens == 0
    assert meter.cumulative == TRAIN_COST_FULL * trainer.state.num_input_tokens_seen
    ledger = read_ledger(tmp_path / "qtuning_ledger").to_pandas()
    assert ledger.ppl.isna().all() and ledger.entropy.isna().all()  # nothing was measured
    kept = ledger[ledger.decision.isin(KEPT_DECISIONS)]
    expected = 4 if sample_policy == "all" else 2
    assert (kept.groupby("step").size() == expected).all()


def test_policies_that_read_statistics_still_score(tmp_path):
    trainer, _ = _train(tmp_path, max_steps=1, sample_policy="random", token_policy="ppl")
    assert trainer._policy.needs_scoring
    calls = _eval_mode_forwards(trainer.model)
    trainer.train()
    assert len(calls) == 1 and trainer.qtuning_scored_tokens > 0


def test_meter_stops_at_the_target_but_not_before_min_steps(tmp_path):
    trainer, meter = _train(tmp_path, qtuning_enabled=False, max_steps=10)
    meter.target, meter.min_steps = 1, 3  # reached after step 1, but the equal-steps point is step 3
    trainer.train()
    assert trainer.state.global_step == 3
    trainer, meter = _train(tmp_path / "b", qtuning_enabled=False, max_steps=10)
    trainer.train()
    per_step = meter.history[0].compute
    trainer, meter = _train(tmp_path / "c", qtuning_enabled=False, max_steps=10)
    meter.target = int(per_step * 2.5)
    trainer.train()
    assert trainer.state.global_step == 3 and meter.reached_target


def test_meter_needs_the_token_counter(tmp_path):
    trainer = build_trainer(tmp_path)
    with pytest.raises(ValueError, match="include_num_input_tokens_seen='non_padding'"):
        ComputeMeter(trainer)
    assert torch.is_tensor(torch.zeros(1))
