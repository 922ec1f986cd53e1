"""The tables behind the lessons' reveals: per Predict, the form of the answer, how close counts
as right, and the wrong answers learners typically give, each with the reason to print.

Why a package and not the notebook: a Check cell that lists the candidate answers next to their
reasons gives the right one away by elimination, one screen below the Predict. The Check cell
now names its Predict by key, ``reveal(my_x, derived, measured, key="2.2/rerun-order")``, and
the table lives here, one module per lesson notebook (``phase1.py`` for
``1_why_activations_eat_memory.ipynb``, ``phase3b.py`` for ``3b_pitfalls.ipynb``, ...), each
with a ``PREDICTS`` dict from key to `Predict`.

A typical wrong answer is a value or a rule: a function of the derived value and of the
``given`` numbers the Check cell passes (``lambda d, g: d - 4 * g["n_tensors"]``: the counters
forgotten). Each table's ``answer`` function recomputes the derived value from the package
alone, so the visibility test (tests/test_lesson_visibility.py) knows what must not be on screen
before the Predict without running the lesson; a lesson run with ``CKPT_COURSE_STRICT_TABLES=1``
fails when its derivation and its table's answer disagree.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field

FORMS = ("number", "count", "tuple", "set", "dict", "choice")
# Which module holds a key's table: the key's lesson prefix ("3b.2/..." -> phase3b).
LESSONS = ("1", "2", "3", "3b", "4", "4b")
KEY = re.compile(r"^(\d+[a-z]?)\.\d+/[a-z0-9-]+$")


@dataclass(frozen=True)
class Wrong:
    """A typical wrong answer: a value, or a rule ``(derived, given) -> value``; and its reason."""

    answer: object
    reason: str

    def value(self, derived, given: dict):
        return self.answer(derived, given) if callable(self.answer) else self.answer


@dataclass(frozen=True)
class Predict:
    """One Predict's table.

    form: "number" (a size, a ratio: any real), "count" (a whole number >= 0), "tuple", "set",
      "dict" or "choice" (one of ``choices``).
    tolerance: relative; within it of the target counts as right. It is the measurement's own
      spread (0 for the exact byte and FLOP counts).
    judge: "derivation", or "measured" where the lesson's point is that the measurement beats
      the model (the textbook figure closer to the measurement is then right).
    wrong: at least three typical wrong answers, tried before the generic over/under reasons.
    over, under: the lesson's reason for any other number above / below the target; other: for
      any other wrong answer of the right form (a tuple, a set, a choice).
    answer: the derived value, recomputed from the package (for the visibility test).
    given: the numbers the lesson passes to the rules, recomputed the same way (for the tests).
    example: how an answer of the right form looks, for the one-sentence form message.
    """

    what: str
    form: str
    wrong: tuple[Wrong, ...]
    unit: str = ""
    tolerance: float = 0.0
    judge: str = "derivation"
    choices: tuple = ()
    over: str = ""
    under: str = ""
    other: str = ""
    answer: Callable[[], object] | None = None
    given: Callable[[], dict] | None = None
    example: str = ""
    length: int | None = None  # a tuple's length, when the form says so
    keys: tuple = field(default=())  # a dict's keys

    def __post_init__(self):
        if self.form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {self.form!r}")
        if self.judge not in ("derivation", "measured"):
            raise ValueError(f"judge is 'derivation' or 'measured', got {self.judge!r}")
        if len(self.wrong) < 3:
            raise ValueError(f"{self.what}: a Predict needs at least three typical wrong answers")


class UnknownPredict(KeyError):
    """A key with no table: a KeyError whose message prints as a sentence, not a quoted key."""

    def __str__(self) -> str:
        return str(self.args[0])


def module_for(key: str) -> str:
    """The module name that holds a key's table: '2.2/rerun-order' -> 'phase2'."""
    match = KEY.match(key) if isinstance(key, str) else None
    if not match:
        raise UnknownPredict(f"a Predict key looks like '2.2/rerun-order' (section/name), got "
                             f"{key!r}")
    return f"phase{match.group(1)}"


def lookup(key: str) -> Predict:
    """The table of one Predict, by its key."""
    name = module_for(key)
    table = _table(name)
    if table is None:
        raise UnknownPredict(f"no table module ckpt_course/predicts/{name}.py for {key!r}")
    if key not in table:
        raise UnknownPredict(f"{key!r} is not in ckpt_course/predicts/{name}.py: add its table "
                             f"there")
    return table[key]


def all_tables() -> dict[str, Predict]:
    """Every Predict's table in the package, by key (the modules that exist)."""
    found: dict[str, Predict] = {}
    for lesson in LESSONS:
        found.update(_table(f"phase{lesson}") or {})
    return found


def _table(name: str) -> dict[str, Predict] | None:
    """A module's PREDICTS, or None where the module does not exist (an error inside it raises)."""
    try:
        return importlib.import_module(f"{__name__}.{name}").PREDICTS
    except ModuleNotFoundError as error:
        if error.name != f"{__name__}.{name}":
            raise
        return None
