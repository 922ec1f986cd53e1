"""One source makes both notebooks: the exercise a learner fills in and its solution.

Like nbgrader or numpy-100, each phase of the course is written once, as a percent-format
Python file (jupytext "py:percent"), e.g. `exercises/src/1_why_activations.py`:

    # %% [markdown]
    # ## 1.2 How many bytes does the tape keep?

    # %% tags=["answer:1.2-tape"]
    def predicted_tape_bytes(batch, width):
        ### BEGIN SOLUTION
        return 4 * batch * width
        ### END SOLUTION

    # %% tags=["check:1.2-tape"]
    from ckpt_course import checks
    checks.tape_bytes(predicted_tape_bytes)

Conventions
- An *answer cell* is a code cell tagged `answer:<name>`. Inside it, every region between
  `### BEGIN SOLUTION` and `### END SOLUTION` is the solution. The solution notebook keeps the
  region (without the marker lines); the exercise notebook replaces it with one line,
  `raise NotImplementedError("Exercise <name>: ...")`, indented like the BEGIN marker.
  Regions must sit inside a function body: an answer cell only *defines* functions, so an
  untouched exercise runs its answer cells fine and fails in its check cells, never before.
  `build` refuses a region that would run at the top level of the cell.
- A *check cell* is a code cell tagged `check:<name>` (and optionally `points:<N>`, default 1);
  it is one call `checks.<check>(<name>, ...)` of `ckpt_course.checks`. In the exercise it is
  locked (not editable, not deletable) as a courtesy; the grader reads the pristine one anyway
  (see grading.py).
- Names are letters, digits, `.`, `_` and `-`, unique per file. Every other cell is copied as is.
- Cell metadata other than `tags`, `jupyter` and `slideshow` is dropped (jupytext's own
  layout keys would otherwise leak in).

What `build` writes
- `solutions/<stem>.ipynb` and `exercises/<stem>.ipynb`: no outputs, no execution counts, a
  python3 kernelspec (so JupyterLab opens them without a "Select Kernel" dialog), and fixed
  cell ids (`answer-<name>`, `check-<name>`, `cell-<index>`). The bytes are the same on every
  build, so `stale_notebooks()` / `check_fresh()` can compare regenerated notebooks with the
  committed ones.
- The notebook metadata `ckpt_course` records the exercise stem and `cells_sha256`, a
  fingerprint of the cells (type, id, tags, source) as built. A notebook whose cells still
  match its fingerprint is pristine; one that does not has been edited.

Workflow
- Authors edit `exercises/src/*.py`, then `ckpt-course build-exercises` (build_all).
- Learners work in copies of the exercises, in `my-course/exercises/` (made by `make lab`, see
  workcopy.py), and grade with `ckpt-course grade`. `reset_exercises` resets an exercises folder
  in place, moving edited notebooks to backups that never replace a file.
  A rebuild never destroys their work: an exercise notebook is overwritten only when it is
  absent or still pristine. An edited one makes `build` stop and say so; move it elsewhere
  (your answers keep working there) or pass `force=True` / `--force` to overwrite it.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
from pathlib import Path

import nbformat

KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
KEPT_METADATA = ("tags", "jupyter", "slideshow")
NAME = re.compile(r"[A-Za-z0-9._-]+")


class AuthoringError(ValueError):
    """A source that breaks the conventions, or a build that would destroy someone's work."""


# ---------------------------------------------------------------- reading cells


def tagged_name(cell, prefix: str) -> str | None:
    """The <name> of a cell tagged `<prefix>:<name>` (prefix 'answer' or 'check'), else None."""
    metadata = cell.get("metadata", {}) if isinstance(cell, dict) else {}
    tags = metadata.get("tags", []) if isinstance(metadata, dict) else []
    for tag in tags if isinstance(tags, list) else []:
        if isinstance(tag, str) and tag.startswith(prefix + ":"):
            return tag[len(prefix) + 1 :]
    return None


def cell_id(kind: str, name: str) -> str:
    """A valid nbformat cell id (letters, digits, - and _) that names the exercise."""
    return f"{kind}-" + re.sub(r"[^A-Za-z0-9_-]", "-", name)


def cells_sha256(nb) -> str:
    """Fingerprint of what a learner could change: each cell's type, id, tags and source."""
    parts = [
        [c.cell_type, c.get("id"), c.get("metadata", {}).get("tags", []), c.source]
        for c in nb.cells
    ]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def is_pristine(nb) -> bool:
    """True when a built notebook's cells are still exactly as `build` wrote them."""
    recorded = nb.get("metadata", {}).get("ckpt_course", {}).get("cells_sha256")
    return recorded is not None and recorded == cells_sha256(nb)


# ---------------------------------------------------------------- solution regions


def split_solution(source: str, name: str) -> tuple[str, str]:
    """An answer cell's source -> (solution source, exercise source)."""
    solution, exercise, stub_lines = [], [], []
    begin_line = None
    for number, line in enumerate(source.splitlines(), start=1):
        marker = line.strip()
        if marker == BEGIN:
            if begin_line is not None:
                raise AuthoringError(f"answer {name}, line {number}: {BEGIN} inside a region")
            begin_line = number
            indent = line[: len(line) - len(line.lstrip())]
            exercise.append(f'{indent}raise NotImplementedError("Exercise {name}: '
                            'replace this line with your answer")')
            stub_lines.append(len(exercise))
        elif marker == END:
            if begin_line is None:
                raise AuthoringError(f"answer {name}, line {number}: {END} without {BEGIN}")
            begin_line = None
        else:
            solution.append(line)
            if begin_line is None:
                exercise.append(line)
    if begin_line is not None:
        raise AuthoringError(f"answer {name}, line {begin_line}: {BEGIN} is never closed")
    if not stub_lines:
        raise AuthoringError(f"answer {name} has no {BEGIN} ... {END} region")
    solution_source, exercise_source = "\n".join(solution), "\n".join(exercise)
    _parse(solution_source, f"answer {name} (solution)")
    top_level = _top_level_lines(_parse(exercise_source, f"answer {name} (exercise)"))
    top_level &= set(stub_lines)
    if top_level:
        raise AuthoringError(
            f"answer {name}: the solution region at exercise line {min(top_level)} runs when the "
            "cell runs. Put it inside a function (def ...), so that an untouched exercise fails "
            "in its check cell and not in the answer cell."
        )
    return solution_source, exercise_source


def _parse(text: str, where: str) -> ast.AST:
    try:
        return ast.parse(text)
    except SyntaxError as e:
        raise AuthoringError(f"{where}, line {e.lineno}: {e.msg}") from e


def _top_level_lines(tree: ast.AST) -> set[int]:
    """Lines of statements that run when the cell runs (not inside a def or lambda)."""
    lines, todo = set(), [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            continue
        if isinstance(node, ast.stmt):
            lines.add(node.lineno)
        todo.extend(ast.iter_child_nodes(node))
    return lines


# ---------------------------------------------------------------- notebooks


def read_source(source: str | Path):
    """Parse a percent-format source into a notebook (jupytext imported only when needed)."""
    import jupytext  # slow to import (about 1 s): keep it off the grader's fast path

    return jupytext.read(Path(source), fmt="py:percent")


def render(source: str | Path) -> tuple[object, object]:
    """A source file -> (solution notebook, exercise notebook), in memory."""
    source = Path(source)
    parsed = read_source(source)
    solution, exercise = _empty_notebook(), _empty_notebook()
    seen_ids = set()
    for index, cell in enumerate(parsed.cells):
        metadata = {k: v for k, v in cell.metadata.items() if k in KEPT_METADATA}
        answer, check = tagged_name(cell, "answer"), tagged_name(cell, "check")
        if answer is not None and check is not None:
            raise AuthoringError(f"{source}: cell {index} is tagged both answer and check")
        name = answer if answer is not None else check
        if name is not None and not NAME.fullmatch(name):
            raise AuthoringError(f"{source}: bad exercise name {name!r}: use letters, digits, .-_")
        points = tagged_name(cell, "points")
        if points is not None and (check is None or not _positive(points)):
            raise AuthoringError(f"{source}: cell {index}: points:{points} must be a positive "
                                 "number on a check cell")
        if (answer or check) and cell.cell_type != "code":
            raise AuthoringError(f"{source}: {name} is tagged on a markdown cell; tag a code cell")
        new_id = cell_id("answer" if answer else "check", name) if name else f"cell-{index:02d}"
        if new_id in seen_ids:
            raise AuthoringError(f"{source}: two cells get the id {new_id}: rename one exercise")
        seen_ids.add(new_id)

        if answer is not None:
            solution_text, exercise_text = split_solution(cell.source, answer)
        elif BEGIN in cell.source or END in cell.source:
            raise AuthoringError(f"{source}: cell {index} has solution markers but no "
                                 '`tags=["answer:<name>"]`')
        else:
            solution_text = exercise_text = cell.source
        for nb, text in ((solution, solution_text), (exercise, exercise_text)):
            nb.cells.append(_new_cell(cell.cell_type, new_id, text, metadata))
        if check is not None:
            exercise.cells[-1].metadata.update(editable=False, deletable=False)

    for nb, role in ((solution, "solution"), (exercise, "exercise")):
        nb.metadata["ckpt_course"] = {"exercise": source.stem, "role": role,
                                      "cells_sha256": cells_sha256(nb)}
        nbformat.validate(nb)
    return solution, exercise


def _positive(text: str) -> bool:
    try:
        return 0 < float(text) < float("inf")
    except ValueError:
        return False


def exercise_notebook(source: str | Path):
    """The pristine exercise notebook of a source, in memory (what the grader runs)."""
    return render(source)[1]


def _empty_notebook():
    nb = nbformat.v4.new_notebook()
    nb.metadata = {"kernelspec": dict(KERNELSPEC), "language_info": {"name": "python"}}
    return nb


def _new_cell(cell_type: str, cell_id_: str, source: str, metadata: dict):
    make = nbformat.v4.new_code_cell if cell_type == "code" else nbformat.v4.new_markdown_cell
    cell = make(source=source, metadata=json.loads(json.dumps(metadata)))
    cell.id = cell_id_
    return cell


def to_text(nb) -> str:
    """Same notebook, same bytes: nbformat sorts keys and indents by 1; end with a newline."""
    return nbformat.writes(nb) + "\n"


# ---------------------------------------------------------------- building


def targets(source, solutions_dir, exercises_dir) -> tuple[Path, Path]:
    name = Path(source).stem + ".ipynb"
    return Path(solutions_dir) / name, Path(exercises_dir) / name


def build(source, solutions_dir="solutions", exercises_dir="exercises", force=False) -> list[Path]:
    """Write solutions/<stem>.ipynb and exercises/<stem>.ipynb; return the paths written.

    Files already up to date are not touched (their mtime stays). A notebook someone has edited
    (an exercise with a learner's answers, a solution edited by hand) is never overwritten unless
    `force` is true; both are checked before either is written.
    """
    planned = _planned(source, solutions_dir, exercises_dir, force)
    return _write(planned)


def _planned(source, solutions_dir, exercises_dir, force) -> list[tuple[Path, str]]:
    """The notebooks `source` builds, with their text; AuthoringError, before any write, for one
    that someone has edited (unless `force`)."""
    solution, exercise = render(source)
    solution_path, exercise_path = targets(source, solutions_dir, exercises_dir)
    planned = [(solution_path, to_text(solution)), (exercise_path, to_text(exercise))]
    for path, text in planned:
        if not force and not _safe_to_replace(path, text):
            raise AuthoringError(
                f"{path} has edits that are not in {source} (someone's answers?), so the "
                f"build left it alone. Move it elsewhere to keep it (e.g. `mv {path} "
                f"my_work/`) and build again, or pass force=True (--force) to overwrite it."
            )
    return planned


def _write(planned: list[tuple[Path, str]]) -> list[Path]:
    written = []
    for path, text in planned:
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            written.append(path)
    return written


def _safe_to_replace(path: Path, new_text: str) -> bool:
    """Absent, identical, or still pristine since the build that wrote it."""
    if not path.exists():
        return True
    try:
        old_text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeError):  # not text we can read: someone's file, leave it
        return False
    if old_text == new_text:
        return True
    try:
        return is_pristine(nbformat.reads(old_text, as_version=4))
    except Exception:  # not a notebook we can read: someone's file, leave it
        return False


def sources(src_dir="exercises/src") -> list[Path]:
    found = sorted(p for p in Path(src_dir).glob("*.py") if not p.name.startswith("_"))
    if not found:
        raise AuthoringError(f"no exercise sources (*.py) in {src_dir}: check the path")
    return found


def build_all(src_dir="exercises/src", solutions_dir="solutions", exercises_dir="exercises",
              force=False) -> list[Path]:
    """Build every source in src_dir; return the notebooks written. Every notebook is checked
    (``build``'s rule on edited ones) before the first is written: a refusal writes nothing."""
    planned = [item for s in sources(src_dir)
               for item in _planned(s, solutions_dir, exercises_dir, force)]
    return _write(planned)


def reset_exercises(names=(), src_dir="exercises/src", exercises_dir="exercises",
                    stamp: str | None = None) -> list[Path]:
    """Give learners fresh exercise notebooks without losing their work.

    Each edited exercise (all of them, or those whose stem or file name is in ``names``) is moved
    to ``<exercises_dir>/backups/<stem>-<stamp>[-N].ipynb`` first, then rebuilt pristine; a backup
    never replaces a file (``workcopy.move_to_backup``). Every path is checked before anything is
    moved. Returns the backups made. Solutions are left alone.
    """
    from .workcopy import WorkCopyError, check_backup_folder, check_replaceable, move_to_backup

    chosen = [s for s in sources(src_dir) if not names or s.stem in {Path(n).stem for n in names}]
    unknown = {Path(n).stem for n in names} - {s.stem for s in chosen}
    if unknown:
        raise AuthoringError(f"no exercise named {', '.join(sorted(unknown))} in {src_dir}")
    backup_folder = Path(exercises_dir) / "backups"
    exercises = [Path(exercises_dir) / f"{source.stem}.ipynb" for source in chosen]
    try:
        check_backup_folder(backup_folder)
        for exercise in exercises:
            check_replaceable(exercise)
    except WorkCopyError as error:
        raise AuthoringError(str(error)) from None
    backups = []
    for source, exercise in zip(chosen, exercises, strict=True):
        text = to_text(exercise_notebook(source))
        if not _safe_to_replace(exercise, text):
            backups.append(move_to_backup(exercise, backup_folder, stamp))
        exercise.parent.mkdir(parents=True, exist_ok=True)
        exercise.write_text(text, encoding="utf-8")
    return backups


def is_stale(source, solutions_dir="solutions", exercises_dir="exercises") -> bool:
    """True when either notebook of `source` is missing or differs from a fresh build."""
    return bool(_stale_paths(source, solutions_dir, exercises_dir))


def _stale_paths(source, solutions_dir, exercises_dir) -> list[Path]:
    stale = []
    for path, nb in zip(targets(source, solutions_dir, exercises_dir), render(source), strict=True):
        if not path.exists() or path.read_text(encoding="utf-8") != to_text(nb):
            stale.append(path)
    return stale


def stale_notebooks(src_dir="exercises/src", solutions_dir="solutions",
                    exercises_dir="exercises") -> list[Path]:
    """Every generated notebook that is missing or out of date with its source."""
    return [p for s in sources(src_dir) for p in _stale_paths(s, solutions_dir, exercises_dir)]


def check_fresh(src_dir="exercises/src", solutions_dir="solutions", exercises_dir="exercises"):
    """Raise AuthoringError naming the stale notebooks, if any (for tests and CI)."""
    stale = stale_notebooks(src_dir, solutions_dir, exercises_dir)
    if stale:
        names = ", ".join(str(p) for p in stale)
        raise AuthoringError(f"out of date with {src_dir}: {names}. Rebuild them with "
                             "`ckpt-course build-exercises` and commit the result.")
