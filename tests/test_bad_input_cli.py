"""Bad command lines and file situations, as a new user would type them: each exits with code 2
and one line that names the fix (no traceback), before any work, and no file is touched.

Run in-process through ``cli.main`` (fast); a few through a real process at the end. The API's
bad input is in test_bad_input.py; this table is the command line's share of issue 17's 300.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ckpt_course import cli

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "tests" / "data" / "src" / "0_toy.py"
HTML = ["--html", "{tmp}/new.html"]

# ---------------------------------------------------------------- numbers, for every option
INT_OPTIONS = [  # (command line before the option, the option)
    (["tape"], "--layers"), (["tape"], "--batch"), (["tape"], "--seq"),
    (["trace", *HTML], "--layers"), (["trace", *HTML], "--batch"), (["trace", *HTML], "--seq"),
    (["train"], "--layers"), (["train"], "--batch"), (["train"], "--seq"), (["train"], "--steps"),
    (["compare"], "--layers"), (["compare"], "--width"), (["compare"], "--heads"),
    (["compare"], "--batch"), (["compare"], "--seq"), (["compare"], "--steps"),
    (["plan", "--budget", "1GiB"], "--layers"), (["plan", "--budget", "1GiB"], "--batch"),
    (["plan", "--budget", "1GiB"], "--seq"), (["plan", "--budget", "1GiB"], "--devices"),
    (["doctor"], "--layers"), (["doctor"], "--batch"), (["doctor"], "--seq"),
    (["doctor"], "--steps"), (["grade", "{tmp}/x.ipynb"], "--jobs"),
]
BAD_INTS = [("0", "at least 1"), ("-3", "at least 1"), ("2.5", "whole number"),
            ("ten", "whole number"), ("", "whole number"), ("1e3", "whole number"),
            ("99999999999", "expected at most")]
NUMBERS = [(before + [option, value], fix) for before, option in INT_OPTIONS
           for value, fix in BAD_INTS]

BUDGETS = [(["compare"]), (["plan", "--model", "gpt"]), (["doctor"])]
BAD_BUDGETS = [("0", "positive"), ("-1MiB", "positive"), ("lots", "not understood"),
               ("1XB", "not understood"), ("nan", "not understood"), ("", "not understood"),
               ("0.0GiB", "positive"), ("1.5", "did you mean '1.5GiB'?"),
               ("1.5B", "not a whole number of bytes"), ("512", "has no unit")]
NUMBERS += [(before + ["--budget=" + value], fix) for before in BUDGETS
            for value, fix in BAD_BUDGETS]
NUMBERS += [(["train", "--dropout", v], "probability in [0, 1)")
            for v in ("1", "1.5", "-0.1", "nan", "x", "inf")]
NUMBERS += [(["grade", "{tmp}/x.ipynb", "--timeout", v], "positive number of seconds")
            for v in ("0", "-5", "inf", "nan", "soon")]

# ---------------------------------------------------------------- output files
OUTPUTS = [  # (command line before the output option, the option, its suffix)
    (["trace", "--model", "hand-trace"], "--html", ".html"),
    (["compare"], "--out", ".png"),
    (["grade", "{tmp}/x.ipynb"], "--csv", ".csv"),
    (["grade", "{tmp}/x.ipynb"], "--json", ".json"),
]
BAD_PATHS = [  # (the path, with {sfx} for the right suffix, a fragment of the error)
    ("{tmp}/missing/out{sfx}", "does not exist"),
    ("{tmp}/a_file/out{sfx}", "is a file, not a folder"),
    ("{tmp}/a_folder", "is a folder"),
    ("{tmp}/a_folder/", "is a folder"),
    ("{tmp}/out.txt", "file name"),
    ("{tmp}/out", "file name"),
    ("", "give a file name"),
    ("/etc/ckpt{sfx}", "system folder"),
    ("/usr/ckpt{sfx}", "system folder"),
    ("/proc/ckpt{sfx}", "system folder"),
    ("{tmp}/link_to_etc{sfx}", "system folder"),  # a symlink that points into /etc
    ("{tmp}/old{sfx}", "pass --force"),  # someone's file
    ("{tmp}/pipe{sfx}", "not a regular file"),
    ("{tmp}/locked/out{sfx}", "not writable"),
]
PATHS = [(before + [option, path.replace("{sfx}", sfx)], fix)
         for before, option, sfx in OUTPUTS for path, fix in BAD_PATHS]
PATHS += [(before + [option, "{tmp}/readonly" + sfx, "--force"], "read-only")
          for before, option, sfx in OUTPUTS]
PATHS += [
    (["trace", "--html", "{tmp}/beside.html"], "pass --force"),  # beside.pickle exists
    (["grade", "{tmp}/x.ipynb", "--feedback", "{tmp}/a_file"], "is a file, not a folder"),
    (["grade", "{tmp}/x.ipynb", "--feedback", "/etc/feedback"], "system folder"),
    (["grade", "{tmp}/x.ipynb", "--feedback", "{tmp}/locked/fb"], "not writable"),
    (["grade", "{tmp}/x.ipynb", "--feedback", "{tmp}/feedback"], "pass --force"),  # x.md
    (["grade", "{tmp}/x.ipynb", "--feedback", ""], "give a folder name"),
    (["grade", "{tmp}/x.ipynb", "--csv", "{tmp}/old.csv", "--json", "{tmp}/old.json"],
     "(and 1 more)"),
]

# ---------------------------------------------------------------- names and combinations
NAMES = [
    ([], "required: command"),
    (["tape", "--model", "resnet"], "invalid choice"),
    (["trace", "--model", "bert", *HTML], "invalid choice"),
    (["doctor", "--model", "gpt-9"], "invalid choice"),
    (["plan", "--model", "gpt-9", "--budget", "1GiB"], "invalid choice"),
    (["train", "--policy", "bogus"], "accepted"),
    (["trace", "--policy", "every-0", *HTML], "every-K"),
    (["trace", "--policy", "selective:save=matmul", *HTML], "known: mm, sdpa"),
    (["compare", "--policies", "none,none"], "each policy once"),
    (["compare", "--policies", ""], "at least one policy"),
    (["compare", "--policies", "none;full;full"], "each policy once"),
    (["plan", "--config", "900b", "--budget", "1GiB"], "choose one of"),
    (["plan", "--hf-config", "llama-9000", "--budget", "1GiB"], "config.json path"),
    (["plan", "--hf-config", "{tmp}/missing.json", "--budget", "1GiB"], "config.json"),
    (["plan", "--config", "7b", "--dtype", "int8", "--budget", "1GiB"], "invalid choice"),
    (["plan", "--objective", "speed", "--budget", "1GiB"], "invalid choice"),
    (["train", "--device", "gpu"], "cpu, cuda or cuda:N"),
    (["train", "--device", "cuda:x"], "cpu, cuda or cuda:N"),
    (["compare", "--device", "tpu:0"], "cpu, cuda or cuda:N"),
    (["frobnicate"], "invalid choice"),
    (["tape", "--frobnicate"], "unrecognized arguments"),
    (["trace"], "required: --html"),
    (["plan"], "required: --budget"),
    (["grade"], "required: NOTEBOOK"),
    (["tape", "--model", "hand-trace", "--seq", "8"], "drop --seq"),
    (["trace", "--model", "gpt", "--hf-config", "gpt2", *HTML], "drop one"),
    (["doctor", "--model", "llama-tiny", "--hf-config", "gpt2"], "drop one"),
    (["plan", "--model", "gpt", "--config", "7b", "--budget", "1GiB"], "not allowed with"),
    (["plan", "--config", "7b", "--layers", "2", "--budget", "1GiB"], "drop --layers"),
    (["plan", "--model", "gpt", "--master-weights", "--budget", "1GiB"], "drop it"),
    (["plan", "--model", "gpt", "--dtype", "bf16", "--budget", "1GiB"], "drop --dtype"),
    (["plan", "--hf-config", "gpt2", "--objective", "time", "--budget", "1GiB"],
     "--objective flops"),
    (["compare", "--heads", "3"], "must divide --width"),
    (["train", "--model", "hand-trace", "--dropout", "0.1"], "dropout"),
    (["train", "--layers", "2", "--policy", "segments:0-5"], "below 2"),
    (["train", "--model", "llama-tiny", "--seq", "129"], "--seq 128 or less"),
    (["trace", "--seq", "999", *HTML], "--seq 128 or less"),
    (["tape", "--batch", "200000"], "this machine has free"),  # far beyond memory
    (["compare", "--width", "60000", "--heads", "4"], "smaller --batch, --seq, --layers or "
                                                      "--width"),
]

# ---------------------------------------------------------------- resets and the learner's copy
FILES = [
    (["reset-exercises", "9_nope", "--src", "{course}/exercises/src",
      "--exercises", "{course}/exercises"], "no exercise named 9_nope"),
    (["reset-exercises", "--src", "{tmp}/a_file"], "is a file, not a folder"),
    (["reset-exercises", "--src", "{tmp}/missing"], "check the path"),
    (["reset-exercises", "--src", "{tmp}/a_folder"], "no exercise sources"),
    (["reset-exercises", "--src", "{course}/exercises/src", "--exercises", "{tmp}/a_file"],
     "is a file, not a folder"),
    (["reset-exercises", "--src", "{course}/exercises/src", "--exercises",
      "{course}/folder_case"], "is a folder, not a notebook"),
    (["reset-exercises", "--src", "{course}/exercises/src", "--exercises",
      "{course}/backups_case"], "backups go into a folder"),
    (["build-exercises", "--src", "{tmp}/missing"], "check the path"),
    (["build-exercises", "--exercises", "{tmp}/a_file"], "is a file, not a folder"),
    (["sync-course", "--course", "{tmp}/missing"], "check the path"),
    (["sync-course", "--course", "{tmp}/a_file"], "is a file, not a folder"),
    (["sync-course", "--course", "{tmp}/a_folder", "--into", "{tmp}/copy"], "--course DIR"),
    (["sync-course", "--course", "{course}", "--into", "{tmp}/a_file"],
     "is a file, not a folder"),
    (["sync-course", "--course", "{course}", "--into", "{course}"], "part of the course"),
    (["sync-course", "--course", "{course}", "--into", "{course}/notebooks/mine"],
     "part of the course"),
    (["sync-course", "--course", "{course}", "--into", "/usr/my-course"], "system folder"),
    (["sync-course", "--course", "{course}", "--into", "{tmp}/locked/copy"], "not writable"),
    (["reset-lessons", "9_nope", "--course", "{course}", "--into", "{tmp}/copy"],
     "no lesson or exercise named 9_nope"),
    (["reset-lessons", "--course", "{course}", "--into", "{course}/exercises"],
     "part of the course"),
    (["reset-lessons", "1_lesson", "--course", "{course}", "--into", "{tmp}/copy_folder_case"],
     "is a folder, not a notebook"),
    (["reset-lessons", "1_lesson", "--course", "{course}", "--into", "{tmp}/copy_backups_case"],
     "backups go into a folder"),
]

CASES = NUMBERS + PATHS + NAMES + FILES


def test_the_table_is_large_and_every_case_distinct():
    lines = [tuple(argv) for argv, _ in CASES]
    assert len(set(lines)) == len(lines) >= 130


@pytest.fixture(scope="module")
def situation(tmp_path_factory):
    """One folder holding every file situation of the table."""
    tmp = tmp_path_factory.mktemp("situations")
    (tmp / "a_file").write_text("not a folder")
    (tmp / "a_folder").mkdir()
    (tmp / "x.ipynb").write_text("{}")
    (tmp / "locked").mkdir()
    for sfx in (".html", ".png", ".csv", ".json"):
        (tmp / f"old{sfx}").write_text("someone's file")
        (tmp / f"readonly{sfx}").write_text("someone's read-only file")
        os.mkfifo(tmp / f"pipe{sfx}")
        (tmp / f"link_to_etc{sfx}").symlink_to(f"/etc/ckpt-course-test{sfx}")
    (tmp / "beside.pickle").write_text("someone's snapshot")
    (tmp / "feedback").mkdir()
    (tmp / "feedback" / "x.md").write_text("last week's feedback")
    course = tmp / "course"
    (course / "exercises" / "src").mkdir(parents=True)
    shutil.copy(TOY, course / "exercises" / "src")
    (course / "notebooks").mkdir()
    (course / "notebooks" / "1_lesson.ipynb").write_text("a lesson")
    for case, what in (("folder_case", "mkdir"), ("backups_case", "file")):
        folder = course / case
        folder.mkdir()
        if what == "mkdir":
            (folder / "0_toy.ipynb").mkdir()
        else:
            (folder / "0_toy.ipynb").write_text("edited")
            (folder / "backups").write_text("a file named backups")
    for case, what in (("copy_folder_case", "mkdir"), ("copy_backups_case", "file")):
        lessons = tmp / case / "notebooks"
        lessons.mkdir(parents=True)
        if what == "mkdir":
            (lessons / "1_lesson.ipynb").mkdir()
        else:
            (lessons / "1_lesson.ipynb").write_text("my edits")
            (lessons / "backups").write_text("a file named backups")
    return tmp


def snapshot(folder: Path) -> dict:
    """Every entry under ``folder``: its kind and, for a file, its bytes."""
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.is_symlink():
            out[path] = ("link", os.readlink(path))
        elif path.is_dir():
            out[path] = "folder"
        elif path.is_file():
            out[path] = path.read_bytes()
        else:
            out[path] = "other"
    return out


@pytest.fixture
def no_write_access(monkeypatch, situation):
    """As a learner (not root) sees them: `locked/` cannot be written, `readonly.*` files are
    read-only. (Tests run as root here, for whom permission bits change nothing.)"""
    real = os.access

    def access(path, mode, *args, **kwargs):
        p = Path(path)
        if mode & os.W_OK and (p == situation / "locked" or p.name.startswith("readonly")):
            return False
        return real(path, mode, *args, **kwargs)
    monkeypatch.setattr(os, "access", access)


@pytest.mark.parametrize("argv, fix", CASES, ids=[" ".join(a)[:70] or "(none)" for a, _ in CASES])
def test_a_bad_command_line_gets_one_line_and_touches_nothing(argv, fix, situation,
                                                              no_write_access, capsys):
    argv = [a.replace("{tmp}", str(situation)).replace("{course}", str(situation / "course"))
            for a in argv]
    before = snapshot(situation)
    with pytest.raises(SystemExit) as stop:
        cli.main(argv)
    assert stop.value.code == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and captured.out == ""  # nothing ran
    error = captured.err.strip().splitlines()[-1]
    assert error.startswith("ckpt-course") and "error:" in error
    assert fix in error, error
    assert snapshot(situation) == before, "a refused command changed a file"
    assert not Path("/etc/ckpt-course-test.html").exists()


# ---------------------------------------------------------------- correct results
def test_force_replaces_only_what_was_asked(situation, tmp_path, capsys):
    """With --force the same command that was refused writes its file (a correct result)."""
    out = tmp_path / "old.png"
    out.write_text("someone's plot")
    assert cli.main(["compare", "--layers", "1", "--width", "16", "--heads", "2", "--seq", "8",
                     "--batch", "2", "--steps", "1", "--policies", "none", "--out", str(out),
                     "--force"]) == 0
    assert out.read_bytes().startswith(b"\x89PNG")


def test_a_missing_feedback_folder_is_made_with_its_parents(tmp_path, capsys):
    """A feedback folder a few levels down, not there yet, is fine: it is made."""
    notebook = tmp_path / "x.ipynb"
    notebook.write_text("{}")
    folder = tmp_path / "class" / "week1" / "feedback"
    assert cli.main(["grade", str(notebook), "--feedback", str(folder)]) == 1  # not graded
    assert (folder / "x.md").exists() and "Not graded" in (folder / "x.md").read_text()


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root may write anywhere; the no_write_access fixture stands in")
def test_a_really_unwritable_folder_is_refused(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    with pytest.raises(SystemExit) as stop:
        cli.main(["trace", "--html", str(locked / "x.html")])
    assert stop.value.code == 2 and "not writable" in capsys.readouterr().err


# ---------------------------------------------------------------- a real process
@pytest.mark.slow
@pytest.mark.parametrize("argv, fix", [
    (["trace", "--html", "/etc/x.html"], "system folder"),
    (["compare", "--out", "/nonexistent-folder/x.png"], "does not exist"),
    (["tape", "--batch", "1000000"], "this machine has free"),
])
def test_a_real_process_exits_2_with_one_line(argv, fix):
    done = subprocess.run([sys.executable, "-m", "ckpt_course.cli", *argv], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert fix in done.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("error", [
    MemoryError(),
    RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 68719476736 "
                 "bytes. Error code 12 (Cannot allocate memory)"),
])
def test_the_allocators_out_of_memory_is_one_line(monkeypatch, capsys, error):
    """What the memory guard lets through (another process took the memory meanwhile) still
    ends in one line, not a traceback."""
    def allocate(*args, **kwargs):
        raise error
    monkeypatch.setattr("ckpt_course.tape.record_tape", allocate)
    with pytest.raises(SystemExit) as stop:
        cli.main(["tape", "--model", "hand-trace", "--batch", "2"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "ran out of memory" in err.strip().splitlines()[-1]
    assert "smaller --batch" in err.strip().splitlines()[-1]


def test_another_runtime_error_is_not_disguised(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug in the course")
    monkeypatch.setattr("ckpt_course.tape.record_tape", broken)
    with pytest.raises(RuntimeError, match="a bug in the course"):
        cli.main(["tape", "--model", "hand-trace", "--batch", "2"])
