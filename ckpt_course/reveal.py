"""Commit, then reveal: a lesson's Predict cell holds the learner's own answer (shipped as None);
after the measurement, `reveal` prints it next to the derivation and the measurement, with how far
off it was and the most likely reason.

A lesson's Check cell names its Predict by key: ``reveal(my_x, derived, measured,
key="2.2/rerun-order")``. The key's table (ckpt_course/predicts/) says the answer's form, the
tolerance that counts as right (the measurement's own), and the typical wrong answers with their
reasons, so no candidate answer sits in the notebook where the learner reads it before predicting.
`judge` decides, in this order: no answer; the wrong form (a string, a negative, NaN, another
shape: one sentence on the form expected); right (within the tolerance; a list for a tuple is
right); a typical wrong answer of the table; a unit slip, named only when the ratio is exactly
that unit's factor; else the table's over/under reason.

The older call with ``why={ratio: reason}`` (``likely_reason``) still works for the lessons not
moved to tables yet; it is deprecated. The lesson's assert never reads the learner's answer: it
compares the derivation with the measurement.
"""

from __future__ import annotations

import math
import os
from numbers import Real

from .predicts import Predict, lookup
from .units import shown

NO_PREDICTION = "no prediction made: type yours into the Predict cell next time, before running"
RIGHT = "right"
# A ratio within 10% of a bucket counts as that bucket: typical mistakes are whole factors.
BUCKET_TOLERANCE = 1.10
CLOSE_TOLERANCE = 0.02  # within 2% of the derivation: a small term was missed or added
BYTE_UNITS = {"B", "bytes", "KiB", "MiB", "GiB", "A", "act"}
BYTE_WHY: dict[float, str] = {  # typical slips when the answer is a size in memory
    4: "a factor of 4: bytes where float32 elements were meant (4 bytes each)",
    0.25: "you counted elements, not bytes (a float32 is 4 bytes)",
    1024: "a unit slip: KiB against bytes, or MiB against KiB (1024)",
    1 / 1024: "a unit slip: bytes against KiB, or KiB against MiB (1024)",
    2**20 / 10**6: "MiB against MB: 1 MiB is 1.048576 MB",
    10**6 / 2**20: "MB against MiB: 1 MB is 0.954 MiB",
}
DEFAULT_WHY: dict = {
    2: "you counted something twice: two names for one storage, or both of a pair",
    0.5: "you counted half: a forward or backward, a pair, or a tensor saved by two ops",
    "close": "close: a small term (a bias, a scalar, a counter) was missed or added",
    "over": "an over-estimate: which part of your count is not there? open the derivation",
    "under": "an under-estimate: which part did you leave out? open the derivation",
    "other": "not the derivation's answer: open the derivation and find the step you skipped",
}


def unanswered(yours) -> bool:
    return yours is None or yours is Ellipsis


def is_number(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def likely_reason(yours, derived, why: dict | None = None, unit: str = "") -> str:
    """The most likely reason a prediction differs from the derivation (RIGHT when it does not).

    For numbers, `why` maps a ratio yours / derived to a reason (merged over the defaults, and
    over BYTE_WHY when `unit` is a size); for choices it maps a wrong answer to its reason.
    """
    if why is not None and not isinstance(why, dict):
        raise TypeError(f"why must be a dict of typical mistakes, got {type(why).__name__}")
    sizes = BYTE_WHY if unit in BYTE_UNITS else {}
    reasons = {**DEFAULT_WHY, **sizes, **(why or {})}
    if unanswered(yours):
        return NO_PREDICTION
    if is_number(derived):
        if not is_number(yours):
            return f"the answer is a number; yours is a {type(yours).__name__}"
        if _finite(yours) is None:
            return f"the answer is a number; yours is {shown(yours)}, which no measurement gives"
        return _number_reason(float(yours), float(derived), reasons)
    if _same_choice(yours, derived):
        return RIGHT
    try:
        return reasons.get(_hashable(yours), reasons["other"])
    except TypeError:  # an unhashable answer of a shape the lesson did not ask for
        return reasons["other"]


def _number_reason(yours: float, derived: float, reasons: dict) -> str:
    if math.isclose(yours, derived, rel_tol=1e-9, abs_tol=1e-12):
        return RIGHT
    if derived == 0 or yours == 0 or (yours < 0) != (derived < 0):
        return reasons["over"] if yours > derived else reasons["under"]
    ratio = yours / derived
    if abs(ratio - 1) <= CLOSE_TOLERANCE:
        return reasons["close"]
    buckets = [k for k in reasons if is_number(k) and k > 0]
    nearest = min(buckets, key=lambda k: abs(math.log(ratio / k)), default=None)
    if nearest is not None and abs(math.log(ratio / nearest)) <= math.log(BUCKET_TOLERANCE):
        return reasons[nearest]
    return reasons["over"] if ratio > 1 else reasons["under"]


def _same_choice(yours, derived) -> bool:
    if isinstance(derived, set | frozenset) and isinstance(yours, list | tuple | set | frozenset):
        return set(yours) == derived
    if isinstance(yours, str) and isinstance(derived, str):
        return yours.strip().lower() == derived.strip().lower()
    if isinstance(derived, tuple) and isinstance(yours, list):
        yours = tuple(yours)
    return type(yours) is type(derived) and yours == derived


def _hashable(value):
    if isinstance(value, set):
        return frozenset(value)
    return tuple(value) if isinstance(value, list) else value


def describe_gap(yours, derived, unit: str = "") -> str:
    """How far off a number was: the ratio and the difference ('' when not comparable)."""
    if not (is_number(yours) and is_number(derived)) or yours == derived:
        return ""
    try:
        if not (math.isfinite(float(yours)) and math.isfinite(float(derived))):
            return ""  # nan or inf: no gap to show
    except OverflowError:  # a number beyond a float (10**400): no gap to show
        return ""
    diff = f"{yours - derived:+,.6g}{' ' + unit if unit else ''}"
    if derived == 0 or abs(yours / derived - 1) < 0.01:  # a ratio of x1 would say nothing
        return f"off by {diff}"
    return f"off by x{yours / derived:.3g} ({diff})"


def format_reveal(yours, derived, measured=None, *, what: str = "", unit: str = "",
                  why: dict | None = None) -> str:
    """The reveal's text: yours, the derivation, the measurement, the gap and its likely reason."""
    if not isinstance(unit, str) or not isinstance(what, str):
        raise TypeError("what and unit are labels: pass strings, e.g. unit='MiB'")
    suffix = f" {unit}" if unit else ""

    def show(value):
        return "-" if unanswered(value) else f"{_fmt(value)}{suffix if is_number(value) else ''}"

    head = f"{what}: " if what else ""
    lines = [f"{head}yours {show(yours)} | derivation {show(derived)}"
             + ("" if measured is None else f" | measured {show(measured)}")]
    reason = likely_reason(yours, derived, why, unit)
    gap = describe_gap(yours, derived, unit)
    lines.append(f"  {gap}: {reason}" if gap else f"  {reason}")
    return "\n".join(lines)


def _fmt(value) -> str:
    if is_number(value):
        if isinstance(value, float):
            return f"{value:,.6g}"
        return f"{value:,}" if abs(value) < 10**30 else shown(value)  # 10**400: its size
    if isinstance(value, set | frozenset):
        return "{" + ", ".join(sorted(map(repr, value))) + "}"
    return repr(value)


def reveal(yours, derived, measured=None, *, key: str | None = None, given: dict | None = None,
           what: str = "", unit: str = "", why: dict | None = None) -> None:
    """Print a prediction next to the derivation and the measurement, how far off and why.

    key names the Predict's table in ckpt_course/predicts/; given holds the lesson's numbers its
    rules read (e.g. ``given={"n_tensors": n_tensors}``). Without a key, ``what``, ``unit`` and
    ``why`` work as before (deprecated).
    """
    if key is None:
        print(format_reveal(yours, derived, measured, what=what, unit=unit, why=why))
        return
    if why is not None or what or unit:
        raise TypeError("with key=, the label, unit and typical mistakes come from the table: "
                        "drop what=, unit= and why=")
    entry = lookup(key)
    if os.environ.get(STRICT_ENV):
        check_table(key, entry, derived)
    print(format_judged(yours, derived, measured, entry, given or {}))


# ------------------------------------------------------------------ the tables' judge
STRICT_ENV = "CKPT_COURSE_STRICT_TABLES"
UNIT_FACTOR_TOLERANCE = 1e-3  # a unit slip is named only at the unit's own factor
BYTE_FACTORS: dict[float, str] = {
    4: "a factor of exactly 4: the 4 bytes of a float32 counted twice",
    1 / 4: "a factor of exactly 1/4: you counted float32 elements, not bytes (4 bytes each)",
    1024: "a factor of exactly 1024: a unit slip (KiB against bytes, or MiB against KiB)",
    1 / 1024: "a factor of exactly 1/1024: a unit slip (bytes against KiB, or KiB against MiB)",
    2**20 / 10**6: "a factor of exactly 1.048576: MiB where MB was meant (1 MiB = 1.048576 MB)",
    10**6 / 2**20: "a factor of exactly 0.9537: MB where MiB was meant (1 MB = 0.9537 MiB)",
    2**30 / 10**9: "a factor of exactly 1.0737: GiB where GB was meant (1 GiB = 1.0737 GB)",
    10**9 / 2**30: "a factor of exactly 0.9313: GB where GiB was meant (1 GB = 0.9313 GiB)",
}
MIB_UNIT_FACTORS: dict[float, str] = {  # answers asked in A (1 MiB) or MiB
    2**20: "that is bytes: the answer is asked in A, 1 A = 1 MiB = 1,048,576 bytes",
    1024: "that is KiB: the answer is asked in A, 1 A = 1 MiB = 1024 KiB",
    2**18: "that is float32 elements: the answer is asked in A, 1 A = 1 MiB = 262,144 floats",
}
OVER = "more than the derivation: which part of your count is not there? open the derivation"
CLOSE = ("close (within 2% of the derivation), and no typical mistake: which small term, "
         "a scalar, a counter or a bias, differs from the derivation's?")
OTHER = "not the derivation's answer: open the derivation and compare it item by item"
UNDER = "less than the derivation: which part did you leave out? open the derivation"


class FormError(ValueError):
    """An answer of the wrong form: its message is the one sentence to print."""


def judge(yours, derived, measured, entry: Predict, given: dict | None = None) -> str:
    """The reason to print for a prediction against a Predict's table (RIGHT when it is right)."""
    if unanswered(yours):
        return NO_PREDICTION
    try:
        mine = conform(yours, entry, derived)
    except FormError as error:
        return str(error)
    # the lesson's own value: a form error here is the lesson's, and raises
    target = conform(measured if entry.judge == "measured" and measured is not None else derived,
                     entry, derived)
    if same(mine, target, entry):
        return RIGHT
    typical = typical_reason(mine, derived, entry, given or {})
    if typical:
        return typical
    slip = unit_slip(mine, target, entry.unit) if entry.form == "number" else ""
    if slip:
        return slip
    if entry.form == "number" and target and abs(mine / target - 1) <= CLOSE_TOLERANCE:
        return CLOSE
    if is_number(mine) and is_number(target):  # a count that is a choice says why in `other`
        return (entry.over or entry.other or OVER) if mine > target else (
            entry.under or entry.other or UNDER)
    return entry.other or OTHER


def conform(value, entry: Predict, derived):
    """The answer in the table's form (a list for a tuple is fine), or FormError saying the form."""
    form = FORM_CHECKS[entry.form]
    return form(value, entry, derived)


def _number(value, entry: Predict, derived, kind: str = "a number"):
    unit = f" in {entry.unit}" if entry.unit else ""
    example = f", e.g. {entry.example}" if entry.example else ""
    expected = f"the answer is {kind}{unit}{example}"
    if isinstance(value, str):
        raise FormError(f"{expected}: yours is the text {value!r} (drop the quotes)")
    if not is_number(value):
        raise FormError(f"{expected}: yours is a {type(value).__name__}")
    if _finite(value) is None:
        shown = "too large for a float" if isinstance(value, int) else value
        raise FormError(f"{expected}: yours is {shown}, which no measurement gives")
    if value < 0:
        raise FormError(f"{expected}: yours is negative, and {entry.what} cannot be")
    return float(value)


def _finite(value) -> float | None:
    """The number as a finite float, None for NaN, infinity or an int past float's range."""
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _count(value, entry: Predict, derived):
    number = _number(value, entry, derived, kind="a whole number")
    if number != int(number):
        raise FormError(f"the answer is a whole number (a count): yours is {value}")
    return int(number)


def _tuple(value, entry: Predict, derived):
    length = entry.length or len(derived)
    expected = f"the answer is a tuple of {length} items" + (
        f", e.g. {entry.example}" if entry.example else "")
    if not isinstance(value, list | tuple):
        raise FormError(f"{expected}: yours is a {type(value).__name__}")
    if len(value) != length:
        raise FormError(f"{expected}: yours has {len(value)}")
    return tuple(_plain_item(v, expected) for v in value)


def _set(value, entry: Predict, derived):
    expected = "the answer is a set of names" + (f", e.g. {entry.example}" if entry.example else "")
    if isinstance(value, str) or not isinstance(value, list | tuple | set | frozenset):
        raise FormError(f"{expected}: yours is a {type(value).__name__}")
    names = frozenset(_plain_item(v, expected) for v in value)
    known = {_item(c) for c in entry.choices}
    if known and not names <= known:
        odd = sorted(map(repr, names - known))
        raise FormError(f"{expected} from {sorted(entry.choices)}: {', '.join(odd)} is not one")
    return names


def _dict(value, entry: Predict, derived):
    keys = tuple(entry.keys or derived)
    expected = f"the answer is a dict with the keys {list(keys)}" + (
        f", e.g. {entry.example}" if entry.example else "")
    if not isinstance(value, dict):
        raise FormError(f"{expected}: yours is a {type(value).__name__}")
    if set(value) != set(keys):
        raise FormError(f"{expected}: yours has {sorted(value, key=repr)}")
    if not all(is_number(v) and _finite(v) is not None and v >= 0 for v in value.values()):
        raise FormError(f"{expected}, each a number >= 0")
    return {k: float(value[k]) for k in keys}


def _choice(value, entry: Predict, derived):
    options = ", ".join(repr(c) for c in entry.choices)
    if not isinstance(value, str) or _item(value) not in {_item(c) for c in entry.choices}:
        raise FormError(f"the answer is one of {options}: yours is {value!r}")
    return _item(value)


FORM_CHECKS = {"number": _number, "count": _count, "tuple": _tuple, "set": _set, "dict": _dict,
               "choice": _choice}


def _item(value):
    """A name compares without case, surrounding blanks or torch's "aten." prefix; 4.0 is 4."""
    if isinstance(value, str):
        return value.strip().lower().removeprefix("aten.")
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _plain_item(value, expected: str):
    """One item of a learner's tuple or set: a name or a finite number, else the form's sentence
    (a nested list or set would raise unhashable, a 10**400 would overflow)."""
    if isinstance(value, str) or (is_number(value) and _finite(value) is not None):
        return _item(value)
    shown = "a number too large for a float" if is_number(value) else f"a {type(value).__name__}"
    raise FormError(f"{expected}, each item a name or a number: yours holds {shown}")


def same(mine, target, entry: Predict, tolerance: float | None = None) -> bool:
    """Equal within the table's tolerance (relative, for numbers and a dict's numbers)."""
    tol = entry.tolerance if tolerance is None else tolerance
    if is_number(mine) and is_number(target):
        return math.isclose(mine, target, rel_tol=max(tol, 1e-9), abs_tol=1e-12)
    if isinstance(mine, dict) and isinstance(target, dict):
        return mine.keys() == target.keys() and all(
            same(mine[k], target[k], entry, tol) for k in mine)
    return mine == target


def typical_reason(mine, derived, entry: Predict, given: dict) -> str:
    """The reason of the typical wrong answer that is yours, '' when none is.

    A rule matches its own value only: within the measurement's tolerance, or as a figure typed
    in rounded (0.33 for 1/3). A wider band would name the opposite mistake for a near miss
    (the loss counted as 8 bytes is not the loss forgotten). A set answer with no exact match
    gets the reason of the typical answer sharing most of its wrong members.
    """
    values = []
    for wrong in entry.wrong:
        try:
            values.append((conform(wrong.value(derived, given), entry, derived), wrong.reason))
        except FormError:
            continue  # a rule that gives no answer of this form at these sizes
    matches = [(abs(math.log(mine / value)) if is_number(mine) and mine and value else 0, reason)
               for value, reason in values
               if same(mine, value, entry) or _rounded_from(mine, value)]
    if matches:
        return min(matches)[1]
    if entry.form == "set":
        return _sharing_wrong_members(mine, conform(derived, entry, derived), values)
    return ""


def _rounded_from(mine, value) -> bool:
    """A typed-in figure with decimals that is the rule's value rounded to those decimals."""
    if not (isinstance(mine, float) and is_number(value)) or mine.is_integer():
        return False
    decimals = len(repr(mine).partition(".")[2])
    return "e" not in repr(mine) and round(value, decimals) == mine


def _sharing_wrong_members(mine: frozenset, target: frozenset, values: list) -> str:
    """The reason of the largest typical wrong set that yours contains, with only right members
    added ({"8 layers", "batch 1024"} makes the mistake {"8 layers"} makes), '' when none."""
    fits = [(len(value), -n, reason) for n, (value, reason) in enumerate(values)
            if value - target and value <= mine and mine - value <= target]
    return max(fits)[2] if fits else ""


def unit_slip(mine: float, target: float, unit: str) -> str:
    """A unit slip's name, only when yours / the target is exactly that unit's factor."""
    factors = BYTE_FACTORS if unit in ("B", "bytes") else (
        MIB_UNIT_FACTORS if unit in ("A", "MiB") else {})
    if not (mine and target):
        return ""
    ratio = mine / target
    for factor, reason in factors.items():
        if abs(ratio / factor - 1) <= UNIT_FACTOR_TOLERANCE:
            return reason
    return ""


def format_judged(yours, derived, measured, entry: Predict, given: dict | None = None) -> str:
    """The reveal's text for a Predict with a table."""
    suffix = f" {entry.unit}" if entry.unit else ""

    def show(value):
        return "-" if unanswered(value) else f"{_fmt(value)}{suffix if is_number(value) else ''}"

    line = f"{entry.what}: yours {show(yours)} | derivation {show(derived)}" + (
        "" if measured is None else f" | measured {show(measured)}")
    reason = judge(yours, derived, measured, entry, given)
    if reason == RIGHT and entry.tolerance:
        reason = f"right (within the measurement's spread, {entry.tolerance:.0%})"
    target = measured if entry.judge == "measured" and measured is not None else derived
    gap = describe_gap(yours, target, entry.unit) if _has_form(yours, entry, derived) else ""
    return f"{line}\n  {gap}: {reason}" if gap else f"{line}\n  {reason}"


def _has_form(yours, entry: Predict, derived) -> bool:
    """An answer of the expected form (a gap to a string or NaN would say nothing)."""
    try:
        conform(yours, entry, derived)
    except FormError:
        return False
    return not unanswered(yours)


def check_table(key: str, entry: Predict, derived) -> None:
    """Under CKPT_COURSE_STRICT_TABLES: the lesson's derivation must be its table's answer."""
    if entry.answer is None:
        return
    expected = conform(entry.answer(), entry, derived)
    if not same(conform(derived, entry, derived), expected, entry, 1e-9):
        raise AssertionError(f"{key}: the lesson derives {derived!r}, its table's answer() gives "
                             f"{expected!r}: update ckpt_course/predicts/ or the lesson")
