"""The trainer's step equals a hand-computed reference: same decisions, same loss, same gradients."""

from __future__ import annotations

import contextlib

import pytest
import torch
from trl import SFTConfig, SFTTrainer

from tests.trainer_helpers import (
    KEPT_DECISIONS,
    GradCapture,
    build_trainer,
    reference_model,
    reference_step_loss,
)
from trl_qtuning import QTuningConfig, read_ledger
from trl_qtuning import select_qtuning
from trl_qtuning.core import eu_plane_stats
from trl_qtuning.testing import make_arithmetic_dataset, make_tiny_model, make_tiny_tokenizer


def _initial_state(trainer):
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


@pytest.mark.parametrize(
    "ga,batch,lora,padding_free,scope,ratio",
    [
        (1, 8, False, False, "step", 0.5),
        (3, 4, False, False, "step", 0.25),
        (3, 4, True, False, "step", 0.25),
        (3, 4, False, True, "step", 0.25),
        (2, 8, True, True, "micro_batch", 0.5),
    ],
    ids=["ga1", "ga3", "ga3-lora", "ga3-padding-free", "ga2-lora-padding-free-microbatch"],
)
def test_gradient_equals_hand_computed_reference(tmp_path, ga, batch, lora, padding_free, scope, ratio):
    capture = GradCapture()
    extra = {"padding_free": True, "max_length": None} if padding_free else {}
    trainer = build_trainer(
        tmp_path,
        lora=lora,
        callbacks=[capture],
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=ga,
        sample_keep_ratio=ratio,
        token_keep_ratio=0.5,
        triage_scope=scope,
        **extra,
    )
    initial = _initial_state(trainer)
    trainer.train()

    model = reference_model(trainer, initial, lora)
    loss, count, rows = reference_step_loss(trainer, model, step=1)
    assert len(rows) == batch * ga, "the ledger must account for every sample of the step"
    groups = [rows] if scope == "step" else [g for _, g in rows.groupby("micro_batch")]
    for group in groups:
        expected_kept = max(1, int(ratio * len(group) + 0.5))
        assert group.decision.isin(KEPT_DECISIONS).sum() == expected_kept
    assert count > 0
    assert (rows.decision == "token_pruned").any(), "the case must exercise token pruning"
    loss.backward()
    got = capture.grads[0]
    expected = {n: p.grad for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    logged = trainer.state.log_history[0]
    assert logged["loss"] == pytest.approx(float(loss.detach()), rel=1e-4)


def test_decisions_match_full_logits_statistics(tmp_path):
    """Scoring through TRL's fused head gives the decisions that full-logits statistics give."""
    trainer = build_trainer(
        tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=3, sample_keep_ratio=0.25, token_keep_ratio=0.5
    )
    initial = _initial_state(trainer)
    trainer.train()
    model = reference_model(trainer, initial, lora=False).eval()
    ledger = read_ledger(tmp_path / "qtuning_ledger").to_pandas()
    rows = ledger[ledger.step == 1]
    dataset = trainer.train_dataset
    index_of = {int(sid): i for i, sid in enumerate(dataset["qtuning_sample_id"])}
    width = max(len(dataset[index_of[int(s)]]["input_ids"]) for s in rows.sample_id) - 1
    logps = torch.zeros(len(rows), width)
    entropy = torch.zeros(len(rows), width)
    response = torch.zeros(len(rows), width, dtype=torch.bool)
    with torch.no_grad():
        for r, sid in enumerate(rows.sample_id):
            example = dataset[index_of[int(sid)]]
            ids, labels = torch.tensor(example["input_ids"]), torch.tensor(example["labels"])
            log_probs = torch.log_softmax(model(input_ids=ids[None]).logits[0, :-1].float(), -1)
            n = ids.numel() - 1
            logps[r, :n] = log_probs.gather(-1, labels[1:].clamp(min=0)[:, None]).squeeze(-1)
            entropy[r, :n] = -(log_probs.exp() * log_probs).sum(-1)
            response[r, :n] = labels[1:] != -100
    ppl, ent = eu_plane_stats(logps, entropy, response)
    torch.testing.assert_close(ppl.double(), torch.tensor(rows.ppl.values), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ent.double(), torch.tensor(rows.entropy.values), rtol=1e-4, atol=1e-5)
    selection = select_qtuning(ppl, ent, logps, response, trainer.args.selection_params())
    assert selection.keep.tolist() == rows.decision.isin(KEPT_DECISIONS).tolist()
    assert selection.triage.quadrant.tolist() == rows.quadrant.tolist()
    assert selection.label_keep.sum(1).tolist() == rows.kept_tokens.tolist()


@pytest.mark.parametrize("entropy_positions", ["response", "all"])
def test_scoring_projects_only_the_positions_it_reads(tmp_path, monkeypatch, entropy_positions):
    """On CPU, TRL's fused head projects every position; scoring asks it for the labelled ones only, same numbers."""
    import trl.trainer.utils as trl_utils

    import trl_qtuning.step.scoring as scoring

    trainer = build_trainer(tmp_path, per_device_train_batch_size=8, entropy_positions=entropy_positions)
    batch = next(iter(trainer.get_train_dataloader()))
    batch.pop("qtuning_sample_id")
    projected = []
    apply = trl_utils._ChunkedLogProbFunction.apply

    def counting(hidden, *args):
        projected.append(hidden.shape[0])
        return apply(hidden, *args)

    monkeypatch.setattr(trl_utils._ChunkedLogProbFunction, "apply", counting)
    compact = trainer._score(dict(batch), None)
    assert trl_utils._use_triton(torch.device("cpu")) is False, "TRL's switch is restored after scoring"
    monkeypatch.setattr(scoring, "project_labelled_positions_only", contextlib.nullcontext)
    every_position = trainer._score(dict(batch), None)
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    if entropy_positions == "all":
        labelled = int(batch["attention_mask"][:, 1:].sum())
    assert projected == [labelled, batch["input_ids"].shape[0] * (batch["input_ids"].shape[1] - 1)]
    assert projected[0] < projected[1]
    torch.testing.assert_close(compact.ppl, every_position.ppl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compact.entropy, every_position.entropy, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compact.token_logps, every_position.token_logps, rtol=1e-5, atol=1e-6)


def test_all_samples_of_a_micro_batch_dropped(tmp_path):
    """Batch 2 x GA 4 at r=0.125 keeps one sample: three micro-batches are emptied, and the step stays exact."""
    capture = GradCapture()
    trainer = build_trainer(
        tmp_path,
        callbacks=[capture],
        per_device_train_batch_size=2,
        gradient_accumulation_steps=4,
        sample_keep_ratio=0.125,
        token_keep_ratio=0.5,
        max_steps=2,
    )
    initial = _initial_state(trainer)
    trainer.train()
    ledger = read_ledger(tmp_path / "qtuning_ledger").to_pandas()
    step1 = ledger[ledger.step == 1]
    kept_per_micro_batch = step1.groupby("micro_batch").decision.apply(lambda d: d.isin(KEPT_DECISIONS).sum())
    assert sorted(kept_per_micro_batch.tolist()) == [0, 0, 0, 1]
    assert len(trainer.state.log_history) >= 2 and trainer.state.global_step == 2
    model = reference_model(trainer, initial, lora=False)
    loss, _, _ = reference_step_loss(trainer, model, step=1)
    loss.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(capture.grads[0][name], p.grad, rtol=1e-4, atol=1e-6)


def _run(trainer_cls, config, dataset, seed=0):
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_model(tokenizer, seed=seed, dropout=0.1)
    trainer = trainer_cls(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return losses, {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def test_pruning_off_and_keep_all_behave_like_sft_trainer(tmp_path):
    from trl_qtuning import QTuningSFTTrainer

    dataset = make_arithmetic_dataset(48, seed=3)
    common = dict(
        per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=3, learning_rate=1e-3,
        bf16=False, use_cpu=True, report_to="none", logging_steps=1, save_strategy="no",
        gradient_checkpointing=False, seed=0, disable_tqdm=True,
    )
    sft_losses, sft_params = _run(SFTTrainer, SFTConfig(output_dir=str(tmp_path / "sft"), **common), dataset)
    off_losses, off_params = _run(
        QTuningSFTTrainer, QTuningConfig(output_dir=str(tmp_path / "off"), qtuning_enabled=False, **common), dataset
    )
    all_losses, all_params = _run(
        QTuningSFTTrainer,
        QTuningConfig(output_dir=str(tmp_path / "all"), sample_keep_ratio=1.0, token_keep_ratio=1.0, **common),
        dataset,
    )
    assert off_losses == sft_losses
    assert len(sft_losses) == 3
    torch.testing.assert_close(all_losses, sft_losses, rtol=1e-6, atol=0)
    for name, value in sft_params.items():
        assert torch.equal(off_params[name], value), name
        torch.testing.assert_close(all_params[name], value, rtol=1e-6, atol=1e-7)
    assert not (tmp_path / "off" / "qtuning_ledger").exists()


def test_config_type_is_checked(tmp_path):
    from trl_qtuning import QTuningSFTTrainer

    tokenizer = make_tiny_tokenizer()
    with pytest.raises(TypeError, match="QTuningConfig"):
        QTuningSFTTrainer(
            model=make_tiny_model(tokenizer),
            args=SFTConfig(output_dir=str(tmp_path), bf16=False, use_cpu=True, report_to="none"),
            train_dataset=make_arithmetic_dataset(8),
            processing_class=tokenizer,
        )


def test_ledger_accounts_for_every_sample_of_every_step(tmp_path):
    trainer = build_trainer(
        tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=4, sample_keep_ratio=0.5,
        token_keep_ratio=0.7,
    )
    trainer.train()
    ledger = read_ledger(tmp_path / "qtuning_ledger").to_pandas()
    assert ledger.groupby("step").size().tolist() == [8, 8, 8, 8]
    assert (ledger.groupby("step").decision.apply(lambda d: d.isin(KEPT_DECISIONS).sum()) == 4).all()
    pruned = ledger[ledger.decision == "token_pruned"]
    assert len(pruned) > 0
    assert (pruned.response_tokens - pruned.kept_tokens == pruned.pruned_positions.apply(len)).all()
    assert ((pruned.kept_tokens == (pruned.response_tokens * 0.7 + 1e-9).astype(int).clip(lower=1))).all()
    # 48 rows, 8 per step, no shuffling within an epoch repeats a sample.
    assert ledger.sample_id.nunique() == 32
    history = [h for h in trainer.state.log_history if "qtuning/sample_keep_ratio" in h]
    assert [h["qtuning/sample_keep_ratio"] for h in history] == [0.5] * 4
    # A fresh run into the same output_dir starts a fresh ledger.
    build_trainer(tmp_path, per_device_train_batch_size=4, max_steps=1).train()
    assert read_ledger(tmp_path / "qtuning_ledger").num_rows == 4
