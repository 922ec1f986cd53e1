"""The learner's copy of the course (workcopy.py, `ckpt-course sync-course` / `reset-lessons`):
running the course never touches a tracked file; updates arrive without a merge conflict; no
learner's file is ever replaced."""

import subprocess
from pathlib import Path

import pytest

from ckpt_course import cli
from ckpt_course.workcopy import MANIFEST, WorkCopyError, reset_lessons, sync_course

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def course(tmp_path):
    """A course-shaped folder: two lessons, one exercise and its source."""
    root = tmp_path / "course"
    for name, text in (("notebooks/1_a.ipynb", "lesson a v1"), ("notebooks/2_b.ipynb", "lesson b"),
                       ("exercises/1_e.ipynb", "exercise v1"), ("exercises/src/1_e.py", "src")):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_the_first_sync_copies_everything_and_changes_nothing_in_the_course(course, tmp_path):
    before = {p: p.read_text() for p in course.rglob("*") if p.is_file()}
    copy = tmp_path / "my-course"
    report = sync_course(course, copy)
    assert sorted(report.copied) == ["exercises/1_e.ipynb", "exercises/src/1_e.py",
                                     "notebooks/1_a.ipynb", "notebooks/2_b.ipynb"]
    assert (copy / "notebooks" / "1_a.ipynb").read_text() == "lesson a v1"
    assert (copy / "exercises" / "src" / "1_e.py").read_text() == "src"  # grading reads it
    assert {p: p.read_text() for p in course.rglob("*") if p.is_file()} == before
    assert sync_course(course, copy).copied == []  # a second sync has nothing to do


def test_an_update_reaches_the_learner_and_keeps_their_edits(course, tmp_path):
    copy = tmp_path / "my-course"
    sync_course(course, copy)
    (copy / "notebooks" / "1_a.ipynb").write_text("lesson a with my outputs")
    (copy / "exercises" / "1_e.ipynb").unlink()  # deleted by the learner
    (course / "notebooks" / "1_a.ipynb").write_text("lesson a v2")  # the course is updated
    (course / "notebooks" / "2_b.ipynb").write_text("lesson b v2")
    (course / "notebooks" / "3_c.ipynb").write_text("lesson c, new")
    (copy / "notebooks" / "3_c.ipynb").write_text("my own notebook called 3_c")
    report = sync_course(course, copy, stamp="20260101-120000")
    assert report.kept == ["notebooks/1_a.ipynb"]
    assert (copy / "notebooks" / "1_a.ipynb").read_text() == "lesson a with my outputs"
    assert report.updated == ["notebooks/2_b.ipynb"]
    assert (copy / "notebooks" / "2_b.ipynb").read_text() == "lesson b v2"
    assert report.restored == ["exercises/1_e.ipynb"]
    assert "notebooks/3_c.ipynb" in report.copied
    assert (copy / "notebooks" / "3_c.ipynb").read_text() == "lesson c, new"
    [backup] = report.backups
    assert backup.read_text() == "my own notebook called 3_c"
    assert backup == copy / "notebooks" / "backups" / "3_c-20260101-120000.ipynb"
    assert "reset-lessons notebooks/1_a`" in str(report)
    report = reset_lessons(["notebooks/1_a"], course, copy)  # what the sync said to run
    assert (copy / "notebooks" / "1_a.ipynb").read_text() == "lesson a v2"
    assert [b.read_text() for b in report.backups] == ["lesson a with my outputs"]


def test_reset_lessons_gives_fresh_copies_and_keeps_every_edit(course, tmp_path, capsys):
    copy = tmp_path / "my-course"
    sync_course(course, copy)
    lesson = copy / "notebooks" / "1_a.ipynb"
    for attempt in ("first edit", "second edit"):
        lesson.write_text(attempt)
        assert cli.main(["reset-lessons", "1_a", "--course", str(course), "--into",
                         str(copy)]) == 0
        assert lesson.read_text() == "lesson a v1"
    backups = sorted((copy / "notebooks" / "backups").iterdir())
    assert sorted(b.read_text() for b in backups) == ["first edit", "second edit"]
    assert "moved to" in capsys.readouterr().out


def test_reset_lessons_of_the_same_second_never_overwrite_a_backup(course, tmp_path):
    copy = tmp_path / "my-course"
    sync_course(course, copy)
    lesson = copy / "notebooks" / "2_b.ipynb"
    lesson.write_text("edit 1")
    reset_lessons(["2_b"], course, copy, stamp="20260101-120000")
    lesson.write_text("edit 2")
    reset_lessons(["2_b.ipynb"], course, copy, stamp="20260101-120000")
    names = sorted(p.name for p in (copy / "notebooks" / "backups").iterdir())
    assert names == ["2_b-20260101-120000-2.ipynb", "2_b-20260101-120000.ipynb"]


def test_the_copy_is_found_from_inside_it(course, tmp_path, monkeypatch, capsys):
    copy = tmp_path / "my-course"
    sync_course(course, copy)
    (copy / "exercises" / "1_e.ipynb").write_text("my answers")
    monkeypatch.chdir(copy / "exercises")  # JupyterLab's terminal, inside the copy
    assert cli.main(["reset-lessons", "1_e", "--course", str(course)]) == 0
    assert (copy / "exercises" / "1_e.ipynb").read_text() == "exercise v1"
    assert not (copy / "exercises" / "my-course").exists()


@pytest.mark.parametrize("case, message", [
    ("unknown name", "no lesson or exercise named 9_nope"),
    ("lesson is a folder", "is a folder, not a notebook"),
    ("backups is a file", "is a file, but backups go into a folder"),
    ("copy inside the course's notebooks", "part of the course itself"),
    ("copy is the course", "part of the course itself"),
])
def test_a_reset_that_would_lose_or_misplace_work_is_refused(course, tmp_path, case, message,
                                                             capsys):
    copy = tmp_path / "my-course"
    sync_course(course, copy)
    names = ["1_a"]
    if case == "unknown name":
        names = ["9_nope"]
    elif case == "lesson is a folder":
        (copy / "notebooks" / "1_a.ipynb").unlink()
        (copy / "notebooks" / "1_a.ipynb").mkdir()
    elif case == "backups is a file":
        (copy / "notebooks" / "1_a.ipynb").write_text("mine")
        (copy / "notebooks" / "backups").write_text("a file")
    elif case == "copy inside the course's notebooks":
        copy = course / "notebooks" / "work"
    else:
        copy = course
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit) as stop:
        cli.main(["reset-lessons", *names, "--course", str(course), "--into", str(copy)])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and "Traceback" not in "\n".join(err)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_an_unreadable_manifest_loses_nothing(course, tmp_path):
    copy = tmp_path / "my-course"
    sync_course(course, copy)
    (copy / "notebooks" / "1_a.ipynb").write_text("mine")
    (copy / MANIFEST).write_text("{ not json")
    report = sync_course(course, copy)
    assert [b.read_text() for b in report.backups] == ["mine"]


def test_a_course_without_lessons_is_refused(tmp_path):
    with pytest.raises(WorkCopyError, match="--course"):
        sync_course(tmp_path, tmp_path / "copy")


def test_make_lab_opens_the_ignored_copy_not_the_tracked_lessons():
    lab = ROOT.joinpath("Makefile").read_text().split("\nlab:", 1)[1].split("\n\n", 1)[0]
    assert "sync-course" in lab and "root_dir=$(CURDIR)/$(COPY)" in lab
    ignored = subprocess.run(["git", "check-ignore", "-q", "my-course/notebooks/x.ipynb"],
                             cwd=ROOT, capture_output=True)
    if ignored.returncode == 128:
        pytest.skip("not a git checkout")
    assert ignored.returncode == 0, "my-course/ must be ignored by git"


def test_a_stem_shared_by_a_lesson_and_an_exercise_must_say_which(course, tmp_path):
    (course / "exercises" / "2_b.ipynb").write_text("exercise b")
    copy = tmp_path / "my-course"
    sync_course(course, copy)
    (copy / "exercises" / "2_b.ipynb").write_text("my answers")
    with pytest.raises(WorkCopyError, match="notebooks/2_b or exercises/2_b"):
        reset_lessons(["2_b"], course, copy)
    report = reset_lessons(["notebooks/2_b"], course, copy)
    assert report.fresh == ["notebooks/2_b.ipynb"] and report.backups == []
    assert (copy / "exercises" / "2_b.ipynb").read_text() == "my answers"


def test_lessons_run_in_the_clone_before_copies_existed_count_as_the_learners(course, tmp_path):
    """A learner who ran a lesson in notebooks/ itself (before `make lab` made copies): the first
    sync copies their run, and no course update ever replaces it."""
    def git(*args):
        subprocess.run(["git", "-C", str(course), "-c", "user.name=t", "-c", "user.email=t@t",
                        *args], check=True, capture_output=True)
    git("init", "-q")
    git("add", "-A")
    git("commit", "-qm", "course v1")
    (course / "notebooks" / "1_a.ipynb").write_text("lesson a, run in the clone")
    copy = tmp_path / "my-course"
    assert "notebooks/1_a.ipynb" in sync_course(course, copy).copied
    git("checkout", "--", "notebooks")  # what the README tells them to do next
    (course / "notebooks" / "1_a.ipynb").write_text("lesson a v2")
    git("commit", "-qam", "course v2")  # their git pull
    report = sync_course(course, copy)
    assert report.kept == ["notebooks/1_a.ipynb"]
    assert (copy / "notebooks" / "1_a.ipynb").read_text() == "lesson a, run in the clone"
