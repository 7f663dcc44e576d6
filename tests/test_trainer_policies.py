"""Baseline policies inside the trainer: same budgets, exact loss (with InfoBatch's weights), Rho-1's reference."""

from __future__ import annotations

import pytest
import torch

from tests.trainer_helpers import KEPT_DECISIONS, GradCapture, build_trainer, reference_model, reference_step_loss
from trl_qtuning import read_ledger


def _initial_state(trainer):
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def _ledger(trainer):
    return read_ledger(f"{trainer.args.output_dir}/qtuning_ledger").to_pandas()


@pytest.mark.parametrize(
    "sample_policy,token_policy,padding_free",
    [
        ("random", "random", False),
        ("infobatch", "random", False),
        ("infobatch", "ppl", True),
        ("entropy", "ppl", False),
        ("longest", "reversed", True),
    ],
)
def test_baseline_gradient_equals_hand_computed_reference(tmp_path, sample_policy, token_policy, padding_free):
    capture = GradCapture()
    weights: dict[int, float] = {}
    extra = {"padding_free": True, "max_length": None} if padding_free else {}
    trainer = build_trainer(
        tmp_path,
        callbacks=[capture],
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        sample_keep_ratio=0.75,
        token_keep_ratio=0.5,
        sample_policy=sample_policy,
        token_policy=token_policy,
        **extra,
    )

    def remember_weights(event):
        for sid, w in zip(event.columns["sample_id"], event.columns.get("loss_weight", [1.0] * len(event.columns["sample_id"]))):
            weights[int(sid)] = float(w)

    trainer.add_decision_listener(remember_weights)
    initial = _initial_state(trainer)
    trainer.train()

    rows = _ledger(trainer)
    assert len(rows) == 8 and rows.decision.isin(KEPT_DECISIONS).sum() == 6
    kept = rows[rows.decision.isin(KEPT_DECISIONS)]
    assert (kept.decision == "token_pruned").all(), "baselines token-prune every kept sample"
    assert (kept.kept_tokens == (kept.response_tokens * 0.5).astype(int).clip(lower=1)).all()
    assert (rows.quadrant == 0).all()
    if sample_policy == "infobatch":
        assert max(weights.values()) > 1.0, "the case must exercise InfoBatch's rescaling"
        assert trainer.state.log_history[0]["qtuning/loss_weight_mean"] > 1.0
    else:
        assert "qtuning/q2_share" not in trainer.state.log_history[0]

    model = reference_model(trainer, initial, lora=False)
    loss, _, _ = reference_step_loss(trainer, model, step=1, weights=weights)
    loss.backward()
    got = capture.grads[0]
    for name, param in model.named_parameters():
        if param.grad is not None:
            torch.testing.assert_close(got[name], param.grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    assert trainer.state.log_history[0]["loss"] == pytest.approx(float(loss.detach()), rel=1e-4)


def test_random_policy_repeats_with_the_seed_and_changes_with_it(tmp_path):
    def decisions(seed: int, folder: str):
        trainer = build_trainer(
            tmp_path / folder, max_steps=2, per_device_train_batch_size=8, sample_keep_ratio=0.5,
            sample_policy="random", token_policy="random", seed=seed, data_seed=0,
        )
        trainer.train()
        ledger = _ledger(trainer)
        return list(zip(ledger.sample_id, ledger.decision, ledger.kept_tokens))

    first = decisions(0, "a")
    assert first == decisions(0, "b")
    assert first != decisions(1, "c")


def test_rho1_scores_against_the_reference_model(tmp_path):
    from trl_qtuning.testing import save_tiny_model

    # The reference is the trained model itself: every excess loss is 0, so the stable ranking keeps the first
    # floor(r * T) response tokens of each sample and prunes the rest.
    reference = save_tiny_model(tmp_path / "reference", seed=0)
    trainer = build_trainer(
        tmp_path / "run", per_device_train_batch_size=8, sample_keep_ratio=0.5, token_keep_ratio=0.5,
        sample_policy="random", token_policy="rho1", reference_model_path=str(reference),
    )
    trainer.train()
    ledger = _ledger(trainer)
    dataset = trainer.train_dataset
    index_of = {int(sid): i for i, sid in enumerate(dataset["qtuning_sample_id"])}
    checked = 0
    for row in ledger[ledger.decision == "token_pruned"].itertuples():
        labels = dataset[index_of[int(row.sample_id)]]["labels"]
        response = [i for i, label in enumerate(labels) if label != -100 and i > 0]
        keep = max(1, len(response) // 2)
        assert sorted(int(p) for p in row.pruned_positions) == response[keep:]
        checked += 1
    assert checked == 4

    other = save_tiny_model(tmp_path / "other", seed=7)  # a different reference changes the decisions
    trainer2 = build_trainer(
        tmp_path / "run2", per_device_train_batch_size=8, sample_keep_ratio=0.5, token_keep_ratio=0.5,
        sample_policy="random", token_policy="rho1", reference_model_path=str(other),
    )
    trainer2.train()
    pruned = lambda t: [sorted(map(int, p)) for p in _ledger(t).pruned_positions]  # noqa: E731
    assert pruned(trainer2) != pruned(trainer)


def test_rho1_reference_path_errors_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="reference_model_path"):
        build_trainer(tmp_path, token_policy="rho1", reference_model_path=str(tmp_path / "missing"))
