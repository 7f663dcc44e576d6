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
