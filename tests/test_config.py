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
        ("eu_plane", "x", "`eu_plane` must be one of 'paper', 'decorrelated'; got 'x'"),
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


def test_eu_plane_reaches_the_core_and_warns_when_the_sample_policy_ignores_it(recwarn):
    assert QTuningConfig(**BASE).selection_params().eu_plane == "paper"
    config = QTuningConfig(**BASE, eu_plane="decorrelated")
    assert config.selection_params().eu_plane == "decorrelated"
    assert not [w for w in recwarn if "eu_plane" in str(w.message)], "the qtuning sample policy uses the plane"
    with pytest.warns(UserWarning, match="`eu_plane='decorrelated'` has no effect with `sample_policy='random'`"):
        QTuningConfig(**BASE, eu_plane="decorrelated", sample_policy="random")


def test_integer_ratio_one_is_accepted_as_float():
    config = QTuningConfig(**BASE, sample_keep_ratio=1, token_keep_ratio=1)
    assert config.sample_keep_ratio == 1.0 and isinstance(config.sample_keep_ratio, float)


def test_reference_model_path_rules_for_rho1_and_tailsft():
    # TailSFT's reference is the initial model by default, so no path is needed; a given one is used.
    assert QTuningConfig(**BASE, sample_policy="tailsft").reference_model_path is None
    assert QTuningConfig(**BASE, sample_policy="tailsft", reference_model_path="ref").reference_model_path == "ref"
    QTuningConfig(**BASE, sample_policy="tailsft", token_policy="rho1", reference_model_path="ref")
    with pytest.raises(ValueError, match="token_policy='rho1'.*reference_model_path"):
        QTuningConfig(**BASE, token_policy="rho1")
    with pytest.raises(ValueError, match="token_policy='rho1'.*reference_model_path"):
        QTuningConfig(**BASE, sample_policy="tailsft", token_policy="rho1")  # rho1 still needs its path
    with pytest.raises(ValueError, match="`reference_model_path` is only used by.*tailsft"):
        QTuningConfig(**BASE, sample_policy="random", reference_model_path="ref")
