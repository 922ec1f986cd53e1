"""The grader: learners' answers in a pristine copy, run by nbval, read back as a scorecard."""

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from ckpt_course import authoring, cli, grading
from ckpt_course.authoring import tagged_name
from ckpt_course.grading import CheckResult, GradingError, Scorecard

TOY = Path(__file__).parent / "data" / "src" / "0_toy.py"
CHECKS = ["0.1-bytes", "0.2-tape", "0.2-tape-scales"]
RIGHT = {"0.1-bytes": "def predicted_bytes(batch, width):\n    return 4 * batch * width",
         "0.2-tape": "def saved_tensor_count(layers):\n    return 2 * layers"}
STUB = "NotImplementedError: Exercise {}: replace this line with your answer"


@pytest.fixture(scope="module")
def course(tmp_path_factory):
    """exercises/src/0_toy.py built into exercises/ and solutions/, as in the repo."""
    root = tmp_path_factory.mktemp("course")
    (root / "exercises" / "src").mkdir(parents=True)
    shutil.copy(TOY, root / "exercises" / "src")
    authoring.build_all(root / "exercises" / "src", root / "solutions", root / "exercises")
    return root


def learner(course, answers=(), drop=(), checks=(), outputs=False):
    """The pristine exercise with some answers filled in, cells dropped (by tag) or checks
    rewritten."""
    nb = nbformat.read(course / "exercises" / "0_toy.ipynb", as_version=4)
    answers, checks = dict(answers), dict(checks)
    kept = []
    for cell in nb.cells:
        if set(cell.metadata.get("tags", [])) & set(drop):
            continue
        if tagged_name(cell, "answer") in answers:
            cell.source = answers[tagged_name(cell, "answer")]
        if tagged_name(cell, "check") in checks:
            cell.source = checks[tagged_name(cell, "check")]
        if outputs and cell.cell_type == "code":  # saved outputs that claim all went well
            cell.outputs = [nbformat.v4.new_output("stream", text="all checks passed!\n")]
            cell.execution_count = None if tagged_name(cell, "answer") else 7
        kept.append(cell)
    nb.cells = kept
    return nb


def save(nb, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


def by_name(card):
    return {c.name: c for c in card.checks}


# ---------------------------------------------------------------- fast: no kernel


def test_hint_keeps_the_exception_and_drops_the_source():
    message = (
        "Notebook cell execution failed\nCell 2: Cell execution caused an exception\n\n"
        "Input:\nassert f() == 1024, 'Count the bytes:\\nthen multiply'\n\nTraceback:\n\n"
        + "-" * 75 + "\nAssertionError" + " " * 28 + "Traceback (most recent call last)\n"
        "Cell In[1], line 1\n----> 1 assert f() == 1024, 'Count the bytes:\\nthen multiply'\n\n"
        "AssertionError: Count the bytes:\nthen multiply\n"
    )
    assert grading.hint(message, 60) == "AssertionError: Count the bytes:\nthen multiply"
    syntax = ("Cell 1: Cell execution caused an exception\n\nInput:\ndef f(:\n\nTraceback:\n\n"
              "  Cell In[1], line 3\n    def f(:\n          ^\nSyntaxError: invalid syntax\n\n")
    assert grading.hint(syntax, 60) == "SyntaxError: invalid syntax (line 3 of the cell)"
    timeout = ("Cell 4: Timeout of 5 seconds exceeded executing cell\n\nTraceback:\n\n"
               "KeyboardInterrupt: ")
    assert grading.hint(timeout, 5) == ("ran out of time (5 s per cell) and was interrupted: "
                                        "an endless loop?")
    assert "kernel was stopped" in grading.hint("pytest plugin exception: Kernel dead on test "
                                                "start", 5)
    assert grading.hint("\x1b[31mCell 1: odd\x1b[0m", 5) == "odd"


def test_transplant_takes_only_answer_cells(course):
    pristine = nbformat.read(course / "exercises" / "0_toy.ipynb", as_version=4)
    mine = learner(course, answers=RIGHT, checks={"0.1-bytes": "pass"}, drop=["answer:0.2-tape"],
                   outputs=True)
    mine.cells[0].source = "# my own title"
    graded, notes = grading.transplant(pristine, mine)
    assert notes == ["answer 0.2-tape: not found in your notebook, graded as the empty stub"]
    for got, want in zip(graded.cells, pristine.cells, strict=True):
        if tagged_name(want, "answer") == "0.1-bytes":
            assert got.source == RIGHT["0.1-bytes"]
        else:
            assert got.source == want.source
        assert got.get("outputs", []) == [] and got.get("execution_count") is None


def test_answer_found_by_id_when_its_tag_was_lost(course):
    pristine = nbformat.read(course / "exercises" / "0_toy.ipynb", as_version=4)
    mine = learner(course, answers=RIGHT)
    for cell in mine.cells:
        cell.metadata.pop("tags", None)
    graded, notes = grading.transplant(pristine, mine)
    assert notes == []
    assert [c.source for c in graded.cells if tagged_name(c, "answer")] == list(RIGHT.values())


def test_pristine_comes_from_the_built_notebook_or_its_source(course, tmp_path):
    mine = save(learner(course, answers=RIGHT), tmp_path / "alice" / "0_toy.ipynb")
    pristine = grading.find_pristine(mine, course / "exercises")
    assert authoring.to_text(pristine) == (course / "exercises" / "0_toy.ipynb").read_text()

    # a learner working in exercises/ of their clone: that file is no longer pristine
    clone = tmp_path / "clone" / "exercises"
    shutil.copytree(course / "exercises", clone)
    save(learner(course, answers=RIGHT), clone / "0_toy.ipynb")
    pristine = grading.find_pristine(clone / "0_toy.ipynb", clone)
    assert authoring.to_text(pristine) == (course / "exercises" / "0_toy.ipynb").read_text()
    shutil.rmtree(clone / "src")
    with pytest.raises(GradingError, match="has been edited since it was built.*git checkout"):
        grading.find_pristine(clone / "0_toy.ipynb", clone)

    renamed = save(learner(course), tmp_path / "alice" / "my attempt.ipynb")
    assert grading.find_pristine(renamed, course / "exercises").metadata.ckpt_course[
        "exercise"] == "0_toy"


def test_bad_inputs_are_all_reported_before_anything_runs(course, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    stranger = save(nbformat.v4.new_notebook(), tmp_path / "9_other.ipynb")
    with pytest.raises(GradingError) as error:
        grading.grade([tmp_path / "missing.ipynb", text, stranger], course / "exercises")
    message = str(error.value)
    assert "missing.ipynb: no such file" in message
    assert "notes.txt: not a notebook" in message
    assert "9_other.ipynb: no exercise of that name" in message and "0_toy.ipynb" in message
    assert cli.grade_main([str(tmp_path / "missing.ipynb"), "--exercises",
                               str(course / "exercises")]) == 2


def test_a_broken_notebook_file_gets_a_scorecard_not_a_crash(course, tmp_path):
    broken = tmp_path / "0_toy.ipynb"
    broken.write_text("{ not json")
    [card] = grading.grade([broken], course / "exercises")
    assert card.score == "0/3" and [c.name for c in card.checks] == CHECKS
    assert card.notes[0].startswith("could not read the notebook")


def test_reports(tmp_path):
    cards = [Scorecard("alice.ipynb", [CheckResult("a", True), CheckResult("b", False,
                                                                           "Error: x\ny")]),
             Scorecard("bob.ipynb", [CheckResult("a", True), CheckResult("b", True)],
                       ["answer c failed: boom"])]
    text = grading.format_scorecards(cards)
    assert text.splitlines() == ["alice.ipynb  1/2", "  ok   a", "  FAIL b  Error: x",
                                 "          y", "bob.ipynb  2/2", "  ok   a", "  ok   b",
                                 "  note: answer c failed: boom"]
    grading.write_csv(cards, tmp_path / "class.csv")
    with open(tmp_path / "class.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["notebook"], r["check"], r["passed"]) for r in rows] == [
        ("alice.ipynb", "a", "1"), ("alice.ipynb", "b", "0"), ("bob.ipynb", "a", "1"),
        ("bob.ipynb", "b", "1")]
    assert rows[1]["hint"] == "Error: x\ny"
    grading.write_json(cards, tmp_path / "class.json")
    data = json.loads((tmp_path / "class.json").read_text())
    assert [(d["notebook"], d["score"], d["passed"], d["total"]) for d in data] == [
        ("alice.ipynb", "1/2", 1, 2), ("bob.ipynb", "2/2", 2, 2)]
    assert data[1]["notes"] == ["answer c failed: boom"]


# ---------------------------------------------------------------- slow: real kernels


@pytest.fixture(scope="module")
def graded_class(course, tmp_path_factory):
    """A class of learners, each in a folder of their own, graded in one call."""
    root = tmp_path_factory.mktemp("class")
    loop = "def predicted_bytes(batch, width):\n    while True:\n        pass"
    students = {
        "correct": learner(course, answers=RIGHT),
        "untouched": learner(course),
        "wrong": learner(course, answers={**RIGHT, "0.1-bytes":
                                          "def predicted_bytes(batch, width):\n    return 999"}),
        "no_checks": learner(course, answers={**RIGHT, "0.2-tape":
                                              "def saved_tensor_count(layers):\n    return 1"},
                             drop=["check:0.1-bytes"], checks={"0.2-tape": "pass",
                                                         "0.2-tape-scales": "pass"}),
        "no_answer": learner(course, answers=RIGHT, drop=["answer:0.2-tape"]),
        "syntax": learner(course, answers={**RIGHT, "0.2-tape":
                                           "def saved_tensor_count(layers):\n    return (2 *"}),
        "stale": learner(course, answers={**RIGHT, "0.1-bytes":
                                          "def predicted_bytes(batch, width):\n    return 0"},
                         outputs=True),
        "loop": learner(course, answers={**RIGHT, "0.1-bytes": loop}),
    }
    paths = {who: save(nb, root / who / "0_toy.ipynb") for who, nb in students.items()}
    before = {who: (p.read_bytes(), p.stat().st_mtime_ns) for who, p in paths.items()}
    cards = grading.grade(list(paths.values()), course / "exercises", timeout=5, jobs=2)
    after = {who: (p.read_bytes(), p.stat().st_mtime_ns) for who, p in paths.items()}
    return dict(zip(students, cards, strict=True)), before, after


@pytest.mark.slow
def test_correct_notebook_passes_everything(graded_class):
    card = graded_class[0]["correct"]
    assert card.score == "3/3" and card.notes == []
    assert [c.name for c in card.checks] == CHECKS


@pytest.mark.slow
def test_untouched_exercise_fails_at_each_check_and_nowhere_else(graded_class):
    card = graded_class[0]["untouched"]
    assert card.score == "0/3" and card.notes == []
    assert [c.hint for c in card.checks] == [STUB.format("0.1-bytes"), STUB.format("0.2-tape"),
                                             STUB.format("0.2-tape")]


@pytest.mark.slow
def test_wrong_answer_shows_the_hint_not_the_answer(graded_class):
    card = graded_class[0]["wrong"]
    assert card.score == "2/3"
    bytes_check = by_name(card)["0.1-bytes"]
    assert bytes_check.hint == ("AssertionError: predicted_bytes(8, 32) returned 999. Count the "
                                "elements (batch x width), then the bytes of one float32.")
    assert "1024" not in bytes_check.hint and "4 * BATCH" not in bytes_check.hint


@pytest.mark.slow
def test_deleted_and_edited_checks_are_still_graded(graded_class):
    card = graded_class[0]["no_checks"]
    assert [(c.name, c.passed) for c in card.checks] == [
        ("0.1-bytes", True), ("0.2-tape", False), ("0.2-tape-scales", False)]
    assert "saved_tensor_count(3) returned 1" in by_name(card)["0.2-tape"].hint


@pytest.mark.slow
def test_deleted_answer_cell_is_graded_as_its_stub(graded_class):
    card = graded_class[0]["no_answer"]
    assert card.score == "1/3"
    assert by_name(card)["0.2-tape"].hint == STUB.format("0.2-tape")
    assert card.notes == ["answer 0.2-tape: not found in your notebook, graded as the empty stub"]


@pytest.mark.slow
def test_syntax_error_in_an_answer(graded_class):
    card = graded_class[0]["syntax"]
    assert [(c.name, c.passed) for c in card.checks] == [
        ("0.1-bytes", True), ("0.2-tape", False), ("0.2-tape-scales", False)]
    assert by_name(card)["0.2-tape"].hint == (
        "NameError: name 'saved_tensor_count' is not defined")
    assert card.notes == ["answer 0.2-tape failed: SyntaxError: incomplete input "
                          "(line 2 of the cell)"]


@pytest.mark.slow
def test_stale_saved_outputs_do_not_count(graded_class):
    card = graded_class[0]["stale"]
    assert [(c.name, c.passed) for c in card.checks] == [
        ("0.1-bytes", False), ("0.2-tape", True), ("0.2-tape-scales", True)]
    assert "returned 0" in by_name(card)["0.1-bytes"].hint


@pytest.mark.slow
def test_endless_loop_fails_by_timeout_and_grading_goes_on(graded_class):
    cards = graded_class[0]
    card = cards["loop"]
    assert [(c.name, c.passed) for c in card.checks] == [
        ("0.1-bytes", False), ("0.2-tape", True), ("0.2-tape-scales", True)]
    assert by_name(card)["0.1-bytes"].hint == (
        "ran out of time (5 s per cell) and was interrupted: an endless loop?")
    assert list(cards)[-1] == "loop" and card.notes == []


@pytest.mark.slow
def test_grading_never_touches_the_learners_file(graded_class):
    _, before, after = graded_class
    assert before == after


@pytest.mark.slow
def test_a_kernel_that_ignores_the_interrupt_is_stopped_and_later_checks_say_so(course, tmp_path):
    frozen = ("import os, signal\ndef predicted_bytes(batch, width):\n"
              "    os.kill(os.getpid(), signal.SIGSTOP)")  # stopped: deaf to the interrupt
    path = save(learner(course, answers={**RIGHT, "0.1-bytes": frozen}), tmp_path / "0_toy.ipynb")
    [card] = grading.grade([path], course / "exercises", timeout=1)
    assert [c.passed for c in card.checks] == [False, False, False]
    assert "ignored the interrupt and its kernel was stopped" in card.checks[0].hint
    assert card.checks[1].hint == card.checks[2].hint == (
        "not run: the kernel was stopped after an earlier cell ran out of time")


@pytest.mark.slow
def test_whole_notebook_safety_net(course, tmp_path):
    path = save(learner(course, answers=RIGHT), tmp_path / "0_toy.ipynb")
    [card] = grading.grade([path], course / "exercises", total_timeout=0.5)
    assert card.score == "0/3"
    assert {c.hint for c in card.checks} == {
        "not graded: the notebook ran longer than 0.5 s in all"}


@pytest.mark.slow
def test_command_line_grades_a_learner_working_in_their_clone(course, tmp_path, capsys):
    clone = tmp_path / "clone" / "exercises"
    shutil.copytree(course / "exercises", clone)
    save(learner(course, answers=RIGHT), clone / "0_toy.ipynb")
    wrong = save(learner(course), tmp_path / "bob" / "0_toy.ipynb")
    code = cli.grade_main([str(clone / "0_toy.ipynb"), str(wrong), "--exercises", str(clone),
                               "--timeout", "5", "--csv", str(tmp_path / "c.csv"),
                               "--json", str(tmp_path / "c.json")])
    assert code == 1
    out = capsys.readouterr().out
    assert "0_toy.ipynb  3/3" in out and "2 notebooks, 3/6 checks passed" in out
    rows = list(csv.DictReader(open(tmp_path / "c.csv", newline="")))
    assert [r["passed"] for r in rows] == ["1", "1", "1", "0", "0", "0"]
    assert [d["score"] for d in json.loads((tmp_path / "c.json").read_text())] == ["3/3", "0/3"]


@pytest.mark.slow
def test_grading_and_authoring_do_not_import_torch():
    code = ("import sys, ckpt_course.grading, ckpt_course.authoring;"
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
