"""Tests of trl_qtuning.core.selection: triage + token pruning of one group (spec sections 2-3).

Expected values are computed by hand (see tests/test_core_triage.py for the quantile arithmetic of the batches).
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trl_qtuning import select_qtuning
from trl_qtuning.core.selection import SelectionParams
from trl_qtuning.core.stats import eu_plane_stats

NAN, INF = float("nan"), float("inf")
T, F = True, False

# Hand batch (see test_core_triage.test_hand_batch_r_half_two_iterations): with r = 0.5 the final q = 0.3675 and
#   quadrants [2, 4, 1, 3, 4, 2, 0, 0]: Q2 = {0, 5}, Q4 = {1, 4}, Q1 = {2}, Q3 = {3}, mid = {6, 7}; keep {0, 1, 4, 5}.
PPL8 = [8.0, 1.0, 7.0, 2.0, 3.0, 6.0, 4.0, 5.0]
ENT8 = [1.0, 8.0, 7.0, 2.0, 6.0, 3.0, 5.0, 4.0]

# Token perplexities (6 positions). Rows 0..4, 6, 7: prompt at 0, response 1..4, padding at 5:
#   tppl [9, 1, 2, 8, 4, 7] -> sum scores (lam .5): pos1 .5 + .5*(0+2) = 1.5; pos2 1 + .5*(1+8) = 5.5;
#   pos3 4 + .5*(2+4) = 7; pos4 2 + .5*(8+0) = 6. r_token .5 -> 2 kept: pos1, pos2; reversed: pos3, pos4.
# Row 5: prompt 0..1, response 2..5: tppl [5, 5, 4, 1, 2, 8] -> pos2 2 + .5*(0+1) = 2.5; pos3 .5 + .5*(4+2) = 3.5;
#   pos4 1 + .5*(1+8) = 5.5; pos5 4 + .5*(2+0) = 5. r_token .5 -> pos2, pos3; .75 -> 3: pos2, pos3, pos5.
ROW_A = [9.0, 1.0, 2.0, 8.0, 4.0, 7.0]
MASK_A = [F, T, T, T, T, F]
ROW_B = [5.0, 5.0, 4.0, 1.0, 2.0, 8.0]
MASK_B = [F, F, T, T, T, T]


def _batch():
    tppl = torch.tensor([ROW_B if i == 5 else ROW_A for i in range(8)], dtype=torch.float64)
    mask = torch.tensor([MASK_B if i == 5 else MASK_A for i in range(8)])
    return -torch.log(tppl), mask


def _rows(label_keep):
    return [r.nonzero().view(-1).tolist() for r in label_keep]


def test_select_drops_non_kept_and_prunes_only_q2():
    logps, mask = _batch()
    sel = select_qtuning(torch.tensor(PPL8), torch.tensor(ENT8), logps, mask, SelectionParams(sample_keep_ratio=0.5))
    assert sel.triage.quadrant.tolist() == [2, 4, 1, 3, 4, 2, 0, 0]
    assert sel.keep.tolist() == [T, T, F, F, T, T, F, F]
    assert sel.token_pruned.tolist() == [T, F, F, F, F, T, F, F]
    assert sel.label_keep.shape == (8, 6) and sel.label_keep.dtype == torch.bool
    assert _rows(sel.label_keep) == [
        [1, 2],  # Q2: 2 of 4 tokens (lowest scores 1.5, 5.5)
        [1, 2, 3, 4],  # Q4: every response token
        [],  # Q1 dropped
        [],  # Q3 dropped
        [1, 2, 3, 4],  # Q4
        [2, 3],  # Q2 (scores 2.5, 3.5)
        [],  # mid band
        [],
    ]
    assert torch.equal(sel.ppl, torch.tensor(PPL8)) and torch.equal(sel.entropy, torch.tensor(ENT8))


def test_select_token_ratio_three_quarters_and_reverse():
    logps, mask = _batch()
    params = SelectionParams(sample_keep_ratio=0.5, token_keep_ratio=0.75)
    sel = select_qtuning(torch.tensor(PPL8), torch.tensor(ENT8), logps, mask, params)
    # floor(.75 * 4) = 3: row 0 -> pos1 (1.5), pos2 (5.5), pos4 (6); row 5 -> pos2, pos3, pos5
    assert _rows(sel.label_keep)[0] == [1, 2, 4]
    assert _rows(sel.label_keep)[5] == [2, 3, 5]
    params = SelectionParams(sample_keep_ratio=0.5, reverse_token_score=True)
    sel = select_qtuning(torch.tensor(PPL8), torch.tensor(ENT8), logps, mask, params)
    # reversed, 2 tokens: row 0 -> pos3 (7), pos4 (6); row 5 -> pos4 (5.5), pos5 (5); Q4 rows untouched
    assert _rows(sel.label_keep) == [[3, 4], [1, 2, 3, 4], [], [], [1, 2, 3, 4], [4, 5], [], []]


def test_select_batch_token_budget_over_q2_rows():
    # Only the kept Q2 rows (0 and 5, 8 response tokens) share the budget floor(.5 * 8) = 4. Best of each row:
    # row 0 pos1 (1.5), row 5 pos2 (2.5); 2 more among row 0 {5.5, 7, 6} and row 5 {3.5, 5.5, 5}: row 5 pos3 (3.5),
    # row 5 pos5 (5).
    logps, mask = _batch()
    params = SelectionParams(sample_keep_ratio=0.5, token_budget_scope="batch")
    sel = select_qtuning(torch.tensor(PPL8), torch.tensor(ENT8), logps, mask, params)
    assert _rows(sel.label_keep) == [[1], [1, 2, 3, 4], [], [], [1, 2, 3, 4], [2, 3, 5], [], []]


def test_select_token_ratio_one_prunes_nothing():
    logps, mask = _batch()
    sel = select_qtuning(
        torch.tensor(PPL8), torch.tensor(ENT8), logps, mask, SelectionParams(sample_keep_ratio=0.5, token_keep_ratio=1.0)
    )
    expected = mask & torch.tensor([T, T, F, F, T, T, F, F]).unsqueeze(-1)
    assert torch.equal(sel.label_keep, expected)


# Under-fill batch (see test_core_triage): PPL/ENT rank-correlated, r = 0.375 -> all Q1/Q3, filled {1, 2, 6},
# Q2-like {6} (norm P .75 >= norm E .625).
UPPL = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 9.0]
UENT = [0.0, 3.0, 3.5, 3.75, 4.0, 4.5, 5.0, 8.0]


def test_select_filled_rows_kept_whole_by_default_and_q2_like_pruned_on_request():
    logps, mask = _batch()
    sel = select_qtuning(torch.tensor(UPPL), torch.tensor(UENT), logps, mask, SelectionParams(sample_keep_ratio=0.375))
    assert sel.keep.nonzero().view(-1).tolist() == [1, 2, 6]
    assert not sel.token_pruned.any()
    assert _rows(sel.label_keep) == [[], [1, 2, 3, 4], [1, 2, 3, 4], [], [], [], [1, 2, 3, 4], []]
    params = SelectionParams(sample_keep_ratio=0.375, prune_filled_q2_like=True)
    sel = select_qtuning(torch.tensor(UPPL), torch.tensor(UENT), logps, mask, params)
    assert sel.token_pruned.nonzero().view(-1).tolist() == [6]
    # row 6 is pruned like row A (pos1, pos2); filled rows 1, 2 lean to Q4 and stay whole
    assert _rows(sel.label_keep) == [[], [1, 2, 3, 4], [1, 2, 3, 4], [], [], [], [1, 2], []]


def test_select_invalid_rows_never_kept():
    # row 1 has no response token -> NaN stats from eu_plane_stats -> invalid; r = 1 keeps every other row
    logps = -torch.log(torch.tensor([ROW_A, ROW_A, ROW_B], dtype=torch.float64))
    mask = torch.tensor([MASK_A, [F] * 6, MASK_B])
    ent = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0, 0.0], [1.0] * 6, [0.0, 0.0, 5.0, 5.0, 5.0, 5.0]], dtype=torch.float64)
    ppl, h = eu_plane_stats(logps, ent, mask)
    assert math.isnan(ppl[1].item())
    sel = select_qtuning(ppl, h, logps, mask, SelectionParams(sample_keep_ratio=1.0, token_keep_ratio=0.5))
    assert sel.keep.tolist() == [T, F, T]
    assert sel.triage.invalid.tolist() == [F, T, F]
    assert not sel.label_keep[1].any()


# ---------------------------------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------------------------------


@st.composite
def groups(draw):
    b = draw(st.integers(1, 8))
    length = draw(st.integers(1, 8))
    mask = np.array(draw(st.lists(st.booleans(), min_size=b * length, max_size=b * length))).reshape(b, length)
    mask[:, 0] |= ~mask.any(axis=1)  # at least one response token per row
    logps = -np.array(draw(st.lists(st.floats(0.0, 4.0), min_size=b * length, max_size=b * length))).reshape(b, length)
    garbage = np.array(
        draw(st.lists(st.sampled_from([NAN, INF, -INF, 3.0]), min_size=b * length, max_size=b * length))
    ).reshape(b, length)
    ppl = np.array(draw(st.lists(st.floats(1.0, 30.0), min_size=b, max_size=b)))
    ent = np.array(draw(st.lists(st.floats(0.0, 10.0), min_size=b, max_size=b)))
    params = SelectionParams(
        sample_keep_ratio=draw(st.integers(1, 100)) / 100,
        token_keep_ratio=draw(st.integers(1, 100)) / 100,
        neighbor_lambda=draw(st.sampled_from([0.0, 0.5, 1.0])),
        neighbor_mode=draw(st.sampled_from(["sum", "mean"])),
        enforce_sample_budget=draw(st.booleans()),
        prune_filled_q2_like=draw(st.booleans()),
        reverse_token_score=draw(st.booleans()),
    )
    return mask, logps, garbage, ppl, ent, params


@settings(max_examples=200, deadline=None)
@given(groups())
def test_property_selection(group):
    mask, logps, garbage, ppl, ent, params = group
    sel = select_qtuning(torch.tensor(ppl), torch.tensor(ent), torch.tensor(logps), torch.tensor(mask), params)
    keep, quad, q2_like = sel.keep.numpy(), sel.triage.quadrant.numpy(), sel.triage.q2_like.numpy()
    lk, pruned = sel.label_keep.numpy(), sel.token_pruned.numpy()
    assert not (lk & ~mask).any()
    expected_pruned = keep & ((quad == 2) | (params.prune_filled_q2_like & q2_like))
    expected_pruned &= params.token_keep_ratio < 1.0  # at ratio 1 nothing is token-pruned: Q2 is simply kept
    k_of = lambda n: max(1, math.floor(Fraction(round(params.token_keep_ratio * 100), 100) * n))  # noqa: E731
    expected_pruned &= np.array([k_of(int(n)) < int(n) for n in mask.sum(axis=1)])  # a label was removed
    assert pruned.tolist() == expected_pruned.tolist()
    for row in range(mask.shape[0]):
        n = int(mask[row].sum())
        if not keep[row]:
            assert not lk[row].any()
        elif pruned[row]:
            # exactly max(1, floor(r_token * |T|)) response tokens (all of them when r_token = 1)
            k = max(1, math.floor(Fraction(round(params.token_keep_ratio * 100), 100) * n))
            assert int(lk[row].sum()) == k
        else:
            # Q4 rows and whole-kept fills keep every response token
            assert lk[row].tolist() == mask[row].tolist()
        if keep[row] and quad[row] == 4:
            assert lk[row].tolist() == mask[row].tolist()
    # log-probs at non-response positions change nothing
    logps2 = np.where(mask, logps, garbage)
    sel2 = select_qtuning(torch.tensor(ppl), torch.tensor(ent), torch.tensor(logps2), torch.tensor(mask), params)
    assert torch.equal(sel2.label_keep, sel.label_keep)
    assert torch.equal(sel2.keep, sel.keep)


def test_q2_at_token_ratio_one_is_kept_not_token_pruned():
    """At ``token_keep_ratio=1.0`` no token loses its label, so no sample is reported as token-pruned (the ledger
    used to say ``token_pruned`` for Q2 rows that kept every token)."""
    ppl, ent = torch.tensor([9.0, 1.0, 5.0, 2.0]), torch.tensor([1.0, 9.0, 5.0, 2.0])
    mask = torch.ones(4, 3, dtype=torch.bool)
    sel = select_qtuning(ppl, ent, torch.zeros(4, 3), mask, SelectionParams(sample_keep_ratio=0.5, token_keep_ratio=1.0))
    assert sel.triage.quadrant[0] == 2 and bool(sel.keep[0])
    assert not bool(sel.token_pruned.any()) and bool(sel.label_keep[sel.keep].all())


def test_one_token_answer_of_a_q2_sample_is_kept_not_token_pruned():
    """Row 0 is Q2 with a one-token answer (EOS only): it keeps max(1, floor(.5 * 1)) = 1 token, i.e. all of them,
    so nothing was pruned and it is ``kept`` (issue 27)."""
    ppl, ent = torch.tensor([9.0, 1.0, 5.0, 2.0]), torch.tensor([1.0, 9.0, 5.0, 2.0])
    mask = torch.tensor([[T, F, F], [T, T, T], [T, T, T], [T, T, T]])
    sel = select_qtuning(ppl, ent, torch.zeros(4, 3), mask, SelectionParams(sample_keep_ratio=0.5))
    assert sel.triage.quadrant.tolist() == [2, 4, 0, 0] and sel.keep.tolist() == [T, T, F, F]
    assert sel.token_pruned.tolist() == [F, F, F, F]
    assert _rows(sel.label_keep) == [[0], [0, 1, 2], [], []]


def test_run_budget_with_room_to_spare_prunes_nothing_and_reports_nothing():
    """``token_budget_scope="run"``: the kept Q4 row 1 (3 tokens) counts first, the Q2 row 0 gets ``budget - 3``
    (at least its best token). Budget 5 keeps 2 of row 0's 3 tokens (token-pruned); budget 6 or more keeps all 3,
    so row 0 is simply kept (issue 27: it was labelled token_pruned with nothing pruned)."""
    from trl_qtuning.policies import build_policy

    ppl, ent = torch.tensor([9.0, 1.0, 5.0, 2.0]), torch.tensor([1.0, 9.0, 5.0, 2.0])
    mask = torch.ones(4, 3, dtype=torch.bool)
    policy = build_policy("qtuning", "qtuning", SelectionParams(sample_keep_ratio=0.5, token_budget_scope="run"))
    for budget, pruned, kept in ((5, [T, F, F, F], [2, 3, 0, 0]), (6, [F] * 4, [3, 3, 0, 0]), (100, [F] * 4, [3, 3, 0, 0])):
        sel = policy.select(ppl, ent, torch.zeros(4, 3), mask, generator=torch.Generator(), token_budget_tokens=budget)
        assert sel.token_pruned.tolist() == pruned, budget
        assert sel.label_keep.sum(dim=-1).tolist() == kept, budget
