"""The decorrelated EU plane: entropy residuals on log PPL, computed by hand here, and what they change in triage."""

from __future__ import annotations

import math

import pytest
import torch

from trl_qtuning.core import decorrelated_entropy, plane_correlation, triage_samples

NAN, INF = float("nan"), float("inf")


def _t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# Four valid samples with log PPL x = 0, 1, 2, 3 and entropy y = 1, 2, 2, 5:
#   mean x = 1.5, mean y = 2.5; dx = -1.5, -0.5, 0.5, 1.5; dy = -1.5, -0.5, -0.5, 2.5
#   Sxx = 2.25 + 0.25 + 0.25 + 2.25 = 5;  Sxy = 2.25 + 0.25 - 0.25 + 3.75 = 6;  Syy = 2.25 + 0.25 + 0.25 + 6.25 = 9
#   b = Sxy / Sxx = 1.2;  a = 2.5 - 1.2 * 1.5 = 0.7;  fit = 0.7, 1.9, 3.1, 4.3
#   residual = 1 - 0.7, 2 - 1.9, 2 - 3.1, 5 - 4.3 = 0.3, 0.1, -1.1, 0.7
#   corr = Sxy / sqrt(Sxx * Syy) = 6 / sqrt(45) = 2 / sqrt(5)
X, Y = [0.0, 1.0, 2.0, 3.0], [1.0, 2.0, 2.0, 5.0]
RESIDUAL = [0.3, 0.1, -1.1, 0.7]


def test_residual_of_a_hand_made_batch():
    got = decorrelated_entropy(torch.exp(_t(X)), _t(Y))
    assert got.dtype == torch.float64 and got.shape == (4,)
    assert got.tolist() == pytest.approx(RESIDUAL, abs=1e-12)


def test_invalid_samples_stay_invalid_and_do_not_enter_the_fit():
    # The same four valid samples plus NaN PPL, infinite entropy, infinite PPL and zero PPL (log undefined).
    ppl = torch.cat([torch.exp(_t(X)), _t([NAN, 2.0, INF, 0.0])])
    entropy = torch.cat([_t(Y), _t([1.0, INF, 1.0, 1.0])])
    got = decorrelated_entropy(ppl, entropy)
    assert got[:4].tolist() == pytest.approx(RESIDUAL, abs=1e-12), "invalid samples must not move the fit"
    assert not bool(torch.isfinite(got[4:]).any())
    triage = triage_samples(ppl, got, 0.5)
    assert triage.invalid.tolist() == [False] * 4 + [True] * 4 and not bool(triage.keep[4:].any())


def test_residual_degenerate_groups_subtract_the_mean():
    # Constant log PPL: b = 0, a = mean entropy = (1 + 2 + 6) / 3 = 3.
    assert decorrelated_entropy(_t([2.0, 2.0, 2.0]), _t([1.0, 2.0, 6.0])).tolist() == pytest.approx([-2.0, -1.0, 3.0])
    # One valid sample: residual 0 (its own mean); the invalid one stays NaN.
    got = decorrelated_entropy(_t([3.0, NAN]), _t([0.7, 0.1]))
    assert got[0].item() == 0.0 and math.isnan(got[1].item())
    # No valid sample at all.
    assert bool(torch.isnan(decorrelated_entropy(_t([NAN, NAN]), _t([1.0, 2.0]))).all())
    assert decorrelated_entropy(_t([]), _t([])).shape == (0,)
    with pytest.raises(ValueError, match="same shape"):
        decorrelated_entropy(_t([1.0, 2.0]), _t([1.0]))


def test_plane_correlation_by_hand_and_nan_on_degenerate_input():
    ppl, entropy = torch.exp(_t(X)), _t(Y)
    assert plane_correlation(ppl, entropy) == pytest.approx(2 / math.sqrt(5), abs=1e-12)
    # Perfectly linear in log PPL: +1 and -1 (entropy = 2 - 0.5 * x).
    assert plane_correlation(ppl, _t([2.0, 1.5, 1.0, 0.5])) == pytest.approx(-1.0, abs=1e-12)
    assert plane_correlation(ppl, 3 * _t(X) + 1) == pytest.approx(1.0, abs=1e-12)
    # The residual is orthogonal to log PPL by construction.
    assert plane_correlation(ppl, decorrelated_entropy(ppl, entropy)) == pytest.approx(0.0, abs=1e-12)
    # Invalid samples are ignored: appending them changes nothing.
    assert plane_correlation(torch.cat([ppl, _t([NAN, 5.0])]), torch.cat([entropy, _t([9.0, INF])])) == pytest.approx(
        2 / math.sqrt(5), abs=1e-12
    )
    for p, e in [
        ([2.0], [1.0]),  # one valid sample
        ([2.0, NAN, 3.0], [1.0, 2.0, INF]),  # one valid sample left
        ([2.0, 2.0, 2.0], [1.0, 2.0, 3.0]),  # constant PPL
        ([1.0, 2.0, 3.0], [0.5, 0.5, 0.5]),  # constant entropy
        ([], []),
    ]:
        assert math.isnan(plane_correlation(_t(p), _t(e))), (p, e)


# Eight samples with log PPL x = 0..7 and entropy x + d, where d is orthogonal to x and sums to zero:
#   d = 1, -0.9, -0.7, -0.4, 0.4, 0.7, 0.9, -1;  sum d = 0;  sum x*d = -0.9 - 1.4 - 1.2 + 1.6 + 3.5 + 5.4 - 7 = 0
# so the fit is b = 1, a = 0 and the residual is d itself. Entropy = 1, 0.1, 1.3, 2.6, 4.4, 5.7, 6.9, 6.0.
# Budget r = 0.25 of B = 8: K = 2. The first bisection level q = 0.245 puts the quantiles at position 0.245 * 7 =
# 1.715 and 0.755 * 7 = 5.285, so each axis has 2 "low" and 2 "high" samples.
D = [1.0, -0.9, -0.7, -0.4, 0.4, 0.7, 0.9, -1.0]
X8 = [float(i) for i in range(8)]


def test_decorrelated_plane_changes_the_quadrants_and_the_kept_set():
    ppl = torch.exp(_t(X8))
    entropy = _t(X8) + _t(D)
    assert decorrelated_entropy(ppl, entropy).tolist() == pytest.approx(D, abs=1e-12)

    # Paper plane: entropy ranks like PPL (the two lowest PPL also have the two lowest entropies, and so on at every
    # level), so only Q1 and Q3 are ever occupied; bisection raises q for all 10 steps to q = 0.49 * (1 - 2**-10),
    # where the quantile positions 3.43 / 3.57 split each axis 4 / 4: samples 0-3 are Q3, 4-7 are Q1.
    # Fill takes the 2 largest |norm(PPL) - norm(ENT)|, norm(PPL) = (e^x - 1) / (e^7 - 1), norm(ENT) = (ENT - 0.1) / 6.8:
    #   x=4: |0.0489 - 0.6324| = 0.5834;  x=5: |0.1345 - 0.8235| = 0.6890;  x=6: |0.3673 - 1| = 0.6327
    #   x=3: |0.0174 - 0.3676| = 0.3502;  the others are below 0.18.  -> samples 5 and 6, both filled.
    paper = triage_samples(ppl, entropy, 0.25)
    assert paper.quadrant.tolist() == [3, 3, 3, 3, 1, 1, 1, 1]
    assert paper.keep.tolist() == [False] * 5 + [True, True, False]
    assert torch.equal(paper.filled, paper.keep)
    assert paper.iterations == 10 and paper.q == pytest.approx(0.49 * (1 - 2**-10))

    # Decorrelated plane: high PPL = {6, 7}, low PPL = {0, 1}; low residual = {7 (-1), 1 (-0.9)}, high residual =
    # {0 (+1), 6 (+0.9)}. So 7 is Q2, 0 is Q4, 6 is Q1, 1 is Q3: the kept share 2/8 hits r at the first step.
    plane = triage_samples(ppl, decorrelated_entropy(ppl, entropy), 0.25)
    assert plane.quadrant.tolist() == [4, 3, 0, 0, 0, 0, 1, 2]
    assert plane.keep.tolist() == [True] + [False] * 6 + [True]
    assert not bool(plane.filled.any()) and not bool(plane.trimmed.any())
    assert plane.iterations == 1 and plane.q == pytest.approx(0.245)
    # The raw axes correlate strongly, corr = Sxy / sqrt(Sxx * Syy) with Sxx = Sxy = 42 (x = 0..7; d is orthogonal
    # to x) and Syy = 42 + sum d^2 = 42 + 4.92: corr = sqrt(42 / 46.92) = 0.9461; the triaged axes do not correlate.
    assert plane_correlation(ppl, entropy) == pytest.approx(math.sqrt(42 / 46.92), abs=1e-12)
    assert plane_correlation(ppl, decorrelated_entropy(ppl, entropy)) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_decorrelated_triage_is_invariant_to_rescaling_ppl(seed):
    gen = torch.Generator().manual_seed(seed)
    batch = int(torch.randint(6, 40, (1,), generator=gen))
    log_ppl = 1.5 * torch.randn(batch, generator=gen, dtype=torch.float64) + 1.0
    entropy = 0.8 * log_ppl + 0.5 * torch.randn(batch, generator=gen, dtype=torch.float64)
    ppl = torch.exp(log_ppl)
    invalid = torch.rand(batch, generator=gen) < 0.1
    ppl[invalid] = NAN
    ratio = float(torch.rand((), generator=gen)) * 0.8 + 0.1
    base_axis = decorrelated_entropy(ppl, entropy)
    base = triage_samples(ppl, base_axis, ratio)
    for c in (0.5, 2.0, 3.7, 1e-3, 1e4):
        axis = decorrelated_entropy(ppl * c, entropy)
        # The intercept absorbs log(c): the residual does not move (up to rounding).
        torch.testing.assert_close(axis, base_axis, equal_nan=True, rtol=0, atol=1e-9)
        got = triage_samples(ppl * c, axis, ratio)
        assert torch.equal(got.keep, base.keep), (seed, c)
        assert torch.equal(got.quadrant, base.quadrant), (seed, c)
        assert torch.equal(got.invalid, invalid), (seed, c)
