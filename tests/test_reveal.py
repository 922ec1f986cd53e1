"""The reveal's reasons: a pure function from (yours, derived, the lesson's typical mistakes)."""

import pytest

from ckpt_course.reveal import (
    NO_PREDICTION,
    RIGHT,
    describe_gap,
    format_reveal,
    likely_reason,
)


@pytest.mark.parametrize("empty", [None, ...])
def test_an_empty_prediction_says_so(empty):
    assert likely_reason(empty, 12) == NO_PREDICTION
    text = format_reveal(empty, 12, 12, what="bytes per parameter", unit="B")
    assert NO_PREDICTION in text and "derivation 12 B | measured 12 B" in text


def test_the_right_number_is_right_whatever_its_type():
    assert likely_reason(12, 12.0) == RIGHT
    assert likely_reason(4 / 11, 4 / 11) == RIGHT


def test_byte_slips_are_named_only_when_the_answer_is_a_size():
    assert "elements, not bytes" in likely_reason(250, 1000, unit="B")
    assert "1024" in likely_reason(1000 * 1024, 1000, unit="B")
    assert "MB" in likely_reason(10**6, 2**20, unit="B")
    # a count off by 4x is no unit slip
    assert likely_reason(1, 4) == likely_reason(1, 4, unit="layers")
    assert "under-estimate" in likely_reason(1, 4)


def test_a_lessons_own_mistakes_win_within_ten_percent_of_their_ratio():
    why = {0.5: "AdamW keeps two moments per parameter"}
    assert likely_reason(52, 100, why) == why[0.5]  # 0.52 is within 10% of 0.5
    assert likely_reason(60, 100, why) != why[0.5]  # 0.6 is not
    assert "twice" in likely_reason(200, 100)  # the default for x2
    assert likely_reason(200, 100, {2: "the output h4 is no input"}) == "the output h4 is no input"


def test_a_near_miss_is_close_and_a_lesson_can_say_which_small_term():
    assert "close" in likely_reason(4 * 2**20, 4 * 2**20 + 4, unit="B")
    assert likely_reason(99, 100, {"close": "the loss scalar"}) == "the loss scalar"


def test_wrong_sign_or_zero_falls_back_to_over_or_under():
    assert "over-estimate" in likely_reason(2, 0)
    assert likely_reason(2, 0, {"over": "torch never re-runs it"}) == "torch never re-runs it"
    assert "under-estimate" in likely_reason(-3, 5)


def test_choices_match_loosely_and_wrong_ones_get_their_reason():
    assert likely_reason(" Full ", "full") == RIGHT
    assert likely_reason(["mm", "sdpa"], {"mm", "sdpa"}) == RIGHT
    assert likely_reason([4, 4, 2, 2], (4, 4, 2, 2)) == RIGHT
    why = {frozenset({"mm"}): "SDPA costs FLOPs too", (4, 3, 2, 1): "a region re-runs whole"}
    assert likely_reason({"mm"}, {"mm", "sdpa"}, why) == "SDPA costs FLOPs too"
    assert likely_reason([4, 3, 2, 1], (4, 4, 2, 2), why) == "a region re-runs whole"
    assert "not the derivation's answer" in likely_reason({1: 2}, {1: 3}, why)  # unhashable


def test_a_learners_type_slip_is_a_reason_not_an_error():
    assert "is a str" in likely_reason("12", 12)
    assert "is a bool" in likely_reason(True, 12)


def test_the_gap_gives_ratio_and_difference_and_the_lesson_asks_right():
    assert describe_gap(250, 1000, "B") == "off by x0.25 (-750 B)"
    assert describe_gap(1000, 1004, "B") == "off by -4 B"  # a ratio of x1 says nothing
    assert describe_gap(2, 0) == "off by +2"
    assert describe_gap(5, 5) == describe_gap("a", "b") == ""
    with pytest.raises(TypeError, match="dict"):
        likely_reason(1, 2, why=[(0.5, "half")])
    with pytest.raises(TypeError, match="labels"):
        format_reveal(1, 2, unit=4)
