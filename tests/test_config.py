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
        ("neighbor_lambda", 1.5, r"`neighbor_lambda` must be a number in \[0, 1\]"),
        ("neighbor_lambda", None, r"`neighbor_lambda` must be a number in \[0, 1\], got None"),
        ("neighbor_lambda", "x", r"`neighbor_lambda` must be a number in \[0, 1\], got 'x' \(a str\)"),
        ("neighbor_lambda", "0.3", r"`neighbor_lambda` must be a number in \[0, 1\], got '0.3' \(a str\)"),
        ("sample_keep_ratio", float("nan"), "`sample_keep_ratio` must be a number"),
        ("triage_max_iter", 2.5, "`triage_max_iter` must be an integer >= 1"),
        ("neighbor_lambda", -0.5, "neighbor_lambda"),
        ("neighbor_mode", "max", "`neighbor_mode` must be one of 'sum', 'mean'"),
        ("triage_scope", "epoch", "`triage_scope` must be one of"),
        ("token_budget_scope", "step", "`token_budget_scope`"),
        ("entropy_positions", "prompt", "`entropy_positions`"),
        ("qtuning_ledger", "verbose", "`qtuning_ledger`"),
        ("eu_plane", "x", "`eu_plane` must be one of 'paper', 'decorrelated'; got 'x'"),
        ("fill_rule", "lowest", "`fill_rule` must be one of 'paper', 'q1_last', 'least_suspect'; got 'lowest'"),
        ("triage_max_iter", 0, "`triage_max_iter`"),
        ("triage_tol", 0.0, "`triage_tol`"),
        ("qtuning_ledger_rows_per_shard", 0, "`qtuning_ledger_rows_per_shard`"),
    ],
)
def test_bad_values_name_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        QTuningConfig(**BASE, **{field: value})


@pytest.mark.parametrize(
    "field", ["qtuning_enabled", "token_prune_q4", "enforce_sample_budget", "prune_filled_q2_like",
              "reverse_token_score", "scoring_inference_mode", "pack_kept_rows"],
)  # fmt: skip
@pytest.mark.parametrize("value", ["false", "False", 0, None])
def test_boolean_fields_take_booleans_only(field, value):
    """Issue 27: ``qtuning_enabled="false"`` from Python was stored and counted as true (a non-empty string)."""
    with pytest.raises(ValueError, match=rf"`{field}` must be True or False, got {value!r}.*`{field}=False`"):
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


def test_fill_rule_reaches_the_core_and_warns_when_the_sample_policy_ignores_it(recwarn):
    assert QTuningConfig(**BASE).selection_params().fill_rule == "paper"
    for rule in ("q1_last", "least_suspect"):
        assert QTuningConfig(**BASE, fill_rule=rule).selection_params().fill_rule == rule
    assert not [w for w in recwarn if "fill_rule" in str(w.message)], "the qtuning sample policy fills"
    with pytest.warns(UserWarning, match="`fill_rule='q1_last'` has no effect with `sample_policy='random'`"):
        QTuningConfig(**BASE, fill_rule="q1_last", sample_policy="random")


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


@pytest.mark.parametrize(
    ("settings", "realised"),
    [
        (dict(per_device_train_batch_size=3, gradient_accumulation_steps=1, sample_keep_ratio=0.1), "0.333"),
        (dict(per_device_train_batch_size=2, gradient_accumulation_steps=4, triage_scope="micro_batch"), "0.5"),
    ],
)
def test_a_budget_the_group_cannot_realise_is_said_with_the_knob(settings, realised):
    config = QTuningConfig(**BASE, **settings)
    with pytest.warns(UserWarning, match=rf"realised as {realised}: .*Fix: "):
        config.check_sample_budget()


def test_a_group_of_one_sample_is_refused():
    config = QTuningConfig(**BASE, per_device_train_batch_size=1, gradient_accumulation_steps=1)
    with pytest.raises(ValueError, match=r"cannot be met: each triage group holds 1 sample.*gradient_accumulation"):
        config.check_sample_budget()
    QTuningConfig(**BASE, per_device_train_batch_size=1, gradient_accumulation_steps=1, qtuning_enabled=False
                  ).check_sample_budget()  # fmt: skip
    QTuningConfig(**BASE, per_device_train_batch_size=1, gradient_accumulation_steps=8).check_sample_budget()
    # triage_scope="global" triages every rank's samples together: 4 ranks of one sample make a group of 4.
    QTuningConfig(**BASE, per_device_train_batch_size=1, gradient_accumulation_steps=1, triage_scope="global"
                  ).check_sample_budget(4)  # fmt: skip


def test_the_trainer_refuses_a_group_of_one_at_construction(tmp_path):
    from .trainer_helpers import build_trainer

    with pytest.raises(ValueError, match="cannot be met"):
        build_trainer(tmp_path, per_device_train_batch_size=1, gradient_accumulation_steps=1)


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        (dict(sample_policy="random", token_prune_q4=True), r"`token_prune_q4=True` has no effect"),
        (dict(sample_policy="random", prune_filled_q2_like=True), r"`prune_filled_q2_like=True` has no effect"),
        (dict(token_policy="random", reverse_token_score=True), r"`reverse_token_score=True` has no effect"),
        (dict(token_policy="none", token_keep_ratio=0.5), r"`token_keep_ratio=0.5` has no effect with token_policy='none'"),
    ],
)
def test_settings_without_effect_are_said(settings, match):
    with pytest.warns(UserWarning, match=match):
        QTuningConfig(**BASE, **settings)


def test_padding_free_with_max_length_names_max_length_none():
    with pytest.raises(ValueError, match=r"`padding_free=True` needs `max_length=None`"):
        QTuningConfig(**BASE, padding_free=True, max_length=64)
    QTuningConfig(**BASE, padding_free=True, max_length=None)


def test_trainer_names_the_class_it_got_instead_of_qtuning_config(tmp_path):
    from transformers import TrainingArguments

    from trl_qtuning import QTuningSFTTrainer
    from trl_qtuning.testing import make_arithmetic_dataset, make_tiny_model, make_tiny_tokenizer

    tokenizer = make_tiny_tokenizer()
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    with pytest.raises(TypeError, match=r"got TrainingArguments\. Replace TrainingArguments\(\.\.\.\) with QTuningConfig"):
        QTuningSFTTrainer(model=make_tiny_model(tokenizer), args=args, train_dataset=make_arithmetic_dataset(4),
                          processing_class=tokenizer)  # fmt: skip
