"""Pearson scores and their named failures."""

from __future__ import annotations

import math

import pytest

from safesail.interpret.scoring import ScoreUndefined, SegmentSim, pearson, score_segments


def test_pearson_known_vectors():
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # x = 1..4, y = 1,3,2,4: cov 3.0 / sqrt(5 * 5) = 0.8
    assert pearson([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    # invariant to the prediction's scale and offset (0..9 vs 0..10 scale)
    assert pearson([0, 0, 5, 1], [0, 1, 9, 2]) == pytest.approx(pearson([0, 0, 5, 1], [5, 15, 95, 25]))


@pytest.mark.parametrize("true,pred,code", [
    ([0.0, 1.0, 2.0], [3.0, 3.0, 3.0], "constant_prediction"),
    ([0.0, 0.0, 0.0], [1.0, 2.0, 3.0], "constant_true"),
    ([1.5], [2.0], "too_few_tokens"),
    ([], [], "too_few_tokens"),
    ([0.0, 1.0], [0.0, math.nan], "non_finite"),
])
def test_pearson_undefined_cases_are_named(true, pred, code):
    with pytest.raises(ScoreUndefined) as e:
        pearson(true, pred)
    assert e.value.code == code


def _seg(i, true, pred, failure=None):
    return SegmentSim(f"s{i}", "activating", [f"t{j}" for j in range(len(true))], true, pred, failure)


def test_score_concatenates_segments_and_records_failures():
    segs = [_seg(0, [0, 5, 1], [0, 9, 2]), _seg(1, [0, 0, 0], [0, 1, 0])]
    ls = score_segments(segs)
    assert ls.failure is None and ls.n_tokens == 6
    assert ls.score == pytest.approx(pearson([0, 5, 1, 0, 0, 0], [0, 9, 2, 0, 1, 0]))

    # A segment that failed to simulate fails the latent by default, with its reason ...
    segs.append(_seg(2, [3, 0], None, "unparsable_reply: no JSON object in the reply"))
    ls = score_segments(segs)
    assert ls.score is None
    assert ls.failure.startswith("segments_failed: 1 of 3") and "unparsable_reply" in ls.failure
    # ... unless the config accepts partial score sets: then it is scored on the rest.
    ls = score_segments(segs, min_ok_fraction=0.6)
    assert ls.failure is None and ls.n_tokens == 6
    rec = segs[2].as_record()
    assert rec["pred"] is None and rec["failure"].startswith("unparsable_reply")


def test_score_with_constant_prediction_is_a_failure_not_zero():
    ls = score_segments([_seg(0, [0, 3, 1], [0, 0, 0]), _seg(1, [2, 0], [0, 0])])
    assert ls.score is None and ls.failure.startswith("constant_prediction")
    assert score_segments([]).failure.startswith("no_score_segments")
    assert score_segments([_seg(0, [4.0], [3.0])]).failure.startswith("too_few_tokens")
