"""Each lesson executed once per test session, shared by the tests that read its outputs.

A lesson runs for up to a minute; the tests that need one run (each Predict's first typical wrong
answer gets its reason, tests/test_lessons.py and tests/test_predicts_phase3_4.py; no output
above a Predict shows its answer, tests/test_lesson_visibility.py) share it through the
session fixture ``lesson_run`` (tests/conftest.py), so ``make test`` runs each lesson once, here
(nbval runs the solutions only). A run as shipped would add nothing: a Predict's answer reaches
only its reveal (tests/test_lessons.py checks the sources), and what a reveal prints for an
empty answer is tested for every table.

The run types each keyed Predict's first typical wrong answer, with the tables' strict check on
(the lesson's derivation must equal its table's answer). What the learner who left the Predicts
as shipped (None) would see differs only in the reveal lines, which echo the answer typed;
``as_shipped`` puts those lines back as a None run prints them.
"""

from __future__ import annotations

import ast
import copy
import re
from dataclasses import dataclass
from pathlib import Path
from queue import Empty
from time import monotonic

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellTimeoutError, DeadKernelError
from nbclient.util import ensure_async

from ckpt_course.predicts import lookup
from ckpt_course.reveal import NO_PREDICTION, STRICT_ENV

# Per cell: every lesson cell takes seconds (the slowest about 7 s, 25 s on a loaded machine).
# A run whose kernel went silent (seen twice on a loaded machine: the kernel idle, the client
# waiting for a reply that never came) is retried once with a fresh kernel instead of holding
# the suite for ten minutes.
TIMEOUT_S = 60
ATTEMPTS = 2
# How often the wait for a cell's reply asks the shell channel again (``Client``).
POLL_S = 0.5


class Client(NotebookClient):
    """nbclient's client, asking the shell channel for a cell's reply every ``POLL_S``.

    nbclient 0.11 waits for the reply in one poll as long as the cell limit, and pyzmq's
    asyncio poller can miss the wake-up of a reply that has come (after an ipywidgets cell:
    lesson 1's slider; jupyter/nbclient#312). It reads the reply only when that poll times
    out, with no error: in most full runs each miss cost a whole cell limit. A poll that ends
    looks at the socket again (``zmq._future._AsyncPoller.poll``), so short ones find it."""

    async def _async_poll_for_reply(self, msg_id, cell, timeout, *tasks):
        channel = self.kc.shell_channel
        whole = channel.get_msg

        async def get_msg(timeout=None):
            end = None if timeout is None else monotonic() + timeout
            while True:
                step = POLL_S if end is None else max(0.0, min(POLL_S, end - monotonic()))
                try:
                    return await ensure_async(whole(timeout=step))
                except Empty:
                    if end is not None and monotonic() >= end:
                        raise

        channel.get_msg = get_msg
        try:
            return await super()._async_poll_for_reply(msg_id, cell, timeout, *tasks)
        finally:
            channel.get_msg = whole


@dataclass(frozen=True)
class LessonRun:
    """One executed lesson: the notebook with its outputs, and per reveal label the reason the
    typed wrong answer must get."""

    nb: nbformat.NotebookNode
    expected: dict[str, str]
    typed: dict[str, object]  # reveal label -> the wrong answer typed for it


def group_of(path) -> str:
    return f"lesson:{Path(path).stem}"


def on(path) -> pytest.MarkDecorator:
    """The mark of every test that reads ``path``'s run: under pytest-xdist (`make test`) they
    run on one worker, so the lesson runs once (tests/conftest.py checks that each asker has it)."""
    return pytest.mark.xdist_group(group_of(path))


def each(paths) -> list:
    """``paths`` as parameters of a test that reads their runs, each with its lesson's mark."""
    return [pytest.param(p, marks=on(p), id=Path(p).stem) for p in paths]


def tagged(cell, tag: str) -> bool:
    return tag in cell.metadata.get("tags", [])


def answers(cell) -> dict[str, ast.expr]:
    tree = ast.parse(cell.source)
    return {t.id: node.value for node in tree.body if isinstance(node, ast.Assign)
            for t in node.targets if isinstance(t, ast.Name) and t.id.startswith("my_")}


def reveal_keys(nb, i: int) -> dict[str, str]:
    """The Predict cell i's answers and the table keys their reveals name."""
    mine = set(answers(nb.cells[i]))
    return {call.args[0].id: next(k.value.value for k in call.keywords if k.arg == "key")
            for cell in nb.cells[i + 1:] if cell.cell_type == "code"
            for call in ast.walk(ast.parse(cell.source))
            if isinstance(call, ast.Call) and getattr(call.func, "id", "") == "reveal"
            and call.args and getattr(call.args[0], "id", "") in mine}


def type_first_guesses(nb) -> tuple[dict[str, str], dict[str, object]]:
    """Type each Predict's first typical wrong answer (its value) where the learner would;
    return the reveal's label -> the reason it must print, and label -> the value typed."""
    expected, typed = {}, {}
    for i, cell in enumerate(nb.cells):
        if not tagged(cell, "predict"):
            continue
        for name, key in reveal_keys(nb, i).items():
            entry = lookup(key)
            wrong = entry.wrong[0]
            value = wrong.value(entry.answer(), entry.given() if entry.given else {})
            cell.source = cell.source.replace(f"{name} = None", f"{name} = {value!r}")
            expected[entry.what] = wrong.reason
            typed[entry.what] = value
    return expected, typed


def execute(path: Path, nb=None) -> nbformat.NotebookNode:
    """Run a notebook (``path``'s, or ``nb`` as if it were at ``path``) to the end, in place."""
    source = nb if nb is not None else nbformat.read(path, as_version=4)
    for attempt in range(1, ATTEMPTS + 1):
        nb = copy.deepcopy(source)
        try:
            Client(nb, timeout=TIMEOUT_S, kernel_name="python3",
                           resources={"metadata": {"path": str(path.parent)}}).execute()
        except (CellTimeoutError, DeadKernelError):
            if attempt == ATTEMPTS:
                raise
            continue
        if nb is not source:  # the caller's notebook holds the outputs, as before
            source.cells = nb.cells
        return source
    raise AssertionError("unreachable")


def run_with_first_guesses(path: Path) -> LessonRun:
    nb = nbformat.read(path, as_version=4)
    expected, typed = type_first_guesses(nb)
    with pytest.MonkeyPatch.context() as env:
        env.setenv(STRICT_ENV, "1")
        execute(path, nb)
    return LessonRun(nb, expected, typed)


def output_lines(nb) -> list[str]:
    """Every code cell's printed text, in order (as the Check cells' tests read it)."""
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.outputs).splitlines()


REVEAL_LINE = re.compile(r"^(?P<what>.+?): yours (?P<yours>.+?) \| derivation ")


def as_shipped(run: LessonRun) -> nbformat.NotebookNode:
    """The executed lesson as a learner who left every Predict as None sees it: each reveal's
    first line says ``yours -`` and its second line the no-prediction sentence."""
    nb = copy.deepcopy(run.nb)
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                out["text"] = unanswered(out["text"], run.typed)
    return nb


def unanswered(text: str, typed: dict) -> str:
    lines = text.split("\n")
    for k, line in enumerate(lines):
        match = REVEAL_LINE.match(line)
        if match and match["what"] in typed:
            lines[k] = line.replace(f"yours {match['yours']} |", "yours - |", 1)
            if k + 1 < len(lines):
                lines[k + 1] = f"  {NO_PREDICTION}"
    return "\n".join(lines)
