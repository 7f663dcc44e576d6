"""Tests of trl_qtuning.core.triage: stage 1, sample triage on the EU plane (spec section 2).

Expected values are worked out by hand in the comments. Quantiles use numpy's default linear interpolation: for n
sorted values x[0..n-1] and level a, h = (n-1)*a, Quantile = x[floor h] + (h - floor h) * (x[floor h + 1] - x[floor h]).
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from trl_qtuning.core.triage import assign_quadrants, target_keep_count, triage_samples

NAN, INF = float("nan"), float("inf")


def _t(values, dtype=torch.float64):
    return torch.tensor(values, dtype=dtype)


def _idx(mask: torch.Tensor) -> list[int]:
    return mask.nonzero().view(-1).tolist()


# ---------------------------------------------------------------------------------------------------------------------
# target_keep_count
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("batch", "ratio", "expected"),
    [
        (8, 0.125, 1),  # 1.0 -> 1
        (20, 0.125, 3),  # 2.5 -> rounds half UP to 3 (Python's round would give 2)
        (3, 0.1, 1),  # 0.3 -> 0 -> at least 1
        (8, 0.25, 2),  # 2.0
        (10, 0.25, 3),  # 2.5 -> 3
        (7, 0.5, 4),  # 3.5 -> 4
        (10, 0.35, 4),  # 3.5 (0.35 is 0.34999.. in binary: 3.4999999999999996) -> 4
        (100, 0.125, 13),  # 12.5 -> 13
        (32, 0.125, 4),  # 4.0
        (4, 0.3, 1),  # 1.2 -> 1
        (9, 0.3, 3),  # 2.7 -> 3
        (1, 0.01, 1),  # 0.01 -> at least 1
        (5, 1.0, 5),  # all
        (64, 0.5, 32),
        (0, 0.5, 0),  # empty batch
    ],
)
def test_target_keep_count_table(batch, ratio, expected):
    assert target_keep_count(batch, ratio) == expected


# ---------------------------------------------------------------------------------------------------------------------
# The hand-worked 8-sample batch
# ---------------------------------------------------------------------------------------------------------------------
#
#   sample  0  1  2  3  4  5  6  7
#   PPL     8  1  7  2  3  6  4  5
#   ENT     1  8  7  2  6  3  5  4
#
# Both axes hold the values 1..8, so for either axis Quantile(a) = 1 + 7a (x[i] = i + 1, linear interpolation).
# Thresholds at level q: lo = 1 + 7q, hi = 1 + 7(1 - q) = 8 - 7q, the same on both axes.

PPL8 = [8.0, 1.0, 7.0, 2.0, 3.0, 6.0, 4.0, 5.0]
ENT8 = [1.0, 8.0, 7.0, 2.0, 6.0, 3.0, 5.0, 4.0]


def test_hand_batch_r_half_two_iterations():
    # r = 0.5, B = 8 -> K = 4.
    # iter 1: q = (0 + 0.49)/2 = 0.245: lo = 1 + 1.715 = 2.715, hi = 8 - 1.715 = 6.285.
    #   Q2 = PPL > 6.285 (samples 0, 2) & ENT <= 2.715 (samples 0, 3) -> {0}
    #   Q4 = PPL <= 2.715 (1, 3) & ENT > 6.285 (1, 2) -> {1}; share 2/8 = 0.25 < 0.5 -> lo = 0.245
    # iter 2: q = (0.245 + 0.49)/2 = 0.3675: lo = 1 + 2.5725 = 3.5725, hi = 8 - 2.5725 = 5.4275.
    #   Q2 = PPL > 5.4275 (0, 2, 5) & ENT <= 3.5725 (0, 3, 5) -> {0, 5}
    #   Q4 = PPL <= 3.5725 (1, 3, 4) & ENT > 5.4275 (1, 2, 4) -> {1, 4}; share 4/8 = 0.5 -> |0.5-0.5| < 0.01: stop.
    #   Q1 = PPL high & ENT high -> {2}; Q3 = PPL low & ENT low -> {3}; 6 and 7 mid band.
    res = triage_samples(_t(PPL8), _t(ENT8), 0.5)
    assert res.iterations == 2
    assert res.q == pytest.approx(0.3675, abs=1e-12)
    assert res.target == 4
    assert res.quadrant.tolist() == [2, 4, 1, 3, 4, 2, 0, 0]
    assert _idx(res.keep) == [0, 1, 4, 5]
    assert not res.filled.any() and not res.trimmed.any() and not res.invalid.any() and not res.q2_like.any()
    assert res.thresholds["ppl_lo"] == pytest.approx(3.5725)
    assert res.thresholds["ppl_hi"] == pytest.approx(5.4275)
    assert res.thresholds["ent_lo"] == pytest.approx(3.5725)
    assert res.thresholds["ent_hi"] == pytest.approx(5.4275)


def test_hand_batch_r_three_eighths_full_bisection_then_fill_with_tie():
    # r = 0.375 -> K = round(3.0) = 3. Q2 and Q4 grow in pairs here (share 2/8 or 4/8), so the target 3/8 is never
    # met and the bisection runs all 10 steps. The share jumps from 2/8 to 4/8 at q = 2/7 = 0.2857142857:
    # there lo = 1 + 2 = 3 and hi = 8 - 2 = 6, and samples 4 (PPL 3, ENT 6) and 5 (PPL 6, ENT 3) enter for q > 2/7.
    #   it  q                 share  interval after
    #   1   0.245             2/8    [0.245, 0.49]
    #   2   0.3675            4/8    [0.245, 0.3675]
    #   3   0.30625           4/8    [0.245, 0.30625]
    #   4   0.275625          2/8    [0.275625, 0.30625]
    #   5   0.2909375         4/8    [0.275625, 0.2909375]
    #   6   0.28328125        2/8    [0.28328125, 0.2909375]
    #   7   0.287109375       4/8    [0.28328125, 0.287109375]
    #   8   0.2851953125      2/8    [0.2851953125, 0.287109375]
    #   9   0.28615234375     4/8    [0.2851953125, 0.28615234375]
    #   10  0.285673828125    2/8    (last midpoint is the final q)
    # Final q = 0.285673828125: lo = 1 + 7q = 2.999716796875, hi = 8 - 7q = 6.000283203125.
    #   Q2 = {0} (8 > 6.0003, 1 <= 2.9997), Q4 = {1}, Q1 = {2} (7, 7), Q3 = {3} (2, 2), 4..7 mid band.
    # Under-fill by 1. norm(PPL) = (PPL-1)/7, norm(ENT) = (ENT-1)/7, so |diff| = |PPL-ENT|/7 over non-kept samples:
    #   2: 0, 3: 0, 4: 3/7, 5: 3/7, 6: 1/7, 7: 1/7 -> tie between 4 and 5 at 3/7 -> earlier index 4 is filled.
    #   Sample 4: norm PPL 2/7 < norm ENT 5/7 -> not Q2-like.
    res = triage_samples(_t(PPL8), _t(ENT8), 0.375)
    assert res.iterations == 10
    assert res.q == pytest.approx(0.285673828125, abs=1e-12)
    assert res.target == 3
    assert res.quadrant.tolist() == [2, 4, 1, 3, 0, 0, 0, 0]
    assert _idx(res.keep) == [0, 1, 4]
    assert _idx(res.filled) == [4]
    assert not res.q2_like.any()
    assert not res.trimmed.any()
    assert res.thresholds["ppl_lo"] == pytest.approx(2.999716796875, abs=1e-9)
    assert res.thresholds["ppl_hi"] == pytest.approx(6.000283203125, abs=1e-9)
    assert res.thresholds["ent_lo"] == pytest.approx(2.999716796875, abs=1e-9)
    assert res.thresholds["ent_hi"] == pytest.approx(6.000283203125, abs=1e-9)


def test_hand_batch_float32_input_same_decision():
    res = triage_samples(_t(PPL8, torch.float32), _t(ENT8, torch.float32), 0.5)
    assert _idx(res.keep) == [0, 1, 4, 5]
    assert res.keep.dtype == torch.bool and res.quadrant.dtype == torch.long


def test_over_fill_tie_at_tiny_q_enforced_and_not():
    # r = 0.125 -> K = 1. Sample 0 (max PPL, min ENT) is Q2 and sample 1 (min PPL, max ENT) is Q4 at every q > 0
    # (hi = 8 - 7q < 8, lo = 1 + 7q >= 1), so the share never drops below 2/8 and q halves 10 times:
    # q = 0.49 / 2^10 = 0.000478515625; lo = 1.003349609375, hi = 7.996650390625 -> Q2 = {0}, Q4 = {1}, all else mid.
    # Over-full: 2 > K = 1. Rank: sample 0 (Q2) norm P - norm E = 1 - 0 = 1; sample 1 (Q4) norm E - norm P = 1 - 0 = 1
    # -> tie -> the earlier index stays.
    res = triage_samples(_t(PPL8), _t(ENT8), 0.125)
    assert res.iterations == 10
    assert res.q == pytest.approx(0.000478515625, abs=1e-15)
    assert res.quadrant.tolist() == [2, 4, 0, 0, 0, 0, 0, 0]
    assert res.thresholds["ppl_lo"] == pytest.approx(1.003349609375)
    assert res.thresholds["ppl_hi"] == pytest.approx(7.996650390625)
    assert res.target == 1
    assert _idx(res.keep) == [0]
    assert _idx(res.trimmed) == [1]
    assert not res.filled.any()
    # same batch with samples 0 and 1 swapped: now the Q4 sample comes first and wins the tie
    p, e = PPL8.copy(), ENT8.copy()
    p[0], p[1], e[0], e[1] = p[1], p[0], e[1], e[0]
    res = triage_samples(_t(p), _t(e), 0.125)
    assert res.quadrant.tolist() == [4, 2, 0, 0, 0, 0, 0, 0]
    assert _idx(res.keep) == [0] and _idx(res.trimmed) == [1]
    # paper-faithful: no trim, both stay although K = 1
    res = triage_samples(_t(PPL8), _t(ENT8), 0.125, enforce_budget=False)
    assert _idx(res.keep) == [0, 1]
    assert not res.trimmed.any() and not res.filled.any()
    assert res.target == 1


def test_over_fill_ranking_trims_to_exactly_k():
    #   sample  0  1  2  3  4  5  6  7
    #   PPL     8  9  1  2  3  4  5  6     sorted 1 2 3 4 5 6 8 9
    #   ENT     2  1  8  9  3  4  5  6     sorted 1 2 3 4 5 6 8 9
    # r = 0.25 -> K = 2; tol = 0.3 stops after iteration 1 (q = 0.245):
    #   h_lo = 7 * 0.245 = 1.715 -> lo = 2 + 0.715 * (3 - 2) = 2.715
    #   h_hi = 7 * 0.755 = 5.285 -> hi = 6 + 0.285 * (8 - 6) = 6.57     (same on both axes)
    #   Q2 = PPL > 6.57 (0, 1) & ENT <= 2.715 (0, 1) -> {0, 1}; Q4 = PPL <= 2.715 (2, 3) & ENT > 6.57 (2, 3) -> {2, 3}
    #   Q3 = {}, Q1 = {}, 4..7 mid.  share 4/8 = 0.5, |0.5 - 0.25| = 0.25 < 0.3 -> stop.
    # Over-full 4 > 2. norm P = (P - 1)/8, norm E = (E - 1)/8:
    #   0 (Q2): 7/8 - 1/8 = 6/8;  1 (Q2): 1 - 0 = 1;  2 (Q4): 7/8 - 0 = 7/8;  3 (Q4): 1 - 1/8 = 7/8
    # top 2: sample 1 (1), then 2 and 3 tie at 7/8 -> 2. Trimmed: 0 and 3.
    ppl = _t([8.0, 9.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    ent = _t([2.0, 1.0, 8.0, 9.0, 3.0, 4.0, 5.0, 6.0])
    res = triage_samples(ppl, ent, 0.25, tol=0.3)
    assert res.iterations == 1
    assert res.q == pytest.approx(0.245)
    assert res.thresholds["ppl_lo"] == pytest.approx(2.715)
    assert res.thresholds["ppl_hi"] == pytest.approx(6.57)
    assert res.quadrant.tolist() == [2, 2, 4, 4, 0, 0, 0, 0]
    assert _idx(res.keep) == [1, 2]
    assert _idx(res.trimmed) == [0, 3]
    assert not res.filled.any()
    assert int(res.keep.sum()) == res.target == 2
    res = triage_samples(ppl, ent, 0.25, tol=0.3, enforce_budget=False)
    assert _idx(res.keep) == [0, 1, 2, 3]
    assert not res.trimmed.any()


# ---------------------------------------------------------------------------------------------------------------------
# Under-fill: PPL and ENT perfectly rank-correlated -> Q2 and Q4 are always empty
# ---------------------------------------------------------------------------------------------------------------------
#   sample   0    1      2      3        4    5       6      7
#   PPL      1    2      3      4        5    6       7      9        lo 1, span 8 -> norm P = (P-1)/8
#   ENT      0    3      3.5    3.75     4    4.5     5      8        lo 0, span 8 -> norm E = E/8
#   norm P   0    .125   .25    .375     .5   .625    .75    1
#   norm E   0    .375   .4375  .46875   .5   .5625   .625   1
#   P - E    0   -.25   -.1875 -.09375   0    .0625   .125   0
# Same ranks on both axes, so no sample is ever high on one axis and low on the other: share 0 at every q, the
# bisection always raises q: final q = 0.49 * (1 - 2^-10) = 0.489521484375 after 10 steps.
# At that q (h = 7q = 3.426650390625, 7(1-q) = 3.573349609375):
#   ppl_lo = 4 + 0.426650390625 = 4.426650390625, ppl_hi = 4.573349609375
#   ent_lo = 3.75 + 0.426650390625 * 0.25 = 3.85666259765625, ent_hi = 3.75 + 0.573349609375 * 0.25 = 3.89333740234375
#   -> samples 0..3 are Q3, samples 4..7 are Q1.
UPPL = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 9.0]
UENT = [0.0, 3.0, 3.5, 3.75, 4.0, 4.5, 5.0, 8.0]


def test_under_fill_correlated_r_three_eighths():
    # K = 3: fill by |P - E| descending: 1 (.25), 2 (.1875), 6 (.125). Q2-like (norm P >= norm E): only 6.
    res = triage_samples(_t(UPPL), _t(UENT), 0.375)
    assert res.iterations == 10
    assert res.q == pytest.approx(0.489521484375, abs=1e-12)
    assert res.quadrant.tolist() == [3, 3, 3, 3, 1, 1, 1, 1]
    assert res.thresholds["ppl_lo"] == pytest.approx(4.426650390625)
    assert res.thresholds["ppl_hi"] == pytest.approx(4.573349609375)
    assert res.thresholds["ent_lo"] == pytest.approx(3.85666259765625)
    assert res.thresholds["ent_hi"] == pytest.approx(3.89333740234375)
    assert _idx(res.keep) == [1, 2, 6]
    assert _idx(res.filled) == [1, 2, 6]
    assert _idx(res.q2_like) == [6]
    assert not res.trimmed.any()


def test_under_fill_correlated_ties_go_to_earlier_index():
    # K = round(0.75 * 8) = 6: the 5 non-zero |P - E| (1, 2, 6, 3, 5) then one of the zero-diff samples 0, 4, 7 ->
    # the earliest, 0. Q2-like: 5 (.0625), 6 (.125) and 0 (0 >= 0).
    res = triage_samples(_t(UPPL), _t(UENT), 0.75)
    assert _idx(res.keep) == [0, 1, 2, 3, 5, 6]
    assert _idx(res.filled) == [0, 1, 2, 3, 5, 6]
    assert _idx(res.q2_like) == [0, 5, 6]


def test_under_fill_order_independent_of_batch_position():
    # Reverse the batch: |P - E| ranking still picks the samples with the largest difference (old 1, 2, 6 -> new 6, 5, 1).
    res = triage_samples(_t(UPPL[::-1]), _t(UENT[::-1]), 0.375)
    assert _idx(res.keep) == [1, 5, 6]
    assert _idx(res.q2_like) == [1]


# ---------------------------------------------------------------------------------------------------------------------
# Small and degenerate batches
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [0.01, 0.125, 0.5, 1.0])
def test_single_sample_batch(ratio):
    # B = 1: every quantile is the value itself. PPL 2 <= ppl_lo = 2 (low), ENT 1 <= ent_lo = 1 (low) -> Q3.
    # K = 1 -> filled. norm P = norm E = 0 (constant) -> Q2-like (0 >= 0).
    res = triage_samples(_t([2.0]), _t([1.0]), ratio)
    assert res.quadrant.tolist() == [3]
    assert res.keep.tolist() == [True]
    assert res.filled.tolist() == [True]
    assert res.q2_like.tolist() == [True]
    assert res.target == 1
    assert res.thresholds == {"ppl_lo": 2.0, "ppl_hi": 2.0, "ent_lo": 1.0, "ent_hi": 1.0}


def test_all_equal_statistics():
    # Every quantile is 3 (PPL) / 5 (ENT); every sample is PPL <= lo and ENT <= lo -> Q3. K = 2, all |diff| = 0
    # -> samples 0 and 1 by index; all norms 0 -> Q2-like.
    res = triage_samples(torch.full((8,), 3.0), torch.full((8,), 5.0), 0.25)
    assert res.quadrant.tolist() == [3] * 8
    assert _idx(res.keep) == [0, 1]
    assert _idx(res.filled) == [0, 1]
    assert _idx(res.q2_like) == [0, 1]


def test_keep_ratio_one_keeps_all_valid_and_nonfinite_never_kept():
    #   sample  0    1  2  3    4    5  6
    #   PPL     nan  1  3  inf  2    4  5
    #   ENT     1    4  2  1    nan  1  3
    # valid = {1, 2, 5, 6}; K = min(7, 4) = 4. The share (kept / 7) can never reach 1 -> q rises to 0.489521484375.
    # Thresholds over the 4 valid values (h = 3q = 1.468564453125, 3(1-q) = 1.531435546875):
    #   PPL sorted 1 3 4 5: lo = 3 + .468564453125 * 1 = 3.468564453125, hi = 3.531435546875
    #   ENT sorted 1 2 3 4: lo = 2.468564453125, hi = 2.531435546875
    #   1 (1, 4): Q4; 2 (3, 2): Q3; 5 (4, 1): Q2; 6 (5, 3): Q1. Fill 2 and 6.
    # Norms over valid: norm P = (P-1)/4, norm E = (E-1)/3: 2: .5 vs 1/3, 6: 1 vs 2/3 -> both Q2-like.
    ppl = _t([NAN, 1.0, 3.0, INF, 2.0, 4.0, 5.0])
    ent = _t([1.0, 4.0, 2.0, 1.0, NAN, 1.0, 3.0])
    res = triage_samples(ppl, ent, 1.0)
    assert _idx(res.invalid) == [0, 3, 4]
    assert res.target == 4
    assert res.quadrant.tolist() == [0, 4, 3, 0, 0, 2, 1]
    assert res.thresholds["ppl_lo"] == pytest.approx(3.468564453125)
    assert res.thresholds["ppl_hi"] == pytest.approx(3.531435546875)
    assert res.thresholds["ent_lo"] == pytest.approx(2.468564453125)
    assert res.thresholds["ent_hi"] == pytest.approx(2.531435546875)
    assert _idx(res.keep) == [1, 2, 5, 6]
    assert _idx(res.filled) == [2, 6]
    assert _idx(res.q2_like) == [2, 6]


def test_keep_ratio_one_all_valid_keeps_everything():
    res = triage_samples(_t(PPL8), _t(ENT8), 1.0)
    assert res.keep.all()
    assert res.target == 8


def test_invalid_sample_with_extreme_value_not_kept():
    # Sample 0 has an infinite PPL (it would look like the strongest Q2 candidate) and -inf entropy: never kept,
    # never filled, and the other three still fill the budget. K = round(0.5 * 4) = 2.
    res = triage_samples(_t([INF, 1.0, 2.0, 3.0]), _t([-INF, 1.0, 2.0, 3.0]), 0.5)
    assert res.invalid.tolist() == [True, False, False, False]
    assert not res.keep[0] and not res.filled[0] and res.quadrant[0] == 0
    assert int(res.keep.sum()) == 2


def test_all_invalid():
    res = triage_samples(_t([NAN, INF]), _t([1.0, 1.0]), 0.5)
    assert not res.keep.any()
    assert res.invalid.all()
    assert res.target == 0
    assert all(math.isnan(v) for v in res.thresholds.values())


def test_k_capped_at_valid_count():
    # B = 4, r = 0.75 -> K = 3, but only 2 samples are valid -> K = 2, both kept.
    res = triage_samples(_t([1.0, NAN, 2.0, NAN]), _t([1.0, 1.0, 3.0, 1.0]), 0.75)
    assert res.target == 2
    assert _idx(res.keep) == [0, 2]


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.0001, 1.5, NAN])
def test_invalid_keep_ratio_raises(ratio):
    with pytest.raises(ValueError):
        triage_samples(_t(PPL8), _t(ENT8), ratio)


def test_invalid_shapes_and_max_iter_raise():
    with pytest.raises(ValueError):
        triage_samples(torch.ones(2, 2), torch.ones(2, 2), 0.5)
    with pytest.raises(ValueError):
        triage_samples(torch.ones(3), torch.ones(4), 0.5)
    with pytest.raises(ValueError):
        triage_samples(torch.ones(3), torch.ones(3), 0.5, max_iter=0)


def test_max_iter_one():
    # max_iter = 1: only q = 0.245 is tried; from the first hand batch: Q2 = {0}, Q4 = {1}, share 2/8 < K = 4
    # -> fill 2 by |P - E|/7: 4 (3/7) and 5 (3/7) (then 6, 7 at 1/7).
    res = triage_samples(_t(PPL8), _t(ENT8), 0.5, max_iter=1)
    assert res.iterations == 1 and res.q == pytest.approx(0.245)
    assert res.quadrant.tolist() == [2, 4, 1, 3, 0, 0, 0, 0]
    assert _idx(res.keep) == [0, 1, 4, 5]
    assert _idx(res.filled) == [4, 5]
    # 5: norm P 5/7 >= norm E 2/7 -> Q2-like; 4 not.
    assert _idx(res.q2_like) == [5]


def test_assign_quadrants_boundaries():
    # ppl_lo = 2, ppl_hi = 4, ent_lo = 1, ent_hi = 3: "high" is strict (>), "low" is inclusive (<=).
    th = {"ppl_lo": torch.tensor(2.0), "ppl_hi": torch.tensor(4.0), "ent_lo": torch.tensor(1.0), "ent_hi": torch.tensor(3.0)}
    ppl = _t([5.0, 5.0, 2.0, 2.0, 4.0, 3.0, 5.0, 1.0])
    ent = _t([4.0, 1.0, 1.0, 3.5, 4.0, 1.0, 3.0, 2.0])
    # 0: high/high Q1; 1: high/low Q2; 2: low/low Q3; 3: low/high Q4; 4: PPL 4 not > 4 -> mid; 5: PPL mid;
    # 6: ENT 3 not > 3 and not <= 1 -> mid; 7: PPL low, ENT 2 mid -> 0
    assert assign_quadrants(ppl, ent, th).tolist() == [1, 2, 3, 4, 0, 0, 0, 0]


# ---------------------------------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------------------------------


def _k_reference(batch: int, percent: int, n_valid: int) -> int:
    # round half up of r * B with exact rationals (r = percent / 100), at least 1, at most B and n_valid
    k = math.floor(Fraction(percent, 100) * batch + Fraction(1, 2))
    return min(max(1, k), batch, n_valid)


def _norm(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    out = np.zeros_like(values)
    v = values[valid]
    if v.size and v.max() > v.min():
        out[valid] = (v - v.min()) / (v.max() - v.min())
    return out


def _bisection_reference(ppl: np.ndarray, ent: np.ndarray, ratio: float, batch: int, max_iter=10, tol=0.01):
    # spec section 2, written independently with numpy quantiles
    lo, hi = 0.0, 0.49
    for it in range(1, max_iter + 1):
        q = (lo + hi) / 2
        p_lo, p_hi = np.quantile(ppl, [q, 1 - q])
        e_lo, e_hi = np.quantile(ent, [q, 1 - q])
        q2 = (ppl > p_hi) & (ent <= e_lo)
        q4 = (ppl <= p_lo) & (ent > e_hi)
        share = int((q2 | q4).sum()) / batch
        if abs(share - ratio) < tol:
            break
        if share < ratio:
            lo = q
        else:
            hi = q
    return q, it


stat_value = st.floats(0.5, 60.0, allow_nan=False, allow_infinity=False)
small_ints = st.integers(1, 6).map(float)  # coarse values: many ties


@st.composite
def stat_batches(draw, with_invalid=False, coarse=None):
    b = draw(st.integers(1, 12))
    elem = draw(st.sampled_from([stat_value, small_ints])) if coarse is None else (small_ints if coarse else stat_value)
    if with_invalid:
        elem_p = st.one_of(elem, st.sampled_from([NAN, INF, -INF]))
    else:
        elem_p = elem
    ppl = draw(st.lists(elem_p, min_size=b, max_size=b))
    ent = draw(st.lists(elem_p, min_size=b, max_size=b))
    percent = draw(st.integers(1, 100))
    return np.array(ppl), np.array(ent), percent


def _check_invariants(res, ppl, ent, percent, enforce):
    b = ppl.size
    ratio = percent / 100
    valid = np.isfinite(ppl) & np.isfinite(ent)
    n_valid = int(valid.sum())
    keep = res.keep.numpy()
    quad = res.quadrant.numpy()
    filled, trimmed, q2_like = res.filled.numpy(), res.trimmed.numpy(), res.q2_like.numpy()
    assert res.invalid.numpy().tolist() == (~valid).tolist()
    # keep is a subset of valid; invalid samples are in the mid band
    assert not (keep & ~valid).any()
    assert (quad[~valid] == 0).all()
    assert set(quad.tolist()) <= {0, 1, 2, 3, 4}
    if n_valid == 0:
        assert not keep.any()
        return
    k = _k_reference(b, percent, n_valid)
    assert res.target == k
    # the quantile thresholds are numpy's linear quantiles over the valid samples at the final q
    q = res.q
    assert 0.0 < q < 0.49
    vp, ve = ppl[valid], ent[valid]
    p_lo, p_hi = np.quantile(vp, [q, 1 - q])
    e_lo, e_hi = np.quantile(ve, [q, 1 - q])
    th = res.thresholds
    assert th["ppl_lo"] == pytest.approx(p_lo, rel=1e-12, abs=1e-12)
    assert th["ppl_hi"] == pytest.approx(p_hi, rel=1e-12, abs=1e-12)
    assert th["ent_lo"] == pytest.approx(e_lo, rel=1e-12, abs=1e-12)
    assert th["ent_hi"] == pytest.approx(e_hi, rel=1e-12, abs=1e-12)
    # quadrants consistent with the reported thresholds (valid samples)
    hp, lp = ppl > th["ppl_hi"], ppl <= th["ppl_lo"]
    he, le = ent > th["ent_hi"], ent <= th["ent_lo"]
    expected = np.zeros(b, dtype=np.int64)
    expected[hp & he] = 1
    expected[hp & le] = 2
    expected[lp & le] = 3
    expected[lp & he] = 4
    expected[~valid] = 0
    assert quad.tolist() == expected.tolist()
    # q and the number of iterations follow the spec's bisection
    q_ref, it_ref = _bisection_reference(vp, ve, ratio, b)
    assert q == pytest.approx(q_ref, abs=1e-15)
    assert res.iterations == it_ref
    in24 = (quad == 2) | (quad == 4)
    n24 = int(in24.sum())
    # filled: subset of keep, disjoint from Q2 u Q4; trimmed: subset of Q2 u Q4, disjoint from keep
    assert not (filled & ~keep).any()
    assert not (filled & in24).any()
    assert not (trimmed & ~in24).any()
    assert not (trimmed & keep).any()
    assert not (q2_like & ~filled).any()
    assert keep.tolist() == ((in24 & ~trimmed) | filled).tolist()
    n_keep = int(keep.sum())
    if n24 <= k:
        assert n_keep == k
        assert not trimmed.any()
        assert int(filled.sum()) == k - n24
    else:
        assert not filled.any()
        assert n_keep == (k if enforce else n24)
    if enforce:
        assert n_keep == k
    else:
        assert n_keep >= k
    # fill rule: every filled sample has |nP - nE| at least that of every unfilled candidate
    n_p, n_e = _norm(np.where(valid, ppl, 0.0), valid), _norm(np.where(valid, ent, 0.0), valid)
    d = np.abs(n_p - n_e)
    cand = valid & ~in24
    if filled.any() and (cand & ~filled).any():
        assert d[filled].min() >= d[cand & ~filled].max() - 1e-12
    # Q2-like: filled with norm P >= norm E (checked where the two are not within rounding of each other)
    for i in np.nonzero(filled)[0]:
        if abs(n_p[i] - n_e[i]) > 1e-12:
            assert bool(q2_like[i]) == bool(n_p[i] > n_e[i])
    # trim rule: kept Q2/Q4 samples rank at least as high as trimmed ones
    if trimmed.any():
        rank = np.where(quad == 2, n_p - n_e, n_e - n_p)
        assert rank[in24 & keep].min() >= rank[trimmed].max() - 1e-12


@settings(max_examples=200, deadline=None)
@given(stat_batches(), st.booleans())
def test_property_triage_invariants(batch, enforce):
    ppl, ent, percent = batch
    res = triage_samples(torch.tensor(ppl), torch.tensor(ent), percent / 100, enforce_budget=enforce)
    _check_invariants(res, ppl, ent, percent, enforce)


@settings(max_examples=200, deadline=None)
@given(stat_batches(with_invalid=True), st.booleans())
def test_property_triage_invariants_with_invalid(batch, enforce):
    ppl, ent, percent = batch
    res = triage_samples(torch.tensor(ppl), torch.tensor(ent), percent / 100, enforce_budget=enforce)
    _check_invariants(res, ppl, ent, percent, enforce)


@settings(max_examples=200, deadline=None)
@given(
    stat_batches(coarse=False), st.booleans(), st.randoms(use_true_random=False),
    st.sampled_from(["paper", "q1_last", "least_suspect"]),
)  # fmt: skip
def test_property_permutation_invariance(batch, enforce, rnd, rule):
    ppl, ent, percent = batch
    b = ppl.size
    # distinct statistics and distinct fill/trim scores, so no decision depends on a tie
    assume(len(set(ppl.tolist())) == b and len(set(ent.tolist())) == b)
    valid = np.ones(b, dtype=bool)
    n_p, n_e = _norm(ppl, valid), _norm(ent, valid)
    assume(len(set(np.abs(n_p - n_e).tolist())) == b)
    assume(len(set((n_p - n_e).tolist()) | set((n_e - n_p).tolist())) == 2 * b or b == 1)
    if rule == "least_suspect":  # distinct rank sums (ranks of distinct values are 1..b)
        rank_sums = np.argsort(np.argsort(ppl)) + np.argsort(np.argsort(ent))
        assume(len(set(rank_sums.tolist())) == b)
    perm = list(range(b))
    rnd.shuffle(perm)
    perm_t = torch.tensor(perm)
    r = percent / 100
    base = triage_samples(torch.tensor(ppl), torch.tensor(ent), r, enforce_budget=enforce, fill_rule=rule)
    moved = triage_samples(torch.tensor(ppl[perm]), torch.tensor(ent[perm]), r, enforce_budget=enforce, fill_rule=rule)
    for name in ("quadrant", "keep", "filled", "trimmed", "invalid", "q2_like"):
        assert getattr(moved, name).tolist() == getattr(base, name)[perm_t].tolist(), name
    assert moved.q == base.q
    assert moved.iterations == base.iterations
    assert moved.thresholds == pytest.approx(base.thresholds)


# ---------------------------------------------------------------------------------------------------------------------
# Fill rules (fill_rule): which non-kept samples top up an under-full Q2 u Q4
# ---------------------------------------------------------------------------------------------------------------------
# On UPPL/UENT (quadrants [3, 3, 3, 3, 1, 1, 1, 1], Q2 u Q4 empty):
#   norm P = (p - 1) / 8 = [0, .125, .25, .375, .5, .625, .75, 1]
#   norm E = e / 8       = [0, .375, .4375, .46875, .5, .5625, .625, 1]
#   |nP - nE|            = [0, .25, .1875, .09375, 0, .0625, .125, 0]
#   rank P + rank E      = [2, 4, 6, 8, 10, 12, 14, 16] (both strictly increasing)


@pytest.mark.parametrize(
    ("rule", "ratio", "kept", "q2_like"),
    [
        # K = 3. paper: 1 (.25), 2 (.1875), 6 (.125); only 6 has nP >= nE.
        ("paper", 0.375, [1, 2, 6], [6]),
        # q1_last: the Q3 samples 0..3 first, by |nP - nE|: 1 (.25), 2 (.1875), 3 (.09375); none leans to Q2.
        ("q1_last", 0.375, [1, 2, 3], []),
        # least_suspect: the three lowest rank sums 2, 4, 6; sample 0 has nP = nE = 0 -> Q2-like.
        ("least_suspect", 0.375, [0, 1, 2], [0]),
        # K = 5. paper: 1, 2, 6, 3 (.09375), 5 (.0625).
        ("paper", 0.625, [1, 2, 3, 5, 6], [5, 6]),
        # q1_last: all four Q3 samples (0 last: diff 0), then the best Q1 one, 6 (.125).
        ("q1_last", 0.625, [0, 1, 2, 3, 6], [0, 6]),
        # least_suspect: rank sums 2..10 -> 0..4; 4 has nP = nE = .5.
        ("least_suspect", 0.625, [0, 1, 2, 3, 4], [0, 4]),
    ],
)
def test_fill_rules_hand_batch(rule, ratio, kept, q2_like):
    res = triage_samples(_t(UPPL), _t(UENT), ratio, fill_rule=rule)
    assert res.quadrant.tolist() == [3, 3, 3, 3, 1, 1, 1, 1]
    assert _idx(res.keep) == kept
    assert _idx(res.filled) == kept
    assert _idx(res.q2_like) == q2_like
    assert not res.trimmed.any()


def test_paper_fill_rule_is_the_default():
    for ratio in (0.375, 0.625, 0.75):
        default, paper = triage_samples(_t(UPPL), _t(UENT), ratio), triage_samples(_t(UPPL), _t(UENT), ratio, fill_rule="paper")
        assert default.keep.tolist() == paper.keep.tolist()


def test_average_ranks_ties_and_invalid():
    from trl_qtuning.core.triage import average_ranks

    # valid values 1, 2, 2, 3 (the NaN entry is ignored): ranks 1, 2.5, 2.5, 4; invalid -> 0
    values = _t([2.0, 1.0, NAN, 3.0, 2.0])
    valid = torch.isfinite(values)
    assert average_ranks(values, valid).tolist() == [2.5, 1.0, 0.0, 4.0, 2.5]
    # an invalid entry with a finite value neither gets nor takes a rank
    assert average_ranks(_t([5.0, 1.0, 0.0]), torch.tensor([True, True, False])).tolist() == [2.0, 1.0, 0.0]


def test_least_suspect_tie_goes_to_earlier_index():
    from trl_qtuning.core.triage import fill_scores

    # ranks P: [1, 2.5, 2.5, 4]; ranks E (4, 1, 3, 3): [4, 1, 2.5, 2.5]; sums [5, 3.5, 5, 6.5] -> order 1, then 0 and 2
    # tied at 5 (0 first), then 3.
    ppl, ent = _t([1.0, 2.0, 2.0, 3.0]), _t([4.0, 1.0, 3.0, 3.0])
    valid = torch.ones(4, dtype=torch.bool)
    scores = fill_scores("least_suspect", ppl, ent, torch.zeros(4, dtype=torch.long), ppl, ent, valid)
    assert scores.tolist() == [-5.0, -3.5, -5.0, -6.5]
    from trl_qtuning.core.triage import top_k_mask

    assert _idx(top_k_mask(scores, valid, 2)) == [0, 1]


def test_unknown_fill_rule_names_the_choices():
    with pytest.raises(ValueError, match="fill_rule must be one of 'paper', 'q1_last', 'least_suspect'; got 'x'"):
        triage_samples(_t(UPPL), _t(UENT), 0.375, fill_rule="x")


@settings(max_examples=150, deadline=None)
@given(stat_batches(with_invalid=True), st.sampled_from(["q1_last", "least_suspect"]), st.booleans())
def test_property_fill_rules_keep_the_budget_and_their_order(batch, rule, enforce):
    from trl_qtuning.core.triage import average_ranks

    ppl, ent, percent = batch
    res = triage_samples(torch.tensor(ppl), torch.tensor(ent), percent / 100, enforce_budget=enforce, fill_rule=rule)
    paper = triage_samples(torch.tensor(ppl), torch.tensor(ent), percent / 100, enforce_budget=enforce)
    # the rule changes only which candidates fill: quadrants, thresholds, trims and the count are the paper's
    assert res.quadrant.tolist() == paper.quadrant.tolist()
    assert res.trimmed.tolist() == paper.trimmed.tolist()
    assert int(res.keep.sum()) == int(paper.keep.sum())
    assert int(res.filled.sum()) == int(paper.filled.sum())
    valid = np.isfinite(ppl) & np.isfinite(ent)
    quad = res.quadrant.numpy()
    filled, cand = res.filled.numpy(), valid & ~np.isin(quad, [2, 4])
    if not filled.any() or not (cand & ~filled).any():
        return
    if rule == "q1_last":  # a Q1 sample fills only when no other candidate is left
        assert not (filled & (quad == 1)).any() or not (cand & ~filled & (quad != 1)).any()
    else:
        vmask = torch.tensor(valid)
        total = (average_ranks(torch.tensor(ppl), vmask) + average_ranks(torch.tensor(ent), vmask)).numpy()
        assert total[filled].max() <= total[cand & ~filled].min()
