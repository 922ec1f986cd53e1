"""The answer's printed forms, and where a text shows one: the matcher the visibility tests share.

tests/test_lesson_visibility.py reads a lesson's sources (as JupyterLab shows them) and, run once,
its outputs; both ask the same question of a list of lines: does it show this Predict's answer?
A value is found in any printed form: 1234, 1,234, 1_234, 1.2 KiB / MiB / GiB and MB, a ratio
to 2 or 3 digits (0.36, 0.364, 36%, 4/11), a list, tuple, dict or set literal (in any of these
containers), or an assignment whose right side folds to it (``2 + 2 + 8``). Single-digit whole
numbers are found only by the last two rules: as text they are everywhere.
"""

from __future__ import annotations

import ast
import math
import re
from fractions import Fraction

from ckpt_course.predicts import Predict
from ckpt_course.units import GiB, KiB, MiB

BRACKETED = re.compile(r"[\[\(\{][^\[\]\(\)\{\}]*[\]\)\}]")
BYTE_UNITS = {"B", "bytes"}


def number_forms(value: float, unit: str) -> set[str]:
    """How a number can be printed: whole, with separators, in binary or decimal units, or as
    a ratio to 2-3 digits, a percentage or a small fraction."""
    forms: set[str] = set()
    if float(value).is_integer():
        n = int(value)
        if abs(n) >= 10:
            forms |= {str(n), f"{n:,}", f"{n:_}"}
    else:
        forms |= {f"{value:.2g}", f"{value:.3g}", f"{value:.2f}", f"{value:.3f}"}
        if 0 < value < 1:
            forms |= {f"{100 * value:.0f}%", f"{100 * value:.1f}%"}
            frac = Fraction(value).limit_denominator(32)
            if math.isclose(frac, value, rel_tol=1e-9) and frac.denominator > 1:
                forms |= {f"{frac.numerator}/{frac.denominator}",
                          f"{frac.numerator} / {frac.denominator}"}
    if unit in BYTE_UNITS and value >= KiB:
        for name, size in (("KiB", KiB), ("MiB", MiB), ("GiB", GiB), ("KB", 1e3), ("MB", 1e6),
                           ("GB", 1e9)):
            if value >= size:
                forms |= {f"{value / size:.{d}f} {name}" for d in (1, 2)}
                forms |= {f"{value / size:.{d}g} {name}" for d in (2, 3)}
    return forms


def normal(value):
    """A container's content, whatever the container: lists and tuples alike, names caseless."""
    if isinstance(value, str):
        return value.strip().lower()
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and float(value).is_integer():
        return int(value)
    if isinstance(value, list | tuple):
        return tuple(normal(v) for v in value)
    if isinstance(value, set | frozenset):
        return frozenset(normal(v) for v in value)
    if isinstance(value, dict):
        return frozenset((normal(k), normal(v)) for k, v in value.items())
    return value


def as_container(value):
    """Equal-content forms: a set may be typed as a list or tuple."""
    forms = {normal(value)}
    if isinstance(value, set | frozenset | list | tuple):
        forms.add(frozenset(normal(v) for v in value))
    return forms


def literals(text: str):
    """Every bracketed literal in a text (code or prose) that Python can read."""
    for match in BRACKETED.finditer(text):
        try:
            yield ast.literal_eval(match.group(0))
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue


def folded_assignments(lines: list[str]):
    """The values of one-line assignments that derive: literal arithmetic on the right
    (``2 + 2 + 8``), or any literal given to a ``predicted_*`` name. A plain ``B = 4`` is a
    setting the learner needs, not an answer."""
    for line in lines:
        try:
            tree = ast.parse(line.strip())
        except SyntaxError:
            continue
        for node in tree.body:
            if not isinstance(node, ast.Assign | ast.AnnAssign) or node.value is None:
                continue
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            named = any(getattr(t, "id", "").startswith("predicted") for t in targets)
            if named or isinstance(node.value, ast.BinOp):
                value = fold(node.value)
                if value is not None:
                    yield value


def fold(node):
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
        return node.value
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add | ast.Sub | ast.Mult | ast.Div
                                                  | ast.Pow | ast.FloorDiv):
        left, right = fold(node.left), fold(node.right)
        if left is None or right is None:
            return None
        try:
            return {ast.Add: left + right, ast.Sub: left - right, ast.Mult: left * right,
                    ast.Pow: left ** right if abs(right) < 64 else None,
                    ast.Div: left / right if right else None,
                    ast.FloorDiv: left // right if right else None}[type(node.op)]
        except (OverflowError, ZeroDivisionError):
            return None
    try:
        return ast.literal_eval(node)
    except (ValueError, SyntaxError, TypeError):
        return None


def leaks(lines: list[str], value, entry: Predict) -> list[str]:
    """The places in ``lines`` where ``value`` is shown, each as a short description."""
    found = []
    text = "\n".join(lines)
    if isinstance(value, int | float) and not isinstance(value, bool):
        for form in number_forms(float(value), entry.unit):
            # a whole token: not a digit run inside 1.12, +12%, 12.5 or 12,345 (a measured
            # tokens/s or a byte count that merely starts with the answer's digits)
            if re.search(rf"(?<![\w.,]){re.escape(form)}(?![\w%]|[.,]\d)", text):
                found.append(f"the number as {form!r}")
    wanted = as_container(value)
    for literal in literals(text):
        if as_container(literal) & wanted and not isinstance(literal, int | float | str):
            found.append(f"the literal {literal!r}")
    for folded in folded_assignments(lines):
        if (isinstance(folded, int | float) and isinstance(value, int | float)
                and math.isclose(folded, value, rel_tol=1e-9)) or (
                not isinstance(folded, int | float) and as_container(folded) & wanted):
            found.append(f"an assignment of {folded!r}")
    return found
