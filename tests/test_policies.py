"""Sample and token policies on hand-made statistics: each decision is computed by hand here."""

from __future__ import annotations

import math

import pytest
import torch

from trl_qtuning import select_qtuning
from trl_qtuning.core import SelectionParams, decorrelated_entropy
from trl_qtuning.core.triage import TriageResult, triage_samples
from trl_qtuning.policies import (
    SAMPLE_POLICIES,
    SampleBatch,
    SampleDecision,
    SamplePolicy,
    TokenBatch,
    build_policy,
    register_sample_policy,
)

NAN = float("nan")


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _samples(name: str, ppl, entropy=None, lengths=None, *, r: float, seed: int = 0) -> SampleDecision:
    ppl = torch.tensor(ppl, dtype=torch.float64)
    entropy = torch.ones_like(ppl) if entropy is None else torch.tensor(entropy, dtype=torch.float64)
    lengths = torch.full(ppl.shape, 4) if lengths is None else torch.tensor(lengths)
    policy = build_policy(name, "none", SelectionParams(sample_keep_ratio=r))
    return policy.samples.select_samples(SampleBatch(ppl, entropy, lengths), _gen(seed))


def _tokens(name: str, logps, mask=None, reference=None, *, r: float = 0.5, seed: int = 0, **params) -> list[list[bool]]:
    logps = torch.tensor(logps, dtype=torch.float64)
    mask = torch.ones_like(logps, dtype=torch.bool) if mask is None else torch.tensor(mask)
    ref = None if reference is None else torch.tensor(reference, dtype=torch.float64)
    policy = build_policy("all", name, SelectionParams(token_keep_ratio=r, **params))
    return policy.tokens.keep_tokens(TokenBatch(logps, mask, ref), _gen(seed)).tolist()


# ------------------------------------------------------------------------------------------------ sample policies
def test_random_keeps_budget_among_valid_samples_and_repeats_with_the_seed():
    ppl = [1.0, 2.0, NAN, 3.0, 4.0, 5.0, 6.0, 7.0]
    first = _samples("random", ppl, r=0.5, seed=3)
    assert int(first.keep.sum()) == 4 and not bool(first.keep[2])
    assert first.triage.invalid.tolist() == [i == 2 for i in range(8)]
    assert torch.equal(first.keep, _samples("random", ppl, r=0.5, seed=3).keep)
    draws = {tuple(_samples("random", ppl, r=0.5, seed=s).keep.tolist()) for s in range(20)}
    assert len(draws) > 5, "different seeds must give different draws"
    assert torch.equal(first.token_rows, first.keep), "baselines hand every kept sample to the token policy"
    assert first.loss_weight is None and math.isnan(first.triage.q) and int(first.triage.quadrant.abs().sum()) == 0


def test_random_budget_is_capped_by_valid_samples():
    decision = _samples("random", [NAN, NAN, 1.0, NAN], r=1.0)
    assert decision.keep.tolist() == [False, False, True, False]


def test_longest_drops_longest_responses_first_ties_to_earlier():
    decision = _samples("longest", [1.0] * 5, lengths=[5, 1, 9, 3, 3], r=0.4)
    assert decision.keep.tolist() == [False, True, False, True, False]


def test_entropy_keeps_highest_entropy():
    decision = _samples("entropy", [1.0, 1.0, 1.0, 1.0], entropy=[0.2, 0.9, 0.5, 0.7], r=0.5)
    assert decision.keep.tolist() == [False, True, False, True]


def test_ppl_high_and_low():
    ppl = [3.0, 1.0, 8.0, 2.0, NAN, 5.0]
    assert _samples("ppl_high", ppl, r=1 / 3).keep.tolist() == [False, False, True, False, False, True]
    assert _samples("ppl_low", ppl, r=1 / 3).keep.tolist() == [False, True, False, True, False, False]


def test_all_keeps_every_valid_sample():
    assert _samples("all", [1.0, NAN, 3.0], r=0.25).keep.tolist() == [True, False, True]


# Losses log(PPL) = 1..8, mean 4.5: samples 0-3 are below the mean.
INFOBATCH_PPL = [math.exp(v) for v in range(1, 9)]


def test_infobatch_drops_below_mean_at_random_and_rescales_the_kept_ones():
    for seed in range(5):
        decision = _samples("infobatch", INFOBATCH_PPL, r=0.75, seed=seed)  # K = 6: drop 2 of the 4 below-mean
        keep, weight = decision.keep, decision.loss_weight
        assert keep[4:].all() and int(keep[:4].sum()) == 2
        assert weight[:4][keep[:4]].tolist() == [2.0, 2.0], "kept below-mean samples get n_below / n_kept_below"
        assert weight[4:].tolist() == [1.0] * 4


def test_infobatch_drops_all_below_mean_then_random_above_without_rescaling():
    exact = _samples("infobatch", INFOBATCH_PPL, r=0.5)  # K = 4 = the above-mean set
    assert exact.keep.tolist() == [False] * 4 + [True] * 4 and exact.loss_weight.tolist() == [1.0] * 8
    over = _samples("infobatch", INFOBATCH_PPL, r=0.25, seed=1)  # K = 2: 4 below + 2 above dropped
    assert not over.keep[:4].any() and int(over.keep.sum()) == 2
    assert over.loss_weight[over.keep].tolist() == [1.0, 1.0]


def test_infobatch_never_keeps_invalid_samples():
    decision = _samples("infobatch", [NAN, *INFOBATCH_PPL[1:]], r=1.0)
    assert decision.keep.tolist() == [False] + [True] * 7


def _tailsft(log_ppl, log_reference, *, r: float) -> SampleDecision:
    ppl = torch.exp(torch.tensor(log_ppl, dtype=torch.float64))
    reference = torch.exp(torch.tensor(log_reference, dtype=torch.float64))
    policy = build_policy("tailsft", "none", SelectionParams(sample_keep_ratio=r))
    return policy.decide_samples(ppl, torch.ones_like(ppl), torch.full(ppl.shape, 4), _gen(), reference_ppl=reference)


# TailSFT margins log PPL - log PPL_ref: 1, -2, 0, 0.5; sample 4 has no reference PPL, sample 5 no PPL.
TAILSFT_LOG_PPL = [2.0, 1.0, 3.0, 1.0, 2.0, NAN]
TAILSFT_LOG_REF = [1.0, 3.0, 3.0, 0.5, NAN, 1.0]


def test_tailsft_drops_the_samples_whose_loss_fell_furthest_below_the_initial_one():
    decision = _tailsft(TAILSFT_LOG_PPL, TAILSFT_LOG_REF, r=0.5)  # K = 3 of 4 valid: drop the margin -2 one
    assert decision.keep.tolist() == [True, False, True, True, False, False]
    assert decision.triage.invalid.tolist() == [False, False, False, False, True, True]
    assert torch.equal(decision.token_rows, decision.keep) and decision.loss_weight is None
    assert _tailsft(TAILSFT_LOG_PPL, TAILSFT_LOG_REF, r=0.25).keep.tolist() == [True, False, False, True, False, False]
    assert _tailsft(TAILSFT_LOG_PPL, TAILSFT_LOG_REF, r=1 / 6).keep.tolist() == [True] + [False] * 5


def test_tailsft_never_keeps_samples_without_finite_statistics_and_caps_the_budget():
    decision = _tailsft(TAILSFT_LOG_PPL, TAILSFT_LOG_REF, r=1.0)  # K = 6 asked, 4 valid
    assert decision.keep.tolist() == [True, True, True, True, False, False] and decision.triage.target == 4
    inf = _tailsft([1.0, 1.0], [math.inf, 0.0], r=1.0)
    assert inf.keep.tolist() == [False, True]


def test_tailsft_ties_go_to_the_earlier_sample():
    # Before the first step the model is the initial model: every margin is 0, the first K samples stay.
    decision = _tailsft([1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0], r=0.5)
    assert decision.keep.tolist() == [True, True, False, False]


def test_tailsft_reads_the_reference_ppl_from_the_reference_log_probs():
    policy = build_policy("tailsft", "none", SelectionParams(sample_keep_ratio=0.5))
    assert policy.needs_reference and policy.samples.needs_reference and not policy.tokens.needs_reference
    assert not build_policy("random", "none", SelectionParams()).needs_reference
    assert build_policy("random", "rho1", SelectionParams()).needs_reference
    logps = torch.tensor([[-1.0, -1.0, 0.0], [-2.0, -2.0, -2.0]])  # PPL e^1, e^2 (sample 0 has two answer tokens)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    reference = torch.tensor([[-3.0, -3.0, -9.0], [-1.0, -1.0, -1.0]])  # PPL_ref e^3, e^1: margins -2, +1
    ppl = torch.exp(torch.tensor([1.0, 2.0]))
    sel = policy.select(ppl, torch.ones(2), logps, mask, generator=_gen(), reference_logps=reference)
    assert sel.keep.tolist() == [False, True]
    precomputed = torch.exp(torch.tensor([0.0, 5.0]))  # given (the global path): it wins over the log-probs
    sel = policy.select(ppl, torch.ones(2), logps, mask, generator=_gen(), reference_logps=reference,
                        reference_ppl=precomputed)
    assert sel.keep.tolist() == [True, False]
    with pytest.raises(ValueError, match="reference"):
        policy.select(ppl, torch.ones(2), logps, mask, generator=_gen())
    with pytest.raises(ValueError, match="initial model"):
        policy.samples.select_samples(SampleBatch(ppl, torch.ones(2), mask.sum(-1)), _gen())


def test_qtuning_sample_policy_is_the_core_triage():
    gen = torch.Generator().manual_seed(0)
    ppl, entropy = torch.rand(16, generator=gen) * 10 + 1, torch.rand(16, generator=gen)
    logps = -torch.rand(16, 7, generator=gen) * 3
    mask = torch.rand(16, 7, generator=gen) > 0.2
    mask[:, 0] = True
    params = SelectionParams(sample_keep_ratio=0.25, token_keep_ratio=0.5)
    expected = select_qtuning(ppl, entropy, logps, mask, params)
    got = build_policy("qtuning", "qtuning", params).select(ppl, entropy, logps, mask, generator=_gen())
    for name in ("keep", "token_pruned", "label_keep"):
        assert torch.equal(getattr(got, name), getattr(expected, name)), name
    assert torch.equal(got.triage.quadrant, expected.triage.quadrant)


def test_qtuning_sample_policy_on_the_decorrelated_plane_triages_the_entropy_residual():
    gen = torch.Generator().manual_seed(1)
    log_ppl = torch.randn(24, generator=gen, dtype=torch.float64)
    ppl = torch.exp(log_ppl)
    entropy = 0.8 * log_ppl + 0.3 * torch.randn(24, generator=gen, dtype=torch.float64)
    ppl[5], entropy[11] = NAN, math.inf  # invalid samples stay invalid
    params = SelectionParams(sample_keep_ratio=0.25, eu_plane="decorrelated")
    decision = build_policy("qtuning", "qtuning", params).samples.select_samples(
        SampleBatch(ppl, entropy, torch.full((24,), 4)), _gen()
    )
    expected = triage_samples(ppl, decorrelated_entropy(ppl, entropy), 0.25)
    for name in ("keep", "quadrant", "filled", "trimmed", "invalid", "q2_like"):
        assert torch.equal(getattr(decision.triage, name), getattr(expected, name)), name
    assert decision.triage.thresholds == expected.thresholds and decision.triage.q == expected.q
    assert decision.triage.invalid[5] and decision.triage.invalid[11] and int(decision.keep.sum()) == 6
    paper = build_policy("qtuning", "qtuning", SelectionParams(sample_keep_ratio=0.25)).samples.select_samples(
        SampleBatch(ppl, entropy, torch.full((24,), 4)), _gen()
    )
    assert not torch.equal(paper.triage.quadrant, decision.triage.quadrant), "the planes must differ on this batch"
    # The selection (and so the ledger) keeps the raw entropy, not the residual.
    logps, mask = -torch.rand(24, 5, generator=gen, dtype=torch.float64), torch.ones(24, 5, dtype=torch.bool)
    sel = build_policy("qtuning", "qtuning", params).select(ppl, entropy, logps, mask, generator=_gen())
    assert sel.entropy is entropy and torch.equal(sel.keep, expected.keep)
    assert torch.equal(select_qtuning(ppl, entropy, logps, mask, params).keep, expected.keep)


def test_token_prune_q4_ablation_hands_q4_samples_to_the_token_policy():
    # Two Q2 (high PPL, low entropy), two Q4 (low PPL, high entropy), four mid-band samples.
    ppl = torch.tensor([9.0, 8.0, 1.0, 1.5, 4.0, 5.0, 4.5, 5.5])
    entropy = torch.tensor([0.1, 0.2, 0.9, 0.8, 0.5, 0.5, 0.45, 0.55])
    logps = torch.log(torch.tensor([[0.9, 0.1, 0.5, 0.8]] * 8))
    mask = torch.ones(8, 4, dtype=torch.bool)
    for q4 in (False, True):
        params = SelectionParams(sample_keep_ratio=0.5, token_keep_ratio=0.5, token_prune_q4=q4)
        sel = build_policy("qtuning", "qtuning", params).select(ppl, entropy, logps, mask, generator=_gen())
        assert sel.triage.quadrant[:4].tolist() == [2, 2, 4, 4]
        assert sel.token_pruned[:4].tolist() == [True, True, q4, q4]
        assert sel.label_keep[2].sum().item() == (2 if q4 else 4)


# ------------------------------------------------------------------------------------------------ token policies
def test_ppl_token_policy_prunes_highest_ppl_tokens_alone():
    logps = [[-0.1, -3.0, -0.5, -2.0]]
    assert _tokens("ppl", logps) == [[True, False, True, False]]


def test_qtuning_token_policy_uses_neighbours_and_reversed_keeps_the_rest():
    # Token PPL 1, 1, 20, 1, 1, 1; score 0.5 PPL_i + 0.5 (PPL_i-1 + PPL_i+1) = 1, 11, 11, 11, 1.5, 1: keep 3 lowest.
    logps = [[0.0, 0.0, -math.log(20.0), 0.0, 0.0, 0.0]]
    kept = _tokens("qtuning", logps, neighbor_lambda=0.5)
    assert kept == [[True, False, False, False, True, True]]
    reversed_kept = _tokens("reversed", logps, neighbor_lambda=0.5)
    assert reversed_kept == [[False, True, True, True, False, False]]


def test_random_token_policy_keeps_floor_r_t_per_row_and_repeats_with_the_seed():
    logps = torch.zeros(3, 10).tolist()
    mask = [[True] * 10, [True] * 5 + [False] * 5, [True] + [False] * 9]
    kept = torch.tensor(_tokens("random", logps, mask, r=0.5, seed=1))
    assert kept.sum(dim=1).tolist() == [5, 2, 1]
    assert not (kept & ~torch.tensor(mask)).any()
    assert kept.tolist() == _tokens("random", logps, mask, r=0.5, seed=1)
    assert len({str(_tokens("random", logps, mask, r=0.5, seed=s)) for s in range(10)}) > 3


def test_rho1_keeps_highest_excess_loss():
    current = [[-1.0, -1.0, -1.0, -1.0]]
    reference = [[-0.5, -2.0, -0.1, -3.0]]  # excess NLL_model - NLL_ref = 0.5, -1, 0.9, -2
    assert _tokens("rho1", current, reference=reference) == [[True, False, True, False]]
    with pytest.raises(ValueError, match="reference"):
        _tokens("rho1", current)


def test_none_token_policy_keeps_everything():
    assert _tokens("none", [[-1.0, -2.0, -3.0]], [[True, True, False]]) == [[True, True, False]]


# ------------------------------------------------------------------------------------------------ pairs
def test_baseline_pair_prunes_tokens_of_every_kept_sample_and_carries_weights():
    ppl = torch.tensor(INFOBATCH_PPL)
    logps = torch.log(torch.tensor([[0.9, 0.1, 0.5, 0.8]] * 8))
    mask = torch.ones(8, 4, dtype=torch.bool)
    params = SelectionParams(sample_keep_ratio=0.75, token_keep_ratio=0.5)
    sel = build_policy("infobatch", "ppl", params).select(ppl, torch.ones(8), logps, mask, generator=_gen())
    assert torch.equal(sel.token_pruned, sel.keep)
    assert sel.label_keep[sel.keep].tolist() == [[True, False, False, True]] * 6
    assert not sel.label_keep[~sel.keep].any()
    assert sel.loss_weight is not None and sel.loss_weight[sel.keep].max() == 2.0
    no_tokens = build_policy("infobatch", "none", params).select(ppl, torch.ones(8), logps, mask, generator=_gen())
    assert not no_tokens.token_pruned.any() and torch.equal(no_tokens.label_keep, mask & no_tokens.keep[:, None])


def test_decision_rows_slice_every_field():
    decision = _samples("infobatch", INFOBATCH_PPL, r=0.75)
    part = decision.rows(slice(2, 5))
    assert part.keep.tolist() == decision.keep[2:5].tolist()
    assert part.loss_weight.tolist() == decision.loss_weight[2:5].tolist()
    assert part.token_rows.tolist() == decision.token_rows[2:5].tolist()


def test_adding_a_policy_is_one_small_class():
    @register_sample_policy
    class FirstK(SamplePolicy):
        name = "first_k_test"

        def select_samples(self, batch: SampleBatch, generator: torch.Generator) -> SampleDecision:
            keep = torch.zeros(batch.size, dtype=torch.bool)
            keep[: self.target(batch)] = True
            return SampleDecision(TriageResult.without_plane(keep, ~batch.valid, int(keep.sum())), keep)

    try:
        from trl_qtuning import QTuningConfig

        config = QTuningConfig(output_dir="unused", sample_policy="first_k_test", token_policy="none", use_cpu=True)
        policy = config.build_policy()
        sel = policy.select(torch.ones(4), torch.ones(4), torch.zeros(4, 2), torch.ones(4, 2), generator=_gen())
        assert sel.keep.tolist() == [True, False, False, False] and policy.name == "first_k_test-none"
    finally:
        SAMPLE_POLICIES.pop("first_k_test")


def test_unknown_policy_names_are_refused():
    with pytest.raises(ValueError, match="sample_policy"):
        build_policy("nope", "qtuning", SelectionParams())
    with pytest.raises(ValueError, match="token_policy"):
        build_policy("qtuning", "nope", SelectionParams())


def test_reweighting_policy_refuses_non_nll_losses():
    from trl_qtuning import QTuningConfig

    with pytest.raises(ValueError, match="loss_type"):
        QTuningConfig(output_dir="unused", sample_policy="infobatch", loss_type="dft", use_cpu=True)
    QTuningConfig(output_dir="unused", sample_policy="random", loss_type="dft", use_cpu=True)


@pytest.mark.parametrize("rule", ["q1_last", "least_suspect"])
def test_qtuning_sample_policy_fills_by_the_configured_rule(rule):
    # PPL and entropy strongly correlated: Q2 u Q4 is nearly empty and the fill picks most kept samples.
    gen = torch.Generator().manual_seed(3)
    log_ppl = torch.randn(32, generator=gen, dtype=torch.float64)
    ppl, entropy = torch.exp(log_ppl), 0.9 * log_ppl + 0.2 * torch.randn(32, generator=gen, dtype=torch.float64)
    batch = SampleBatch(ppl, entropy, torch.full((32,), 4))
    decision = build_policy("qtuning", "qtuning", SelectionParams(sample_keep_ratio=0.25, fill_rule=rule))
    got = decision.samples.select_samples(batch, _gen()).triage
    expected = triage_samples(ppl, entropy, 0.25, fill_rule=rule)
    paper = triage_samples(ppl, entropy, 0.25)
    assert int(expected.filled.sum()) > 0
    for name in ("keep", "quadrant", "filled", "q2_like"):
        assert torch.equal(getattr(got, name), getattr(expected, name)), name
    assert not torch.equal(got.keep, paper.keep), "the rules must differ on this batch"
