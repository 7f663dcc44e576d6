"""Tests of trl_qtuning.core.stats: EU-plane statistics (spec section 1) and the padding-free helpers.

Every expected value is computed by hand in the comments; the code under test never produces an expectation.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trl_qtuning.core.stats import (
    eu_plane_stats,
    flat_to_padded,
    padded_to_flat,
    segment_ids_from_position_ids,
)

NAN, INF = float("nan"), float("inf")


def _segment_stats(logps, ent, mask, segment_ids, num_segments=None):
    """Statistics of a padding-free row the scorer's way: scatter one sample per row (:func:`flat_to_padded`, each
    position at its offset inside its segment; negative ids dropped), then the padded statistics."""
    seg = segment_ids.reshape(-1).long()
    n = num_segments if num_segments is not None else int(seg.max()) + 1 if seg.numel() else 0
    same = seg[:, None] == torch.arange(max(n, 1))[None]
    cols = torch.where(seg >= 0, (same.cumsum(0) - 1).gather(1, seg.clamp(min=0)[:, None])[:, 0], -1)
    rows = [flat_to_padded(x.reshape(-1), seg, cols, n, fill=fill) for x, fill in ((logps, 0.0), (ent, 0.0), (mask, False))]
    return eu_plane_stats(*rows)


# ---------------------------------------------------------------------------------------------------------------------
# Padded form
# ---------------------------------------------------------------------------------------------------------------------


def _padded_example():
    # row 0: prompt token at 0 (garbage 9.0 / NaN entropy), response at 1..3, padding at 4 (inf garbage)
    #        nll = [1, 2, 3] -> mean 2 -> PPL = e^2; entropy = [0.5, 1.0, 1.5] -> mean 1.0
    # row 1: prompt NaN at 0, response at 1..2, padding at 3..4 holding -inf / NaN
    #        nll = [0.5, 1.5] -> mean 1 -> PPL = e; entropy = [2.0, 4.0] -> mean 3.0
    # row 2: no response token at all -> NaN, NaN
    logps = torch.tensor(
        [
            [9.0, -1.0, -2.0, -3.0, INF],
            [NAN, -0.5, -1.5, -INF, NAN],
            [-1.0, -2.0, -3.0, -4.0, -5.0],
        ]
    )
    ent = torch.tensor(
        [
            [NAN, 0.5, 1.0, 1.5, 123.0],
            [NAN, 2.0, 4.0, INF, -7.0],
            [1.0, 1.0, 1.0, 1.0, 1.0],
        ]
    )
    mask = torch.tensor(
        [
            [False, True, True, True, False],
            [False, True, True, False, False],
            [False, False, False, False, False],
        ]
    )
    return logps, ent, mask


def test_padded_exact_values_and_masking():
    logps, ent, mask = _padded_example()
    ppl, h = eu_plane_stats(logps, ent, mask)
    assert ppl.shape == (3,) and h.shape == (3,)
    assert ppl.dtype == torch.float32 and h.dtype == torch.float32
    assert ppl[0].item() == pytest.approx(math.exp(2.0), rel=1e-6)  # 7.389056...
    assert ppl[1].item() == pytest.approx(math.e, rel=1e-6)  # 2.718281...
    assert h[0].item() == pytest.approx(1.0, rel=1e-6)
    assert h[1].item() == pytest.approx(3.0, rel=1e-6)
    # no response token -> NaN on both axes
    assert math.isnan(ppl[2].item()) and math.isnan(h[2].item())


def test_padded_single_token_and_integer_mask():
    # one response token with log p = log(0.25) -> PPL = 4, entropy 0.7; mask given as 0/1 integers
    logps = torch.tensor([[0.0, math.log(0.25)]])
    ent = torch.tensor([[5.0, 0.7]])
    mask = torch.tensor([[0, 1]])
    ppl, h = eu_plane_stats(logps, ent, mask)
    assert ppl.item() == pytest.approx(4.0, rel=1e-6)
    assert h.item() == pytest.approx(0.7, rel=1e-6)


def test_padded_geometric_mean_not_arithmetic():
    # p = [1/2, 1/8]: nll = [ln2, 3 ln2] -> mean 2 ln2 -> PPL = 4 (not mean of per-token ppl (2+8)/2 = 5)
    logps = torch.tensor([[math.log(0.5), math.log(0.125)]], dtype=torch.float64)
    ent = torch.zeros(1, 2, dtype=torch.float64)
    ppl, h = eu_plane_stats(logps, ent, torch.ones(1, 2, dtype=torch.bool))
    assert ppl.item() == pytest.approx(4.0, rel=1e-6)
    assert h.item() == 0.0


def test_nan_inside_response_gives_nan():
    # A NaN log-prob on a response token is not masked away: the sample becomes invalid (NaN PPL).
    logps = torch.tensor([[-1.0, NAN]])
    ent = torch.tensor([[1.0, 1.0]])
    ppl, h = eu_plane_stats(logps, ent, torch.ones(1, 2, dtype=torch.bool))
    assert math.isnan(ppl.item())
    assert h.item() == pytest.approx(1.0)


def test_shape_errors():
    a = torch.zeros(2, 3)
    with pytest.raises(ValueError):
        eu_plane_stats(a, torch.zeros(2, 4), torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError):
        eu_plane_stats(a, a, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError):  # one row per sample: 2-D
        eu_plane_stats(torch.zeros(6), torch.zeros(6), torch.ones(6, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------------------------------
# Segment (padding-free) form
# ---------------------------------------------------------------------------------------------------------------------


def test_segment_form_equals_padded_form():
    logps, ent, mask = _padded_example()
    # Concatenate the three rows into one padding-free row: row i -> segment i.
    flat_lp, flat_h, flat_m = logps.reshape(-1), ent.reshape(-1), mask.reshape(-1)
    seg = torch.arange(3).repeat_interleave(5)
    ppl_p, h_p = eu_plane_stats(logps, ent, mask)
    for shape in [(15,), (1, 15)]:
        ppl_s, h_s = _segment_stats(flat_lp.view(shape), flat_h.view(shape), flat_m.view(shape), seg.view(shape), 3)
        torch.testing.assert_close(ppl_s, ppl_p, equal_nan=True)
        torch.testing.assert_close(h_s, h_p, equal_nan=True)
    # default num_segments = max id + 1 = 3
    ppl_d, h_d = _segment_stats(flat_lp, flat_h, flat_m, seg)
    torch.testing.assert_close(ppl_d, ppl_p, equal_nan=True)
    torch.testing.assert_close(h_d, h_p, equal_nan=True)


def test_segment_form_hand_values_and_extra_segments():
    # segments: 0 -> positions 0..2, 1 -> 3..4, padding (-1) -> 5..6 (mask False there)
    # seg 0: response at 1,2: nll [1, 3] -> mean 2 -> e^2; entropy [1, 2] -> 1.5
    # seg 1: response at 4 only: nll 0.5 -> e^0.5; entropy 0.25
    # num_segments=4 -> segments 2 and 3 have no token -> NaN
    logps = torch.tensor([NAN, -1.0, -3.0, 7.0, -0.5, NAN, 100.0])
    ent = torch.tensor([NAN, 1.0, 2.0, 9.0, 0.25, INF, -3.0])
    mask = torch.tensor([False, True, True, False, True, False, False])
    seg = torch.tensor([0, 0, 0, 1, 1, -1, -1])
    ppl, h = _segment_stats(logps, ent, mask, seg, 4)
    assert ppl.shape == (4,)
    assert ppl[0].item() == pytest.approx(math.exp(2.0), rel=1e-6)
    assert ppl[1].item() == pytest.approx(math.exp(0.5), rel=1e-6)
    assert h[0].item() == pytest.approx(1.5, rel=1e-6)
    assert h[1].item() == pytest.approx(0.25, rel=1e-6)
    assert all(math.isnan(v) for v in ppl[2:].tolist() + h[2:].tolist())


def test_segment_negative_ids_ignored_with_finite_values():
    # A negative segment id is ignored even where the response mask is True (finite garbage).
    # seg 0: nll [1, 1] -> e^1; entropy [2, 2] -> 2
    logps = torch.tensor([-1.0, -1.0, -50.0])
    ent = torch.tensor([2.0, 2.0, 50.0])
    mask = torch.tensor([True, True, True])
    seg = torch.tensor([0, 0, -1])
    ppl, h = _segment_stats(logps, ent, mask, seg)
    assert ppl.shape == (1,)
    assert ppl.item() == pytest.approx(math.e, rel=1e-6)
    assert h.item() == pytest.approx(2.0, rel=1e-6)


@pytest.mark.parametrize(("bad", "bad_ent"), [(NAN, NAN), (-INF, INF)])
def test_segment_negative_ids_ignored_with_nonfinite_values(bad, bad_ent):
    # The docstring contract: "positions with a negative id (padding) are ignored". Hand value for segment 0:
    # nll [1, 1] -> PPL e^1 = 2.71828, entropy [2, 2] -> 2, whatever the ignored position holds.
    logps = torch.tensor([-1.0, -1.0, bad])
    ent = torch.tensor([2.0, 2.0, bad_ent])
    mask = torch.tensor([True, True, True])
    seg = torch.tensor([0, 0, -1])
    ppl, h = _segment_stats(logps, ent, mask, seg)
    assert ppl.item() == pytest.approx(math.e, rel=1e-6)
    assert h.item() == pytest.approx(2.0, rel=1e-6)


def test_segment_form_only_ignored_positions():
    # Every position has a negative id (a micro-batch made only of padding): there is no sample, so the result is two
    # empty (0,) tensors; with num_segments=2 both samples are empty -> NaN, NaN.
    logps = torch.tensor([-1.0, -2.0])
    ent = torch.tensor([1.0, 2.0])
    mask = torch.tensor([False, True])
    seg = torch.tensor([-1, -1])
    ppl, h = _segment_stats(logps, ent, mask, seg, 2)
    assert ppl.shape == (2,) and all(math.isnan(v) for v in ppl.tolist() + h.tolist())
    ppl, h = _segment_stats(logps, ent, mask, seg)
    assert ppl.shape == (0,) and h.shape == (0,)


# ---------------------------------------------------------------------------------------------------------------------
# segment_ids_from_position_ids
# ---------------------------------------------------------------------------------------------------------------------


def test_segment_ids_from_position_ids_basic():
    pos = torch.tensor([0, 1, 2, 0, 1, 0, 1, 2, 3])
    # each 0 starts a new sample: cumsum(pos==0) - 1
    expected = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    assert torch.equal(segment_ids_from_position_ids(pos), expected)
    out2d = segment_ids_from_position_ids(pos.view(1, -1))
    assert out2d.shape == (1, 9)
    assert torch.equal(out2d, expected.view(1, -1))


def test_segment_ids_from_position_ids_trailing_padding():
    # two real samples then pad_to_multiple_of padding that restarts at 0
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1]])
    assert torch.equal(segment_ids_from_position_ids(pos), torch.tensor([[0, 0, 0, 1, 1, 2, 2]]))
    assert torch.equal(segment_ids_from_position_ids(pos, num_segments=2), torch.tensor([[0, 0, 0, 1, 1, -1, -1]]))
    # padding made of several zero-position tokens: every 0 starts a segment, all beyond the cap become -1
    pos = torch.tensor([0, 1, 0, 0, 0])
    assert torch.equal(segment_ids_from_position_ids(pos), torch.tensor([0, 0, 1, 2, 3]))
    assert torch.equal(segment_ids_from_position_ids(pos, num_segments=2), torch.tensor([0, 0, 1, -1, -1]))
    # a cap at least as large as the number of segments changes nothing
    assert torch.equal(segment_ids_from_position_ids(pos, num_segments=10), torch.tensor([0, 0, 1, 2, 3]))


def test_segment_ids_feed_eu_plane_stats_with_padding():
    # sample 0: positions 0..2 (response 1..2, nll [2, 4] -> e^3, entropy [1, 3] -> 2)
    # sample 1: positions 3..4 (response 4, nll 1 -> e, entropy 5)
    # padding 5..6, response mask False there, garbage values
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1]])
    seg = segment_ids_from_position_ids(pos, num_segments=2)
    logps = torch.tensor([[0.0, -2.0, -4.0, 0.0, -1.0, NAN, INF]])
    ent = torch.tensor([[0.0, 1.0, 3.0, 0.0, 5.0, NAN, NAN]])
    mask = torch.tensor([[False, True, True, False, True, False, False]])
    ppl, h = _segment_stats(logps, ent, mask, seg, 2)
    assert ppl.tolist() == pytest.approx([math.exp(3.0), math.e], rel=1e-6)
    assert h.tolist() == pytest.approx([2.0, 5.0], rel=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# flat_to_padded / padded_to_flat
# ---------------------------------------------------------------------------------------------------------------------


def test_flat_to_padded_hand():
    values = torch.tensor([10.0, 11.0, 12.0, 20.0, 21.0, 30.0, 99.0])
    seg = torch.tensor([0, 0, 0, 1, 1, 2, -1])
    cols = torch.tensor([0, 1, 2, 0, 1, 0, 0])
    out = flat_to_padded(values, seg, cols, num_segments=3, fill=-1.0)
    expected = torch.tensor([[10.0, 11.0, 12.0], [20.0, 21.0, -1.0], [30.0, -1.0, -1.0]])
    assert torch.equal(out, expected)
    # default fill 0, an extra empty segment row
    out4 = flat_to_padded(values, seg, cols, num_segments=4)
    assert out4.shape == (4, 3)
    assert torch.equal(out4[3], torch.zeros(3))
    assert torch.equal(out4[1], torch.tensor([20.0, 21.0, 0.0]))


def test_flat_padded_round_trip_with_position_ids():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3, 0, 1]])
    seg = segment_ids_from_position_ids(pos, num_segments=3)  # last two positions are padding (-1)
    values = torch.arange(11, dtype=torch.float32).view(1, -1) * 1.5
    mat = flat_to_padded(values, seg, pos, num_segments=3, fill=-5.0)
    assert mat.shape == (3, 4)
    # row 0: values 0, 1.5, 3 ; row 1: 4.5, 6 ; row 2: 7.5, 9, 10.5, 12
    assert torch.equal(
        mat,
        torch.tensor([[0.0, 1.5, 3.0, -5.0], [4.5, 6.0, -5.0, -5.0], [7.5, 9.0, 10.5, 12.0]]),
    )
    back = padded_to_flat(mat, seg, pos, fill=-7.0)
    assert back.shape == (1, 11)
    expected = values.clone()
    expected[0, 9:] = -7.0  # padding positions get the fill
    assert torch.equal(back, expected)
    # bool round trip (masks)
    bmask = torch.tensor([[False, True, True, False, True, False, False, True, True, True, True]])
    bmat = flat_to_padded(bmask, seg, pos, num_segments=3, fill=False)
    assert bmat.dtype == torch.bool
    bback = padded_to_flat(bmat, seg, pos, fill=False)
    expected_b = bmask.clone()
    expected_b[0, 9:] = False
    assert torch.equal(bback, expected_b)


def test_padded_to_flat_out_of_range_column_gets_fill():
    mat = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    seg = torch.tensor([0, 0, 0, 1, -1])
    cols = torch.tensor([0, 1, 2, 1, 0])
    # (0,0)=1, (0,1)=2, column 2 out of range -> fill, (1,1)=4, segment -1 -> fill
    assert torch.equal(padded_to_flat(mat, seg, cols, fill=-1.0), torch.tensor([1.0, 2.0, -1.0, 4.0, -1.0]))


# ---------------------------------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------------------------------


@st.composite
def padded_batches(draw):
    b = draw(st.integers(1, 4))
    length = draw(st.integers(1, 7))
    mask = np.array(draw(st.lists(st.booleans(), min_size=b * length, max_size=b * length))).reshape(b, length)
    finite = st.floats(-8.0, 0.0, allow_nan=False)
    lp = np.array(draw(st.lists(finite, min_size=b * length, max_size=b * length))).reshape(b, length)
    ent = np.array(draw(st.lists(st.floats(0.0, 8.0), min_size=b * length, max_size=b * length))).reshape(b, length)
    garbage = st.sampled_from([NAN, INF, -INF, 1e30, -3.0, 0.0])
    glp = np.array(draw(st.lists(garbage, min_size=b * length, max_size=b * length))).reshape(b, length)
    gent = np.array(draw(st.lists(garbage, min_size=b * length, max_size=b * length))).reshape(b, length)
    return mask, lp, ent, glp, gent


@settings(max_examples=200, deadline=None)
@given(padded_batches())
def test_property_stats_reference_and_mask_invariance(batch):
    mask, lp, ent, glp, gent = batch
    ppl, h = eu_plane_stats(torch.tensor(lp), torch.tensor(ent), torch.tensor(mask))
    # reference in numpy, row by row
    for i in range(mask.shape[0]):
        m = mask[i]
        if m.sum() == 0:
            assert math.isnan(ppl[i].item()) and math.isnan(h[i].item())
        else:
            assert ppl[i].item() == pytest.approx(math.exp(float(np.mean(-lp[i][m]))), rel=1e-5, abs=1e-6)
            assert h[i].item() == pytest.approx(float(np.mean(ent[i][m])), rel=1e-5, abs=1e-5)
    # garbage at non-response positions changes nothing
    lp2 = np.where(mask, lp, glp)
    ent2 = np.where(mask, ent, gent)
    ppl2, h2 = eu_plane_stats(torch.tensor(lp2), torch.tensor(ent2), torch.tensor(mask))
    torch.testing.assert_close(ppl2, ppl, equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(h2, h, equal_nan=True, rtol=0, atol=0)
    # the segment form over the concatenated rows (plus a trailing padding segment) gives the same statistics
    b, length = mask.shape
    seg = np.concatenate([np.repeat(np.arange(b), length), -np.ones(3, dtype=np.int64)])
    flat_lp = np.concatenate([lp2.reshape(-1), [NAN, 5.0, -INF]])
    flat_ent = np.concatenate([ent2.reshape(-1), [INF, NAN, 1.0]])
    flat_m = np.concatenate([mask.reshape(-1), [False, False, False]])
    ppl3, h3 = _segment_stats(
        torch.tensor(flat_lp).view(1, -1), torch.tensor(flat_ent).view(1, -1), torch.tensor(flat_m).view(1, -1),
        torch.tensor(seg).view(1, -1), b,
    )
    # Summed in another order (per segment instead of per row) in float32: the mean NLL (up to 8) may differ by a few
    # 1e-6 in the worst case, and exp turns that into the same relative difference of the PPL (hypothesis found
    # 1.02e-6 at PPL ~1081), so 1e-6 is too tight; 1e-5 still catches a wrong segment or a leaked padding value.
    torch.testing.assert_close(ppl3, ppl, equal_nan=True, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h3, h, equal_nan=True, rtol=1e-5, atol=1e-6)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 5), min_size=1, max_size=6), st.integers(0, 3))
def test_property_flat_padded_round_trip(lengths, n_pad):
    # position ids of a padding-free row: each sample counts 0..len-1, then padding restarting at 0
    pos = np.concatenate([np.arange(n) for n in lengths] + ([np.arange(n_pad)] if n_pad else []))
    pos_t = torch.tensor(pos).view(1, -1)
    seg = segment_ids_from_position_ids(pos_t, num_segments=len(lengths))
    expected_seg = np.concatenate(
        [np.full(n, i) for i, n in enumerate(lengths)] + ([np.full(n_pad, -1)] if n_pad else [])
    )
    assert seg.view(-1).tolist() == expected_seg.tolist()
    values = torch.arange(pos.size, dtype=torch.float64).view(1, -1) + 0.5
    mat = flat_to_padded(values, seg, pos_t, num_segments=len(lengths), fill=-1.0)
    # width = largest column of a real (non-padding) position + 1 = longest sample
    assert mat.shape == (len(lengths), max(lengths))
    for i, n in enumerate(lengths):
        start = sum(lengths[:i])
        assert mat[i, :n].tolist() == (np.arange(start, start + n) + 0.5).tolist()
        assert (mat[i, n:] == -1.0).all()
    back = padded_to_flat(mat, seg, pos_t, fill=-2.0).view(-1).numpy()
    n_real = sum(lengths)
    assert back[:n_real].tolist() == (np.arange(n_real) + 0.5).tolist()
    assert (back[n_real:] == -2.0).all()


def test_padding_free_row_statistics_by_hand():
    """Position ids [0, 1, 2, 0, 1, 0] with 2 samples: positions 0-2 -> sample 0, 3-4 -> sample 1, 5 -> padding."""
    seg = segment_ids_from_position_ids(torch.tensor([0, 1, 2, 0, 1, 0]), num_segments=2)
    assert seg.tolist() == [0, 0, 0, 1, 1, -1]
    logps = torch.log(torch.tensor([0.5, 0.25, 1.0, 0.5, 0.5, 0.01]))
    entropy = torch.tensor([1.0, 3.0, 9.0, 2.0, 4.0, 7.0])
    mask = torch.tensor([False, True, True, True, True, True])
    ppl, ent = _segment_stats(logps, entropy, mask, seg, 2)
    # Sample 0: NLL {ln 4, 0} -> PPL exp(ln 4 / 2) = 2, ENT (3 + 9) / 2 = 6. Sample 1: NLL {ln 2, ln 2} -> PPL 2, ENT 3.
    torch.testing.assert_close(ppl, torch.tensor([2.0, 2.0]))
    torch.testing.assert_close(ent, torch.tensor([6.0, 3.0]))
