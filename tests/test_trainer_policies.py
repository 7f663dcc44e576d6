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


def test_decorrelated_plane_logs_both_correlations_and_keeps_the_raw_entropy(tmp_path):
    import numpy as np

    runs = {}
    for plane in ("paper", "decorrelated"):
        trainer = build_trainer(
            tmp_path / plane, max_steps=1, per_device_train_batch_size=8, sample_keep_ratio=0.5, eu_plane=plane
        )
        trainer.train()
        runs[plane] = (trainer.state.log_history[0], _ledger(trainer))
    (paper_log, paper_rows), (log, rows) = runs["paper"], runs["decorrelated"]
    # Same model, same data: the ledger reports the same raw statistics whichever plane was triaged.
    np.testing.assert_allclose(rows.entropy.to_numpy(), paper_rows.entropy.to_numpy(), rtol=1e-6)
    assert log["qtuning/entropy_mean"] == pytest.approx(paper_log["qtuning/entropy_mean"], rel=1e-6)
    raw = float(np.corrcoef(np.log(rows.ppl.to_numpy()), rows.entropy.to_numpy())[0, 1])
    assert log["qtuning/eu_correlation"] == pytest.approx(raw, abs=1e-6)
    assert abs(log["qtuning/plane_correlation"]) < 1e-6, "the triaged residual is orthogonal to log PPL"
    assert paper_log["qtuning/plane_correlation"] == pytest.approx(paper_log["qtuning/eu_correlation"], abs=1e-12)
    assert "qtuning/filled_share" in log and rows.decision.isin(KEPT_DECISIONS).sum() == 4


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


def _record_tailsft_margins(monkeypatch) -> list[torch.Tensor]:
    """Every TailSFT decision's margins log PPL - log PPL_ref, in step order."""
    from trl_qtuning.policies.samples import TailSFTSamples

    margins: list[torch.Tensor] = []
    original = TailSFTSamples.select_samples

    def recording(self, batch, generator):
        margins.append((torch.log(batch.ppl.double()) - torch.log(batch.reference_ppl.double())).cpu())
        return original(self, batch, generator)

    monkeypatch.setattr(TailSFTSamples, "select_samples", recording)
    return margins


def _record_kept(trainer) -> list[torch.Tensor]:
    """Each step's kept samples, in the order the policy saw them (the ledger sorts by sample id)."""
    kept: list[torch.Tensor] = []
    trainer.add_decision_listener(
        lambda event: kept.append(torch.tensor([d in KEPT_DECISIONS for d in event.columns["decision"]]))
    )
    return kept


def _assert_tailsft_kept_the_highest_margins(kept, margins):
    assert len(kept) == len(margins)
    for keep, margin in zip(kept, margins, strict=True):
        assert int(keep.sum()) == 4
        assert margin[keep].min() >= margin[~keep].max()


def test_tailsft_with_lora_scores_the_initial_model_with_adapters_disabled(tmp_path, monkeypatch):
    margins = _record_tailsft_margins(monkeypatch)
    trainer = build_trainer(
        tmp_path, lora=True, max_steps=3, per_device_train_batch_size=8, sample_keep_ratio=0.5,
        sample_policy="tailsft", token_policy="none",
    )
    assert trainer._reference_model is None and trainer._reference_without_adapters  # no extra model in memory
    kept = _record_kept(trainer)
    trainer.train()
    assert len(margins) == 3
    # Step 1: LoRA is still the identity, so the reference PPL is the current PPL and every margin is 0 (ties: the
    # first four samples stay).
    torch.testing.assert_close(margins[0], torch.zeros(8, dtype=torch.float64), atol=1e-5, rtol=0)
    assert kept[0].tolist() == [True] * 4 + [False] * 4
    # Later steps: the adapters are back on for the trained model, which has moved away from its base.
    assert margins[2].abs().max() > 1e-4
    _assert_tailsft_kept_the_highest_margins(kept, margins)
    assert all(p.requires_grad for n, p in trainer.model.named_parameters() if "lora_" in n)


def test_tailsft_full_finetuning_keeps_a_frozen_copy_of_the_initial_model(tmp_path, monkeypatch):
    margins = _record_tailsft_margins(monkeypatch)
    trainer = build_trainer(
        tmp_path, max_steps=2, per_device_train_batch_size=8, sample_keep_ratio=0.5,
        sample_policy="tailsft", token_policy="none", triage_scope="global",
    )
    initial = _initial_state(trainer)
    reference = trainer._reference_model
    assert reference is not None and reference is not trainer.model and not trainer._reference_without_adapters
    kept = _record_kept(trainer)
    trainer.train()
    assert not any(p.requires_grad for p in reference.parameters())
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(value, initial[name], rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")
    trained = trainer.model.state_dict()
    assert any(not torch.equal(trained[name], value) for name, value in initial.items()), "the model must train"
    torch.testing.assert_close(margins[0], torch.zeros(8, dtype=torch.float64), atol=1e-5, rtol=0)
    assert margins[1].abs().max() > 1e-4
    _assert_tailsft_kept_the_highest_margins(kept, margins)


def test_tailsft_uses_reference_model_path_when_given(tmp_path, monkeypatch):
    from trl_qtuning.testing import save_tiny_model

    margins = _record_tailsft_margins(monkeypatch)
    other = save_tiny_model(tmp_path / "other", seed=7)
    trainer = build_trainer(
        tmp_path / "run", lora=True, per_device_train_batch_size=8, sample_keep_ratio=0.5,
        sample_policy="tailsft", token_policy="none", reference_model_path=str(other),
    )
    assert trainer._reference_model is not None and not trainer._reference_without_adapters
    trainer.train()
    assert margins[0].abs().max() > 1e-3, "another model's PPL differs from the trained model's from the start"


def test_prepruning_metrics_equal_trls_own_when_nothing_is_pruned(tmp_path):
    """TRL's mean_token_accuracy / entropy / num_tokens see the kept tokens only; the qtuning/prepruning_* twins
    describe the step as fetched, so with nothing pruned they must equal TRL's. (One micro-batch a step: TRL averages
    per-micro-batch ratios, the twins weigh the step's tokens.)"""
    trainer = build_trainer(tmp_path, max_steps=2, sample_keep_ratio=1.0, token_keep_ratio=1.0)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    for entry in logs:
        assert entry["qtuning/prepruning_mean_token_accuracy"] == pytest.approx(entry["mean_token_accuracy"], abs=1e-6)
        assert entry["qtuning/prepruning_entropy"] == pytest.approx(entry["entropy"], rel=1e-4)
        assert entry["qtuning/prepruning_num_tokens"] == entry["num_tokens"]


def test_token_keep_ratio_is_pooled_over_the_logging_window(tmp_path):
    from trl_qtuning import read_ledger

    trainer = build_trainer(tmp_path, max_steps=4, logging_steps=2, sample_keep_ratio=0.5, token_keep_ratio=0.5,
                            gradient_accumulation_steps=2)  # fmt: skip
    trainer.train()
    ledger = read_ledger(tmp_path / "qtuning_ledger").to_pandas()
    logged = {h["step"]: h.get("qtuning/token_keep_ratio") for h in trainer.state.log_history if "loss" in h}
    for step in (2, 4):
        window = ledger[ledger.step.isin([step - 1, step]) & (ledger.decision == "token_pruned")]
        if window.response_tokens.sum():
            assert logged[step] == pytest.approx(window.kept_tokens.sum() / window.response_tokens.sum())
        else:
            assert logged[step] is None  # no token-pruned sample in the window: not logged (it used to log 1.0)


def test_global_scope_token_draws_do_not_replay_the_sample_draws(tmp_path, monkeypatch):
    """With triage_scope='global' the sample decision and the token policy each get their own random stream (they
    used to get generators of one seed, so the token draws repeated the sample draws)."""
    trainer = build_trainer(tmp_path, max_steps=2, sample_policy="random", token_policy="random", triage_scope="global",
                            gradient_accumulation_steps=2)  # fmt: skip
    seeds: dict[str, list[int]] = {"samples": [], "tokens": []}
    samples, tokens = trainer._policy.samples, trainer._policy.tokens
    pick, keep = samples.select_samples, tokens.keep_tokens
    monkeypatch.setattr(samples, "select_samples", lambda b, g: seeds["samples"].append(g.initial_seed()) or pick(b, g))
    monkeypatch.setattr(tokens, "keep_tokens", lambda b, g: seeds["tokens"].append(g.initial_seed()) or keep(b, g))
    trainer.train()
    assert len(seeds["samples"]) == 2 and len(seeds["tokens"]) == 2
    assert not set(seeds["samples"]) & set(seeds["tokens"])


def test_reweighting_with_label_smoothing_is_refused():
    from trl_qtuning import QTuningConfig

    with pytest.raises(ValueError, match="label_smoothing_factor=0.1.*silently ignored"):
        QTuningConfig(output_dir="unused", use_cpu=True, bf16=False, report_to="none", sample_policy="infobatch",
                      token_policy="random", label_smoothing_factor=0.1)  # fmt: skip


def test_a_trl_without_the_compaction_switch_warns_once(monkeypatch, caplog):
    """The scoring forward relies on TRL's private `_use_triton`; a TRL without it scores correctly but slower, and
    says so once (it passed silently). TRL's own fused head needs the name, so only the switch is exercised here."""
    import logging

    import trl.trainer.utils as trl_utils

    import trl_qtuning.step.scoring as scoring

    monkeypatch.delattr(trl_utils, "_use_triton")
    monkeypatch.setattr(scoring, "_warned_no_compaction", False)
    with caplog.at_level(logging.WARNING, logger="trl_qtuning.step.scoring"):
        for _ in range(3):
            with scoring.project_labelled_positions_only():
                pass
    warnings = [r for r in caplog.records if "_use_triton" in r.getMessage()]
    assert len(warnings) == 1 and "runs slower" in warnings[0].getMessage()
