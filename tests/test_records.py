"""What the trainer records is what it trained: metrics, the CLI's closing summary, settings changed after
construction, and the clear errors and warnings around them (issue 27)."""

from __future__ import annotations

import logging

import pytest

from tests.trainer_helpers import KEPT_DECISIONS, build_trainer
from trl_qtuning import read_ledger


def _pooled_token_keep_ratio(rows) -> float:
    pruned = rows[rows.decision == "token_pruned"]
    return pruned.kept_tokens.sum() / pruned.response_tokens.sum()


def test_last_short_logging_window_logs_its_token_keep_ratio(tmp_path):
    """max_steps=3, logging_steps=2: step 3's window closes with the end-of-training log, which must carry its
    pooled token keep ratio like TRL carries the window's other metrics."""
    trainer = build_trainer(
        tmp_path, per_device_train_batch_size=8, max_steps=3, logging_steps=2, sample_keep_ratio=0.5
    )
    trainer.train()
    ledger = read_ledger(tmp_path / "qtuning_ledger").to_pandas()
    assert (ledger[ledger.step == 3].decision == "token_pruned").any()  # the short window pruned tokens
    last = trainer.state.log_history[-1]
    assert "train_loss" in last
    assert last["qtuning/token_keep_ratio"] == pytest.approx(_pooled_token_keep_ratio(ledger[ledger.step == 3]))
    first = next(h for h in trainer.state.log_history if "loss" in h)
    assert first["qtuning/token_keep_ratio"] == pytest.approx(_pooled_token_keep_ratio(ledger[ledger.step <= 2]))


@pytest.mark.parametrize("token_keep_ratio", [0.5, 1.0])
def test_cli_summary_names_each_realised_budget(tmp_path, token_keep_ratio):
    """Issue 27: the closing line called the token keep ratio of token-pruned samples "the kept samples' response
    tokens", and vanished at token_keep_ratio=1.0. Each number is now named for what it counts, from the run's sums."""
    from trl_qtuning.cli.sft import summary_lines

    trainer = build_trainer(
        tmp_path, per_device_train_batch_size=8, max_steps=3, sample_keep_ratio=0.5, token_keep_ratio=token_keep_ratio
    )
    output = trainer.train()
    ledger = read_ledger(tmp_path / "qtuning_ledger").to_pandas()
    trained = ledger[ledger.decision.isin(KEPT_DECISIONS)]
    samples = len(trained) / len(ledger)
    tokens = trained.kept_tokens.sum() / trained.response_tokens.sum()
    line = next(line for line in summary_lines(trainer, output) if line.startswith("Q-Tuning"))
    assert f"trained on {samples:.0%} of the samples it scored (target 50%)" in line
    assert f"and on {tokens:.0%} of those samples' answer tokens" in line
    if token_keep_ratio < 1.0:
        assert f"token-pruned samples kept {_pooled_token_keep_ratio(ledger):.0%} of their answer tokens" in line
        assert f"{_pooled_token_keep_ratio(ledger):.0%}" != f"{tokens:.0%}"  # the two numbers differ here
    else:
        assert line.endswith("no sample was token-pruned.")
    realised = trainer.qtuning_realised_budgets
    assert realised["steps"] == 3
    assert realised["kept_sample_token_share"] == pytest.approx(tokens)


# ------------------------------------------------------------------ settings changed on trainer.args after construction
def test_a_budget_changed_on_trainer_args_is_the_budget_trained(tmp_path, caplog):
    """Issue 27: changing ``trainer.args.sample_keep_ratio`` after construction trained the old budget while MLflow
    and the summary (which read ``trainer.args``) recorded the new one. train() rebuilds the policy and says so."""
    trainer = build_trainer(tmp_path, per_device_train_batch_size=8, max_steps=1, sample_keep_ratio=0.25)
    trainer.args.sample_keep_ratio = 0.75
    with caplog.at_level(logging.WARNING, logger="trl_qtuning.trainer"):
        trainer.train()
    ledger = read_ledger(tmp_path / "qtuning_ledger").to_pandas()
    assert ledger.decision.isin(KEPT_DECISIONS).sum() == 6  # 0.75 of 8, not 0.25 of 8
    assert trainer.state.log_history[0]["qtuning/sample_keep_ratio"] == 0.75
    assert any("sample_keep_ratio 0.25 -> 0.75" in r.getMessage() for r in caplog.records)


def test_an_invalid_value_set_on_trainer_args_is_refused_at_train(tmp_path):
    trainer = build_trainer(tmp_path, max_steps=1)
    trainer.args.token_keep_ratio = 2.0
    with pytest.raises(ValueError, match=r"`token_keep_ratio` must be a number in \(0, 1\]"):
        trainer.train()


@pytest.mark.parametrize("built_with", [False, True])
def test_turning_qtuning_on_or_off_after_construction_is_refused_with_the_field(tmp_path, built_with):
    """Issue 27: turning qtuning_enabled on after building with it off crashed with AttributeError '_ledger'."""
    trainer = build_trainer(tmp_path, max_steps=1, qtuning_enabled=built_with)
    trainer.args.qtuning_enabled = not built_with
    with pytest.raises(ValueError, match=rf"`qtuning_enabled` was changed.*`qtuning_enabled={not built_with}`"):
        trainer.train()


# ------------------------------------------------------------------ warnings and errors that name the way out
def test_tailsft_with_an_already_trained_lora_adapter_warns_that_the_reference_is_the_bare_base(tmp_path, caplog):
    import torch
    from peft import get_peft_model

    from tests.trainer_helpers import lora_config, tiny_config
    from trl_qtuning import QTuningSFTTrainer
    from trl_qtuning.testing import make_arithmetic_dataset, make_tiny_model, make_tiny_tokenizer

    tokenizer = make_tiny_tokenizer()

    def build(trained: bool):
        model = get_peft_model(make_tiny_model(tokenizer, seed=0), lora_config())
        if trained:
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "lora_B" in name:
                        p.fill_(0.01)
        return QTuningSFTTrainer(
            model=model, args=tiny_config(tmp_path / str(trained), sample_policy="tailsft", sample_keep_ratio=0.5),
            train_dataset=make_arithmetic_dataset(16, seed=1), processing_class=tokenizer,
        )  # fmt: skip

    with caplog.at_level(logging.WARNING, logger="trl_qtuning.trainer"):
        build(trained=False)
        assert not any("already trained" in r.getMessage() for r in caplog.records)
        build(trained=True)
    [message] = [r.getMessage() for r in caplog.records if "already trained" in r.getMessage()]
    assert "reference_model_path" in message and "merge_and_unload" in message


def test_an_unwritable_output_dir_is_said_and_names_qtuning_ledger_none(tmp_path, monkeypatch):
    """Issue 27: a read-only output_dir failed at train() with the ledger's raw OSError. (The tests run as root,
    whom a read-only mode does not stop, so the folder refuses new entries the way a read-only one does.)"""
    import errno
    from pathlib import Path

    out = tmp_path / "out"
    trainer = build_trainer(out, max_steps=1)
    mkdir = Path.mkdir

    def read_only(self, *args, **kwargs):
        if out in self.parents:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    with pytest.raises(OSError, match=r"cannot write its outputs in output_dir=.*read-only.*qtuning_ledger=\"none\""):
        trainer.train()
