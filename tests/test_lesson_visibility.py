"""Nothing on screen gives a Predict's answer away before the learner commits.

Each lesson is read as JupyterLab 4.6 shows it: markdown in full, visible code in full, only the
first line of a cell whose source is hidden (``jupyter.source_hidden``), and nothing under a
collapsed heading (``jp-MarkdownHeadingCollapsed``, the key JupyterLab 4 reads and writes; the
classic ``heading_collapsed`` is not honoured by it) but the heading itself. The window runs from
the top down to each Predict cell and one screen (40 lines) below it.

A learner who runs the lesson top-down also sees what the cells printed: the outputs of every
cell above a Predict, and of those between it and its Check (a lesson run before, or run ahead).
The slow test reads them in the session's one run of each lesson (tests/lesson_runs.py; read as
if every Predict were left None), all of them, collapsed or not: a learner opens Go deeper.

The answers come from the Predict tables (``ckpt_course/predicts/``): each table's ``answer()``
recomputes the derived value from the package in a second, with no kernel, so the source test
needs no notebook run; CKPT_COURSE_STRICT_TABLES=1 (set by the session's run) makes each reveal
check that the lesson's derivation gives the same value. Sources and outputs are searched by one
matcher (tests/answer_forms.py): a value is found in any printed form (1234, 1,234, 1.2 KiB, a
ratio to 2-3 digits, a literal, an assignment that folds to it).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import lesson_runs
import nbformat
import pytest
from answer_forms import as_container, leaks, normal, number_forms
from lesson_runs import LessonRun, as_shipped

from ckpt_course.predicts import lookup

ROOT = Path(__file__).resolve().parents[1]
LESSONS = sorted((ROOT / "notebooks").glob("*.ipynb"))
SCREEN_LINES = 40
COLLAPSED = "jp-MarkdownHeadingCollapsed"
HEADING = re.compile(r"^(#{1,6})\s", re.M)


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


def answer_leaks(key: str, lines: list[str]) -> list[str]:
    """Where ``lines`` show the answer of the Predict ``key`` (none for an answer read off a
    clock: it has no fixed value to look for)."""
    entry = lookup(key)
    if entry.answer is None:
        return []
    return leaks(lines, entry.answer(), entry)


def lesson_leaks(nb) -> list[str]:
    return [f"cell {i} ({key}): {where}" for i, keys, text in predict_windows(nb)
            for key in keys for where in answer_leaks(key, text)]


# ---------------------------------------------------------------- what the cells printed
def check_cell(nb, i: int) -> int:
    """The Check of Predict cell i: the first cell after it that reveals one of its answers."""
    mine = set(re.findall(r"^(my_\w+)\s*=", nb.cells[i].source, re.M))
    return next(j for j in range(i + 1, len(nb.cells)) if nb.cells[j].cell_type == "code"
                and revealed(nb.cells[j].source) & mine)


def revealed(source: str) -> set[str]:
    return {call.args[0].id for call in ast.walk(ast.parse(source))
            if isinstance(call, ast.Call) and getattr(call.func, "id", "") == "reveal"
            and call.args and isinstance(call.args[0], ast.Name)}


def printed(cell) -> list[str]:
    """A code cell's outputs as text: what it printed, its result, an error's message."""
    text = []
    for out in cell.get("outputs", []):
        if out.output_type == "stream":
            text.append(out.text)
        elif out.output_type in ("execute_result", "display_data"):
            text += [out.data[kind] for kind in ("text/plain", "text/markdown")
                     if kind in out.data]
        elif out.output_type == "error":
            text.append(f"{out.ename}: {out.evalue}")
    return "\n".join(text).splitlines()


# An earlier reveal that prints the same number as another quantity, under its own label: 3.2's
# 12 bytes per parameter and its 12 GPUs. The label says what the number is; no leak.
SAME_NUMBER_ELSEWHERE = {"3.2/gpus-full": ("3.2/bytes-per-param",)}


def output_leaks(nb) -> list[str]:
    """Per Predict: the outputs of every cell above it, and of those between it and its Check,
    that show its answer (a learner who ran the lesson sees them before committing)."""
    problems = []
    for i, keys, _ in predict_windows(nb):
        before_check = [j for j in range(check_cell(nb, i)) if j != i]
        for key in keys:
            labels = tuple(f"{lookup(k).what}: yours " for k in SAME_NUMBER_ELSEWHERE.get(key, ()))
            for j in before_check:
                lines = [line for line in printed(nb.cells[j]) if not line.startswith(labels)]
                problems += [f"cell {i} ({key}): {where} in the output of cell {j}"
                             for where in answer_leaks(key, lines)]
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


@pytest.mark.slow
@pytest.mark.parametrize("path", lesson_runs.each(LESSONS))
def test_no_output_above_a_predict_shows_its_answer(path, lesson_run):
    """The lesson run once (the session's run, read as if every Predict were left None): no
    output of a cell above a Predict, or between it and its Check, shows the Predict's answer."""
    assert output_leaks(as_shipped(lesson_run(path))) == []


@pytest.mark.slow
@lesson_runs.on(HAND_TRACE)
def test_a_lesson_that_prints_an_answer_above_its_predict_fails(lesson_run):
    """The session's run of lesson 2 (a copy, read as shipped), with one cell added above 2.1's
    second Predict that printed its answer (4 A + the loss scalar, in bytes): found, by cell."""
    nb = as_shipped(lesson_run(HAND_TRACE))
    predict = first_cell(nb, "my_saved_none = ")  # the run typed a wrong answer here
    nb.cells.insert(predict, nbformat.v4.new_code_cell(
        'print(f"forward will leave {4 * A + LOSS:,} bytes alive")', outputs=[
            nbformat.v4.new_output("stream", name="stdout",
                                   text="forward will leave 4,194,308 bytes alive\n")]))
    found = output_leaks(nb)
    assert any("'4,194,308' in the output of cell " + str(predict) in f for f in found), found
    assert output_leaks(as_shipped(lesson_run(HAND_TRACE))) == []  # the added cell, only


def test_as_shipped_reads_a_typed_answer_as_none():
    typed = nbformat.v4.new_code_cell(outputs=[nbformat.v4.new_output(
        "stream", name="stdout", text="intro 16\nsaved: yours 8 B | derivation 12 B\n"
                                      "  off by x0.667 (-4 B): the reason\nafter\n")])
    nb = nbformat.v4.new_notebook(cells=[typed])
    shown = as_shipped(LessonRun(nb, {}, {"saved": 8})).cells[0].outputs[0].text
    assert shown == ("intro 16\nsaved: yours - | derivation 12 B\n"
                     "  no prediction made: type yours into the Predict cell next time, "
                     "before running\nafter\n")
    assert nb.cells[0].outputs[0].text.startswith("intro 16\nsaved: yours 8 B")  # kept


def test_an_answer_is_matched_as_a_whole_number_not_inside_a_longer_one():
    """A clock-made '12,345 tokens/s' or '1.12x' must not read as the answer 12; '12 bytes'
    must (the output check once failed at random on a measured throughput)."""
    entry = lookup("3.2/bytes-per-param")
    assert leaks(["12 bytes per parameter"], 12, entry)
    assert leaks(["that is 12."], 12, entry)
    for text in ("12,345 tokens/s", "1.12x", "+12%", "12.5 ms", "3,12"):
        assert not leaks([text], 12, entry), text
