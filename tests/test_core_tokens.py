"""Tests of trl_qtuning.core.tokens: stage 2, neighbour-aware token pruning (spec section 3).

Scores: s_i = (1 - lam) * tppl_i + lam * (tppl_{i-1} + tppl_{i+1}), a neighbour outside the response counts 0;
"mean" divides the neighbour sum by the number of in-response neighbours (edge token: its one neighbour).
Every expected value below is computed by hand.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trl_qtuning.core.tokens import prune_tokens, token_keep_counts, token_scores

NAN, INF = float("nan"), float("inf")
T, F = True, False


def _t(values):
    return torch.tensor(values, dtype=torch.float64)


def _b(values):
    return torch.tensor(values, dtype=torch.bool)


def _kept(mask_row) -> list[int]:
    return torch.as_tensor(mask_row).nonzero().view(-1).tolist()


# Row used throughout: prompt at 0 (tppl 9, must count 0), response 1..4, padding at 5 (tppl 7, counts 0)
ROW_PPL = [[9.0, 1.0, 2.0, 4.0, 3.0, 7.0]]
ROW_MASK = [[F, T, T, T, T, F]]


# ---------------------------------------------------------------------------------------------------------------------
# token_keep_counts
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("count", "ratio", "expected"),
    [
        (5, 0.5, 2),  # 2.5 -> 2
        (3, 0.7, 2),  # 2.1 -> 2
        (10, 0.7, 7),  # 7.000000000000001 -> 7
        (100, 0.29, 29),  # 28.999999999999996 -> 29 (epsilon)
        (4, 0.5, 2),
        (1, 0.5, 1),  # 0.5 -> 0 -> at least 1
        (1, 0.01, 1),
        (7, 1.0, 7),
        (9, 0.125, 1),  # 1.125 -> 1
        (3, 0.1, 1),  # 0.3 -> at least 1
        (0, 0.5, 0),  # no response token -> 0
    ],
)
def test_token_keep_counts_table(count, ratio, expected):
    assert token_keep_counts(torch.tensor([count]), ratio).tolist() == [expected]


def test_token_keep_counts_vector():
    assert token_keep_counts(torch.tensor([0, 1, 2, 3, 10, 11]), 0.5).tolist() == [0, 1, 1, 1, 5, 5]


# ---------------------------------------------------------------------------------------------------------------------
# token_scores by hand
# ---------------------------------------------------------------------------------------------------------------------


def test_scores_sum_lambda_half_prompt_and_padding_neighbours_count_zero():
    # pos1: .5*1 + .5*(0 + 2) = 1.5     (left neighbour is the prompt: 0, not 9)
    # pos2: .5*2 + .5*(1 + 4) = 3.5
    # pos3: .5*4 + .5*(2 + 3) = 4.5
    # pos4: .5*3 + .5*(4 + 0) = 3.5     (right neighbour is padding: 0, not 7)
    s = token_scores(_t(ROW_PPL), _b(ROW_MASK))
    assert s.shape == (1, 6)
    assert s[0, 1:5].tolist() == [1.5, 3.5, 4.5, 3.5]
    assert s[0, 0].item() == INF and s[0, 5].item() == INF


def test_scores_mean_mode():
    # pos1: in-response neighbours {pos2} -> mean 2       -> .5*1 + .5*2   = 1.5
    # pos2: {pos1, pos3} -> (1 + 4)/2 = 2.5               -> .5*2 + .5*2.5 = 2.25
    # pos3: {pos2, pos4} -> (2 + 3)/2 = 2.5               -> .5*4 + .5*2.5 = 3.25
    # pos4: {pos3} -> 4                                   -> .5*3 + .5*4   = 3.5
    s = token_scores(_t(ROW_PPL), _b(ROW_MASK), neighbor="mean")
    assert s[0, 1:5].tolist() == [1.5, 2.25, 3.25, 3.5]


def test_scores_lambda_zero_and_one():
    # lam = 0: own tppl [1, 2, 4, 3]; lam = 1: neighbour sums [0+2, 1+4, 2+3, 4+0] = [2, 5, 5, 4]
    s0 = token_scores(_t(ROW_PPL), _b(ROW_MASK), neighbor_lambda=0.0)
    assert s0[0, 1:5].tolist() == [1.0, 2.0, 4.0, 3.0]
    s1 = token_scores(_t(ROW_PPL), _b(ROW_MASK), neighbor_lambda=1.0)
    assert s1[0, 1:5].tolist() == [2.0, 5.0, 5.0, 4.0]
    # lam = 0.25: .75*t + .25*(neighbours): pos1 .75 + .5 = 1.25; pos2 1.5 + 1.25 = 2.75; pos3 3 + 1.25 = 4.25;
    # pos4 2.25 + 1 = 3.25
    s = token_scores(_t(ROW_PPL), _b(ROW_MASK), neighbor_lambda=0.25)
    assert s[0, 1:5].tolist() == [1.25, 2.75, 4.25, 3.25]


def test_scores_sequence_edges_and_two_spans():
    # row 0: whole row is response: [2, 4, 8]
    #   sum:  pos0 1 + .5*(0+4) = 3;   pos1 2 + .5*(2+8) = 7;  pos2 4 + .5*(4+0) = 6
    #   mean: pos0 1 + .5*4 = 3;       pos1 2 + .5*5 = 4.5;    pos2 4 + .5*4 = 6
    # row 1: two response spans [T, T, F, T, T] (multi-turn), tppl [2, 4, 100, 6, 8]; position 2 counts 0
    #   sum:  pos0 1 + .5*4 = 3;  pos1 2 + .5*(2+0) = 3;  pos3 3 + .5*(0+8) = 7;  pos4 4 + .5*6 = 7
    #   mean: pos0 1 + .5*4 = 3;  pos1 2 + .5*2 = 3;      pos3 3 + .5*8 = 7;      pos4 4 + .5*6 = 7
    # row 2: an isolated single response token (tppl 6) -> sum: 3 + .5*0 = 3; mean: no neighbour -> 3 + 0 = 3
    ppl = _t([[2.0, 4.0, 8.0, 0.0, 0.0], [2.0, 4.0, 100.0, 6.0, 8.0], [5.0, 6.0, 5.0, 0.0, 0.0]])
    mask = _b([[T, T, T, F, F], [T, T, F, T, T], [F, T, F, F, F]])
    s = token_scores(ppl, mask)
    assert s[0, :3].tolist() == [3.0, 7.0, 6.0]
    assert s[1].tolist() == [3.0, 3.0, INF, 7.0, 7.0]
    assert s[2, 1].item() == 3.0
    m = token_scores(ppl, mask, neighbor="mean")
    assert m[0, :3].tolist() == [3.0, 4.5, 6.0]
    assert m[1].tolist() == [3.0, 3.0, INF, 7.0, 7.0]
    assert m[2, 1].item() == 3.0


def test_scores_ignore_nan_outside_response():
    # NaN / inf at prompt and padding must not leak into the neighbours' scores (same hand values as above)
    ppl = _t([[NAN, 1.0, 2.0, 4.0, 3.0, INF]])
    s = token_scores(ppl, _b(ROW_MASK))
    assert s[0, 1:5].tolist() == [1.5, 3.5, 4.5, 3.5]


def test_scores_invalid_neighbor_mode():
    with pytest.raises(ValueError):
        token_scores(_t(ROW_PPL), _b(ROW_MASK), neighbor="max")


# ---------------------------------------------------------------------------------------------------------------------
# prune_tokens by hand
# ---------------------------------------------------------------------------------------------------------------------


def test_prune_sum_lowest_kept_with_tie_to_earlier():
    # |T| = 4, r = 0.5 -> 2 tokens. Scores [1.5, 3.5, 4.5, 3.5] at pos 1..4: keep pos1 (1.5), then pos2 and pos4 tie
    # at 3.5 -> earlier pos2.
    keep = prune_tokens(_t(ROW_PPL), _b(ROW_MASK), 0.5)
    assert keep.dtype == torch.bool
    assert keep.tolist() == [[F, T, T, F, F, F]]


def test_prune_keep_highest():
    # reversed: highest first: pos3 (4.5), then pos2/pos4 tie at 3.5 -> earlier pos2
    keep = prune_tokens(_t(ROW_PPL), _b(ROW_MASK), 0.5, keep_highest=True)
    assert keep.tolist() == [[F, F, T, T, F, F]]


def test_prune_mean_mode():
    # mean scores [1.5, 2.25, 3.25, 3.5]: lowest two pos1, pos2; highest two pos4, pos3
    assert prune_tokens(_t(ROW_PPL), _b(ROW_MASK), 0.5, neighbor="mean").tolist() == [[F, T, T, F, F, F]]
    assert prune_tokens(_t(ROW_PPL), _b(ROW_MASK), 0.5, neighbor="mean", keep_highest=True).tolist() == [
        [F, F, F, T, T, F]
    ]


def test_prune_lambda_zero_and_one():
    # lam 0: [1, 2, 4, 3] -> pos1, pos2 ; lam 1: [2, 5, 5, 4] -> pos1 (2), pos4 (4)
    assert prune_tokens(_t(ROW_PPL), _b(ROW_MASK), 0.5, neighbor_lambda=0.0).tolist() == [[F, T, T, F, F, F]]
    assert prune_tokens(_t(ROW_PPL), _b(ROW_MASK), 0.5, neighbor_lambda=1.0).tolist() == [[F, T, F, F, T, F]]


def test_prune_sum_vs_mean_differ():
    # response [1, 10, 1, 1, 1] (all response), r = 0.4 -> 2 tokens
    # sum:  pos0 .5 + .5*10 = 5.5; pos1 5 + .5*2 = 6; pos2 .5 + .5*11 = 6; pos3 .5 + .5*2 = 1.5; pos4 .5 + .5*1 = 1
    #       -> keep pos4 (1), pos3 (1.5)
    # mean: pos0 .5 + .5*10 = 5.5; pos1 5 + .5*1 = 5.5; pos2 .5 + .5*5.5 = 3.25; pos3 .5 + .5*1 = 1;
    #       pos4 .5 + .5*1 = 1 -> keep pos3, pos4 (same set) ... use r = 0.6 -> 3 tokens:
    # sum 3rd lowest: pos0 (5.5); mean 3rd lowest: pos2 (3.25)
    ppl = _t([[1.0, 10.0, 1.0, 1.0, 1.0]])
    mask = torch.ones(1, 5, dtype=torch.bool)
    assert _kept(prune_tokens(ppl, mask, 0.6)[0]) == [0, 3, 4]
    assert _kept(prune_tokens(ppl, mask, 0.6, neighbor="mean")[0]) == [2, 3, 4]


def test_prune_budgets_per_row():
    # row 0: |T| = 5, r = .5 -> 2;  row 1: |T| = 3 -> 1;  row 2: |T| = 1 -> 1;  row 3: |T| = 0 -> 0
    # tppl increasing 1, 2, 3, ... with lam = 0 -> keep the first positions of each row's response
    ppl = _t([[1.0, 2.0, 3.0, 4.0, 5.0], [9.0, 1.0, 2.0, 3.0, 9.0], [9.0, 9.0, 1.0, 9.0, 9.0], [1.0] * 5])
    mask = _b([[T, T, T, T, T], [F, T, T, T, F], [F, F, T, F, F], [F] * 5])
    keep = prune_tokens(ppl, mask, 0.5, neighbor_lambda=0.0)
    assert [_kept(r) for r in keep] == [[0, 1], [1], [2], []]


@pytest.mark.parametrize(("n", "ratio", "k"), [(5, 0.5, 2), (3, 0.7, 2), (10, 0.7, 7), (100, 0.29, 29), (4, 1.0, 4)])
def test_prune_floor_budget(n, ratio, k):
    # strictly decreasing tppl n, n-1, ..., 1 with lam = 0 -> the last k positions are kept
    ppl = _t([list(range(n, 0, -1))])
    keep = prune_tokens(ppl, torch.ones(1, n, dtype=torch.bool), ratio, neighbor_lambda=0.0)
    assert _kept(keep[0]) == list(range(n - k, n))


def test_single_response_token_always_kept():
    ppl = _t([[1.0, 1000.0, 1.0]])
    mask = _b([[F, T, F]])
    for ratio in (0.01, 0.5, 1.0):
        for highest in (False, True):
            assert prune_tokens(ppl, mask, ratio, keep_highest=highest).tolist() == [[F, T, F]]


def test_ties_keep_earlier_positions():
    # all tppl equal 2 in a 6-token response; sum scores: edges 1 + .5*2 = 2, inner 1 + .5*4 = 3
    # r = 0.5 -> 3 tokens: both edges (pos0, pos5, score 2), then the earliest inner pos1
    ppl = torch.full((1, 6), 2.0, dtype=torch.float64)
    mask = torch.ones(1, 6, dtype=torch.bool)
    assert _kept(prune_tokens(ppl, mask, 0.5)[0]) == [0, 1, 5]
    # lam = 0: all scores equal -> the first 3 positions
    assert _kept(prune_tokens(ppl, mask, 0.5, neighbor_lambda=0.0)[0]) == [0, 1, 2]
    # keep_highest, lam = 0: all equal -> still the first 3 positions
    assert _kept(prune_tokens(ppl, mask, 0.5, neighbor_lambda=0.0, keep_highest=True)[0]) == [0, 1, 2]


def test_keep_ratio_one_keeps_every_response_token():
    keep = prune_tokens(_t(ROW_PPL), _b(ROW_MASK), 1.0)
    assert keep.tolist() == ROW_MASK


def test_nan_outside_response_does_not_change_pruning():
    ppl = _t([[NAN, 1.0, 2.0, 4.0, 3.0, -INF]])
    assert prune_tokens(ppl, _b(ROW_MASK), 0.5).tolist() == [[F, T, T, F, F, F]]


@pytest.mark.parametrize(
    ("lam", "expected"),
    [
        # lam = 0: scores are the own tppl [1, inf, 2, 3] -> keep the 2 lowest: pos0 (1), pos2 (2)
        (0.0, [0, 2]),
        # lam = 1: scores are neighbour sums: pos0 0+inf = inf, pos1 1+2 = 3, pos2 inf+3 = inf, pos3 2+0 = 2
        #          -> keep pos3 (2), pos1 (3)
        (1.0, [1, 3]),
    ],
)
def test_infinite_token_ppl_with_extreme_lambda(lam, expected):
    # A response token with log p = -inf has tppl = +inf. With lam = 0 (the paper's "lam = 0" ablation) the score of
    # a token is its own tppl, so its finite-tppl neighbours must not be affected; with lam = 1 the token's own
    # tppl has weight 0 (a zero-weight term is left out, so 0 * inf never turns into NaN).
    ppl = _t([[1.0, INF, 2.0, 3.0]])
    keep = prune_tokens(ppl, torch.ones(1, 4, dtype=torch.bool), 0.5, neighbor_lambda=lam)
    assert _kept(keep[0]) == expected


# ---------------------------------------------------------------------------------------------------------------------
# Batch budget
# ---------------------------------------------------------------------------------------------------------------------

# row 0: tppl [1, 2, 3, 4], all response: sum scores pos0 .5 + .5*2 = 1.5; pos1 1 + .5*4 = 3; pos2 1.5 + .5*6 = 4.5;
#        pos3 2 + .5*3 = 3.5
# row 1: tppl [1, 1, 1, NaN-garbage], response 0..2: pos0 .5 + .5*1 = 1; pos1 .5 + .5*2 = 1.5; pos2 .5 + .5*1 = 1
BATCH_PPL = [[1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, NAN]]
BATCH_MASK = [[T, T, T, T], [T, T, T, F]]


def test_batch_budget_differs_from_sample_budget():
    # per sample: row 0 floor(2) = 2 -> pos0 (1.5), pos1 (3); row 1 floor(1.5) = 1 -> pos0 (1, tie with pos2 -> earlier)
    keep = prune_tokens(_t(BATCH_PPL), _b(BATCH_MASK), 0.5)
    assert [_kept(r) for r in keep] == [[0, 1], [0]]
    # batch: total floor(0.5 * 7) = 3. Each row's best: row 0 pos0 (1.5), row 1 pos0 (1). 1 extra, lowest remaining:
    # row 1 pos2 (1) < row 1 pos1 (1.5) < row 0 pos1 (3) -> row 1 pos2.
    keep = prune_tokens(_t(BATCH_PPL), _b(BATCH_MASK), 0.5, budget="batch")
    assert [_kept(r) for r in keep] == [[0], [0, 2]]


def test_batch_budget_keep_highest():
    # best (highest) of each row: row 0 pos2 (4.5), row 1 pos1 (1.5); 1 extra highest remaining: row 0 pos3 (3.5)
    keep = prune_tokens(_t(BATCH_PPL), _b(BATCH_MASK), 0.5, budget="batch", keep_highest=True)
    assert [_kept(r) for r in keep] == [[2, 3], [1]]


def test_batch_budget_every_row_keeps_its_best_even_over_budget():
    # three one-token rows and an empty row, r = 0.5: total floor(1.5) = 1 < 3 rows, yet each row keeps its token
    ppl = _t([[5.0, 1.0], [1.0, 7.0], [3.0, 3.0], [1.0, 1.0]])
    mask = _b([[T, F], [F, T], [T, F], [F, F]])
    keep = prune_tokens(ppl, mask, 0.5, budget="batch")
    assert keep.tolist() == [[T, F], [F, T], [T, F], [F, F]]


def test_batch_budget_ratio_one_keeps_all():
    keep = prune_tokens(_t(BATCH_PPL), _b(BATCH_MASK), 1.0, budget="batch")
    assert keep.tolist() == BATCH_MASK


@pytest.mark.parametrize("budget", ["sample", "batch"])
def test_an_infinite_response_score_never_loses_its_slot_to_a_prompt_position(budget):
    # ppl [5, inf, 2] with position 0 outside the response: both response tokens score +inf (lambda 0.5), as does the
    # prompt position; r = 0.5 keeps max(1, floor(0.5 * 2)) = 1 response token (it kept none when the prompt
    # position, earlier, won the first rank slot)
    keep = prune_tokens(_t([[5.0, INF, 2.0]]), _b([[F, T, T]]), 0.5, budget=budget)
    assert _kept(keep[0]) == [1]
    keep = prune_tokens(_t([[5.0, INF, 2.0], [1.0, 1.0, 1.0]]), _b([[F, T, T], [T, T, F]]), 0.5, budget="batch",
                        batch_keep=3)  # fmt: skip
    assert int(keep.sum()) == 3 and not bool((keep & ~_b([[F, T, T], [T, T, F]])).any())


def test_batch_keep_sets_the_number_of_tokens_kept_over_all_rows():
    # keep 5 of the 7: each row's best first (row 0 pos0 1.5, row 1 pos0 1), then the lowest remaining:
    # row 1 pos2 (1), row 1 pos1 (1.5), row 0 pos1 (3)
    keep = prune_tokens(_t(BATCH_PPL), _b(BATCH_MASK), 0.25, budget="batch", batch_keep=5)
    assert [_kept(r) for r in keep] == [[0, 1], [0, 1, 2]]
    # below the rows' count every row still keeps its best token; above what they hold, all of it
    assert [_kept(r) for r in prune_tokens(_t(BATCH_PPL), _b(BATCH_MASK), 0.25, budget="batch", batch_keep=0)] == [[0], [0]]
    assert int(prune_tokens(_t(BATCH_PPL), _b(BATCH_MASK), 0.9, budget="batch", batch_keep=100).sum()) == 7


def test_share_of_tokens_rounds_half_up():
    from trl_qtuning.core.selection import share_of_tokens

    assert [share_of_tokens(r, 10) for r in (0.2, 0.25, 0.3, 0.34)] == [2, 3, 3, 3]
    assert share_of_tokens(0.5, 0) == 0 and share_of_tokens(0.29, 100) == 29


def test_run_scope_keeps_a_share_of_every_answer_token_of_the_group():
    from trl_qtuning.core.selection import SelectionParams, token_budget
    from trl_qtuning.policies import build_policy

    assert token_budget(SelectionParams(token_budget_scope="run"), 12) == {"budget": "batch", "batch_keep": 12}
    assert token_budget(SelectionParams(token_budget_scope="sample"), 12) == {"budget": "sample"}
    # 4 samples of 5 answer tokens; random samples keep 2; without a caller's budget the group's own share:
    # round(0.3 * 20) = 6 of their 10 tokens; with a caller's budget (a run's running share) exactly that many
    params = SelectionParams(sample_keep_ratio=0.5, token_keep_ratio=0.3, token_budget_scope="run")
    policy = build_policy("random", "random", params)
    mask = torch.ones(4, 5, dtype=torch.bool)
    ppl = torch.ones(4, dtype=torch.float64)

    def select(**kwargs):
        return policy.select(ppl, ppl, torch.zeros(4, 5), mask, generator=torch.Generator().manual_seed(0), **kwargs)

    selection = select()
    assert int(selection.keep.sum()) == 2 and int(selection.label_keep.sum()) == 6
    assert not bool(selection.label_keep[~selection.keep].any())
    assert int(select(token_budget_tokens=9).label_keep.sum()) == 9
    assert int(select(token_budget_tokens=0).label_keep.sum()) == 2  # each kept sample keeps its best token
    # samples kept whole (not handed to the token policy) count towards the share: Q-Tuning hands over Q2 only
    qtuning = build_policy("qtuning", "qtuning", params)
    chosen = qtuning.select(torch.tensor([9.0, 1.0, 5.0, 2.0]), torch.tensor([1.0, 9.0, 5.0, 2.0]),
                            torch.zeros(4, 5), mask, generator=torch.Generator(), token_budget_tokens=8)  # fmt: skip
    whole = int((chosen.keep & ~chosen.token_pruned).sum()) * 5
    assert int(chosen.label_keep.sum()) == max(8, whole + int(chosen.token_pruned.sum()))


# ---------------------------------------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"keep_ratio": 0.0},
        {"keep_ratio": -0.5},
        {"keep_ratio": 1.01},
        {"keep_ratio": NAN},
        {"neighbor_lambda": -0.1},
        {"neighbor_lambda": 1.1},
        {"neighbor": "max"},
        {"budget": "global"},
    ],
)
def test_invalid_arguments_raise(kwargs):
    args = {"keep_ratio": 0.5, **kwargs}
    ratio = args.pop("keep_ratio")
    with pytest.raises(ValueError):
        prune_tokens(_t(ROW_PPL), _b(ROW_MASK), ratio, **args)


def test_invalid_shapes_raise():
    with pytest.raises(ValueError):
        prune_tokens(_t([1.0, 2.0]), _b([T, T]), 0.5)
    with pytest.raises(ValueError):
        prune_tokens(_t([[1.0, 2.0]]), _b([[T, T, T]]), 0.5)


# ---------------------------------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------------------------------


def _reference_scores(ppl: np.ndarray, mask: np.ndarray, lam: float, mode: str) -> np.ndarray:
    out = np.full(ppl.shape, np.inf)
    for r in range(ppl.shape[0]):
        for i in range(ppl.shape[1]):
            if not mask[r, i]:
                continue
            nb, n = 0.0, 0
            if i > 0 and mask[r, i - 1]:
                nb, n = nb + ppl[r, i - 1], n + 1
            if i + 1 < ppl.shape[1] and mask[r, i + 1]:
                nb, n = nb + ppl[r, i + 1], n + 1
            if mode == "mean" and n:
                nb /= n
            out[r, i] = (1 - lam) * ppl[r, i] + lam * nb
    return out


def _k_ref(n: int, percent: int) -> int:
    return 0 if n == 0 else max(1, math.floor(Fraction(percent, 100) * n))


@st.composite
def token_batches(draw):
    b = draw(st.integers(1, 4))
    length = draw(st.integers(1, 10))
    mask = np.array(draw(st.lists(st.booleans(), min_size=b * length, max_size=b * length))).reshape(b, length)
    ppl = np.array(draw(st.lists(st.floats(1.0, 50.0), min_size=b * length, max_size=b * length))).reshape(b, length)
    garbage = np.array(
        draw(st.lists(st.sampled_from([NAN, INF, -INF, 0.0, 1e9]), min_size=b * length, max_size=b * length))
    ).reshape(b, length)
    percent = draw(st.integers(1, 100))
    lam = draw(st.sampled_from([0.0, 0.25, 0.5, 1.0]))
    mode = draw(st.sampled_from(["sum", "mean"]))
    return mask, ppl, garbage, percent, lam, mode


@settings(max_examples=200, deadline=None)
@given(token_batches(), st.booleans())
def test_property_sample_budget(batch, highest):
    mask, ppl, garbage, percent, lam, mode = batch
    r = percent / 100
    keep = prune_tokens(torch.tensor(ppl), torch.tensor(mask), r, neighbor_lambda=lam, neighbor=mode, keep_highest=highest)
    keep_np = keep.numpy()
    # kept tokens lie inside the response, and each row keeps exactly max(1, floor(r |T|)) of them
    assert not (keep_np & ~mask).any()
    scores = _reference_scores(ppl, mask, lam, mode)
    torch.testing.assert_close(
        token_scores(torch.tensor(ppl), torch.tensor(mask), neighbor_lambda=lam, neighbor=mode),
        torch.tensor(scores),
        rtol=1e-12,
        atol=1e-12,
    )
    for row in range(mask.shape[0]):
        n = int(mask[row].sum())
        k = _k_ref(n, percent)
        assert int(keep_np[row].sum()) == k
        if 0 < k < n:
            kept, pruned = scores[row][keep_np[row]], scores[row][mask[row] & ~keep_np[row]]
            if highest:
                assert kept.min() >= pruned.max() - 1e-9
            else:
                assert kept.max() <= pruned.min() + 1e-9
    # values at non-response positions change nothing
    ppl2 = np.where(mask, ppl, garbage)
    keep2 = prune_tokens(
        torch.tensor(ppl2), torch.tensor(mask), r, neighbor_lambda=lam, neighbor=mode, keep_highest=highest
    )
    assert torch.equal(keep2, keep)


@settings(max_examples=200, deadline=None)
@given(token_batches(), st.booleans())
def test_property_batch_budget(batch, highest):
    mask, ppl, _, percent, lam, mode = batch
    keep = prune_tokens(
        torch.tensor(ppl), torch.tensor(mask), percent / 100, neighbor_lambda=lam, neighbor=mode,
        keep_highest=highest, budget="batch",
    ).numpy()
    assert not (keep & ~mask).any()
    n_total = int(mask.sum())
    nonempty = int((mask.sum(axis=1) > 0).sum())
    # every row with a response token keeps at least one; in all max(rows, max(1, floor(r * total)))
    assert ((keep.sum(axis=1) >= 1) == (mask.sum(axis=1) >= 1)).all()
    assert int(keep.sum()) == max(nonempty, _k_ref(n_total, percent))
