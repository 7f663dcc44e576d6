"""Dataset forms, resume, and the ledger across runs."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset

from tests.trainer_helpers import KEPT_DECISIONS, build_trainer
from trl_qtuning import read_ledger
from trl_qtuning.testing import make_arithmetic_dataset


def _messages_dataset(n: int) -> Dataset:
    rows = []
    for row in make_arithmetic_dataset(n, seed=5, conversational=True):
        rows.append({"messages": row["prompt"] + row["completion"]})
    return Dataset.from_list(rows)


def _text_dataset(n: int) -> Dataset:
    return Dataset.from_list([{"text": r["prompt"] + r["completion"]} for r in make_arithmetic_dataset(n, seed=6)])


@pytest.mark.parametrize(
    "kind",
    ["prompt_completion", "conversational_prompt_completion", "messages_assistant_only", "plain_text"],
)
def test_dataset_forms_train_and_trace_back(tmp_path, kind):
    overrides = {}
    if kind == "prompt_completion":
        dataset = make_arithmetic_dataset(24, seed=4)
    elif kind == "conversational_prompt_completion":
        dataset = make_arithmetic_dataset(24, seed=4, conversational=True)
    elif kind == "messages_assistant_only":
        dataset = _messages_dataset(24)
        overrides["assistant_only_loss"] = True
    else:
        dataset = _text_dataset(24)
    trainer = build_trainer(
        tmp_path, dataset=dataset, per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=2,
        sample_keep_ratio=0.5, token_keep_ratio=0.5, **overrides,
    )
    trainer.train()
    ledger = read_ledger(tmp_path / "qtuning_ledger").to_pandas()
    assert len(ledger) == 16 and (ledger.sample_id >= 0).all()
    assert (ledger.groupby("step").decision.apply(lambda d: d.isin(KEPT_DECISIONS).sum()) == 4).all()
    # Every sample id points at its row: the response-token count in the ledger matches the tokenized row's labels.
    prepared = trainer.train_dataset
    index_of = {int(sid): i for i, sid in enumerate(prepared["qtuning_sample_id"])}
    for row in ledger.itertuples():
        labels = prepared[index_of[int(row.sample_id)]]["labels"]
        assert row.response_tokens == sum(1 for label in labels[1:] if label != -100)
    if kind in ("prompt_completion", "messages_assistant_only"):
        # Only the answer is trained on: fewer response tokens than sequence tokens.
        assert (ledger.response_tokens < ledger.sample_id.map(lambda s: len(prepared[index_of[int(s)]]["input_ids"]) - 1)).all()


def test_resume_continues_the_ledger_without_duplicates(tmp_path):
    trainer = build_trainer(
        tmp_path, per_device_train_batch_size=4, max_steps=3, save_strategy="steps", save_steps=2,
        sample_keep_ratio=0.5,
    )
    trainer.train()
    first = read_ledger(tmp_path / "qtuning_ledger").to_pandas()
    assert sorted(first.step.unique()) == [1, 2, 3]
    resumed = build_trainer(
        tmp_path, per_device_train_batch_size=4, max_steps=3, save_strategy="steps", save_steps=2,
        sample_keep_ratio=0.5,
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    ledger = read_ledger(tmp_path / "qtuning_ledger").to_pandas()
    assert ledger.groupby("step").size().to_dict() == {1: 4, 2: 4, 3: 4}
    # Step 3 is decided on the same samples, with the same decisions, as in the uninterrupted run.
    columns = ["sample_id", "quadrant", "decision", "kept_tokens"]
    redone = ledger[ledger.step == 3][columns].sort_values("sample_id").reset_index(drop=True)
    original = first[first.step == 3][columns].sort_values("sample_id").reset_index(drop=True)
    assert redone.equals(original)


def test_same_seed_gives_identical_ledgers_and_parameters(tmp_path):
    runs = []
    for name in ("a", "b"):
        trainer = build_trainer(
            tmp_path / name, per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=3,
            sample_keep_ratio=0.25,
        )
        trainer.train()
        ledger = read_ledger(tmp_path / name / "qtuning_ledger").to_pandas()
        runs.append((ledger, {k: v.clone() for k, v in trainer.model.state_dict().items()}))
    (ledger_a, params_a), (ledger_b, params_b) = runs
    assert ledger_a.drop(columns="pruned_positions").equals(ledger_b.drop(columns="pruned_positions"))
    assert ledger_a.pruned_positions.apply(list).tolist() == ledger_b.pruned_positions.apply(list).tolist()
    for name, value in params_a.items():
        assert torch.equal(value, params_b[name]), name


def test_micro_batch_scope_triages_each_micro_batch_alone(tmp_path):
    trainer = build_trainer(
        tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=3, sample_keep_ratio=0.5,
        triage_scope="micro_batch",
    )
    trainer.train()
    ledger = read_ledger(tmp_path / "qtuning_ledger").to_pandas()
    kept = ledger.groupby("micro_batch").decision.apply(lambda d: d.isin(KEPT_DECISIONS).sum())
    assert kept.tolist() == [2, 2, 2]


@pytest.mark.parametrize(
    "option",
    [
        {"entropy_positions": "all"},
        {"neighbor_mode": "mean", "neighbor_lambda": 0.3},
        {"token_budget_scope": "batch"},
        {"prune_filled_q2_like": True},
        {"enforce_sample_budget": False},
        {"reverse_token_score": True},
        {"qtuning_ledger": "summary"},
    ],
    ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()),
)
def test_method_options_train_and_keep_the_ledger_consistent(tmp_path, option):
    trainer = build_trainer(
        tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=2, sample_keep_ratio=0.5,
        token_keep_ratio=0.5, **option,
    )
    trainer.train()
    ledger = read_ledger(tmp_path / "qtuning_ledger").to_pandas()
    assert len(ledger) == 16
    kept = ledger.decision.isin(KEPT_DECISIONS)
    assert (ledger.kept_tokens[~kept] == 0).all()
    assert (ledger.kept_tokens[kept] >= 1).all() and (ledger.kept_tokens <= ledger.response_tokens).all()
    if option.get("enforce_sample_budget", True):
        assert (ledger.groupby("step").decision.apply(lambda d: d.isin(KEPT_DECISIONS).sum()) == 4).all()
    else:
        assert (ledger.groupby("step").decision.apply(lambda d: d.isin(KEPT_DECISIONS).sum()) >= 4).all()
    if option.get("qtuning_ledger") == "summary":
        assert ledger.pruned_positions.isna().all()
    else:
        assert (ledger.response_tokens - ledger.kept_tokens)[kept].tolist() == ledger.pruned_positions[kept].apply(len).tolist()
    assert "qtuning/q" in trainer.state.log_history[0]


def test_decision_listeners_receive_every_step(tmp_path):
    events = []
    trainer = build_trainer(
        tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=2, qtuning_ledger="none",
    )
    trainer.add_decision_listener(events.append)
    trainer.train()
    assert [e.step for e in events] == [1, 2]
    assert all(len(e.columns["sample_id"]) == 8 and len(e.columns["pruned_positions"]) == 8 for e in events)
    assert all(set(e.thresholds[0]) == {"q", "ppl_lo", "ppl_hi", "ent_lo", "ent_hi"} for e in events)
    assert not (tmp_path / "qtuning_ledger").exists()
