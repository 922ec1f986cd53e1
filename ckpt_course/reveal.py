"""Commit, then reveal: a lesson's Predict cell holds the learner's own answer (shipped as None);
after the measurement, `reveal` prints it next to the derivation and the measurement, with how far
off it was and the most likely reason.

The reason comes from `likely_reason`, a pure function: for numbers it buckets the ratio
yours / derived (x4 and x0.25: bytes against float32 elements; x2: a tensor counted twice, ...);
a lesson adds its own typical mistakes with `why={ratio: reason}`. For a choice (a name, a
bool, a tuple, a set) `why` maps a wrong answer to its reason. The lesson's assert never reads
the learner's answer: it compares the derivation with the measurement.
"""

from __future__ import annotations

import math
from numbers import Real

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
        return f"{value:,.6g}" if isinstance(value, float) else f"{value:,}"
    if isinstance(value, set | frozenset):
        return "{" + ", ".join(sorted(map(repr, value))) + "}"
    return repr(value)


def reveal(yours, derived, measured=None, *, what: str = "", unit: str = "",
           why: dict | None = None) -> None:
    """Print a prediction next to the derivation and the measurement (see format_reveal)."""
    print(format_reveal(yours, derived, measured, what=what, unit=unit, why=why))
