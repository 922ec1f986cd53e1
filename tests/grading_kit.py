"""What the grader's tests share: the self-test exercise built into a course folder, and
learners' notebooks made from it."""

import shutil
from pathlib import Path

import nbformat

from ckpt_course import authoring
from ckpt_course.authoring import tagged_name

FIXTURES = Path(__file__).parent / "fixtures" / "src"
CHECKS = ["0.1-bytes", "0.2-tape", "0.3-double"]
POINTS = {"0.1-bytes": 2.0, "0.2-tape": 1.0, "0.3-double": 1.0}
RIGHT = {"0.1-bytes": "def predicted_bytes(batch, width):\n    return 4 * batch * width",
         "0.2-tape": "def saved_tensor_count(layers):\n    return 2 * layers",
         "0.3-double": "def doubled(x):\n    return 2 * x"}
STUB = "raised NotImplementedError: Exercise {}: replace this line with your answer"


def build_course(root: Path) -> Path:
    """tests/fixtures/src/*.py built into root/exercises (with src/) and root/solutions."""
    (root / "exercises").mkdir(parents=True)
    shutil.copytree(FIXTURES, root / "exercises" / "src")
    authoring.build_all(root / "exercises" / "src", root / "solutions", root / "exercises")
    return root


def learner(course: Path, answers=(), drop=(), checks=(), stem="0_selftest"):
    """The pristine exercise with answers filled in, cells dropped (by tag), checks rewritten."""
    nb = nbformat.read(course / "exercises" / f"{stem}.ipynb", as_version=4)
    answers, checks = dict(answers), dict(checks)
    kept = []
    for cell in nb.cells:
        if set(cell.metadata.get("tags", [])) & set(drop):
            continue
        if tagged_name(cell, "answer") in answers:
            cell.source = answers[tagged_name(cell, "answer")]
        if tagged_name(cell, "check") in checks:
            cell.source = checks[tagged_name(cell, "check")]
        kept.append(cell)
    nb.cells = kept
    return nb


def save(nb, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


def results(card) -> dict[str, float]:
    return {c.name: c.earned for c in card.checks}


def hints(card) -> dict[str, str]:
    return {c.name: c.hint for c in card.checks}
