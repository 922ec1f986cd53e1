"""Grade learners' notebooks where their code cannot reach the grade; grade a class.

How a notebook is graded
1. Read the file once: a regular file (a link to one is fine) of at most 20 MB, UTF-8 with or
   without a byte-order mark; anything else (a FIFO, a device, a link loop, a folder) is a row
   with the reason, never a hang or a traceback.
2. Its exercise: the bare name `build` wrote into its metadata (`ckpt_course.exercise`), else
   the file's stem; it must be one of the course's own exercises (`<exercises>/src/*.py`,
   `<exercises>/*.ipynb`). A path, an unknown name or a look-alike is refused with the reason.
   The pristine notebook is always the course's: `<exercises>/<name>.ipynb` if it is an
   untouched *exercise* (role and fingerprint as built; never a solution), else a fresh build
   of `<exercises>/src/<name>.py`. A file holding none of the exercise's answer cells is
   reported (with the answer names it does hold), not silently zeroed; a file named like one
   exercise whose metadata names another is graded as the metadata says, with a note.
3. Take from the learner's file ONLY the sources of their answer cells (matched by their
   `answer:<name>` tag, else by cell id; a missing one keeps its stub). Everything else comes
   from the pristine notebook, so edited, deleted or reordered check cells and saved outputs
   change nothing.
4. Read each check cell of the PRISTINE notebook with `ast`: exactly `checks.NAME(a, b, ...)`,
   `checks` being what the pristine setup imports from `ckpt_course.checks`, and its points
   from the `points:N` tag (default 1).
5. A worker process (grade_worker.py) runs the non-check cells in order; each check is called
   right after the cells above its check cell, as in the notebook (a later cell cannot change
   what an earlier check sees). Here, in the grader's process, each check function is imported
   from the installed package, seeded with `checks.set_seed(<secret random>)`, and called with
   `Remote(name)` proxies: calls cross the process boundary as data (JSON, and tensors as
   torch.save bytes read back with weights_only=True). The score is the check's return value
   (None: full marks, a number in [0, 1]: that fraction) or 0 with the hint of the
   `CheckFailed` it raised (a fraction on it gives partial credit with a hint). Any other
   failure is 0 with a hint naming the learner-side cause: their exception, an exit, a crash,
   a timeout, a rule broken.
6. Each row's text (hints, notes, errors, file names) is one clean line (`clean`): learner
   text cannot print a row of its own. Duplicates (the same changed answers) are flagged.

Threat model: an answer cell is untrusted code that can do anything Python can in its own
process (rebind or monkeypatch `checks`, ckpt_course, IPython, builtins, sys hooks; exit,
crash, loop, print anything, fork, setsid, return lying objects), written by someone who has
read this code. Per class of attack, what is defended and what is not:

- The grade. Computed in the grader's process by check code imported from the package, read
  from the pristine notebook, on data the worker returns: only JSON and weights_only tensors
  are deserialised (exact types, no pickle); what the worker prints is never read. Inputs come
  from a secret seed. Each call has a time limit; a cell that kills a worker (exit, crash,
  timeout) is graded as its stub in a fresh worker.
- Identity (step 2). The learner chooses only a name among the course's exercises; the
  pristine copy, the check cells and the points never come from anything they hand in.
- Build-it rules. Each check declares what its answer may not use (`@checks.forbids`); every
  notebook also forbids `ckpt_course.checks.references` (the reference implementations). From
  the first answer cell on, the worker (grade_worker.Rules) replaces the code of every
  function object of a forbidden module (or class) with a body raising "rule broken: ...
  <target>", found through gc, so attributes, `sys.modules`, `importlib`, `__import__`,
  subclasses, `__wrapped__`, closures and `gc.get_objects` all reach the poisoned objects;
  forbidden modules cannot be imported; and a second Landlock layer makes their files and
  bytecode caches unreadable (no reload, no exec of the source, no marshal of the .pyc). The
  hint names the rule. NOT defended: an answer that re-types the forbidden code (from memory,
  from the course's public repository, or from another copy of the same code on disk, e.g. a
  vendored torch in another environment the worker can read), that builds the mechanism from
  torch's lower-level pieces (saved_tensors_hooks, autograd.Function) in a different way than
  intended, or that measures instead of predicting with tools no rule names (its own
  saved_tensors_hooks, torch's profiler). `save_on_cpu` and the planner's classes are poisoned
  but the modules that hold them (torch.autograd.graph) stay readable: their source could be
  re-executed; the same holds for every class or function rule (e.g.
  `ckpt_course.sharding:per_gpu_bytes`, loaded before the answers so that an import cannot get
  an unpoisoned copy). Native code (ctypes into torch's C++ library) is not covered.
  Which tools are the answer: every exercise forbids its own check module and the checks'
  metering helpers (`peak_of`, `measure`, `memory_runs`), so no check's private helper (the
  dial's peak of 1.4, the reference tape of 4b) is reachable; predict-by-reasoning checks
  (phase 2) forbid every module that measures saved or peak bytes or computes an answer (tape,
  trace, meter, recompute, pitfalls, ranking, compare, sharding, estimate, costs, recording,
  hf, sweeps, train, step, timing, plan, auto, doctor, memviz); 4b forbids hf_config_costs,
  costs, recording, estimate, the meter; 3.2-per-gpu forbids
  `sharding.per_gpu_bytes`/`min_gpus`, 3.3 the estimate's `layer_activation_bytes`. Intended,
  not a hole: 3.4-save teaches `rank_ops`, so an answer that filters its ranking (ops with
  FLOPs, nameable) is the exercise's reading; 3.4-budget picks from the table the notebook
  measured. NOT yet defended: 1.2-mlp may call `record_tape` (the exercise's own demo cell
  prints a tape after the first answer, and rules hold for the whole worker); 1.3-by-hand's
  memory part measures RSS, so an answer that parks the tape in files (saved_tensors_hooks +
  torch.save) and a plain forward earn points they should not.
- Memory checks. The memory run's sizes are drawn from the secret seed; its result is checked
  against the reference's (a SHA-256 of the tensors' bytes), so an answer that detects the
  memory run (by size, by inspecting the worker's frames) and skips the work fails; counters
  are measured by trusted code: the peak by the reaper (sum of the tree's ru_maxrss), the
  bytes offloaded by the reaper reading the host store's pipe (not `host.bytes_to_host`).
  NOT defended: an answer can write padding into that pipe, so "bytes moved" is a lower bound
  the answer can raise to the reference's count (it cannot lower it, and the memory part still
  needs the bytes really gone); peaks are RSS, so shared pages count in each process.
- The class. Every file ends as one row (step 1); a grader failure on one file is a row of its
  own and exit code 3 (`EXIT_GRADER_FAILED`), distinct from 1 (not all full marks) and 2 (bad
  options). Learner strings the checks parse in the grader are size-checked first
  (`checks.learner_policy`: a policy string is at most 300 characters with numbers up to the
  chain's size, so `segments:0..3000000` is refused before it is expanded); returned data is
  capped at 32 MB a message. The worker's temporary folder is removed with errors ignored.
- Processes. The reaper unshares a user, PID and network namespace where the kernel allows
  (`user,pid,net` here; `pid,net` as root without user namespaces; else `net`; else none) and
  forks the namespace's init: when the worker ends, kill(-1) ends every process of the
  namespace, setsid'd and double-forked ones included, and the namespace dies with the outer
  reaper (PDEATHSIG). Without a PID namespace the reaper is a child subreaper and kills every
  descendant found in /proc, repeatedly, until none is left. The user namespace also takes
  root's powers over the host away (no chattr +i, no mounts).
- What the worker can see. Its environment is built from scratch (`worker_environment`:
  PATH, locale, its own folder as HOME/TMPDIR, PYTHONPATH to the package): nothing of the
  grader's. Landlock (first layer) lets it write only its own folder, read only the system,
  the Python installation and the package, open no TCP port, and neither signal nor ptrace
  (so neither read /proc/<pid>/environ nor memory of) processes outside its sandbox. In a
  network namespace it has no network at all (no UDP, no abstract unix sockets to the host).
  NOT defended: world-readable system files and other processes' /proc/<pid>/cmdline (the
  secret seed is on no command line); without a network namespace, UDP and unix sockets by
  path; CPU, memory and disk use (a fork bomb or a 100 GB allocation is not stopped here).
- Without Landlock (not Linux, kernel < 5.13, or blocked) the worker runs with the grader's
  own rights (it could read a neighbour's file, write the package or the gradebook, signal the
  grader) and forbidden files stay readable; `Scorecard.sandbox` and the command line say so.
  Grading is not a security sandbox for the host: for untrusted classes, run the grader as an
  unprivileged user in a container (read-only package and submissions, memory and pid limits).

The learner's file is only ever read. This module imports no torch; the check modules do.
"""

from __future__ import annotations

import ast
import contextlib
import csv
import errno
import hashlib
import importlib
import io
import json
import os
import re
import secrets
import stat
import subprocess
import sys
import tempfile
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nbformat

from ckpt_course.authoring import cell_id, is_pristine, tagged_name
from ckpt_course.grade_remote import Cell, Session

CHECK_PACKAGE = "ckpt_course.checks"
HINT_CHARS = 600
MAX_NOTEBOOK_BYTES = 20 * 2**20  # a notebook with outputs cleared is far smaller
EXERCISE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")  # a bare name: no dot, no slash
# The package's reference implementations: no answer may use them (see grade_worker.RULES).
ALWAYS_FORBIDDEN = ("ckpt_course.checks.references",)
# Exit codes of `ckpt-course grade` (README, instructor notes).
EXIT_FULL_MARKS, EXIT_NOT_FULL, EXIT_USAGE, EXIT_GRADER_FAILED = 0, 1, 2, 3


class GradingError(ValueError):
    """A notebook that cannot be graded: unreadable, not an exercise, or a broken exercise."""


@dataclass
class CheckResult:
    name: str
    earned: float
    points: float
    hint: str = ""  # why points were lost: never the answer

    @property
    def passed(self) -> bool:
        return self.earned >= self.points


@dataclass
class Scorecard:
    notebook: str
    exercise: str = ""
    checks: list[CheckResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # failures outside check cells, and why
    error: str = ""  # why the notebook could not be graded at all
    sandbox: str = ""  # why the worker ran without its sandbox ("" = sandboxed)
    grader_failed: bool = False  # the grader itself failed on this file (exit code 3)
    answers_sha256: str = ""  # the answers the learner changed, for spotting duplicates
    duplicate_of: str = ""  # an earlier notebook of the class with the very same answers

    @property
    def earned(self) -> float:
        return sum(c.earned for c in self.checks)

    @property
    def points(self) -> float:
        return sum(c.points for c in self.checks)

    @property
    def score(self) -> str:
        return f"{_num(self.earned)}/{_num(self.points)}"

    @property
    def full_marks(self) -> bool:
        return not self.error and all(c.passed for c in self.checks)


@dataclass(frozen=True)
class Check:
    name: str  # the cell's check:<name>
    module: str  # e.g. ckpt_course.checks.phase1
    function: str
    args: tuple[str, ...]  # the names the notebook defines, passed as Remote proxies
    points: float


# ---------------------------------------------------------------- the exercise, its pristine copy


def course_exercises(pristine_dir: Path) -> list[str]:
    """The exercises this course has: the stems of its sources and of its built notebooks."""
    stems = {p.stem for p in (pristine_dir / "src").glob("*.py") if not p.name.startswith("_")}
    stems |= {p.stem for p in pristine_dir.glob("*.ipynb")}
    return sorted(s for s in stems if EXERCISE_NAME.fullmatch(s))


def exercise_of(learner, path: Path, pristine_dir: Path) -> tuple[str, list[str]]:
    """The exercise a notebook is graded as, and notes; GradingError when it names none of this
    course's. The metadata `build` wrote names it (a bare name, one of the course's own: never a
    path); without it, the file's name does. A file named like one exercise whose metadata names
    another is graded as the metadata says, with a note."""
    known = course_exercises(pristine_dir)
    listing = ", ".join(known) or "nothing"
    named = _metadata_exercise(learner)
    if named is not None:
        if not (isinstance(named, str) and EXERCISE_NAME.fullmatch(named)):
            raise GradingError(f"its metadata names the exercise {_short(named)}, which is not a "
                               f"bare exercise name: it must be one of {listing}")
        if named not in known:
            raise GradingError(f"its metadata names the exercise {named!r}, which this course "
                               f"does not have (it has: {listing})")
        notes = ([f"the file is named like exercise {path.stem} but holds exercise {named} (its "
                  f"metadata): graded as {named}"] if path.stem in known and path.stem != named
                 else [])
        return named, notes
    if path.stem in known:
        return path.stem, []
    raise GradingError(f"no exercise named {_short(path.stem)} in {pristine_dir} (it has: "
                       f"{listing}): is it a notebook of this course? Else pass --exercises "
                       "DIR, the folder the exercises were built into")


def _metadata_exercise(nb):
    meta = nb.get("metadata", {}) if isinstance(nb, dict) else {}
    course = meta.get("ckpt_course") if isinstance(meta, dict) else None
    return course.get("exercise") if isinstance(course, dict) else None


def find_pristine(stem: str, pristine_dir: Path):
    """The pristine exercise notebook of exercise `stem` (a bare name of this course's): the
    built `<exercises>/<stem>.ipynb` if it is an untouched exercise (never a solution), else a
    fresh build of `<exercises>/src/<stem>.py`; GradingError if neither."""
    if not EXERCISE_NAME.fullmatch(stem):
        raise GradingError(f"{_short(stem)} is not an exercise name")
    path, source = pristine_dir / f"{stem}.ipynb", pristine_dir / "src" / f"{stem}.py"
    if path.is_file():
        try:
            nb = nbformat.read(path, as_version=4)
        except Exception:  # unreadable: not pristine either
            nb = None
        meta = nb.metadata.get("ckpt_course", {}) if nb is not None else {}
        if (nb is not None and meta.get("role") == "exercise" and meta.get("exercise") == stem
                and is_pristine(nb)):
            return nb
    if source.is_file():
        from ckpt_course.authoring import exercise_notebook

        return exercise_notebook(source)
    if path.exists():
        raise GradingError(f"{path} has been edited since it was built and {source} is not "
                           f"there to rebuild it: restore it (`git checkout -- {path}`) or pass "
                           "--exercises DIR with untouched copies")
    raise GradingError(f"no exercise named {stem!r} in {pristine_dir}")


def read_learner(path: Path) -> tuple[object, bytes]:
    """The learner's notebook and its bytes, or GradingError with the real reason it cannot be
    read. Only a regular file (a link to one is fine) of at most MAX_NOTEBOOK_BYTES is read, and
    read once: a FIFO, a device, a link loop or a file that changes cannot stall or fool it."""
    if path.suffix != ".ipynb":
        raise GradingError("not a notebook (expected a .ipynb file)")
    data = _read_regular_file(path)
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark is fine
    except UnicodeError:
        raise GradingError("not a notebook: the file is not UTF-8 text") from None
    if not text.strip():
        raise GradingError("the file is empty: was the notebook saved?")
    try:
        _check_cells(json.loads(text))  # before nbformat, whose errors on a bad cell are cryptic
        nb = nbformat.reads(text, as_version=4)
    except GradingError:
        raise
    except Exception as e:  # JSON errors, nbformat's own: all mean "not a notebook"
        raise GradingError(f"not a notebook: {_first_line(str(e))}") from None
    return nb, data


def _check_cells(parsed) -> None:
    """GradingError naming the first thing that is not a cell in a notebook's JSON."""
    if isinstance(parsed, dict) and parsed.get("nbformat") in (1, 2, 3):
        return  # an old format, which nbformat converts (its cells are in worksheets)
    cells = parsed.get("cells") if isinstance(parsed, dict) else None
    if not isinstance(cells, list):
        raise GradingError("not a notebook: it has no list of cells")
    for number, cell in enumerate(cells, 1):
        # a cell whose source is not text is still a cell: its answer is "not found" later,
        # and the rest of the notebook is graded
        if not (isinstance(cell, dict) and isinstance(cell.get("cell_type"), str)
                and isinstance(cell.get("metadata", {}), dict)):
            raise GradingError(f"not a notebook: its cell {number} is a {type(cell).__name__}, "
                               "not a cell (an object with cell_type, metadata and source)")


def _read_regular_file(path: Path) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # a FIFO does not block
    except FileNotFoundError:
        raise GradingError("no such file") from None
    except OSError as e:
        why = "a symbolic link loop" if e.errno == errno.ELOOP else e.strerror
        raise GradingError(f"could not read the file: {why}") from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise GradingError("a folder, not a notebook")
        if not stat.S_ISREG(mode):
            raise GradingError("not a regular file (a FIFO, a device or a socket): hand in the "
                               ".ipynb file itself")
        chunks, size = [], 0
        while size <= MAX_NOTEBOOK_BYTES and (chunk := os.read(fd, 2**20)):
            chunks.append(chunk)
            size += len(chunk)
        data = b"".join(chunks)
    except OSError as e:
        raise GradingError(f"could not read the file: {e.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_NOTEBOOK_BYTES:
        raise GradingError(f"larger than {MAX_NOTEBOOK_BYTES // 2**20} MB: clear the outputs "
                           "(Edit > Clear Outputs of All Cells), save, and hand it in again")
    return data


def answers_found(pristine, learner) -> int:
    """How many of the exercise's answer cells the learner's notebook holds."""
    names = [tagged_name(c, "answer") for c in pristine.cells]
    return sum(_find_answer(learner, n) is not None for n in names if n is not None)


def _foreign_answers(learner) -> list[str]:
    return sorted({n for c in learner.cells if isinstance(c, dict)
                   and (n := tagged_name(c, "answer")) is not None})[:6]


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
    code = [c for c in learner.cells if isinstance(c, dict) and c.get("cell_type") == "code"
            and isinstance(c.get("source"), str)]
    tagged = [c for c in code if tagged_name(c, "answer") == name]
    by_id = [c for c in code if c.get("id") == cell_id("answer", name)]
    return (tagged or by_id or [None])[-1]


# ---------------------------------------------------------------- reading the checks


def parse_checks(pristine) -> list[Check]:
    """Each check cell of the pristine notebook as a Check, or GradingError (an author's bug)."""
    code = [c for c in pristine.cells if c.cell_type == "code"]
    aliases = _check_imports([c for c in code if tagged_name(c, "check") is None])
    return [_parse_check(c, aliases) for c in code if tagged_name(c, "check") is not None]


def _check_imports(cells) -> dict[str, str]:
    """{name: module} for every module under ckpt_course.checks the setup cells import."""
    aliases = {}
    for cell in cells:
        try:
            tree = ast.parse(cell.source)
        except SyntaxError:
            continue
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
            elif isinstance(node, ast.Import):
                aliases.update((a.asname, a.name) for a in node.names if a.asname)
    return {k: v for k, v in aliases.items()
            if v == CHECK_PACKAGE or v.startswith(CHECK_PACKAGE + ".")}


def _parse_check(cell, aliases: dict[str, str]) -> Check:
    name = tagged_name(cell, "check")
    form = (f"check {name}: a check cell must be one call `checks.<check>(<name>, ...)`, "
            f"`checks` imported from {CHECK_PACKAGE} in a setup cell")
    try:
        body = ast.parse(cell.source).body
    except SyntaxError as e:
        raise GradingError(f"{form} (line {e.lineno}: {e.msg})") from None
    call = body[0].value if len(body) == 1 and isinstance(body[0], ast.Expr) else None
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
            and isinstance(call.func.value, ast.Name) and call.func.value.id in aliases
            and not call.keywords and all(isinstance(a, ast.Name) for a in call.args)):
        raise GradingError(form)
    return Check(name, aliases[call.func.value.id], call.func.attr,
                 tuple(a.id for a in call.args), _points(cell, name))


def _points(cell, name: str) -> float:
    text = tagged_name(cell, "points")
    try:
        points = 1.0 if text is None else float(text)
    except ValueError:
        points = -1.0
    if not points > 0 or points == float("inf"):
        raise GradingError(f"check {name}: points:{text} must be a positive number")
    return points


# ---------------------------------------------------------------- grading one notebook


def grade_one(path, pristine_dir="exercises", timeout: float = 60,
              sandbox: bool = True) -> Scorecard:
    """Grade one learner notebook; problems with the file land in `Scorecard.error`, a failure
    of the grader itself in `Scorecard.grader_failed` (never a traceback: the class goes on)."""
    card = Scorecard(str(path))
    try:
        _grade_into(card, Path(path), Path(pristine_dir), timeout, sandbox)
    except Exception as e:  # a grader bug: say so on this row, grade the rest of the class
        card.error = f"the grader failed on this file: {type(e).__name__}: {_first_line(str(e))}"
        card.grader_failed = True
    card.error = clean(card.error)
    card.notes = [clean(n) for n in card.notes]
    for check in card.checks:
        check.hint = clean(check.hint)
    return card


def _grade_into(card: Scorecard, path: Path, pristine_dir: Path, timeout, sandbox) -> None:
    try:
        learner, _ = read_learner(path)
    except GradingError as e:
        learner, card.error = None, str(e)
    try:
        stem, card.notes = exercise_of(learner or {}, path, pristine_dir)
        pristine = find_pristine(stem, pristine_dir)
        checks = parse_checks(pristine)
    except GradingError as e:
        card.error = card.error or str(e)
        return
    card.exercise = stem
    if learner is not None and not answers_found(pristine, learner):
        theirs = _foreign_answers(learner)
        card.error = (f"none of exercise {stem}'s answer cells are in this file"
                      + (f" (it holds {', '.join(theirs)}: another exercise's answers?)"
                         if theirs else ": was the exercise's notebook handed in?"))
        learner = None
    if learner is None:
        card.checks = [CheckResult(c.name, 0.0, c.points, f"not graded: {card.error}")
                       for c in checks]
        return
    graded, notes = transplant(pristine, learner)
    card.notes += notes
    card.answers_sha256 = _answers_fingerprint(graded, pristine)
    cells, positions = _worker_cells(graded, pristine)
    rules = tuple(sorted({rule for check in checks for rule in forbidden(check)}))
    with tempfile.TemporaryDirectory(prefix="ckpt-grade-", ignore_cleanup_errors=True) as tmp, \
            Session(cells, timeout, Path(tmp), sandbox, rules) as session:
        for check in checks:
            session.position = positions[check.name]  # the cells above the check cell
            card.checks.append(run_check(check, session))
        card.notes += session.notes
        card.sandbox = session.unsandboxed


def _answers_fingerprint(graded, pristine) -> str:
    """A digest of the answers the learner changed ("" if none): equal for duplicates."""
    changed = [(tagged_name(g, "answer"), g.source) for g, p in zip(graded.cells, pristine.cells,
                                                                    strict=True)
               if tagged_name(g, "answer") is not None and g.source != p.source]
    return hashlib.sha256(json.dumps(changed).encode()).hexdigest() if changed else ""


def _worker_cells(graded, pristine) -> tuple[list[Cell], dict[str, int]]:
    """The non-check code cells, in the pristine order (what the worker runs), and for each check
    how many of them run before it: as in the notebook, a check sees only the cells above it."""
    cells, positions = [], {}
    for number, (mine, original) in enumerate(zip(graded.cells, pristine.cells, strict=True), 1):
        if mine.cell_type != "code":
            continue
        check = tagged_name(mine, "check")
        if check is not None:
            positions[check] = len(cells)
            continue
        answer = tagged_name(mine, "answer")
        label = f"answer {answer}" if answer else f"cell {number} (setup)"
        cells.append(Cell(label, mine.source, original.source, answer is not None))
    return cells, positions


def forbidden(check: Check) -> tuple[str, ...]:
    """What the check declares its answer may not use (`@checks.forbids(...)`), plus the
    package's reference implementations, which no answer may use."""
    function = getattr(importlib.import_module(check.module), check.function, None)
    return (*getattr(function, "forbidden", ()), *ALWAYS_FORBIDDEN)


def run_check(check: Check, session: Session) -> CheckResult:
    """Call the package's check with Remote proxies; score from what it returns or raises."""
    import ckpt_course.checks as package
    from ckpt_course.checks import CheckFailed

    module = importlib.import_module(check.module)
    function = getattr(module, check.function, None)
    set_seed = getattr(module, "set_seed", None) or getattr(package, "set_seed", None)
    if function is None or set_seed is None:
        missing = check.function if function is None else "set_seed"
        return CheckResult(check.name, 0.0, check.points,
                           f"not graded: {check.module} has no {missing} (a course bug)")
    set_seed(secrets.randbits(32))  # inputs the learner cannot have seen
    printed = io.StringIO()  # a check giving partial credit prints the failed parts' hints
    try:
        with contextlib.redirect_stdout(printed):
            outcome = function(*(session.remote(name) for name in check.args))
    except CheckFailed as e:  # LearnerError and WorkerGone too: their message is the hint
        fraction, hint = getattr(e, "fraction", 0.0), str(e)
    except Exception as e:  # the check choked on what came back: say what, not where
        fraction = 0.0
        hint = ("the check could not use what your code returned: "
                f"{type(e).__name__}: {_first_line(str(e))}")
    else:
        fraction = 1.0 if outcome is None else outcome
        hint = "" if outcome is None else printed.getvalue().strip()
    if type(fraction) not in (int, float) or not 0 <= fraction <= 1:
        fraction, hint = 0.0, f"not graded: the check gave {fraction!r} (a course bug)"
    return CheckResult(check.name, round(check.points * fraction, 4), check.points,
                       clean(hint)[:HINT_CHARS])


def _first_line(text: str) -> str:
    return (text.strip().splitlines() or [""])[0][:200]


def _short(value) -> str:
    text = repr(value)
    return clean(text if len(text) <= 60 else text[:57] + "...")


_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2066-\u2069\ufeff]+")


def clean(text: str, limit: int = 2000) -> str:
    """Learner-made text as ONE printable line: line breaks become " / ", other control and
    direction-changing characters a space, so no hint, note or file name can print a fake row
    on the console, in the gradebook or in feedback."""
    text = str(text).strip()
    text = re.sub(r"\s*(?:\r\n|[\n\r\x0b\x0c\x1c-\x1e\x85\u2028\u2029])\s*", " / ", text)
    text = _UNPRINTABLE.sub(" ", text)
    return text if len(text) <= limit else text[:limit - 3] + "..."


# ---------------------------------------------------------------- grading a class


def grade(notebooks, pristine_dir="exercises", timeout: float = 60, jobs: int | None = None,
          progress=None, sandbox: bool = True) -> list[Scorecard]:
    """Grade each notebook (one Scorecard each, in order; a path given twice is graded once),
    `jobs` at once (default: the cores).

    timeout: seconds per cell and per call. progress: called with each Scorecard when done.
    """
    if type(timeout) not in (int, float) or not 0 < timeout < float("inf"):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    if not Path(pristine_dir).is_dir():
        raise ValueError(f"no exercises folder {pristine_dir}: pass the folder the exercises "
                         "were built into (--exercises DIR)")
    named: dict[str, str] = {}  # a path named twice (x.ipynb, ./x.ipynb) is graded once
    for n in notebooks:
        named.setdefault(os.path.normpath(str(n)), str(n))
    notebooks = list(named.values())
    jobs = max(1, min(len(notebooks), jobs or os.cpu_count() or 1))
    if jobs == 1:
        cards = []
        for path in notebooks:
            cards.append(grade_one(path, pristine_dir, timeout, sandbox))
            if progress:
                progress(cards[-1])
        return flag_duplicates(cards)
    cards: list[Scorecard | None] = [None] * len(notebooks)
    todo, lock = list(enumerate(notebooks))[::-1], threading.Lock()

    def feed_one_process() -> None:
        """A grader process of its own (checks keep global state: the seed, stdout) that
        grades notebook after notebook; torch is imported once per process, not per notebook."""
        proc = None
        while True:
            with lock:
                if not todo:
                    break
                i, path = todo.pop()
            if proc is None:
                proc = subprocess.Popen([sys.executable, "-c", "from ckpt_course.grading import "
                                         "_pool_main; _pool_main()"], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)
            try:
                proc.stdin.write(json.dumps([path, str(pristine_dir), timeout, sandbox]) + "\n")
                proc.stdin.flush()
                card = _card_from_dict(json.loads(proc.stdout.readline()))
            except (OSError, ValueError, TypeError) as e:  # the grader's process died: say so
                card = Scorecard(path, error=f"the grader's process failed: {e!r}",
                                 grader_failed=True)
                proc.kill()
                proc.wait()
                proc = None
            cards[i] = card
            if progress:
                with lock:
                    progress(card)
        if proc is not None:
            proc.stdin.close()
            proc.wait()

    threads = [threading.Thread(target=feed_one_process) for _ in range(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return flag_duplicates(cards)


def flag_duplicates(cards: list[Scorecard]) -> list[Scorecard]:
    """Mark each notebook whose changed answers are exactly those of an earlier one (the same
    file handed in twice, or copied answers) with `duplicate_of` and a note."""
    first: dict[tuple[str, str], str] = {}
    for card in cards:
        if not card.answers_sha256:
            continue
        key = (card.exercise, card.answers_sha256)
        if key in first:
            card.duplicate_of = first[key]
            card.notes.append(f"duplicate: the same answers as {clean(first[key])}")
        else:
            first[key] = card.notebook
    return cards


def _pool_main() -> None:
    """A grader process: one JSON line in (path, exercises, timeout, sandbox), one scorecard out.
    The replies go to the original stdout; anything else printed goes to stderr."""
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    for line in sys.stdin:
        card = grade_one(*json.loads(line))
        replies.write(json.dumps(asdict(card)) + "\n")
        replies.flush()


def _card_from_dict(data: dict) -> Scorecard:
    checks = [CheckResult(**c) for c in data.pop("checks")]
    return Scorecard(**data, checks=checks)


# ---------------------------------------------------------------- reports


def format_scorecards(cards: list[Scorecard]) -> str:
    """Each notebook: a line with its score, an indented line per check, its notes; every piece
    of text one clean line (`clean`), so a learner's text cannot start a line of its own."""
    out = []
    for card in cards:
        name, error = clean(card.notebook), clean(card.error)
        if card.error and not card.checks:
            out.append(f"{name}  not graded: {error}")
            continue
        out.append(f"{name}  {card.score}" + (f"  (not graded: {error})" if error else ""))
        width = max((len(c.name) for c in card.checks), default=0)
        for check in card.checks:
            mark = "ok  " if check.passed else "PART" if check.earned else "FAIL"
            points = f"{_num(check.earned)}/{_num(check.points)}"
            out.append(f"  {mark} {check.name:<{width}}  {points:>5}  {clean(check.hint)}"
                       .rstrip())
        out.extend(f"  note: {clean(note)}" for note in card.notes)
    return "\n".join(out)


def write_csv(cards: list[Scorecard], path) -> None:
    """A gradebook: one row per notebook, one column per check (points earned), the total
    (`score`) and the `max_score` (nbgrader's names), and why a row could not be graded."""
    columns = list(dict.fromkeys(c.name for card in cards for c in card.checks))
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["notebook", "exercise", *columns, "score", "max_score", "error",
                         "duplicate_of"])
        for card in cards:
            earned = {c.name: _num(c.earned) for c in card.checks}
            writer.writerow([_cell(card.notebook), card.exercise,
                             *(earned.get(n, "") for n in columns), _num(card.earned),
                             _num(card.points) if card.checks else "", _cell(card.error),
                             _cell(card.duplicate_of)])


def _cell(text: str) -> str:
    """A gradebook cell of text: one clean line that a spreadsheet shows, never evaluates."""
    text = clean(text)
    return "'" + text if text[:1] in ("=", "+", "-", "@") else text


def write_json(cards: list[Scorecard], path) -> None:
    data = [{**asdict(card), "score": card.score, "earned": card.earned, "points": card.points}
            for card in cards]
    Path(path).write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def write_feedback(cards: list[Scorecard], folder) -> list[Path]:
    """One markdown report per learner: each check, its points and hint; never an answer."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for card, name in zip(cards, _report_names([c.notebook for c in cards]), strict=True):
        lines = [f"# Feedback on {_md(Path(card.notebook).name)}", ""]
        if card.exercise:
            lines.append(f"Exercise: `{card.exercise}`  ")
        if card.error:
            lines.append(f"**Not graded:** {_md(card.error)}")
        if card.checks:
            lines += [f"Score: **{card.score}**", "", "| check | points | |", "|---|---|---|"]
            lines += [f"| {c.name} | {_num(c.earned)}/{_num(c.points)} | "
                      f"{'passed' if c.passed else 'see below'} |" for c in card.checks]
        for check in (c for c in card.checks if not c.passed):
            lines += ["", f"## {check.name}", "", f"    {clean(check.hint)}"]
        if card.notes:
            lines += ["", "## Notes", "", *(f"- {_md(note)}" for note in card.notes)]
        path = folder / name
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        written.append(path)
    return written


def _md(text: str) -> str:
    """Learner-made text in markdown: one clean line, with markdown's active characters escaped."""
    return re.sub(r"([\\`*_{}\[\]<>()#+|!~])", r"\\\1", clean(text))


def _report_names(notebooks: list[str]) -> list[str]:
    """File names for the reports, unique: the notebooks' paths from their common folder."""
    paths = [Path(os.path.abspath(n)).with_suffix("") for n in notebooks]  # no resolve: a
    # submission may be a symbolic link loop
    root = Path(os.path.commonpath([p.parent for p in paths])) if paths else Path()
    names, seen = [], set()
    for p in paths:
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", "_".join(p.relative_to(root).parts)) or "notebook"
        name, k = f"{base}.md", 2
        while name in seen:
            name, k = f"{base}-{k}.md", k + 1
        seen.add(name)
        names.append(name)
    return names


def _num(x: float) -> str:
    return f"{x:g}"
