"""One percent-format source -> exercise + solution notebooks, the same bytes on every build."""

import shutil
import textwrap
from pathlib import Path

import nbformat
import pytest

from ckpt_course import authoring, cli
from ckpt_course.authoring import AuthoringError, tagged_name

TOY = Path(__file__).parent / "data" / "src" / "0_toy.py"


@pytest.fixture
def course(tmp_path):
    """A repo-shaped folder: exercises/src/0_toy.py, built into exercises/ and solutions/."""
    src = tmp_path / "exercises" / "src"
    src.mkdir(parents=True)
    shutil.copy(TOY, src)
    authoring.build_all(src, tmp_path / "solutions", tmp_path / "exercises")
    return tmp_path


def read(path):
    return nbformat.read(path, as_version=4)


def answer_cell(nb, name):
    return next(c for c in nb.cells if tagged_name(c, "answer") == name)


def write_source(tmp_path, body, name="1_bad.py"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(body).lstrip())
    return path


def test_build_writes_clean_notebooks_with_a_kernelspec(course):
    for role in ("exercises", "solutions"):
        nb = read(course / role / "0_toy.ipynb")
        assert nb.metadata.kernelspec == {"display_name": "Python 3 (ipykernel)",
                                          "language": "python", "name": "python3"}
        assert nb.metadata.ckpt_course["exercise"] == "0_toy"
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(c.outputs == [] and c.execution_count is None for c in code)
        assert [c.id for c in code] == ["cell-01", "answer-0-1-bytes", "check-0-1-bytes",
                                        "answer-0-2-tape", "check-0-2-tape",
                                        "check-0-2-tape-scales"]
        assert all(k in ("tags", "editable", "deletable") for c in code for k in c.metadata)


def test_exercise_gets_stubs_and_solution_loses_markers(course):
    exercise = answer_cell(read(course / "exercises" / "0_toy.ipynb"), "0.1-bytes")
    solution = answer_cell(read(course / "solutions" / "0_toy.ipynb"), "0.1-bytes")
    assert exercise.source == ("def predicted_bytes(batch, width):\n"
                               '    raise NotImplementedError("Exercise 0.1-bytes: '
                               'replace this line with your answer")')
    assert solution.source == "def predicted_bytes(batch, width):\n    return 4 * batch * width"


def test_check_cells_are_locked_only_in_the_exercise(course):
    for role, locked in (("exercises", False), ("solutions", True)):
        nb = read(course / role / "0_toy.ipynb")
        checks = [c for c in nb.cells if tagged_name(c, "check")]
        assert len(checks) == 3
        assert all(c.metadata.get("editable", True) is locked for c in checks)


def run_cells(nb, stop_at_checks=False):
    """exec every code cell in one namespace; {check name: exception type name or None}."""
    namespace, results = {}, {}
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        name = tagged_name(cell, "check")
        try:
            exec(cell.source, namespace)
            error = None
        except Exception as e:
            error = type(e).__name__
        if name is None:
            assert error is None, f"non-check cell {cell.id} raised {error}"
        else:
            results[name] = error
    return results


def test_untouched_exercise_fails_at_each_check_and_nowhere_else(course):
    assert run_cells(read(course / "exercises" / "0_toy.ipynb")) == {
        "0.1-bytes": "NotImplementedError", "0.2-tape": "NotImplementedError",
        "0.2-tape-scales": "NotImplementedError"}


def test_solution_passes_every_check(course):
    results = run_cells(read(course / "solutions" / "0_toy.ipynb"))
    assert results == {"0.1-bytes": None, "0.2-tape": None, "0.2-tape-scales": None}


def test_build_is_deterministic_and_leaves_fresh_files_alone(course, tmp_path):
    other = tmp_path / "again"
    authoring.build(TOY, other / "solutions", other / "exercises")
    for role in ("exercises", "solutions"):
        assert (other / role / "0_toy.ipynb").read_bytes() == (course / role / "0_toy.ipynb"
                                                               ).read_bytes()
    mtime = (course / "exercises" / "0_toy.ipynb").stat().st_mtime_ns
    src = course / "exercises" / "src"
    assert authoring.build_all(src, course / "solutions", course / "exercises") == []
    assert (course / "exercises" / "0_toy.ipynb").stat().st_mtime_ns == mtime


def test_stale_detection(course):
    src, sol, ex = course / "exercises" / "src", course / "solutions", course / "exercises"
    assert authoring.stale_notebooks(src, sol, ex) == []
    authoring.check_fresh(src, sol, ex)
    assert cli.build_main(["--src", str(src), "--solutions", str(sol),
                                 "--exercises", str(ex), "--check"]) == 0

    source = src / "0_toy.py"
    source.write_text(source.read_text().replace("BATCH, WIDTH, LAYERS = 8, 32, 3",
                                                 "BATCH, WIDTH, LAYERS = 4, 32, 3"))
    assert authoring.is_stale(source, sol, ex)
    assert authoring.stale_notebooks(src, sol, ex) == [sol / "0_toy.ipynb", ex / "0_toy.ipynb"]
    with pytest.raises(AuthoringError, match="out of date.*ckpt-course build-exercises"):
        authoring.check_fresh(src, sol, ex)
    assert cli.build_main(["--src", str(src), "--solutions", str(sol),
                                 "--exercises", str(ex), "--check"]) == 1

    # the exercise was still pristine, so a rebuild may replace it without --force
    assert authoring.build_all(src, sol, ex) == [sol / "0_toy.ipynb", ex / "0_toy.ipynb"]
    assert not authoring.is_stale(source, sol, ex)
    (sol / "0_toy.ipynb").unlink()
    assert authoring.stale_notebooks(src, sol, ex) == [sol / "0_toy.ipynb"]


def test_build_never_overwrites_a_learners_work(course):
    src, sol, ex = course / "exercises" / "src", course / "solutions", course / "exercises"
    nb = read(ex / "0_toy.ipynb")
    answer_cell(nb, "0.1-bytes").source = "def predicted_bytes(batch, width):\n    return 42"
    nbformat.write(nb, ex / "0_toy.ipynb")
    work = (ex / "0_toy.ipynb").read_bytes()
    source = src / "0_toy.py"
    source.write_text(source.read_text() + "\n# %%\nprint('a new cell')\n")

    with pytest.raises(AuthoringError, match=r"edits that are not in .*mv .*--force"):
        authoring.build_all(src, sol, ex)
    assert (ex / "0_toy.ipynb").read_bytes() == work
    assert cli.build_main(["--src", str(src), "--solutions", str(sol),
                                 "--exercises", str(ex)]) == 1
    assert (ex / "0_toy.ipynb").read_bytes() == work

    authoring.build_all(src, sol, ex, force=True)
    assert "return 42" not in (ex / "0_toy.ipynb").read_text()
    assert not authoring.is_stale(source, sol, ex)


def test_fingerprint_tells_pristine_from_edited(course):
    nb = read(course / "exercises" / "0_toy.ipynb")
    assert authoring.is_pristine(nb)
    nb.cells[1].outputs = [nbformat.v4.new_output("stream", text="ran it")]
    assert authoring.is_pristine(nb), "running a notebook is not editing it"
    nb.cells.append(nbformat.v4.new_code_cell("scratch = 1"))
    assert not authoring.is_pristine(nb)


@pytest.mark.parametrize("body, message", [
    ("""
     # %% tags=["answer:a"]
     ### BEGIN SOLUTION
     x = 1
     ### END SOLUTION
     """, "runs when the cell runs. Put it inside a function"),
    ("""
     # %% tags=["answer:a"]
     def f():
         ### BEGIN SOLUTION
         return 1
     """, "line 2: ### BEGIN SOLUTION is never closed"),
    ("""
     # %% tags=["answer:a"]
     def f():
         return 1
     """, "answer a has no ### BEGIN SOLUTION"),
    ("""
     # %%
     def f():
         ### BEGIN SOLUTION
         return 1
         ### END SOLUTION
     """, 'solution markers but no `tags=\\["answer:<name>"\\]`'),
    ("""
     # %% tags=["answer:a"]
     def f():
         ### BEGIN SOLUTION
         return (1
         ### END SOLUTION
     """, r"answer a \(solution\), line 2"),
    ("""
     # %% tags=["check:a.1"]
     pass

     # %% tags=["check:a-1"]
     pass
     """, "two cells get the id check-a-1"),
    ("""
     # %% tags=["check:a b"]
     pass
     """, "bad exercise name 'a b'"),
])
def test_sources_that_break_the_conventions_are_refused(tmp_path, body, message):
    source = write_source(tmp_path, body)
    with pytest.raises(AuthoringError, match=message):
        authoring.build(source, tmp_path / "solutions", tmp_path / "exercises")
    assert not (tmp_path / "exercises").exists()


def test_a_region_inside_a_nested_block_of_a_function_is_fine(tmp_path):
    source = write_source(tmp_path, """
        # %% tags=["answer:a"]
        def f(n):
            total = 0
            for i in range(n):
                ### BEGIN SOLUTION
                total += i
                ### END SOLUTION
            return total
        """)
    _, exercise = authoring.render(source)
    assert exercise.cells[0].source.splitlines()[3] == (
        '        raise NotImplementedError("Exercise a: replace this line with your answer")')


def test_build_all_needs_sources(tmp_path):
    with pytest.raises(AuthoringError, match="no exercise sources"):
        authoring.build_all(tmp_path)


# ---------------------------------------------------------------- reset-exercises keeps every edit
def edit(course, text):
    exercise = course / "exercises" / "0_toy.ipynb"
    exercise.write_text(exercise.read_text().replace("raise NotImplementedError", text))
    return exercise.read_text()


def reset(course, stamp=None):
    return authoring.reset_exercises((), course / "exercises" / "src", course / "exercises",
                                     stamp=stamp)


def test_two_resets_in_the_same_second_keep_both_edits(course):
    pristine = (course / "exercises" / "0_toy.ipynb").read_text()
    first = edit(course, "return 1  # first try")
    [backup1] = reset(course, stamp="20260101-120000")
    second = edit(course, "return 2  # second try")
    [backup2] = reset(course, stamp="20260101-120000")  # the same second
    assert backup1 != backup2 and backup1.parent == backup2.parent
    assert backup1.read_text() == first and backup2.read_text() == second
    assert backup1.name == "0_toy-20260101-120000.ipynb"
    assert backup2.name == "0_toy-20260101-120000-2.ipynb"
    assert (course / "exercises" / "0_toy.ipynb").read_text() == pristine


def test_a_file_already_at_the_backup_name_is_never_replaced(course):
    backups = course / "exercises" / "backups"
    backups.mkdir()
    (backups / "0_toy-20260101-120000.ipynb").write_text("someone's file")
    edited = edit(course, "return 3")
    [backup] = reset(course, stamp="20260101-120000")
    assert (backups / "0_toy-20260101-120000.ipynb").read_text() == "someone's file"
    assert backup.read_text() == edited


def test_a_pristine_exercise_is_reset_without_a_backup(course):
    assert reset(course) == []
    assert not (course / "exercises" / "backups").exists()


@pytest.mark.parametrize("situation, message", [
    ("exercise is a folder", "is a folder, not a notebook"),
    ("backups is a file", "is a file, but backups go into a folder"),
])
def test_a_reset_that_cannot_keep_the_work_is_refused_before_any_move(course, situation,
                                                                      message, capsys):
    exercise, backups = course / "exercises" / "0_toy.ipynb", course / "exercises" / "backups"
    if situation == "exercise is a folder":
        exercise.unlink()
        exercise.mkdir()
        (exercise / "notes.txt").write_text("mine")
    else:
        edited = edit(course, "return 4")
        backups.write_text("a file named backups")
    with pytest.raises(SystemExit) as stop:
        cli.main(["reset-exercises", "--src", str(course / "exercises" / "src"),
                  "--exercises", str(course / "exercises")])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and "Traceback" not in "\n".join(err)
    if situation == "exercise is a folder":
        assert (exercise / "notes.txt").read_text() == "mine"
    else:
        assert exercise.read_text() == edited and backups.read_text() == "a file named backups"


def test_an_unreadable_exercise_is_backed_up_not_lost(course):
    exercise = course / "exercises" / "0_toy.ipynb"
    exercise.write_bytes(b"\xff\xfe not a notebook")
    [backup] = reset(course)
    assert backup.read_bytes() == b"\xff\xfe not a notebook"
