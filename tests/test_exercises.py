"""Every exercise set: generated notebooks are fresh; untouched exercises fail at each check and
nowhere else. (Solutions run through nbval in `make test`; the lessons in tests/lesson_runs.py.)"""

from pathlib import Path

import nbformat
import pytest
from grading_kit import reads_course_class

from ckpt_course.authoring import stale_notebooks, tagged_name

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "exercises" / "src").glob("*.py"))


def test_there_are_exercise_sources():
    assert SOURCES, "exercises/src holds no exercise source"


def test_generated_notebooks_are_fresh():
    stale = stale_notebooks(ROOT / "exercises" / "src", ROOT / "solutions", ROOT / "exercises")
    assert not stale, f"regenerate with `.venv/bin/ckpt-course build-exercises`: {stale}"


def cell_errors(path: Path) -> dict:
    """Run a notebook in a real kernel; {cell id: error name or None} for each code cell."""
    from lesson_runs import Client

    nb = nbformat.read(path, as_version=4)
    Client(nb, allow_errors=True, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    return {
        cell.id: next((o.ename for o in cell.outputs if o.output_type == "error"), None)
        for cell in nb.cells if cell.cell_type == "code"
    }


@pytest.mark.slow
@pytest.mark.parametrize("source", SOURCES, ids=[s.stem for s in SOURCES])
def test_untouched_exercise_fails_at_each_check_and_nowhere_else(source):
    path = ROOT / "exercises" / f"{source.stem}.ipynb"
    nb = nbformat.read(path, as_version=4)
    checks = {c.id for c in nb.cells if c.cell_type == "code" and tagged_name(c, "check")}
    errors = cell_errors(path)
    failing = {cell_id for cell_id, error in errors.items() if error}
    assert checks, f"{path.name} has no check cells"
    assert failing == checks, f"fails outside: {failing - checks}; passes: {checks - failing}"
    assert {errors[c] for c in checks} == {"NotImplementedError"}


@pytest.mark.slow
@reads_course_class
def test_the_grader_gives_every_solution_full_marks_and_every_stub_none(course_class):
    """The real grader (worker processes, secret seeds, RSS peaks) on what the course ships:
    each solution earns every point, each untouched exercise earns none (the session's one run
    of the course's exercises, tests/conftest.py)."""
    cards, unchanged = course_class
    assert unchanged
    graded = {key: card for key, card in cards.items() if key[0] != "build-it"}
    assert sorted(graded) == sorted((kind, s.stem) for kind in ("solutions", "exercises")
                                    for s in SOURCES)
    for (kind, _), card in graded.items():
        assert not card.error, (card.notebook, card.error)
        assert card.checks, card.notebook
        if kind == "solutions":
            assert card.full_marks, (card.notebook, [(c.name, c.hint) for c in card.checks
                                                     if not c.passed], card.notes)
        else:
            assert card.earned == 0, (card.notebook, [c.name for c in card.checks if c.passed])
