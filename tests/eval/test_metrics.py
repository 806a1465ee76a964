"""MCIT metrics equal hand-computed values; ragged and square inputs agree."""
import math

import numpy as np
import pytest

from cram_ray.eval.metrics import confusion, routing_accuracy, summarize

# a[t][i]: score on task i after training task t
RAGGED = [
    [80.0],
    [60.0, 90.0],
    [40.0, 70.0, 50.0],
]


def test_summarize_known_matrix():
    got = summarize(RAGGED)
    # MFT: diagonal 80, 90, 50 -> 220 / 3
    assert got["mft"] == pytest.approx(220 / 3)
    # MFN: last row 40, 70, 50 -> 160 / 3
    assert got["mfn"] == pytest.approx(160 / 3)
    # MAA: row means 80, (60+90)/2 = 75, (40+70+50)/3 = 160/3 -> (80 + 75 + 160/3) / 3
    assert got["maa"] == pytest.approx((80 + 75 + 160 / 3) / 3)
    # BWT over the two earlier tasks: (40 - 80) + (70 - 90) = -60, / 2 = -30
    assert got["bwt"] == pytest.approx(-30.0)
    assert set(got) == {"mft", "mfn", "maa", "bwt"}


def test_square_inputs_agree_with_ragged():
    want = summarize(RAGGED)
    square_none = [[80.0, None, None], [60.0, 90.0, None], [40.0, 70.0, 50.0]]
    square_nan = np.array([[80.0, np.nan, np.nan], [60.0, 90.0, np.nan], [40.0, 70.0, 50.0]])
    # values above the diagonal (zero-shot scores on future tasks) are ignored
    square_full = np.array([[80.0, 11.0, 12.0], [60.0, 90.0, 13.0], [40.0, 70.0, 50.0]])
    for m in (square_none, square_nan, square_full, square_nan.tolist()):
        assert summarize(m) == pytest.approx(want)


def test_single_task_stream():
    got = summarize([[72.5]])
    assert got == {"mft": 72.5, "mfn": 72.5, "maa": 72.5, "bwt": 0.0}
    assert summarize(np.array([[0.3]]))["bwt"] == 0.0


def test_no_forgetting_gives_zero_bwt_and_equal_metrics():
    m = [[50.0], [50.0, 70.0], [50.0, 70.0, 90.0]]
    got = summarize(m)
    assert got["bwt"] == 0.0
    assert got["mft"] == got["mfn"] == pytest.approx(70.0)


def test_missing_entries_are_rejected():
    with pytest.raises(ValueError, match=r"row 1"):
        summarize([[1.0], [2.0]])
    with pytest.raises(ValueError, match=r"\[1\]\[0\]"):
        summarize([[1.0, None], [None, 2.0]])
    with pytest.raises(ValueError, match="at least one row"):
        summarize([])


def test_results_are_plain_floats():
    got = summarize(np.array([[1, 0], [1, 1]]))
    assert all(type(v) is float and math.isfinite(v) for v in got.values())


def test_routing_accuracy_and_confusion():
    true = [0, 0, 0, 1, 1, 2]
    routed = [0, 0, 1, 1, 2, 2]
    assert routing_accuracy(routed, true) == pytest.approx(4 / 6)
    assert confusion(routed, true, 3) == [
        [2, 1, 0],  # task 0: two routed home, one to expert 1
        [0, 1, 1],
        [0, 0, 1],
    ]


def test_routing_rejects_bad_input():
    with pytest.raises(ValueError, match="as many"):
        routing_accuracy([0, 1], [0])
    with pytest.raises(ValueError, match="at least one"):
        routing_accuracy([], [])
    with pytest.raises(ValueError, match="outside 0..1"):
        confusion([2], [0], 2)
