"""The grader: pristine notebook + the learner's answer sources, run in a worker; checks in the
grader's process; a class graded into scorecards, a gradebook and feedback."""

import csv
import io
import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import torch
from grading_kit import CHECKS, POINTS, RIGHT, STUB, build_course, hints, learner, results, save

from ckpt_course import authoring, cli, grading
from ckpt_course.authoring import AuthoringError, tagged_name
from ckpt_course.grade_worker import MAX_MESSAGE, WireError, from_wire, receive, to_wire
from ckpt_course.grading import CheckResult, GradingError, Scorecard


@pytest.fixture(scope="module")
def course(tmp_path_factory):
    return build_course(tmp_path_factory.mktemp("course"))


# ---------------------------------------------------------------- fast: no worker


def test_transplant_takes_only_answer_cells(course):
    pristine = nbformat.read(course / "exercises" / "0_selftest.ipynb", as_version=4)
    mine = learner(course, answers={"0.1-bytes": RIGHT["0.1-bytes"]}, drop=["answer:0.2-tape"],
                   checks={"0.1-bytes": "pass"})
    mine.cells[0].source = "# my own title"
    for cell in mine.cells:
        if cell.cell_type == "code":
            cell.outputs = [nbformat.v4.new_output("stream", text="Correct!\n")]
    graded, notes = grading.transplant(pristine, mine)
    assert notes == ["answer 0.2-tape: not found in your notebook, graded as the empty stub"]
    for got, want in zip(graded.cells, pristine.cells, strict=True):
        if tagged_name(want, "answer") == "0.1-bytes":
            assert got.source == RIGHT["0.1-bytes"]
        else:
            assert got.source == want.source
        assert got.get("outputs", []) == [] and got.get("execution_count") is None


def test_answer_found_by_id_when_its_tag_was_lost(course):
    pristine = nbformat.read(course / "exercises" / "0_selftest.ipynb", as_version=4)
    mine = learner(course, answers=RIGHT)
    for cell in mine.cells:
        cell.metadata.pop("tags", None)
    graded, notes = grading.transplant(pristine, mine)
    assert notes == []
    assert [c.source for c in graded.cells if tagged_name(c, "answer")] == list(RIGHT.values())


def test_pristine_comes_from_the_built_notebook_or_its_source(course, tmp_path):
    built = (course / "exercises" / "0_selftest.ipynb").read_text()
    assert authoring.to_text(grading.find_pristine("0_selftest", course / "exercises")) == built

    clone = tmp_path / "clone" / "exercises"  # a learner working in exercises/ of their clone
    shutil.copytree(course / "exercises", clone)
    save(learner(course, answers=RIGHT), clone / "0_selftest.ipynb")
    assert authoring.to_text(grading.find_pristine("0_selftest", clone)) == built
    shutil.rmtree(clone / "src")
    with pytest.raises(GradingError, match="has been edited since it was built.*git checkout"):
        grading.find_pristine("0_selftest", clone)


def test_a_solution_in_the_exercises_folder_is_never_taken_as_pristine(course, tmp_path):
    folder = tmp_path / "exercises"
    shutil.copytree(course / "exercises", folder)
    shutil.copy(course / "solutions" / "0_selftest.ipynb", folder / "0_selftest.ipynb")
    found = grading.find_pristine("0_selftest", folder)  # rebuilt from src: the exercise
    assert authoring.to_text(found) == (course / "exercises" / "0_selftest.ipynb").read_text()


def test_the_exercise_is_named_by_metadata_or_file_name(course, tmp_path):
    folder = course / "exercises"
    renamed = learner(course)
    assert grading.exercise_of(renamed, Path("my attempt.ipynb"), folder) == ("0_selftest", [])
    assert grading.exercise_of({}, Path("0_peak.ipynb"), folder) == ("0_peak", [])
    name, notes = grading.exercise_of(renamed, Path("0_peak.ipynb"), folder)
    assert name == "0_selftest" and notes == [
        "the file is named like exercise 0_peak but holds exercise 0_selftest (its metadata): "
        "graded as 0_selftest"]


@pytest.mark.parametrize("named, message", [
    ("../solutions/0_selftest", "not a bare exercise name"),
    ("/abs/0_selftest", "not a bare exercise name"),
    ("0_selftest.ipynb", "not a bare exercise name"),
    ("..", "not a bare exercise name"),
    (["0_selftest"], "not a bare exercise name"),
    ("9_unknown", "which this course does not have"),
])
def test_metadata_may_only_name_one_of_the_course_exercises(course, named, message):
    nb = learner(course)
    nb.metadata["ckpt_course"]["exercise"] = named
    with pytest.raises(GradingError, match=message):
        grading.exercise_of(nb, Path("0_selftest.ipynb"), course / "exercises")


@pytest.mark.parametrize("name, content, reason", [
    ("gone.ipynb", None, "no such file"),
    ("notes.txt", b"hello", "not a notebook (expected a .ipynb file)"),
    ("empty.ipynb", b"", "the file is empty"),
    ("blank.ipynb", b"  \n", "the file is empty"),
    ("latin.ipynb", "{é}".encode("latin-1"), "not UTF-8"),
    ("broken.ipynb", b"{ not json", "not a notebook: "),
    ("list.ipynb", b"[1, 2]", "not a notebook: "),
    ("cells.ipynb", json.dumps({"cells": [5], "metadata": {}, "nbformat": 4,
                                "nbformat_minor": 5}).encode(),
     "not a notebook: its cell 1 is a int, not a cell"),
    ("huge.ipynb", b" " * (grading.MAX_NOTEBOOK_BYTES + 1), "larger than 20 MB"),
])
def test_unreadable_files_say_why(tmp_path, name, content, reason):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(GradingError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        grading.read_learner(path)


def test_fifos_links_and_folders_are_refused_without_blocking(tmp_path):
    import os

    fifo = tmp_path / "fifo.ipynb"
    os.mkfifo(fifo)  # nobody writes to it: reading it would block for ever
    loop = tmp_path / "loop.ipynb"
    loop.symlink_to(loop)
    (tmp_path / "folder.ipynb").mkdir()
    for path, reason in ((fifo, "not a regular file"), (loop, "a symbolic link loop"),
                         (tmp_path / "folder.ipynb", "a folder, not a notebook")):
        with pytest.raises(GradingError, match=reason):
            grading.read_learner(path)


def test_a_byte_order_mark_is_fine(course, tmp_path):
    path = tmp_path / "0_selftest.ipynb"
    path.write_bytes(b"\xef\xbb\xbf" + nbformat.writes(learner(course)).encode())
    nb, _ = grading.read_learner(path)
    assert nb.metadata.ckpt_course["exercise"] == "0_selftest"


def test_learner_text_reaches_every_report_as_one_line(tmp_path):
    fake = "boom\nmallory.ipynb  2/2\n  ok   a    2/2"
    cards = [Scorecard("x\nevil.ipynb  2/2", "0_x", [CheckResult("a", 0, 2, f"raised E: {fake}")],
                       [f"answer a failed: E: {fake}"], error="")]
    lines = grading.format_scorecards(cards).splitlines()
    assert len(lines) == 3 and not any(line.startswith("mallory") for line in lines)
    grading.write_csv(cards, tmp_path / "c.csv")
    assert len((tmp_path / "c.csv").read_text().splitlines()) == 2
    report = grading.write_feedback(cards, tmp_path / "fb")[0].read_text()
    assert "\nmallory" not in report and "\n  ok" not in report
    formula = [Scorecard("=HYPERLINK(1).ipynb", error="=cmd|' /C calc'!A0")]
    grading.write_csv(formula, tmp_path / "f.csv")
    row = list(csv.reader(open(tmp_path / "f.csv", newline="")))[1]
    assert row[0].startswith("'=") and row[-2].startswith("'=")


def test_feedback_for_a_link_loop_is_written(tmp_path):
    loop = tmp_path / "class" / "loop.ipynb"
    loop.parent.mkdir()
    loop.symlink_to(loop)
    cards = [Scorecard(str(loop), error="could not read the file: a symbolic link loop"),
             Scorecard(str(tmp_path / "class" / "ann.ipynb"), "0_x", [CheckResult("a", 1, 1)])]
    written = grading.write_feedback(cards, tmp_path / "fb")
    assert [p.name for p in written] == ["loop.md", "ann.md"]
    assert "a symbolic link loop" in written[0].read_text()


def test_duplicates_are_flagged():
    cards = [Scorecard("a.ipynb", "0_x", answers_sha256="1"), Scorecard("b.ipynb", "0_x"),
             Scorecard("c.ipynb", "0_x", answers_sha256="1"),
             Scorecard("d.ipynb", "0_y", answers_sha256="1")]
    grading.flag_duplicates(cards)
    assert [c.duplicate_of for c in cards] == ["", "", "a.ipynb", ""]
    assert cards[2].notes == ["duplicate: the same answers as a.ipynb"]


def test_a_path_named_twice_is_graded_once(tmp_path, monkeypatch):
    """`grade a.ipynb a.ipynb ./a.ipynb` is one file: one row, not a duplicate of itself."""
    monkeypatch.chdir(tmp_path)
    Path("a.txt").write_text("hello")
    cards = grading.grade(["a.txt", tmp_path / "b.txt", "a.txt", "./a.txt"], tmp_path, jobs=1)
    assert [(c.notebook, c.duplicate_of) for c in cards] == [("a.txt", ""),
                                                             (str(tmp_path / "b.txt"), "")]


def test_learner_text_is_one_clean_line():
    text = "boom\nalice.ipynb  2/2\r\n  ok   0.1  2/2\x1b[2J\u202eevil\u2028x\ty"
    cleaned = grading.clean(text)
    assert "\n" not in cleaned and "\r" not in cleaned and "\x1b" not in cleaned
    assert "\u202e" not in cleaned and "\u2028" not in cleaned
    assert cleaned == "boom / alice.ipynb  2/2 / ok   0.1  2/2 [2J evil / x y"


def test_checks_are_read_from_the_pristine_check_cells(course):
    pristine = nbformat.read(course / "exercises" / "0_selftest.ipynb", as_version=4)
    checks = grading.parse_checks(pristine)
    assert [(c.name, c.module, c.function, c.args, c.points) for c in checks] == [
        ("0.1-bytes", "ckpt_course.checks.selftest", "bytes_of", ("predicted_bytes",), 2.0),
        ("0.2-tape", "ckpt_course.checks.selftest", "tape_count", ("saved_tensor_count",), 1.0),
        ("0.3-double", "ckpt_course.checks.selftest", "doubled", ("doubled",), 1.0)]


@pytest.mark.parametrize("setup, check", [
    ("from ckpt_course.checks import selftest as checks", "x = 1\nchecks.bytes_of(f)"),
    ("from ckpt_course.checks import selftest as checks", "checks.bytes_of(f, hint=1)"),
    ("from ckpt_course.checks import selftest as checks", "checks.bytes_of(f())"),
    ("from ckpt_course.checks import selftest as checks", "assert f() == 1"),
    ("import os as checks", "checks.bytes_of(f)"),  # only modules of ckpt_course.checks
    ("from mymodule import selftest as checks", "checks.bytes_of(f)"),
])
def test_a_check_cell_must_be_one_call_of_the_package(setup, check):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(setup),
                nbformat.v4.new_code_cell(check, metadata={"tags": ["check:x"]})]
    with pytest.raises(GradingError, match="one call `checks.<check>"):
        grading.parse_checks(nb)


def test_points_tags_are_positive_numbers_on_check_cells(tmp_path):
    for tags, message in ((["check:a", "points:0"], "points:0 must be a positive number"),
                          (["check:a", "points:many"], "points:many must be"),
                          (["answer:a", "points:2"], "on a check cell")):
        source = tmp_path / "src" / "9_x.py"
        source.parent.mkdir(exist_ok=True)
        source.write_text(f"# %% tags={json.dumps(tags)}\nchecks.f(g)\n")
        with pytest.raises(AuthoringError, match=message):
            authoring.render(source)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_the_wire_carries_data_and_nothing_else(tmp_path):
    value = {"n": 3, "x": 1.5, "ok": True, "none": None, "s": "é", "t": (1, [2, 3]),
             "ops": {"mm", "sdpa"}, "frozen": frozenset({(1, 2)}),
             7: {"nested": (torch.arange(6).reshape(2, 3),)}}
    back = from_wire(*to_wire(value))
    tensor = back[7]["nested"][0]
    assert torch.equal(tensor, value[7]["nested"][0]) and type(tensor) is torch.Tensor
    assert {k: v for k, v in back.items() if k != 7} == {k: v for k, v in value.items() if k != 7}

    class Liar(int):
        def __eq__(self, other):
            return True

    for lie in (Liar(1), object(), torch.nn.Parameter(torch.ones(2)), lambda: 1, {object()}):
        with pytest.raises(WireError, match="is not data"):
            to_wire(lie)

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (marker.write_text, ("ran",))

    with pytest.raises(WireError, match="not a plain tensor"):
        from_wire(b'{"tensor": 0}', [pickle.dumps(Evil())])
    buffer = io.BytesIO()
    torch.save(Evil(), buffer)
    with pytest.raises(WireError, match="not a plain tensor"):
        from_wire(b'{"tensor": 0}', [buffer.getvalue()])
    assert not marker.exists()
    for text in (b'{"call": 1}', b'{"tensor": 5}', b"nan nan"):
        with pytest.raises(WireError):
            from_wire(text, [])


def test_a_giant_integer_is_refused_by_the_wire_with_its_cause():
    """json.dumps cannot write an int of over 4,300 digits: the wire names that, as data it
    cannot send, instead of the worker dying on it."""
    assert from_wire(*to_wire(2**8000)) == 2**8000
    for giant in (10**5000, [1, -(10**5000)]):
        with pytest.raises(WireError, match="is too big to be sent back"):
            to_wire(giant)


def test_a_message_over_the_cap_is_refused_before_it_is_read():
    header = (1).to_bytes(8, "big") + (MAX_MESSAGE + 1).to_bytes(8, "big")
    stream = io.BytesIO(header)
    with pytest.raises(WireError, match="more than 32 MB"):
        receive(stream.read)
    assert stream.tell() == 16  # the 32 MB were never read


def test_reports(tmp_path):
    cards = [Scorecard("a/alice.ipynb", "0_x", [CheckResult("a", 2, 2),
                                                CheckResult("b", 0.5, 1, "b: two per layer")]),
             Scorecard("b/bob.ipynb", "0_x", [CheckResult("a", 0, 2, "Error: x\ny"),
                                              CheckResult("b", 1, 1)], ["answer c failed: boom"]),
             Scorecard("c/carol.ipynb", error="the file is empty: was the notebook saved?")]
    assert grading.format_scorecards(cards).splitlines() == [
        "a/alice.ipynb  2.5/3", "  ok   a    2/2", "  PART b  0.5/1  b: two per layer",
        "b/bob.ipynb  1/3", "  FAIL a    0/2  Error: x / y",
        "  ok   b    1/1", "  note: answer c failed: boom",
        "c/carol.ipynb  not graded: the file is empty: was the notebook saved?"]

    grading.write_csv(cards, tmp_path / "class.csv")
    with open(tmp_path / "class.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows == [["notebook", "exercise", "a", "b", "score", "max_score", "error",
                     "duplicate_of"],
                    ["a/alice.ipynb", "0_x", "2", "0.5", "2.5", "3", "", ""],
                    ["b/bob.ipynb", "0_x", "0", "1", "1", "3", "", ""],
                    ["c/carol.ipynb", "", "", "", "0", "", cards[2].error, ""]]

    grading.write_json(cards, tmp_path / "class.json")
    data = json.loads((tmp_path / "class.json").read_text())
    assert [(d["notebook"], d["score"], d["error"]) for d in data] == [
        ("a/alice.ipynb", "2.5/3", ""), ("b/bob.ipynb", "1/3", ""),
        ("c/carol.ipynb", "0/0", cards[2].error)]

    written = grading.write_feedback(cards, tmp_path / "feedback")
    assert [p.name for p in written] == ["a_alice.md", "b_bob.md", "c_carol.md"]
    bob = written[1].read_text()
    assert "Score: **1/3**" in bob and "| a | 0/2 | see below |" in bob
    assert "## a\n\n    Error: x / y" in bob and "- answer c failed: boom" in bob
    assert "**Not graded:** the file is empty" in written[2].read_text()


@pytest.mark.parametrize("value, message", [("0", "positive"), ("-5", "positive"),
                                            ("inf", "positive"), ("abc", "number of seconds")])
def test_timeout_must_be_a_positive_number_before_any_work(course, capsys, value, message):
    with pytest.raises(SystemExit) as stop:
        cli.grade_main(["whatever.ipynb", "--timeout", value])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and "whatever" not in err.split("usage")[0]
    with pytest.raises(ValueError, match="timeout must be a positive number"):
        grading.grade(["whatever.ipynb"], course / "exercises", timeout=-5)


def test_a_missing_exercises_folder_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        cli.grade_main([str(tmp_path / "a.ipynb"), "--exercises", str(tmp_path / "nowhere")])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "nowhere does not exist" in err and "Traceback" not in err


def test_grading_and_authoring_do_not_import_torch():
    code = ("import sys, ckpt_course.grading, ckpt_course.authoring;"
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# ---------------------------------------------------------------- slow: workers


@pytest.fixture(scope="module")
def graded_class(course, tmp_path_factory):
    """A class, each learner in a folder of their own, graded in one call (2 at a time)."""
    root = tmp_path_factory.mktemp("class")
    students = {
        "correct": learner(course, answers=RIGHT),
        "untouched": learner(course),
        "wrong": learner(course, answers={**RIGHT, "0.1-bytes":
                                          "def predicted_bytes(batch, width):\n    return 999"}),
        "partial": learner(course, answers={**RIGHT, "0.2-tape":
                                            "def saved_tensor_count(layers):\n    return layers"}),
        "no_answer": learner(course, answers=RIGHT, drop=["answer:0.2-tape"]),
        "syntax": learner(course, answers={**RIGHT, "0.2-tape":
                                           "def saved_tensor_count(layers):\n    return (2 *"}),
    }
    paths = {who: save(nb, root / who / "0_selftest.ipynb") for who, nb in students.items()}
    paths["renamed"] = save(learner(course, answers=RIGHT), root / "renamed" / "mine (1).ipynb")
    paths["empty"] = root / "empty" / "0_selftest.ipynb"
    paths["empty"].parent.mkdir()
    paths["empty"].write_bytes(b"")
    paths["foreign"] = save(nbformat.v4.new_notebook(), root / "foreign" / "9_other.ipynb")
    paths["missing"] = root / "missing" / "0_selftest.ipynb"
    before = {who: (p.read_bytes(), p.stat().st_mtime_ns) for who, p in paths.items()
              if p.exists()}
    cards = grading.grade(list(paths.values()), course / "exercises", timeout=20, jobs=2)
    after = {who: (p.read_bytes(), p.stat().st_mtime_ns) for who, p in paths.items()
             if p.exists()}
    return dict(zip(paths, cards, strict=True)), before, after


@pytest.mark.slow
def test_correct_and_renamed_notebooks_get_full_marks(graded_class):
    for who in ("correct", "renamed"):
        card = graded_class[0][who]
        assert card.score == "4/4" and card.error == ""
        assert card.notes == ([] if who == "correct" else [  # the same answers: flagged
            f"duplicate: the same answers as {graded_class[0]['correct'].notebook}"])
        assert [(c.name, c.points) for c in card.checks] == list(POINTS.items())
        assert card.sandbox == ""  # Landlock confined the worker on this machine


@pytest.mark.slow
def test_untouched_exercise_fails_at_each_check(graded_class):
    card = graded_class[0]["untouched"]
    assert card.score == "0/4" and card.notes == []
    for name, hint in hints(card).items():
        assert hint.endswith(STUB.format(name))


@pytest.mark.slow
def test_wrong_and_partly_right_answers(graded_class):
    wrong, partial = graded_class[0]["wrong"], graded_class[0]["partial"]
    assert results(wrong) == {"0.1-bytes": 0, "0.2-tape": 1, "0.3-double": 1}
    assert "returned 999. Count the elements" in hints(wrong)["0.1-bytes"]
    assert results(partial) == {"0.1-bytes": 2, "0.2-tape": 0.5, "0.3-double": 1}
    assert hints(partial)["0.2-tape"] == ("two per layer: each Linear+ReLU pair keeps its input "
                                          "and its ReLU output")


@pytest.mark.slow
def test_missing_and_broken_answers_are_noted(graded_class):
    no_answer, syntax = graded_class[0]["no_answer"], graded_class[0]["syntax"]
    assert results(no_answer) == {"0.1-bytes": 2, "0.2-tape": 0, "0.3-double": 1}
    assert no_answer.notes == [
        "answer 0.2-tape: not found in your notebook, graded as the empty stub"]
    assert results(syntax) == {"0.1-bytes": 2, "0.2-tape": 0, "0.3-double": 1}
    assert hints(syntax)["0.2-tape"].endswith("raised NameError: name 'saved_tensor_count' is "
                                              "not defined")
    assert syntax.notes == ["answer 0.2-tape failed: SyntaxError: incomplete input "
                            "(line 2 of the cell)"]


@pytest.mark.slow
def test_files_that_cannot_be_graded_get_their_own_row(graded_class):
    cards = graded_class[0]
    empty, foreign, missing = cards["empty"], cards["foreign"], cards["missing"]
    assert empty.error == "the file is empty: was the notebook saved?"
    assert results(empty) == dict.fromkeys(CHECKS, 0)  # the exercise is known from the name
    assert foreign.error.startswith("no exercise named '9_other'") and foreign.checks == []
    assert missing.error == "no such file"
    assert cards["correct"].score == "4/4"  # and the rest of the class was graded


@pytest.mark.slow
def test_grading_never_touches_the_learners_files(graded_class):
    _, before, after = graded_class
    assert before == after and len(before) == 9


@pytest.mark.slow
def test_command_line_writes_gradebook_and_feedback(course, tmp_path, capsys):
    good = save(learner(course, answers=RIGHT), tmp_path / "ann" / "0_selftest.ipynb")
    bad = save(learner(course), tmp_path / "ben" / "0_selftest.ipynb")
    empty = tmp_path / "cat" / "0_selftest.ipynb"
    empty.parent.mkdir()
    empty.touch()
    code = cli.grade_main([str(good), str(bad), str(empty), "--exercises",
                               str(course / "exercises"), "--timeout", "20", "--jobs", "1",
                               "--csv", str(tmp_path / "c.csv"), "--feedback",
                               str(tmp_path / "fb")])
    assert code == 1
    assert "3 notebooks, 4/12 points; 1 could not be graded" in capsys.readouterr().out
    rows = list(csv.DictReader(open(tmp_path / "c.csv", newline="")))
    assert [(r["0.1-bytes"], r["0.2-tape"], r["0.3-double"], r["score"], r["max_score"])
            for r in rows] == [("2", "1", "1", "4", "4"), ("0", "0", "0", "0", "4"),
                               ("0", "0", "0", "0", "4")]
    assert rows[2]["error"] == "the file is empty: was the notebook saved?"
    report = (tmp_path / "fb" / "ben_0_selftest.md").read_text()
    assert "Score: **0/4**" in report and "NotImplementedError" in report
    assert "return 4 * batch" not in report and "2 * layers" not in report
    assert sorted(p.name for p in (tmp_path / "fb").iterdir()) == [
        "ann_0_selftest.md", "ben_0_selftest.md", "cat_0_selftest.md"]


@pytest.mark.slow
def test_processes_the_learner_leaves_behind_are_killed(tmp_path):
    from ckpt_course.grade_remote import Cell, Session

    mark = "300.5113"  # in the sleepers' argv: their pids are the namespace's, not ours
    source = ("import glob, subprocess, time\n"
              "def running():\n    n = 0\n    for p in glob.glob('/proc/[0-9]*/cmdline'):\n"
              "        try:\n"
              f"            n += open(p, 'rb').read() == b'sleep\\x00{mark}\\x00'\n"
              "        except OSError:\n            pass\n    return n\n"
              "def sleeper():\n    subprocess.Popen(['sh', '-c', "
              f"'sleep {mark} & sleep {mark}'], start_new_session=True)\n"
              "    for _ in range(1000):  # until both sleeps run\n"
              "        if running() == 2:\n            return 1\n"
              "        time.sleep(0.01)\n    return 0")

    def sleepers():
        found = []
        for p in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                found += [p] if mark.encode() in p.read_bytes() else []
            except OSError:
                pass
        return found

    with Session([Cell("answer a", source, "", True)], 20, tmp_path) as session:
        assert session.call("sleeper", (), {}) == 1
        assert sleepers()  # a setsid'd shell and its own child, both running
    assert not sleepers()  # killed and reaped when their worker ended


PEAK_ANSWERS = {
    "chunked": None,  # the solution
    "whole": "import torch\ndef sum_of_squares(n):\n"
             "    return float(torch.arange(n, dtype=torch.float64).square().sum())",
    "forked": "import os, struct, torch\ndef sum_of_squares(n):\n    r, w = os.pipe()\n"
              "    if os.fork() == 0:  # a child does the work; the parent stays small\n"
              "        total = float(torch.arange(n, dtype=torch.float64).square().sum())\n"
              "        os.write(w, struct.pack('d', total))\n        os._exit(0)\n"
              "    return struct.unpack('d', os.read(r, 8))[0]",
}


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peaks need Linux")
def test_peak_memory_is_measured_over_the_whole_process_tree(course, tmp_path):
    solved = nbformat.read(course / "solutions" / "0_peak.ipynb", as_version=4)
    paths = []
    for who, source in PEAK_ANSWERS.items():
        nb = learner(course, stem="0_peak", answers={} if source is None else
                     {"0.4-peak": source})
        if source is None:
            nb.cells = solved.cells
        paths.append(save(nb, tmp_path / who / "0_peak.ipynb"))
    cards = grading.grade(paths, course / "exercises", timeout=60, jobs=2)
    assert [card.score for card in cards] == ["2/2", "0/2", "0/2"]
    assert all("held all n numbers at once" in card.checks[0].hint for card in cards[1:])


def test_rules_poison_every_route_and_leave_no_original_code():
    """In a process of its own (the rules are for good): after Rules.enforce, torch's checkpoint
    raises by every route, no original code object of it survives (so none can be rebuilt),
    its file is unreadable, and what the exercise still needs (saved_tensors_hooks) works."""
    code = """
import gc, importlib, sys, types, weakref
import torch, torch.utils.checkpoint as c
from ckpt_course.grade_worker import Rules
codes = [weakref.ref(o.__code__) for o in gc.get_objects() if type(o) is types.FunctionType
         and o.__code__.co_filename.endswith('torch/utils/checkpoint.py')]
Rules(['torch.utils.checkpoint', 'torch.autograd.graph:save_on_cpu']).enforce()
gc.collect()
assert codes and all(w() is None for w in codes), 'an original code object survived'
x = torch.ones(2)
routes = [lambda: c.checkpoint(lambda t: t, x, use_reentrant=False),
          lambda: sys.modules['torch.utils.checkpoint'].checkpoint_sequential([], 1, x),
          lambda: importlib.import_module('torch.utils.checkpoint').CheckpointFunction.apply(
              lambda t: t, False, x),
          lambda: type('Mine', (c.CheckpointFunction,), {}).apply(lambda t: t, False, x),
          lambda: torch.autograd.graph.save_on_cpu()]
for route in routes:
    try:
        route()
    except PermissionError as e:
        assert 'rule broken' in str(e), e
    else:
        raise AssertionError('a route worked')
try:
    open(c.__file__).read()
except PermissionError:
    pass
else:
    raise AssertionError('the source is readable')
with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
    (x.requires_grad_() * 2).sum().backward()
print('ok')
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.stdout.strip() == "ok", done.stderr[-2000:]


@pytest.mark.parametrize("text, message", [
    ("segments:0..3000000", "numbers in this policy go up to 64"),
    ("segments:" + "0," * 400, "a policy string of 809 characters"),
    ("every-99999999999999999999", "numbers in this policy go up to 64"),
])
def test_learner_policies_are_size_checked_before_they_are_parsed(text, message):
    import tracemalloc

    from ckpt_course.checks import CheckFailed, learner_policy

    tracemalloc.start()
    with pytest.raises(CheckFailed, match=message):
        learner_policy(text, largest=64)
    assert tracemalloc.get_traced_memory()[1] < 2**20  # nothing was expanded
    tracemalloc.stop()
    assert str(learner_policy("segments:0-2,5", largest=64)) == "segments:0-2,5"


def test_a_grader_failure_has_its_own_exit_code(course, tmp_path, capsys, monkeypatch):
    path = save(learner(course, answers=RIGHT), tmp_path / "0_selftest.ipynb")

    def broken(*args, **kwargs):
        raise RuntimeError("a bug\nwith two lines")

    monkeypatch.setattr(grading, "_grade_into", broken)
    code = cli.grade_main([str(path), "--exercises", str(course / "exercises"), "--jobs", "1"])
    assert code == grading.EXIT_GRADER_FAILED == 3
    out, err = capsys.readouterr()
    assert "the grader failed on this file: RuntimeError: a bug" in out
    assert "exit code 3" in err and "Traceback" not in out + err
    monkeypatch.setattr(grading, "grade", broken)
    assert cli.grade_main([str(path), "--exercises", str(course / "exercises")]) == 3
    assert "error: the grader failed: RuntimeError" in capsys.readouterr().err


def test_a_memory_run_is_compared_by_a_digest_of_its_data():
    from ckpt_course.grade_worker import digest

    run = {"loss": torch.tensor(1.5), "grads": [torch.ones(3, 2), torch.zeros(2).bfloat16()],
           "bytes_to_host": 96}
    same = {**run, "bytes_to_host": 0, "grads": [g.clone() for g in run["grads"]]}
    assert digest(run, ["loss", "grads"]) == digest(same, ["loss", "grads"])
    assert digest(run) != digest(same)  # the counter differs
    for changed in ({**run, "loss": torch.tensor(1.25)},
                    {**run, "grads": [torch.ones(2, 3), run["grads"][1]]},  # same bytes
                    {**run, "grads": [torch.ones(3, 2).double(), run["grads"][1]]},
                    {**run, "grads": run["grads"][:1]}):
        assert digest(changed, ["loss", "grads"]) != digest(run, ["loss", "grads"])
    with pytest.raises(WireError, match="is not data"):
        digest({"loss": torch.nn.Parameter(torch.ones(1))}, ["loss"])
