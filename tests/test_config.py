"""QTuningConfig validation: every bad value names the field and what is allowed."""

from __future__ import annotations

import pytest

from trl_qtuning import QTuningConfig

BASE = dict(output_dir="unused", bf16=False, use_cpu=True, report_to="none")


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("sample_keep_ratio", 0.0, r"`sample_keep_ratio` must be a number in \(0, 1\]"),
        ("sample_keep_ratio", 1.5, "sample_keep_ratio"),
        ("sample_keep_ratio", -0.1, "sample_keep_ratio"),
        ("token_keep_ratio", 0.0, r"`token_keep_ratio` must be a number in \(0, 1\]"),
        ("token_keep_ratio", 2, "token_keep_ratio"),
        ("neighbor_lambda", 1.5, r"`neighbor_lambda` must be in \[0, 1\]"),
        ("neighbor_lambda", -0.5, "neighbor_lambda"),
        ("neighbor_mode", "max", "`neighbor_mode` must be one of 'sum', 'mean'"),
        ("triage_scope", "epoch", "`triage_scope` must be one of"),
        ("token_budget_scope", "step", "`token_budget_scope`"),
        ("entropy_positions", "prompt", "`entropy_positions`"),
        ("qtuning_ledger", "verbose", "`qtuning_ledger`"),
        ("triage_max_iter", 0, "`triage_max_iter`"),
        ("triage_tol", 0.0, "`triage_tol`"),
        ("qtuning_ledger_rows_per_shard", 0, "`qtuning_ledger_rows_per_shard`"),
    ],
)
def test_bad_values_name_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        QTuningConfig(**BASE, **{field: value})


def test_packing_is_refused_with_a_way_out():
    with pytest.raises(ValueError, match="packing=True.*padding_free=True"):
        QTuningConfig(**BASE, packing=True)
    # Packing is fine when Q-Tuning is off: the config is then a plain SFTConfig.
    assert QTuningConfig(**BASE, packing=True, qtuning_enabled=False).packing


def test_defaults_follow_the_method_page():
    config = QTuningConfig(**BASE)
    assert (config.sample_keep_ratio, config.token_keep_ratio, config.neighbor_lambda) == (0.25, 0.5, 0.5)
    assert config.triage_scope == "step" and config.neighbor_mode == "sum" and config.enforce_sample_budget
    params = config.selection_params()
    assert params.sample_keep_ratio == 0.25 and params.triage_max_iter == 10 and params.triage_tol == 0.01


def test_integer_ratio_one_is_accepted_as_float():
    config = QTuningConfig(**BASE, sample_keep_ratio=1, token_keep_ratio=1)
    assert config.sample_keep_ratio == 1.0 and isinstance(config.sample_keep_ratio, float)
