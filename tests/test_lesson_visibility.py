"""Nothing on screen gives a Predict's answer away before the learner commits.

Each lesson is read as JupyterLab 4.6 shows it: markdown in full, visible code in full, only the
first line of a cell whose source is hidden (``jupyter.source_hidden``), and nothing under a
collapsed heading (``jp-MarkdownHeadingCollapsed``, the key JupyterLab 4 reads and writes; the
classic ``heading_collapsed`` is not honoured by it) but the heading itself. Outputs are not
read: the lessons ship without them. The window runs from the top down to each Predict cell and
one screen (40 lines) below it.

The answers come from the Predict tables (``ckpt_course/predicts/``): each table's ``answer()``
recomputes the derived value from the package in a second, with no kernel, so this test needs no
notebook run and no file another test wrote; CKPT_COURSE_STRICT_TABLES=1 (set by the lessons'
wrong-prediction test) makes each reveal check that the lesson's derivation gives the same value.

A value is found in any printed form: 1234, 1,234, 1_234, 1.2 KiB / MiB / GiB and MB, a ratio
to 2 or 3 digits (0.36, 0.364, 36%, 4/11), a list, tuple, dict or set literal (in any of these
containers), or an assignment in visible code whose right side folds to it (``2 + 2 + 8``).
Single-digit whole numbers are found only by the last two rules: as text they are everywhere.
"""

from __future__ import annotations

import ast
import math
import re
from fractions import Fraction
from pathlib import Path

import nbformat
import pytest

from ckpt_course.predicts import Predict, lookup
from ckpt_course.units import GiB, KiB, MiB

ROOT = Path(__file__).resolve().parents[1]
LESSONS = sorted((ROOT / "notebooks").glob("*.ipynb"))
SCREEN_LINES = 40
COLLAPSED = "jp-MarkdownHeadingCollapsed"
HEADING = re.compile(r"^(#{1,6})\s", re.M)
BRACKETED = re.compile(r"[\[\(\{][^\[\]\(\)\{\}]*[\]\)\}]")
BYTE_UNITS = {"B", "bytes"}


# ---------------------------------------------------------------- what the learner sees
def visible(nb, opened: int | None = None) -> list[tuple[int, str]]:
    """(cell index, line) as JupyterLab shows the notebook, collapsed parts folded, except the
    collapsed heading a learner opened to reach cell ``opened`` (a Predict in a Go deeper)."""
    lines: list[tuple[int, str]] = []
    hidden_below = None  # the level of the collapsed heading we are under
    for i, cell in enumerate(nb.cells):
        level = heading_level(cell)
        if hidden_below is not None:
            if level is None or level > hidden_below:
                continue
            hidden_below = None
        source = cell.source.splitlines()
        if cell.cell_type == "markdown":
            lines += [(i, line) for line in source]
            if (level is not None and cell.metadata.get(COLLAPSED)
                    and not (opened is not None and i < opened <= section_end(nb, i, level))):
                hidden_below = level
        elif cell.cell_type == "code":
            if cell.metadata.get("jupyter", {}).get("source_hidden"):
                source = source[:1]
            lines += [(i, line) for line in source]
    return lines


def section_end(nb, start: int, level: int) -> int:
    """The last cell under the heading at ``start`` (up to a heading of ``level`` or above)."""
    for j in range(start + 1, len(nb.cells)):
        below = heading_level(nb.cells[j])
        if below is not None and below <= level:
            return j - 1
    return len(nb.cells) - 1


def heading_level(cell) -> int | None:
    if cell.cell_type != "markdown":
        return None
    levels = [len(m.group(1)) for m in HEADING.finditer(cell.source)]
    return min(levels) if levels else None


def predict_windows(nb) -> list[tuple[int, list[str], list[str]]]:
    """Per Predict cell: its index, its keys, and the lines visible up to one screen below it."""
    windows = []
    for i, cell in enumerate(nb.cells):
        if "predict" not in cell.metadata.get("tags", []):
            continue
        shown = visible(nb, opened=i)
        last = max(k for k, (j, _) in enumerate(shown) if j == i)
        text = [line for _, line in shown[:last + 1 + SCREEN_LINES]]
        windows.append((i, keys_of(nb, i), text))
    return windows


def keys_of(nb, i: int) -> list[str]:
    """The table keys the reveals of Predict cell i's answers name (in the cells after it)."""
    mine = set(re.findall(r"^(my_\w+)\s*=", nb.cells[i].source, re.M))
    keys = []
    for cell in nb.cells[i + 1:]:
        if cell.cell_type != "code":
            continue
        for call in ast.walk(ast.parse(cell.source)):
            if (isinstance(call, ast.Call) and getattr(call.func, "id", "") == "reveal"
                    and call.args and getattr(call.args[0], "id", "") in mine):
                key = next((k.value.value for k in call.keywords if k.arg == "key"), None)
                keys.append(key)
    return keys


# ---------------------------------------------------------------- the answer's printed forms
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
            if re.search(rf"(?<![\w.]){re.escape(form)}(?![\w%]|\.\d)", text):
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


def answer_of(key: str):
    entry = lookup(key)
    return entry, entry.answer()


def lesson_leaks(nb) -> list[str]:
    problems = []
    for i, keys, text in predict_windows(nb):
        for key in keys:
            if lookup(key).answer is None:  # derived from a clock: no fixed value to look for
                continue
            entry, value = answer_of(key)
            problems += [f"cell {i} ({key}): {where}" for where in leaks(text, value, entry)]
    return problems


# ---------------------------------------------------------------- the tests
@pytest.mark.parametrize("path", LESSONS, ids=[p.stem for p in LESSONS])
def test_no_answer_is_on_screen_before_its_predict(path):
    nb = nbformat.read(path, as_version=4)
    keys = [k for _, ks, _ in predict_windows(nb) for k in ks]
    if None in keys:
        pytest.skip(f"{path.name}: a reveal with no key= (not on a Predict table yet)")
    assert keys, f"{path.name}: no Predict revealed by key"
    assert lesson_leaks(nb) == []


HAND_TRACE = ROOT / "notebooks" / "2_hand_trace_a_checkpointed_net.ipynb"


def first_cell(nb, text: str, start: int = 0) -> int:
    return next(i for i, c in enumerate(nb.cells) if i >= start and text in c.source)


def derivation_after(nb, text: str) -> int:
    start = first_cell(nb, text)
    return next(i for i, c in enumerate(nb.cells)
                if i > start and "derivation" in c.metadata.get("tags", []))


def broken(edit) -> list[str]:
    nb = nbformat.read(HAND_TRACE, as_version=4)  # a fresh copy, in memory: the file is kept
    edit(nb)
    return lesson_leaks(nb)


def test_a_lesson_broken_on_purpose_fails():
    def derivation_first_line(nb):  # 2.2's collapsed derivation opens with the answer
        i = derivation_after(nb, "my_reruns = None")
        nb.cells[i].source = "predicted_reruns = [4, 4, 2, 2]\n" + nb.cells[i].source

    def prose_above(nb):  # prose that states 2.3's result
        i = first_cell(nb, "my_full_share = None")
        nb.cells.insert(i, nbformat.v4.new_markdown_cell("A re-run costs 36% of a step."))

    def folded(nb):  # an innocent-looking constant that is 2.1's answer in bytes
        i = first_cell(nb, "my_saved_none = None")
        nb.cells[i].source = f"SAVED = 4 * {2**20} + 4\n" + nb.cells[i].source

    def megabytes(nb):
        i = first_cell(nb, "my_saved_none = None")
        nb.cells.insert(i, nbformat.v4.new_markdown_cell("forward leaves 4.00 MiB alive"))

    for edit, where in [(derivation_first_line, "the literal [4, 4, 2, 2]"),
                        (prose_above, "'36%'"), (folded, "an assignment of 4194308"),
                        (megabytes, "'4.00 MiB'")]:
        found = broken(edit)
        assert any(where in f for f in found), f"{edit.__name__}: found only {found}"


def test_what_jupyterlab_hides_is_not_read():
    def hidden_second_line(nb):  # a collapsed cell shows its first line only
        i = derivation_after(nb, "my_reruns = None")
        nb.cells[i].source = "# Derivation\npredicted_reruns = [4, 4, 2, 2]\n"
        nb.cells[i].metadata["jupyter"] = {"source_hidden": True}

    def under_collapsed_heading(nb):  # a collapsed "Go deeper" hides the cells under it
        i = first_cell(nb, "my_full_share = None")
        nb.cells[i:i] = [
            nbformat.v4.new_markdown_cell("### Go deeper", metadata={COLLAPSED: True}),
            nbformat.v4.new_markdown_cell("A re-run costs 36% of a step."),
            nbformat.v4.new_markdown_cell("### Your prediction")]  # the same level: shown

    for edit in (hidden_second_line, under_collapsed_heading):
        assert broken(edit) == [], edit.__name__


def test_number_forms_cover_the_ways_a_size_and_a_ratio_print():
    size = number_forms(4 * 2**20 + 4, "B")
    assert {"4194308", "4,194,308", "4.00 MiB", "4.2 MB"} <= size
    ratio = number_forms(4 / 11, "")
    assert {"0.36", "0.364", "36%", "4/11"} <= ratio
    assert number_forms(5, "A") == set()  # a digit alone is everywhere in the text
    assert normal([4, 4, 2, 2]) == normal((4, 4, 2, 2))
    assert as_container(["grads freed"]) & as_container({"grads freed"})
