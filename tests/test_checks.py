import pytest

from ckpt_course.checks import CheckFailed, expect, expect_peak_near


def test_a_failed_check_shows_its_hint_not_the_checkers_code():
    with pytest.raises(CheckFailed) as failure:
        expect(False, "you counted the weights as activations")
    rendered = failure.value._render_traceback_()
    assert rendered == ["CheckFailed: you counted the weights as activations"]
    expect(True, "never raised")


# ------------------------------------------------ a memory claim, judged on given peaks
def _runs(mine, reference=100, none=200, again=None):
    digest = {"digest": "same"}
    return {"mine": {"peak": mine, **digest}, "reference": {"peak": reference, **digest},
            "none": {"peak": none, **digest}, "again": again}


def _again(*rounds):
    """Re-measurements that give these (mine, reference, none) peaks, one round per call."""
    given = iter(rounds)

    def again():
        mine, reference, none = next(given)
        return _runs(mine, reference, none)
    return again


def test_a_peak_within_a_quarter_of_the_gap_passes_without_measuring_again():
    expect_peak_near(_runs(125, again=_again()), "kept too much")  # no round left to give


def test_a_peak_near_the_line_is_measured_twice_more_and_judged_by_medians():
    # one noisy first round (40% of the gap), two quiet ones (5%): the medians pass
    expect_peak_near(_runs(140, again=_again((105, 100, 200), (105, 100, 200))), "kept too much")
    # the reference's noise counts too: a low first reference, then normal ones
    expect_peak_near(_runs(140, reference=60, again=_again((110, 100, 200), (112, 100, 200))),
                     "kept too much")
    with pytest.raises(CheckFailed, match="kept too much"):  # a real 40%: every round agrees
        expect_peak_near(_runs(140, again=_again((141, 100, 200), (139, 100, 200))),
                         "kept too much")


def test_a_peak_like_no_mechanism_fails_at_once():
    with pytest.raises(CheckFailed, match="kept too much"):
        expect_peak_near(_runs(195, again=_again()), "kept too much")


def test_a_different_result_fails_whatever_the_peak():
    runs = _runs(100, again=_again())
    runs["mine"]["digest"] = "other"
    with pytest.raises(CheckFailed, match="differs from the reference"):
        expect_peak_near(runs, "kept too much")
