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
