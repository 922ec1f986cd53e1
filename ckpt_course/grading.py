"""Grade learners' notebooks by their answers alone, with nbval, into one scorecard each.

How a notebook is graded
1. Find its pristine exercise: `<exercises>/<same file name>` if that file is still pristine
   (its cells match the fingerprint `build` recorded), else a fresh build of
   `<exercises>/src/<stem>.py`. A learner who works in `exercises/` of their clone edits the
   very file the build wrote, so the source is what keeps grading honest there. A renamed
   notebook is matched by the exercise stem `build` wrote into its metadata.
2. Copy the pristine notebook into a temporary folder and put into it ONLY the sources of the
   learner's answer cells (matched by their `answer:<name>` tag, else by cell id). Check cells,
   markdown and setup come from the pristine copy, so edited or deleted checks and stale saved
   outputs cannot change the grade. A missing answer cell keeps its stub.
3. Run the copy with `pytest --nbval-lax` in a subprocess (cwd = that folder, as the kernel's),
   each cell under a time limit, with a whole-notebook limit as a safety net. An IPython profile
   with `colors = 'nocolor'` keeps ANSI codes out of the tracebacks.
4. Read the JUnit XML: nbval names items "Cell N" (N counts code cells only). A check passes if
   its cell passed; a failing one reports the exception's message, never the cell's source.

What nbval does after a cell timeout (nbval 0.11): it interrupts the kernel (the cell fails with
a KeyboardInterrupt traceback) and marks every later cell xfail, which would hide their real
failures as "skipped". We pass `--runxfail`, so later cells report what really happened. If the
interrupt does not stop the cell within 5 s, nbval stops the kernel and every later cell fails
with "Kernel dead on test start", which we report as not run.

The learner's file is only ever read. This module imports no torch, so grading a class is fast.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nbformat

from ckpt_course.authoring import cell_id, is_pristine, tagged_name

HINT_LINES = 8
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class GradingError(ValueError):
    """Notebooks that cannot be graded at all: missing, not a notebook, no pristine exercise."""


@dataclass
class CheckResult:
    name: str
    passed: bool
    hint: str = ""  # why it failed: the first lines of the exception, never the answer


@dataclass
class Scorecard:
    notebook: str
    checks: list[CheckResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # failures outside check cells, and why

    @property
    def passed(self) -> int:
        return sum(c.passed for c in self.checks)

    @property
    def score(self) -> str:
        return f"{self.passed}/{len(self.checks)}"


# ---------------------------------------------------------------- finding the pristine copy


def find_pristine(notebook: Path, pristine_dir: Path):
    """The pristine exercise notebook for a learner's notebook, or GradingError saying why not."""
    stem = notebook.stem
    if not any(p.exists() for p in _candidates(pristine_dir, stem)):
        stem = _stem_from_metadata(notebook) or stem  # a renamed copy of an exercise
    path, source = _candidates(pristine_dir, stem)
    if path.exists():
        try:
            nb = nbformat.read(path, as_version=4)
        except Exception:  # unreadable: not pristine either
            nb = None
        if nb is not None and is_pristine(nb):
            return nb
    if source.exists():
        from ckpt_course.authoring import exercise_notebook

        return exercise_notebook(source)
    if path.exists():
        raise GradingError(f"{path} has been edited since it was built and {source} is not "
                           f"there to rebuild it: restore it (`git checkout -- {path}`) or pass "
                           "--exercises DIR with untouched copies")
    known = sorted(p.name for p in pristine_dir.glob("*.ipynb"))
    raise GradingError(f"{notebook}: no exercise of that name in {pristine_dir} (it has: "
                       f"{', '.join(known) or 'nothing'}); pass --exercises DIR, the folder the "
                       "exercises were built into")


def _candidates(pristine_dir: Path, stem: str) -> tuple[Path, Path]:
    return pristine_dir / f"{stem}.ipynb", pristine_dir / "src" / f"{stem}.py"


def _stem_from_metadata(notebook: Path) -> str | None:
    try:
        nb = json.loads(notebook.read_text(encoding="utf-8"))
        return nb["metadata"]["ckpt_course"]["exercise"]
    except (ValueError, KeyError, TypeError, OSError):
        return None


def _check_inputs(notebooks: list[Path], pristine_dir: Path) -> list:
    """Every notebook's pristine exercise; all the problems at once, before running anything."""
    problems, pristines = [], []
    for path in notebooks:
        try:
            if not path.is_file():
                raise GradingError(f"{path}: no such file")
            if path.suffix != ".ipynb":
                raise GradingError(f"{path}: not a notebook (expected a .ipynb file)")
            pristines.append(find_pristine(path, pristine_dir))
        except GradingError as e:
            problems.append(str(e))
    if problems:
        raise GradingError("\n".join(problems))
    return pristines


# ---------------------------------------------------------------- transplanting answers


def transplant(pristine, learner) -> tuple[object, list[str]]:
    """A copy of `pristine` holding the learner's answer sources; notes on what was missing."""
    graded, notes = nbformat.from_dict(json.loads(json.dumps(pristine))), []
    for cell in graded.cells:
        name = tagged_name(cell, "answer")
        if name is None:
            continue
        mine = _find_answer(learner, name)
        if mine is None:
            notes.append(f"answer {name}: not found in your notebook, graded as the empty stub")
        else:
            cell.source = mine.source
        cell.outputs, cell.execution_count = [], None
    return graded, notes


def _find_answer(learner, name: str):
    """The learner's cell for answer `name`: by tag (survives copy-paste), else by cell id.

    If several cells carry the tag (a duplicated cell), the last one wins: people usually
    copy a cell and keep working on the copy below.
    """
    code = [c for c in learner.cells if c.get("cell_type") == "code"]
    tagged = [c for c in code if tagged_name(c, "answer") == name]
    by_id = [c for c in code if c.get("id") == cell_id("answer", name)]
    return (tagged or by_id or [None])[-1]


# ---------------------------------------------------------------- running nbval


def _profile(ipython_dir: Path) -> Path:
    profile = ipython_dir / "profile_default"
    profile.mkdir(parents=True, exist_ok=True)
    (profile / "ipython_config.py").write_text(
        "c.InteractiveShell.colors = 'nocolor'\n"  # tracebacks without ANSI codes
        "c.HistoryManager.enabled = False\n"  # kernels graded at once share this profile
    )
    return ipython_dir


def run_nbval(notebook: Path, ipython_dir: Path, timeout: float, total_timeout: float):
    """Run one notebook under nbval -> ({code cell index: failure text or None}, output).

    The dict is None when the whole-notebook safety net stopped the run.
    """
    folder = notebook.parent
    (folder / "pytest.ini").write_text("[pytest]\n")  # rootdir here: no outside config leaks in
    junit = folder / "junit.xml"
    cmd = [sys.executable, "-m", "pytest", "-p", "nbval.plugin", "-p", "no:cacheprovider",
           "--nbval-lax", "--nbval-current-env", f"--nbval-cell-timeout={timeout:g}",
           "--runxfail", "--color=no", "-q", f"--junitxml={junit}", notebook.name]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env.update(IPYTHONDIR=str(ipython_dir), PYTEST_DISABLE_PLUGIN_AUTOLOAD="1",
               PYDEVD_DISABLE_FILE_VALIDATION="1", JUPYTER_PLATFORM_DIRS="1")
    proc = subprocess.Popen(cmd, cwd=folder, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=total_timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(proc)
        return None, ""
    if not junit.exists():
        return {}, output
    return _read_junit(junit), output


def _kill_tree(proc: subprocess.Popen) -> None:
    """Kill pytest and the kernel it started (the kernel runs in a session of its own)."""
    pids = _descendants(proc.pid)
    os.killpg(proc.pid, signal.SIGKILL)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.communicate()


def _descendants(pid: int) -> list[int]:
    """Child processes of `pid`, recursively (Linux /proc; elsewhere the kernel's own parent
    poller makes it exit once pytest is gone)."""
    try:
        tasks = Path(f"/proc/{pid}/task").iterdir()
        children = [int(c) for t in tasks for c in (t / "children").read_text().split()]
    except OSError:
        return []
    return children + [d for c in children for d in _descendants(c)]


def _read_junit(path: Path) -> dict[int, str | None]:
    results = {}
    for case in ET.parse(path).iter("testcase"):
        match = re.fullmatch(r"Cell (\d+)", case.get("name", ""))
        if not match:
            continue
        message = None
        for child in case:
            text = child.text or child.get("message") or child.tag  # message may be cut short
            if child.tag == "error" and text.startswith("failed on teardown"):
                continue  # the kernel shutting down after the last cell; the cell itself ran
            if child.tag in ("failure", "error", "skipped"):
                message = text if child.tag != "skipped" else f"not run ({text})"
        results[int(match.group(1))] = message
    return results


# ---------------------------------------------------------------- from nbval's text to a hint


def hint(message: str, timeout: float) -> str:
    """nbval's failure text -> the few lines a learner needs (no cell source, no colours)."""
    text = ANSI.sub("", message)
    if "Kernel dead" in text:
        return "not run: the kernel was stopped after an earlier cell ran out of time"
    reason = re.search(r"^Cell \d+: (.*)$", text, re.M)
    if reason and "Failed to interrupt" in reason.group(1):
        return (f"ran out of time ({timeout:g} s per cell), ignored the interrupt and its "
                "kernel was stopped: an endless loop?")
    if reason and "Timeout" in reason.group(1):
        return f"ran out of time ({timeout:g} s per cell) and was interrupted: an endless loop?"
    _, _, traceback = text.partition("\nTraceback:\n")
    lines = [line.rstrip() for line in traceback.strip("\n").splitlines()]
    headers = [m for line in lines
               if (m := re.match(r"(\S+)\s+Traceback \(most recent call last\)", line))]
    if headers:  # an ordinary exception (the last one, if chained): from "Name: message" on
        ename = headers[-1].group(1)
        starts = [i for i, line in enumerate(lines) if line.split(":")[0] == ename]
        lines = lines[starts[-1]:] if starts else lines[-1:]
    elif lines:  # SyntaxError and friends: "Cell In[1], line 3 / code / ^ / SyntaxError: ..."
        where = re.search(r"line (\d+)", "\n".join(lines))
        lines = [lines[-1] + (f" (line {where.group(1)} of the cell)" if where else "")]
    else:
        lines = [reason.group(1)] if reason else text.strip().splitlines()[:1] or ["failed"]
    return "\n".join(lines[:HINT_LINES]).strip()


# ---------------------------------------------------------------- grading


def grade(notebooks, pristine_dir="exercises", timeout=60, total_timeout=None, jobs=1,
          progress=None) -> list[Scorecard]:
    """Grade each learner notebook against its pristine exercise; one Scorecard each.

    timeout: seconds per cell. total_timeout: seconds per notebook, a safety net (default:
    enough for every code cell to time out, plus a minute to start). jobs: notebooks graded at
    once. progress: called with each Scorecard as it is done.
    """
    notebooks, pristine_dir = [Path(n) for n in notebooks], Path(pristine_dir)
    pristines = _check_inputs(notebooks, pristine_dir)
    with tempfile.TemporaryDirectory(prefix="ckpt-grade-") as tmp:
        ipython_dir = _profile(Path(tmp) / "ipython")

        def one(i: int) -> Scorecard:
            folder = Path(tmp) / f"{i:04d}"
            folder.mkdir()
            card = grade_one(notebooks[i], pristines[i], folder, ipython_dir, timeout,
                             total_timeout)
            if progress:
                progress(card)
            return card

        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            return list(pool.map(one, range(len(notebooks))))


def grade_one(path: Path, pristine, folder: Path, ipython_dir: Path, timeout: float,
              total_timeout: float | None = None) -> Scorecard:
    checks = [(i, tagged_name(c, "check")) for i, c in enumerate(_code_cells(pristine))]
    checks = [(i, name) for i, name in checks if name is not None]
    card = Scorecard(str(path))
    try:
        learner = nbformat.read(path, as_version=4)
    except Exception as e:  # a student's broken file must not stop the class
        card.notes.append(f"could not read the notebook: {e}")
        card.checks = [CheckResult(n, False, "not graded: the notebook could not be read")
                       for _, n in checks]
        return card
    graded, card.notes = transplant(pristine, learner)
    copy = folder / path.name
    nbformat.write(graded, copy)
    code = _code_cells(graded)
    if total_timeout is None:
        total_timeout = 60 + (timeout + 10) * len(code)
    results, output = run_nbval(copy, ipython_dir, timeout, total_timeout)
    if results is None:
        why = f"not graded: the notebook ran longer than {total_timeout:g} s in all"
        card.checks = [CheckResult(n, False, why) for _, n in checks]
        return card
    for i, cell in enumerate(code):
        name = tagged_name(cell, "check")
        if i not in results:
            why = "not run: nbval gave no result; its output ends with:\n" + _tail(output)
            if name is not None:
                card.checks.append(CheckResult(name, False, why))
            continue
        failure = results[i]
        if name is not None:
            card.checks.append(CheckResult(name, failure is None,
                                           "" if failure is None else hint(failure, timeout)))
        elif failure is not None:
            what = tagged_name(cell, "answer")
            label = f"answer {what}" if what else f"code cell {i + 1}"
            card.notes.append(f"{label} failed: {hint(failure, timeout)}")
    return card


def _code_cells(nb) -> list:
    return [c for c in nb.cells if c.cell_type == "code"]


def _tail(output: str, lines: int = 5) -> str:
    return "\n".join(ANSI.sub("", output).strip().splitlines()[-lines:])


# ---------------------------------------------------------------- reports


def format_scorecards(cards: list[Scorecard]) -> str:
    out = []
    for card in cards:
        out.append(f"{card.notebook}  {card.score}")
        width = max((len(c.name) for c in card.checks), default=0)
        for check in card.checks:
            mark = "ok  " if check.passed else "FAIL"
            first, *rest = (check.hint or "").splitlines() or [""]
            out.append(f"  {mark} {check.name:<{width}}  {first}".rstrip())
            out.extend(" " * (9 + width) + line for line in rest)
        out.extend(f"  note: {note}" for note in card.notes)
    return "\n".join(out)


def write_csv(cards: list[Scorecard], path) -> None:
    """One row per notebook x check: notebook, check, passed (1/0), hint."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["notebook", "check", "passed", "hint"])
        for card in cards:
            for check in card.checks:
                writer.writerow([card.notebook, check.name, int(check.passed), check.hint])


def write_json(cards: list[Scorecard], path) -> None:
    data = [{**asdict(card), "score": card.score, "passed": card.passed,
             "total": len(card.checks)} for card in cards]
    Path(path).write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
