"""The lessons' shape: commit, then reveal. Each Predict cell holds only the learner's own
answers (shipped as None); the derivation sits in a collapsed cell whose visible first line says
nothing; a later cell reveals every answer; the notebooks ship without outputs, with the python3
kernel. A "Go deeper" part is a heading JupyterLab shows collapsed, and the core never needs a
name only a Go deeper cell defines (a learner may skip them). And a lesson in which a learner
typed a wrong prediction runs to the end and shows the gap and the reason."""

import ast
import re
from pathlib import Path

import lesson_runs
import nbformat
import pytest
from lesson_runs import output_lines

from ckpt_course.predicts import all_tables, lookup
from ckpt_course.reveal import NO_PREDICTION, STRICT_ENV, reveal

ROOT = Path(__file__).resolve().parents[1]
LESSONS = sorted((ROOT / "notebooks").glob("*.ipynb"))
LESSON_4 = ROOT / "notebooks" / "4_diagnose_a_real_oom.ipynb"


def tagged(cell, tag):
    return tag in cell.metadata.get("tags", [])


def answers(cell) -> dict[str, ast.expr]:
    tree = ast.parse(cell.source)
    return {t.id: node.value for node in tree.body if isinstance(node, ast.Assign)
            for t in node.targets if isinstance(t, ast.Name) and t.id.startswith("my_")}


def revealed(source: str) -> set[str]:
    return {call.args[0].id for call in ast.walk(ast.parse(source))
            if isinstance(call, ast.Call) and getattr(call.func, "id", "") == "reveal"
            and call.args and isinstance(call.args[0], ast.Name)}


@pytest.fixture(params=LESSONS, ids=[p.stem for p in LESSONS])
def lesson(request):
    return nbformat.read(request.param, as_version=4)


def test_every_predict_ships_empty_and_is_revealed_after_its_derivation(lesson):
    code = [c for c in lesson.cells if c.cell_type == "code"]
    predicts = [i for i, c in enumerate(code) if tagged(c, "predict")]
    assert predicts, "a lesson with no Predict"
    for i in predicts:
        mine = answers(code[i])
        assert mine, f"Predict cell {i} asks for no my_* answer"
        assert all(isinstance(v, ast.Constant) and v.value is None for v in mine.values()), (
            f"Predict cell {i} must ship its answers as None: {list(mine)}")
        assert "predicted" not in code[i].source, f"Predict cell {i} gives the derivation away"
        later = code[i + 1:]
        shown = next(j for j, c in enumerate(later) if revealed(c.source) & set(mine))
        assert set(mine) <= set().union(*(revealed(c.source) for c in later)), "not revealed"
        derivation = [c for c in later[:shown] if tagged(c, "derivation")]
        assert derivation, f"Predict cell {i}: no derivation cell before its reveal"
        assert all(c.metadata["jupyter"]["source_hidden"] for c in derivation)


def by_key(path: Path) -> bool:
    """Does the lesson reveal by key (moved to the Predict tables of ckpt_course/predicts)?"""
    nb = nbformat.read(path, as_version=4)
    return any(isinstance(n, ast.Call) and getattr(n.func, "id", "") == "reveal"
               and any(k.arg == "key" for k in n.keywords)
               for c in nb.cells if c.cell_type == "code" for n in ast.walk(ast.parse(c.source)))


KEYED = [p for p in LESSONS if by_key(p)]


@pytest.mark.parametrize("path", KEYED, ids=[p.stem for p in KEYED])
def test_a_collapsed_cells_visible_first_line_says_nothing(path):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.metadata.get("jupyter", {}).get("source_hidden"):
            first = cell.source.splitlines()[0]
            assert first.startswith("# Derivation") and "=" not in first, first


GO_DEEPER = re.compile(r"^(#{2,6}) Go deeper", re.M)
HEADING = re.compile(r"^(#{1,6}) ", re.M)


def deeper_flags(nb) -> list[bool]:
    """Per cell: does it sit under a "Go deeper" heading (which must be collapsed)?"""
    flags, level = [], None
    for cell in nb.cells:
        if cell.cell_type == "markdown" and (heads := HEADING.findall(cell.source)):
            if level is not None and min(map(len, heads)) <= level:
                level = None
            if m := GO_DEEPER.search(cell.source):
                assert cell.metadata.get("jp-MarkdownHeadingCollapsed") is True, (
                    f"{cell.source!r}: JupyterLab 4 collapses a heading by the cell's "
                    "jp-MarkdownHeadingCollapsed metadata")
                level = len(m.group(1))
                flags.append(False)  # the heading itself is shown
                continue
        flags.append(level is not None)
    return flags


def core_and_deeper(nb):
    """The code cells of the core and of the Go deeper parts, in order."""
    flags = deeper_flags(nb)
    code = [(c, f) for c, f in zip(nb.cells, flags, strict=True) if c.cell_type == "code"]
    return [c for c, f in code if not f], [c for c, f in code if f]


def stored(cell) -> set[str]:
    tree = ast.parse(cell.source)
    names = {n.id for n in ast.walk(tree)
             if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    return names | {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.ClassDef)
                    } | {a.arg for a in ast.walk(tree) if isinstance(a, ast.arg)}


def loaded(cell) -> set[str]:
    return {n.id for n in ast.walk(ast.parse(cell.source))
            if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}


@pytest.mark.parametrize("path", KEYED, ids=[p.stem for p in KEYED])
def test_the_core_runs_without_the_go_deeper_parts(path):
    core, deeper = core_and_deeper(nbformat.read(path, as_version=4))
    assert deeper, f"{path.name}: no Go deeper part"
    only_deeper = set().union(*map(stored, deeper)) - set().union(*map(stored, core))
    for cell in core:
        assert not loaded(cell) & only_deeper, (
            f"a core cell uses {loaded(cell) & only_deeper}, defined only under Go deeper")


def test_lessons_ship_without_outputs_and_with_the_python3_kernel(lesson):
    assert lesson.metadata.kernelspec["name"] == "python3"
    for cell in lesson.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None


@pytest.mark.slow
@lesson_runs.on(LESSON_4)
def test_a_wrong_prediction_runs_to_the_end_and_shows_the_gap_and_the_reason(lesson_run):
    """Lesson 4 with 4.1's first typical wrong answer typed (two moments, no step counters; the
    session's one run of the lesson, tests/lesson_runs.py): the line shows yours, the derivation
    and the measurement; the next, how far off and the reason."""
    run = lesson_run(LESSON_4)
    code = [c for c in run.nb.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code), "the lesson stopped early"
    lines = output_lines(run.nb)
    head = next(i for i, ln in enumerate(lines) if ln.startswith("step 2 - step 1: yours"))
    typed = run.typed["step 2 - step 1"]
    assert lines[head].startswith(f"step 2 - step 1: yours {typed:,} B | derivation ")
    assert " | measured " in lines[head]
    gap, reason = lines[head + 1].split(": ", 1)
    assert gap.startswith("  off by ") and "B" in gap  # a few bytes short: the counters
    assert reason == run.expected["step 2 - step 1"] and "step` counter" in reason


def test_a_predicts_answers_reach_nothing_but_their_reveal():
    """A learner's answer changes only what its reveal prints: outside the Predict cell, every
    `my_` name a lesson reads is the first argument of a reveal(). So the session's run with
    wrong answers typed (tests/lesson_runs.py) runs every other line as the shipped lesson does,
    and the lessons need no second run as shipped (what an empty answer prints is tested for
    every table in the next test)."""
    for path in LESSONS:
        for number, cell in enumerate(nbformat.read(path, as_version=4).cells):
            if cell.cell_type != "code":
                continue
            tree = ast.parse(cell.source)
            firsts = {id(call.args[0]) for call in ast.walk(tree) if isinstance(call, ast.Call)
                      and getattr(call.func, "id", "") == "reveal" and call.args}
            reads = [n.id for n in ast.walk(tree) if isinstance(n, ast.Name)
                     and n.id.startswith("my_") and isinstance(n.ctx, ast.Load)
                     and id(n) not in firsts]
            assert not reads, f"{path.name} cell {number} reads {reads} outside a reveal"
            assert tagged(cell, "predict") or not answers(cell), (
                f"{path.name} cell {number} sets {list(answers(cell))} outside a Predict")


@pytest.mark.parametrize("key", sorted(all_tables()))
def test_an_empty_answer_prints_the_no_prediction_line_for_every_table(key, capsys,
                                                                        monkeypatch):
    """What every lesson prints for a Predict left as shipped (None), strict tables on: the
    answer shown as '-', the derivation, and the no-prediction sentence."""
    entry = lookup(key)
    given = entry.given() if entry.given else {}
    derived = entry.answer()
    monkeypatch.setenv(STRICT_ENV, "1")
    for measured in (None, given.get("measured", derived)):
        reveal(None, derived, measured, key=key, given=given)
        first, second = capsys.readouterr().out.splitlines()
        assert first.startswith(f"{entry.what}: yours - | derivation ")
        assert second == f"  {NO_PREDICTION}"


MINE = [ROOT / "notebooks" / name for name in ("1_why_activations_eat_memory.ipynb",
                                               "2_hand_trace_a_checkpointed_net.ipynb")]


@pytest.mark.slow
@pytest.mark.parametrize("path", lesson_runs.each(MINE))
def test_wrong_first_guesses_run_to_the_end_and_each_gets_its_reason(path, lesson_run):
    """Every Predict of lessons 1-2 answered with its first typical wrong answer (the session's
    one run, tests/lesson_runs.py): the lesson runs to the end, the tables' answers agree with
    the lesson's derivations (strict), and each reveal prints its reason. That the core runs
    without the Go deeper parts is read from the names each cell uses (above)."""
    run = lesson_run(path)
    code = [c for c in run.nb.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code), "the lesson stopped early"
    lines = output_lines(run.nb)
    for what, reason in run.expected.items():
        head = next(i for i, line in enumerate(lines) if line.startswith(f"{what}: yours"))
        assert reason in lines[head + 1], f"{what}: {lines[head + 1]!r}"
    assert "no prediction made" not in "\n".join(lines)
