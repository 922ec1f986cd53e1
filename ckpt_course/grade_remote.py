"""The grader's side of the process boundary: workers, and the `Remote` proxies checks call.

A `Session` runs one learner's notebook (pristine cells, the learner's answer sources) in a
worker process tree (see grade_worker.py) and hands checks `Remote(name)` proxies: calling one
sends data to the worker and returns the data it replies, or raises `LearnerError` /
`WorkerGone` whose message is the hint. The worker runs the cells up to `Session.position`
(the cells above the check being graded) before a call. `.measure()` and
`.measure_reference()` run one call in a fresh worker (the learner's cells, or the pristine
ones) and return the peak RSS of its process tree, a digest of the result and the bytes its
host store copied out, all three measured by trusted code.

No torch at import: tensors are loaded only when a reply holds one.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ckpt_course.checks import CheckFailed
from ckpt_course.grade_worker import WireError, receive, send

PROBE_PACKAGE = "ckpt_course.checks."  # reference_peak runs only probes from the package
KILL_GRACE = 5.0  # seconds the reaper gets to kill its tree before the grader kills the group


class LearnerError(CheckFailed):
    """The learner's function raised, or returned something that is not data.

    A CheckFailed, so that a check's own `call()` or `Parts` treat it as the wrong answer it is
    and its message (the hint) goes through unchanged."""


class WorkerGone(CheckFailed):
    """The worker exited, crashed, ran out of time or sent too much; the message says which."""


@dataclass
class Cell:
    label: str  # "answer 1.1-state" or "code cell 3": what a note names
    source: str  # what the worker runs: the learner's answer, or the pristine cell
    pristine: str  # what runs instead if `source` kills the worker
    answer: bool = False  # an answer cell: the exercise's rules hold from the first one on


# ---------------------------------------------------------------- one process tree


def worker_environment(folder: Path) -> dict[str, str]:
    """The worker's whole environment: nothing of the grader's (its variables may hold tokens or
    paths), only what Python, torch and the package need, all pointing into the worker's folder."""
    import ckpt_course

    home = str(folder)
    return {"PATH": os.defpath, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": home,
            "TMPDIR": home, "IPYTHONDIR": home, "MPLCONFIGDIR": home, "MPLBACKEND": "Agg",
            "PYTHONPATH": str(Path(ckpt_course.__file__).resolve().parents[1]),
            "PYTHONDONTWRITEBYTECODE": "1", "PYTHONNOUSERSITE": "1", "PYTHONHASHSEED": "0",
            "CKPT_COURSE_HEADLESS": "1", "HF_HUB_OFFLINE": "1",
            # Peaks are RSS, so freed tensors must leave it: a fixed mmap threshold makes glibc
            # map every block over 64 KiB on its own and unmap it when freed. With the default
            # (dynamic) threshold, freed blocks stay in the heap and an offloading run peaked
            # above a plain one (1097 vs 1003 MiB; fixed: 479 vs 703).
            "MALLOC_MMAP_THRESHOLD_": "65536"}


class Worker:
    """A reaper process and, under it, a worker that has run `sources` and serves calls."""

    def __init__(self, folder: Path, sandbox: bool, rules: tuple[str, ...] = ()):
        req_r, self.req = os.pipe()
        self.rep, rep_w = os.pipe()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ckpt_course.grade_worker", "reap", str(req_r), str(rep_w)],
            cwd=folder, env=worker_environment(folder), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, pass_fds=(req_r, rep_w),
            start_new_session=True)
        os.close(req_r)
        os.close(rep_w)
        self.report: dict | None = None
        self._send({"sandbox": sandbox, "rules": list(rules)}, "starting")

    def receive(self, timeout: float, what: str):
        """The worker's next message, or WorkerGone saying why there is none."""
        deadline = time.monotonic() + timeout
        try:
            return receive(lambda n: self._read_exact(n, deadline))
        except TimeoutError:
            self.kill()
            raise WorkerGone(f"timed out after {timeout:g} s while {what}: an endless loop?") \
                from None
        except EOFError:
            raise WorkerGone(self._why_gone(what)) from None
        except WireError as e:
            self.kill()
            raise WorkerGone(f"sent something that is not data while {what}: {e}") from None

    def request(self, message: dict, timeout: float, what: str):
        self._send(message, what)
        return self.receive(timeout, what)

    def close(self, timeout: float) -> dict:
        """Let the worker end (no more requests) -> the reaper's report {exit, peak}."""
        self._close_fds(self.req)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        return self._report()

    def kill(self) -> None:
        """Stop the whole tree: the reaper kills what it holds; then its group, by force."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(KILL_GRACE)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()
        self._report()

    def _send(self, message: dict, what: str) -> None:
        try:
            send(self.req, message)
        except (BrokenPipeError, OSError):
            raise WorkerGone(self._why_gone(what)) from None

    def _read_exact(self, n: int, deadline: float) -> bytes:
        chunks = []
        while n:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.rep], [], [], left)[0]:
                raise TimeoutError
            chunk = os.read(self.rep, min(n, 2**20))
            if not chunk:
                raise EOFError
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)

    def _why_gone(self, what: str) -> str:
        try:
            self.proc.wait(KILL_GRACE)
        except subprocess.TimeoutExpired:
            self.kill()
        status = self._report().get("exit")
        if status is None:
            return f"the worker crashed while {what} (no exit status)"
        if status >= 0:
            return f"your code exited (os._exit/sys.exit) with code {status} while {what}"
        name = signal.Signals(-status).name
        why = " (out of memory?)" if name == "SIGKILL" else ""
        return f"the worker crashed while {what}: killed by {name}{why}"

    def _report(self) -> dict:
        if self.report is None:
            out = self.proc.stdout.read() if self.proc.stdout else b""
            try:
                self.report = json.loads(out.decode().strip().splitlines()[-1])
            except (ValueError, IndexError):
                self.report = {}
            self._close_fds(self.rep, self.req)
        return self.report

    def _close_fds(self, *fds: int) -> None:
        for fd in fds:
            if fd == self.req:
                self.req = -1
            if fd == self.rep:
                self.rep = -1
            if fd >= 0:
                os.close(fd)


# ---------------------------------------------------------------- one learner's notebook


class Session:
    """One learner's notebook in workers; `remote(name)` proxies for the checks.

    `position` is how many cells a check sees (those above its check cell, as in the notebook):
    the worker runs cells up to it before the next call, and a fresh worker (after a crash, or
    for a peak) replays the same cells. `rules`: what the answers may not use (grade_worker)."""

    def __init__(self, cells: list[Cell], timeout: float, root: Path, sandbox: bool = True,
                 rules: tuple[str, ...] = ()):
        self.cells, self.timeout, self.root, self.rules = cells, timeout, root, tuple(rules)
        self.sandbox, self.notes, self.unsandboxed = sandbox, [], ""
        self.position = len(cells)
        self.dead: set[int] = set()  # cells that killed a worker: run as pristine stubs
        self.noted: set[int] = set()  # cells whose error is already in the notes
        self._worker: Worker | None = None
        self._ran = 0  # cells the current worker has run

    def remote(self, name: str) -> Remote:
        return Remote(self, name)

    def call(self, name: str, args, kwargs):
        worker = self._ready()
        try:
            return self._reply(worker, {"call": name, "args": list(args),
                                        "kwargs": kwargs}, _what(name, args))
        except WorkerGone:
            self._worker = None  # the next call gets a fresh one
            raise

    def measure(self, name: str, args, kwargs, keys) -> dict:
        """Run one call in a fresh worker with the learner's cells -> {"peak": RSS bytes of its
        tree, "digest": of the result's `keys`, "host_bytes": what went to the host store}."""
        request = {"call": name, "args": list(args), "kwargs": kwargs, "digest": keys}
        return self._measure(self._fresh(learner=True), request, _what(name, args))

    def measure_reference(self, probe: str, args, kwargs, keys) -> dict:
        """The same for a trusted probe, in a fresh worker with the pristine cells only."""
        module, _, function = probe.partition(":")
        if not module.startswith(PROBE_PACKAGE) or not function.isidentifier():
            raise ValueError(f"reference probe {probe!r}: expected "
                             f"'{PROBE_PACKAGE}<module>:<function>'")
        request = {"probe": probe, "args": list(args), "kwargs": kwargs, "digest": keys}
        return self._measure(self._fresh(learner=False), request, f"the reference {function}")

    def peak(self, name: str, args, kwargs) -> int:
        return self.measure(name, args, kwargs, None)["peak"]

    def reference_peak(self, probe: str, args, kwargs) -> int:
        return self.measure_reference(probe, args, kwargs, None)["peak"]

    def close(self) -> None:
        if self._worker is not None:
            self._worker.close(self.timeout)
            self._worker = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    # -- workers
    def _ready(self) -> Worker:
        """The worker, having run the cells up to `position`. A cell that kills it (exit, crash,
        timeout) is noted, replaced by its pristine source, and a new worker replays."""
        while True:
            if self._worker is None or self._ran > self.position:
                if self._worker is not None:
                    self._worker.kill()
                self._worker, self._ran = self._start(trusted=False), 0
            try:
                while self._ran < self.position:
                    self._run_cell(self._worker, self._ran, learner=True)
                    self._ran += 1
                return self._worker
            except _CellKilled as e:
                self._worker = None
                if e.index in self.dead:
                    raise WorkerGone(e.why) from None
                self.dead.add(e.index)
                self.noted.add(e.index)
                self.notes.append(f"{self.cells[e.index].label}: {e.why}; graded as the stub")

    def _fresh(self, learner: bool) -> Worker:
        """A new worker that has run the cells up to `position`: the learner's (dead ones as
        stubs) or the pristine ones (no rules: trusted code only)."""
        worker = self._start(trusted=not learner)
        try:
            for i in range(self.position):
                self._run_cell(worker, i, learner)
        except _CellKilled as e:
            raise WorkerGone(e.why) from None
        return worker

    def _start(self, trusted: bool) -> Worker:
        worker = Worker(Path(tempfile.mkdtemp(dir=self.root)), self.sandbox,
                        () if trusted else self.rules)
        reply = worker.receive(self.timeout, "starting")
        if not trusted:
            self.unsandboxed = reply["sandbox"]
        return worker

    def _run_cell(self, worker: Worker, i: int, learner: bool) -> None:
        cell = self.cells[i]
        source = cell.source if learner and i not in self.dead else cell.pristine
        what = f"running {cell.label}" if learner else "running the exercise"
        try:
            error = worker.request({"run": source, "answer": learner and cell.answer},
                                   self.timeout, what)["error"]
        except WorkerGone as e:
            raise _CellKilled(i, str(e)) from None
        if learner and error is not None and i not in self.noted:
            self.noted.add(i)
            self.notes.append(f"{cell.label} failed: {error['type']}: {error['message']}")

    def _reply(self, worker: Worker, request: dict, what: str):
        reply = worker.request(request, self.timeout, f"running {what}")
        if "returned" in reply:
            return reply["returned"]
        if "raised" in reply:
            error = reply["raised"]
            raise LearnerError(f"{what} raised {error['type']}: {error['message']}")
        raise LearnerError(f"{what} returned something that is not data: "
                           f"{reply.get('not_data', reply)}")

    def _measure(self, worker: Worker, request: dict, what: str) -> dict:
        """Run one call in a fresh worker, let it end -> its tree's peak RSS, the digest of the
        result and the bytes its host store received (the last two counted by the reaper)."""
        try:
            if not sys.platform.startswith("linux"):
                raise OSError(f"peak memory checks need Linux (prctl PR_SET_CHILD_SUBREAPER and "
                              f"os.wait4); this is {sys.platform}")
            digest = self._reply(worker, request, what)
        except BaseException:
            worker.kill()
            raise
        report = worker.close(self.timeout)
        if not report.get("peak"):
            raise WorkerGone("the worker's peak memory could not be measured")
        return {"peak": report["peak"], "digest": digest,
                "host_bytes": report.get("host_bytes", 0)}


class _CellKilled(Exception):
    def __init__(self, index: int, why: str):
        super().__init__(why)
        self.index, self.why = index, why


class Remote:
    """What a check gets instead of the learner's function: calls cross as data only."""

    def __init__(self, session: Session, name: str):
        self._session, self._name = session, name

    def __call__(self, *args, **kwargs):
        return self._session.call(self._name, args, kwargs)

    def peak(self, *args, **kwargs) -> int:
        """Peak RSS (bytes) of a fresh worker's process tree running this call."""
        return self._session.peak(self._name, args, kwargs)

    def reference_peak(self, probe: str, *args, **kwargs) -> int:
        """Peak RSS (bytes) of a fresh worker without the learner's answers running `probe`
        ("ckpt_course.checks.<module>:<function>") on the same arguments."""
        return self._session.reference_peak(probe, args, kwargs)

    def measure(self, *args, keys=None) -> dict:
        """{"peak", "digest", "host_bytes"} of this call in a fresh worker (Session.measure)."""
        return self._session.measure(self._name, args, {}, keys)

    def measure_reference(self, probe: str, *args, keys=None) -> dict:
        return self._session.measure_reference(probe, args, {}, keys)

    def __repr__(self) -> str:
        return f"Remote({self._name!r})"


def _what(name: str, args) -> str:
    text = ", ".join(_short(a) for a in args)
    return f"{name}({text})"


def _short(value) -> str:
    if type(value).__name__ == "Tensor":
        return f"<tensor {tuple(value.shape)}>"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
