"""The reveal's reasons: a pure function from (yours, the derivation, the measurement, the
Predict's table). Every typical wrong answer of every table gets its own reason; an answer of
the wrong form gets one sentence on the form. The older ``why=`` path is tested at the top."""

import importlib
import math
import re

import pytest

from ckpt_course.predicts import Predict, Wrong, all_tables, lookup, module_for
from ckpt_course.reveal import (
    NO_PREDICTION,
    RIGHT,
    STRICT_ENV,
    describe_gap,
    format_judged,
    format_reveal,
    judge,
    likely_reason,
    reveal,
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


# ---------------------------------------------------------------- reveals by key, from tables

TABLES = all_tables()


@pytest.fixture(params=sorted(TABLES))
def table(request):
    entry = TABLES[request.param]
    return request.param, entry, entry.answer(), entry.given() if entry.given else {}


def test_every_typical_wrong_answer_prints_its_own_reason(table):
    key, entry, derived, given = table
    measured = given.get("measured", derived)  # a table judged by the clock gives a typical one
    for wrong in entry.wrong:
        text = format_judged(wrong.value(derived, given), derived, measured, entry, given)
        assert wrong.reason in text.splitlines()[1], f"{key}: {wrong.answer!r} read\n{text}"


def test_the_typical_wrong_answers_are_wrong_and_tell_apart(table):
    key, entry, derived, given = table
    measured = given.get("measured")
    reasons = [judge(w.value(derived, given), derived, measured, entry, given)
               for w in entry.wrong]
    assert RIGHT not in reasons, f"{key}: a typical wrong answer counts as right"
    assert [r == w.reason for r, w in zip(reasons, entry.wrong, strict=True)].count(True) >= 3


def test_the_right_answer_is_right_in_any_container_and_empty_says_so(table):
    key, entry, derived, given = table
    measured = given.get("measured", derived)
    assert judge(measured, derived, measured, entry, given) == RIGHT
    if isinstance(derived, tuple):
        assert judge(list(derived), derived, None, entry, given) == RIGHT  # a list for a tuple
    if isinstance(derived, set | frozenset):
        assert judge(sorted(derived), derived, None, entry, given) == RIGHT
        assert judge(tuple(derived), derived, None, entry, given) == RIGHT
    if isinstance(derived, str):
        assert judge(f"  {derived.upper()} ", derived, None, entry, given) == RIGHT
    assert judge(None, derived, None, entry, given) == NO_PREDICTION


def odd_forms(derived):
    """A string, a negative, NaN and another shape, for an answer of ``derived``'s form."""
    huge = 10**400  # too big for a float: OverflowError, never a traceback
    if isinstance(derived, int | float):
        return ["12", -abs(derived) - 1, math.nan, [derived, derived], {"a": 1}, huge, math.inf]
    if isinstance(derived, tuple):
        return ["(4, 4)", -1, math.nan, derived + derived, {1: 2}, huge,
                (huge,) * len(derived), ([1, 2],) * len(derived), ({"x"},) * len(derived)]
    if isinstance(derived, set | frozenset):
        return ["grads freed", -1, math.nan, {"no such name"}, {"a": 1}, huge,
                [sorted(derived)], [{"x"}], [{"a": 1}], [huge]]  # unhashable items
    if isinstance(derived, dict):
        return ["{4: 5}", -1, math.nan, [1, 2, 3, 4], {k: -1 for k in derived}, huge,
                {k: huge for k in derived}]
    return [12, -1, math.nan, ["a"], "zz", huge, [["a"]]]


def test_an_answer_of_the_wrong_form_gets_one_sentence_on_the_form(table):
    key, entry, derived, given = table
    for odd in odd_forms(derived):
        reason = judge(odd, derived, None, entry, given)
        assert format_judged(odd, derived, None, entry, given).splitlines()[1] == f"  {reason}"
        assert reason.startswith("the answer is "), f"{key}: {odd!r} read {reason!r}"
        assert not re.search(r"\w[.!?] [A-Z]", reason) and "\n" not in reason, "one sentence"


def test_every_table_has_a_key_of_its_module_and_an_answer():
    for key, entry in TABLES.items():
        module = importlib.import_module(f"ckpt_course.predicts.{module_for(key)}")
        assert module.PREDICTS[key] is entry is lookup(key)
        assert entry.answer is not None, f"{key}: no answer() for the visibility test"
    assert {k.split(".")[0] for k in TABLES} >= {"1", "2"}


def number_table(**kw):
    defaults = {"what": "bytes", "form": "number", "unit": "B", "wrong": (
        Wrong(lambda d, g: d - 4, "the loss scalar"), Wrong(0, "zero"), Wrong(1, "one"))}
    return Predict(**{**defaults, **kw})


def test_a_unit_slip_is_named_only_at_that_units_exact_factor():
    entry = number_table()
    d = 3 * 2**20
    assert "MB where MiB" in judge(3 * 10**6, d, None, entry)  # 3 MB typed for 3 MiB
    assert "1024" in judge(d * 1024, d, None, entry)
    assert "elements" in judge(d / 4, d, None, entry)
    for near in (0.9 * d, 0.97 * d, 1.03 * d, 1.1 * d, 3.9 * d):  # 2-15% off: no unit named
        reason = judge(near, d, None, entry)
        assert "MB" not in reason and "MiB" not in reason and "factor" not in reason
    assert judge(d - 4, d, None, entry) == "the loss scalar"  # the lesson's reason, not "close"
    assert "1 MiB" in judge(3 * 2**20, 3, None, number_table(unit="A"))  # bytes asked in A


def test_close_is_the_measurements_own_tolerance_and_the_measurement_can_be_the_judge():
    entry = number_table(unit="", tolerance=0.05, judge="measured", wrong=(
        Wrong(4 / 3, "the textbook 1.33: the measurement says otherwise"), Wrong(1, "no cost"),
        Wrong(2, "a whole step")))
    derived, measured = 1.33, 3.61
    assert judge(1.33, derived, measured, entry).startswith("the textbook 1.33")
    assert judge(3.5, derived, measured, entry) == RIGHT  # within the measurement's 5%
    assert "more than" in judge(4.5, derived, measured, entry)
    tight = number_table(unit="", tolerance=0.0)
    assert judge(1.001, 1.0, None, tight) != RIGHT


def test_a_negative_or_nan_is_a_form_not_an_under_estimate():
    entry = number_table()
    assert judge(-3, 5, None, entry).startswith("the answer is a number in B")
    assert "negative" in judge(-3, 5, None, entry)
    assert "nan" in judge(math.nan, 5, None, entry)
    assert "drop the quotes" in judge("5", 5, None, entry)


def test_a_table_needs_three_wrong_answers_and_a_known_form():
    with pytest.raises(ValueError, match="three"):
        number_table(wrong=(Wrong(0, "zero"),))
    with pytest.raises(ValueError, match="form"):
        number_table(form="float")
    with pytest.raises(KeyError, match="section/name"):
        lookup("rerun order")
    with pytest.raises(KeyError, match="add its table"):
        lookup("2.2/no-such-predict")


def test_reveal_by_key_prints_the_tables_label_and_strict_mode_checks_the_answer(
        capsys, monkeypatch):
    reveal([4, 4, 2, 2], (4, 4, 2, 2), (4, 4, 2, 2), key="2.2/rerun-order")
    out = capsys.readouterr().out
    assert out.startswith("re-run addmm in layers: yours [4, 4, 2, 2] | derivation (4, 4, 2, 2)")
    assert out.splitlines()[1] == "  right"
    with pytest.raises(TypeError, match="come from the table"):
        reveal(1, 2, key="2.2/kept-full", why={2: "x"})
    with pytest.raises(TypeError, match="come from the table"):
        reveal(1, 2, key="2.2/kept-full", unit="B")
    monkeypatch.setenv(STRICT_ENV, "1")
    reveal(None, 4, 4, key="2.2/kept-full")  # the lesson's derivation agrees with the table
    with pytest.raises(AssertionError, match="table's answer"):
        reveal(None, 5, 5, key="2.2/kept-full")


# Answers typed as a learner types them: rounded, in another unit, another container, a short
# op name. Each must get the reason of the mistake it makes (or "right").
TYPED = [
    ("1.1/adamw-state", lambda g: 2 * 4 * g["n_params"], "counter"),
    ("1.1/adamw-state", lambda g: 16 * g["n_params"], "parameters + gradients"),
    ("1.1/adamw-state", lambda g: 4 * g["n_params"], "two moments"),
    ("1.1/batch-ratio", lambda g: 2, RIGHT),
    ("1.1/7b-params", lambda g: 6.7e9, RIGHT),
    ("1.1/7b-params", lambda g: 7e9, "rounded name"),
    ("1.2/blocks-bytes", lambda g: 4 * 4.02 * 2**20, RIGHT),  # read off the printed MiB
    ("1.2/blocks-bytes", lambda g: g["block_tape"].activation_bytes, "one block"),
    ("1.3/saving-bytes", lambda g: g["dropout_block"], "keeps block 1's input"),
    ("1.4/best-n", lambda g: 4.0, RIGHT),
    ("1.4/peak-at-4", lambda g: 4, "rebuilt layers"),
    ("1.4/gpt-best-n", lambda g: 3, "sqrt(L)"),
    ("2.1/tape-activations", lambda g: 5 * 2**20, "that is bytes"),
    ("2.1/saved-none", lambda g: 4 * 2**20, "loss scalar"),
    ("2.2/rerun-order", lambda g: [4, 3, 2, 1], "re-runs whole"),
    ("2.3/full-share", lambda g: 0.33, "1/3 assumes"),
    ("2.3/full-share", lambda g: 4 / 11, RIGHT),
    ("2.3/full-share", lambda g: 0.36, RIGHT),
    ("2.4/peak-at", lambda g: ["backward", 2, "sum"], RIGHT),
    ("2.4/peak-at", lambda g: ("forward", 4, "relu"), "end of forward"),
    ("2.5/every2-lowers", lambda g: ["grads freed", "8 layers, grads freed"], "batch of 1024"),
    ("2.5/walk-every2", lambda g: {4: 6, 3: 6, 2: 6, 1: 6}, "before h1 is rebuilt"),
]


@pytest.mark.parametrize("key, typed, reason", TYPED, ids=[f"{k}-{i}" for i, (k, _, _)
                                                            in enumerate(TYPED)])
def test_answers_typed_as_learners_type_them_get_the_mistakes_reason(key, typed, reason):
    entry = lookup(key)
    given = entry.given() if entry.given else {}
    got = judge(typed(given), entry.answer(), None, entry, given)
    assert got == RIGHT if reason == RIGHT else reason in got, f"{key}: {got!r}"


# Issue 18 follow-up: a typical wrong answer matches its own value only (a rounded figure typed
# in, 0.33 for 1/3, still matches); a near-miss in the other direction gets its own reason.
NEAR_MISSES = [
    ("2.1/saved-none", lambda g: 4 * 2**20 + 8, "loss scalar is float32: 4 bytes, not 8"),
    ("2.1/saved-none", lambda g: 4 * 2**20 + 4 + 12, "close (within 2%"),
    ("1.1/adamw-state", lambda g: 8 * g["n_params"] + 8 * g["n_tensors"], "counters as 8-byte"),
    ("1.1/adamw-state", lambda g: 8 * g["n_params"] + 4 * g["n_tensors"] + 4, "close (within 2%"),
    ("1.1/adamw-state", lambda g: 8 * g["n_params"], "also keeps a `step` counter"),
    ("1.4/best-n", lambda g: 3, "a smaller N"),
    ("1.4/best-n", lambda g: 5, "a larger N"),
    ("1.4/best-n", lambda g: 6, "where the two terms meet"),
    ("2.5/every2-lowers", lambda g: {"8 layers", "batch 1024"}, "deeper alone does not help"),
    ("2.5/every2-lowers", lambda g: {"8 layers", "grads freed"}, "deeper alone does not help"),
]


@pytest.mark.parametrize("key, typed, reason", NEAR_MISSES,
                         ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(NEAR_MISSES)])
def test_a_near_miss_gets_its_own_reason_not_the_opposite_mistakes(key, typed, reason):
    entry = lookup(key)
    given = entry.given() if entry.given else {}
    got = judge(typed(given), entry.answer(), None, entry, given)
    assert reason in got, f"{key}: {got!r}"
    wrong_reasons = {w.reason for w in entry.wrong if reason not in w.reason}
    assert got not in wrong_reasons, f"{key}: {typed(given)!r} named another mistake: {got!r}"


def test_no_tables_form_example_is_its_answer(table):
    """The form sentence shows the example before the reveal: it must never be the answer."""
    key, entry, derived, given = table
    try:
        example = eval(entry.example, {"__builtins__": {}})  # noqa: S307 - our own table text
    except (NameError, SyntaxError):
        return  # a formula in the lesson's names ("3 * 4 * B * T * C"): not a value
    for measured in {None, given.get("measured")}:
        assert judge(example, derived, measured, entry, given) != RIGHT, f"{key}: {example!r}"
