"""The step decision and its metrics on hand-made statistics: grouping by triage scope, the policy call that
`select_qtuning` shares with the trainer, the run-wide token budget, and the metrics' sums."""

from __future__ import annotations

import math

import pytest
import torch

from trl_qtuning import select_qtuning
from trl_qtuning.core import SelectionParams, decorrelated_entropy, plane_correlation
from trl_qtuning.step.decision import StepDecider
from trl_qtuning.policies import build_policy
from trl_qtuning.step.scoring import RowLayout, ScoredMicroBatch
from trl_qtuning.step.metrics import (
    DECISION_NAMES,
    correlation_from_moments,
    decision_codes,
    ledger_columns,
    plane_moments,
    realised_budgets,
    step_metrics,
    step_sums,
)

PPL = [1.5, 9.0, 2.0, 7.0, 3.0, 1.1, 8.0, 4.0]
ENT = [0.2, 0.3, 2.5, 2.2, 1.0, 3.0, 0.1, 1.5]


def _micro_batch(rows: slice, width: int = 4) -> ScoredMicroBatch:
    ppl = torch.tensor(PPL[rows])
    n = ppl.numel()
    generator = torch.Generator().manual_seed(rows.start)
    logps = -torch.rand((n, width), generator=generator) * 3
    response = torch.ones((n, width), dtype=torch.bool)
    response[:, 0] = False
    layout = RowLayout(n, torch.arange(1, width + 1).expand(n, -1))
    return ScoredMicroBatch(
        layout, logps, response, ppl, torch.tensor(ENT[rows]), torch.arange(rows.start, rows.stop),
        top1_hits=1.0, entropy_sum=2.0, tokens=n * (width + 1),
    )  # fmt: skip


def _step(scope: str, params: SelectionParams, sample: str = "qtuning", token: str = "qtuning"):
    scored = [_micro_batch(slice(0, 4)), _micro_batch(slice(4, 8))]
    decider = StepDecider(build_policy(sample, token, params), triage_scope=scope, seed=3)
    return scored, decider.decide(scored, step=1)


def test_select_qtuning_is_the_trainers_decision_for_one_group():
    params = SelectionParams(sample_keep_ratio=0.5, token_keep_ratio=0.5)
    scored, step = _step("step", params)
    expected = select_qtuning(
        torch.cat([s.ppl for s in scored]), torch.cat([s.entropy for s in scored]),
        torch.cat([s.token_logps for s in scored]), torch.cat([s.response for s in scored]), params,
    )  # fmt: skip
    assert torch.equal(step.keep, expected.keep) and torch.equal(step.label_keep, expected.label_keep)
    assert step.offsets == [0, 4, 8] and torch.equal(step.of_micro_batch(1)[0], expected.keep[4:])
    assert len(step.thresholds) == 1 and step.thresholds[0]["q"] == expected.triage.q


def test_micro_batch_scope_decides_each_micro_batch_alone():
    params = SelectionParams(sample_keep_ratio=0.5, token_keep_ratio=0.5)
    scored, step = _step("micro_batch", params)
    assert len(step.thresholds) == 2
    for i, s in enumerate(scored):
        alone = select_qtuning(s.ppl, s.entropy, s.token_logps, s.response, params)
        keep, label_keep, _ = step.of_micro_batch(i)
        assert torch.equal(keep, alone.keep) and int(keep.sum()) == 2 and torch.equal(label_keep, alone.label_keep)


def test_the_decorrelated_plane_axis_is_the_one_the_triage_ran_on():
    params = SelectionParams(sample_keep_ratio=0.5, eu_plane="decorrelated")
    scored, step = _step("micro_batch", params)
    for i, s in enumerate(scored):
        torch.testing.assert_close(step.plane_axis[step.rows(i)], decorrelated_entropy(s.ppl, s.entropy))
    assert _step("micro_batch", SelectionParams(sample_keep_ratio=0.5))[1].plane_axis is None


def test_random_sample_and_token_draws_repeat_and_use_distinct_streams():
    params = SelectionParams(sample_keep_ratio=0.5, token_keep_ratio=0.5)
    first = _step("step", params, "random", "random")[1]
    again = _step("step", params, "random", "random")[1]
    assert torch.equal(first.label_keep, again.label_keep)
    decider = StepDecider(build_policy("random", "random", params), triage_scope="global", seed=3)
    decider.step = 1
    samples = torch.rand(8, generator=decider.generator(0, per_rank=False))
    tokens = torch.rand(8, generator=decider.generator(0, per_rank=False, stream=1))
    assert not torch.equal(samples, tokens)


def test_run_budget_carries_the_shortfall_to_the_next_step():
    params = SelectionParams(sample_keep_ratio=1.0, token_keep_ratio=0.5, token_budget_scope="run")
    decider = StepDecider(build_policy("all", "random", params), triage_scope="step", seed=0)
    seen = kept = 0
    for number in (1, 2, 3):
        scored = [_micro_batch(slice(0, 3), width=3)]
        step = decider.decide(scored, number)
        seen += int(scored[0].response.sum())
        kept += int(step.label_keep.sum())
        assert kept == math.floor(0.5 * seen + 0.5), "the run keeps round(r * tokens seen) in all"
    assert (decider.run_tokens_seen, decider.run_tokens_kept) == (seen, kept)


def test_decision_codes_follow_the_ledger_order():
    params = SelectionParams(sample_keep_ratio=0.5, token_keep_ratio=0.5)
    scored, step = _step("step", params)
    names = [DECISION_NAMES[c] for c in decision_codes(step).tolist()]
    keep = step.keep.tolist()
    assert [n in ("kept", "token_pruned", "filled") for n in names] == keep
    columns = ledger_columns(step, number=1, epoch=0.5, rank=0, reweights=False)
    assert columns["decision"] == names and columns["sample_id"] == list(range(8))
    assert columns["micro_batch"] == [0] * 4 + [1] * 4
    pruned = [len(p) for p in columns["pruned_positions"]]
    assert pruned == [r - k if kept else 0 for r, k, kept in zip(columns["response_tokens"], columns["kept_tokens"], keep)]


def test_metrics_from_sums_match_a_count_by_hand():
    params = SelectionParams(sample_keep_ratio=0.5, token_keep_ratio=0.5)
    scored, step = _step("step", params)
    sums = step_sums(step)
    metrics = step_metrics(sums, uses_eu_plane=True, reweights=False)
    keep = step.keep
    kept_tokens = step.label_keep.sum(1).double()
    response = torch.cat([s.response.sum(1) for s in scored]).double()
    assert metrics["qtuning/sample_keep_ratio"] == 0.5
    assert metrics["qtuning/label_token_share"] == pytest.approx(float(kept_tokens.sum() / response.sum()))
    assert metrics["qtuning/kept_sample_token_share"] == pytest.approx(float(kept_tokens[keep].sum() / response[keep].sum()))
    assert metrics["qtuning/ppl_mean"] == pytest.approx(sum(PPL) / 8)
    assert metrics["qtuning/prepruning_mean_token_accuracy"] == pytest.approx(2 / float(response.sum()))
    assert metrics["qtuning/eu_correlation"] == pytest.approx(plane_correlation(torch.tensor(PPL), torch.tensor(ENT)))
    assert sum(metrics[f"qtuning/q{q}_share"] for q in range(1, 5)) + metrics["qtuning/mid_band_share"] == 1.0
    # Two ranks' sums add up: the metrics describe both ranks' samples.
    doubled = step_metrics({k: 2 * v for k, v in sums.items()}, uses_eu_plane=True, reweights=False)
    assert doubled["qtuning/sample_keep_ratio"] == 0.5 and doubled["qtuning/ppl_mean"] == metrics["qtuning/ppl_mean"]
    budgets = realised_budgets(sums)
    assert budgets["label_token_share"] == metrics["qtuning/label_token_share"]
    assert budgets["kept_sample_token_share"] == metrics["qtuning/kept_sample_token_share"]


def test_realised_budgets_are_ratios_of_sums_and_none_where_nothing_was_counted():
    budgets = realised_budgets({"samples": 8, "kept": 2, "pruned_kept": 3, "pruned_response": 6, "response_tokens": 0})
    assert budgets == {"sample_keep_ratio": 0.25, "kept_sample_token_share": None, "token_keep_ratio": 0.5,
                       "label_token_share": None}  # fmt: skip


def test_metrics_log_pools_the_token_keep_ratio_over_the_window_and_warns(caplog):
    import logging
    from collections import defaultdict

    from trl_qtuning.step.metrics import StepMetricsLog

    names = step_sums(_step("step", SelectionParams(sample_keep_ratio=0.5))[1])

    def sums(**values: float) -> dict[str, float]:
        return {**dict.fromkeys(names, 0.0), "samples": 4.0, "kept": 2.0, **values}

    log, metrics = StepMetricsLog(uses_eu_plane=True, reweights=False), defaultdict(list)
    log.append(metrics, sums(pruned_kept=1.0, pruned_response=2.0, before_tokens=10.0), 0.5, step=1)
    log.append(metrics, sums(pruned_kept=99.0, pruned_response=198.0, before_tokens=5.0), 0.25, step=2)
    assert metrics["qtuning/scoring_seconds"] == [0.5, 0.25] and metrics["qtuning/prepruning_num_tokens"] == [15.0]
    assert log.pop_token_keep_ratio() == pytest.approx(100 / 200), "pooled: the big step weighs 99 times more"
    assert log.pop_token_keep_ratio() is None, "a new window with no token-pruned sample has no ratio"
    with caplog.at_level(logging.WARNING, logger="trl_qtuning.trainer"):
        log.append(metrics, sums(kept=0.0, invalid=1.0), 0.0, step=3)
        log.append(metrics, sums(invalid=2.0), 0.0, step=4)
    assert "step 3 kept no sample (1 of 4 had non-finite statistics)" in caplog.text
    assert "2 sample(s) of step 4 had no finite statistics" in caplog.text
    assert log.realised_budgets() == {"steps": 4, "sample_keep_ratio": 6 / 16, "kept_sample_token_share": None,
                                      "token_keep_ratio": 0.5, "label_token_share": None}  # fmt: skip


def test_one_process_gathers_nothing():
    from types import SimpleNamespace

    from trl_qtuning.step.metrics import gather_ledger_columns, gather_step_sums

    sums = {"samples": 3.0}
    assert gather_step_sums(SimpleNamespace(num_processes=1), sums, 1.5, True) == (sums, 1.5, True)
    columns, thresholds = {"step": [1, 1]}, [{"q": 0.5}]
    assert gather_ledger_columns(columns, thresholds, several=False, global_scope=False) == (columns, thresholds)


def test_correlation_from_moments_equals_the_plane_correlation():
    ppl = torch.tensor([1.5, 9.0, float("nan"), 7.0, 3.0])
    axis = torch.tensor([0.2, 0.3, 2.5, 2.2, 1.0])
    halves = plane_moments(ppl[:2], axis[:2]) + plane_moments(ppl[2:], axis[2:])
    assert correlation_from_moments(halves) == pytest.approx(plane_correlation(ppl, axis), abs=1e-12)
    assert math.isnan(correlation_from_moments(plane_moments(ppl, torch.ones(5))))
    assert math.isnan(correlation_from_moments(plane_moments(ppl[:1], axis[:1])))


@pytest.mark.parametrize("ledger", ["none", "summary"])
def test_per_sample_columns_are_built_only_for_a_listener(tmp_path, monkeypatch, ledger):
    """With no ledger and no tracking a step builds no per-sample lists; with a ledger it does, once per step."""
    import trl_qtuning.trainer as module
    from tests.trainer_helpers import build_trainer

    calls = []
    original = module.ledger_columns

    def counting(*args, **kwargs):
        calls.append(kwargs["number"])
        return original(*args, **kwargs)

    monkeypatch.setattr(module, "ledger_columns", counting)
    trainer = build_trainer(tmp_path, max_steps=2, qtuning_ledger=ledger)
    trainer.train()
    assert calls == ([] if ledger == "none" else [1, 2])
    assert trainer.state.log_history[0]["qtuning/sample_keep_ratio"] > 0
