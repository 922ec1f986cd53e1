"""The grader's side of the process boundary: workers, and the `Remote` proxies checks call.

A `Session` runs one learner's notebook (pristine cells, the learner's answer sources) in a
worker process tree (see grade_worker.py) and hands checks `Remote(name)` proxies: calling one
sends data to the worker and returns the data it replies, or raises `LearnerError` /
`WorkerGone` whose message is the hint. `.peak()` and `.reference_peak()` run one call in a
fresh worker and return the peak RSS of its process tree in bytes.

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


# ---------------------------------------------------------------- one process tree


class Worker:
    """A reaper process and, under it, a worker that has run `sources` and serves calls."""

    def __init__(self, sources: list[str], folder: Path, sandbox: bool):
        req_r, self.req = os.pipe()
        self.rep, rep_w = os.pipe()
        home = str(folder)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
        env.update(HOME=home, TMPDIR=home, IPYTHONDIR=home, MPLCONFIGDIR=home,
                   PYTHONDONTWRITEBYTECODE="1",
                   # Peaks are RSS, so freed tensors must leave it: a fixed mmap threshold makes
                   # glibc map every block over 64 KiB on its own and unmap it when freed. With
                   # the default (dynamic) threshold, freed blocks stay in the heap and an
                   # offloading run peaked above a plain one (1097 vs 1003 MiB; fixed: 479 vs 703).
                   MALLOC_MMAP_THRESHOLD_="65536")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ckpt_course.grade_worker", "reap", str(req_r), str(rep_w)],
            cwd=folder, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, pass_fds=(req_r, rep_w), start_new_session=True)
        os.close(req_r)
        os.close(rep_w)
        self.report: dict | None = None
        self._send({"cells": sources, "sandbox": sandbox}, "starting")

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
    """One learner's notebook in workers; `remote(name)` proxies for the checks."""

    def __init__(self, cells: list[Cell], pristine: list[str], timeout: float, root: Path,
                 sandbox: bool = True):
        self.cells, self.pristine, self.timeout, self.root = cells, pristine, timeout, root
        self.sandbox, self.notes, self.unsandboxed = sandbox, [], ""
        self.dead: set[int] = set()  # cells that killed a worker: run as pristine stubs
        self._worker: Worker | None = None
        self._noted = False

    def remote(self, name: str) -> Remote:
        return Remote(self, name)

    def call(self, name: str, args, kwargs):
        if self._worker is None:
            self._worker = self._start()
        try:
            return self._reply(self._worker, {"call": name, "args": list(args),
                                              "kwargs": kwargs}, _what(name, args))
        except WorkerGone:
            self._worker = None  # the next call gets a fresh one
            raise

    def peak(self, name: str, args, kwargs) -> int:
        request = {"call": name, "args": list(args), "kwargs": kwargs}
        return self._peak(self._start(), request, _what(name, args))

    def reference_peak(self, probe: str, args, kwargs) -> int:
        module, _, function = probe.partition(":")
        if not module.startswith(PROBE_PACKAGE) or not function.isidentifier():
            raise ValueError(f"reference probe {probe!r}: expected "
                             f"'{PROBE_PACKAGE}<module>:<function>'")
        request = {"probe": probe, "args": list(args), "kwargs": kwargs}
        return self._peak(self._start(self.pristine), request, f"the reference {function}")

    def close(self) -> None:
        if self._worker is not None:
            self._worker.close(self.timeout)
            self._worker = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _start(self, sources: list[str] | None = None) -> Worker:
        """A worker that has run the cells. A cell that kills it (exit, crash, timeout) is
        noted and replaced by its pristine source, and a new worker starts."""
        learner = sources is None
        while True:
            if learner:
                sources = [c.pristine if i in self.dead else c.source
                           for i, c in enumerate(self.cells)]
            worker = Worker(sources, Path(tempfile.mkdtemp(dir=self.root)), self.sandbox)
            try:
                self.unsandboxed = worker.receive(self.timeout, "starting")["sandbox"]
                errors = self._run_cells(worker, sources, learner)
            except _CellKilled as e:
                if not learner or e.index in self.dead:
                    raise WorkerGone(e.why) from None
                self.dead.add(e.index)
                self.notes.append(f"{self.cells[e.index].label}: {e.why}; graded as the stub")
                continue
            if learner and not self._noted:
                self._noted = True
                self.notes += [f"{self.cells[i].label} failed: {error['type']}: "
                               f"{error['message']}" for i, error in errors]
            return worker

    def _run_cells(self, worker: Worker, sources: list[str], learner: bool):
        errors = []
        for i, _ in enumerate(sources):
            what = f"running {self.cells[i].label}" if learner else "running the exercise"
            try:
                worker.receive(self.timeout, what)  # "running"
                error = worker.receive(self.timeout, what)["error"]
            except WorkerGone as e:
                raise _CellKilled(i, str(e)) from None
            if error is not None:
                errors.append((i, error))
        return errors

    def _reply(self, worker: Worker, request: dict, what: str):
        reply = worker.request(request, self.timeout, f"running {what}")
        if "returned" in reply:
            return reply["returned"]
        if "raised" in reply:
            error = reply["raised"]
            raise LearnerError(f"{what} raised {error['type']}: {error['message']}")
        raise LearnerError(f"{what} returned something that is not data: "
                           f"{reply.get('not_data', reply)}")

    def _peak(self, worker: Worker, request: dict, what: str) -> int:
        """Run one call in a fresh worker, let it end -> the peak RSS of its whole tree."""
        try:
            if not sys.platform.startswith("linux"):
                raise OSError(f"peak memory checks need Linux (prctl PR_SET_CHILD_SUBREAPER and "
                              f"os.wait4); this is {sys.platform}")
            self._reply(worker, {**request, "discard": True}, what)
        except BaseException:
            worker.kill()
            raise
        report = worker.close(self.timeout)
        if not report.get("peak"):
            raise WorkerGone("the worker's peak memory could not be measured")
        return report["peak"]


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
