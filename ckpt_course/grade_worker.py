"""The learner's side of grading: the wire format, the worker and the reaper (see grading.py).

Two programs run from this module, each as a fresh Python process:

    python -m ckpt_course.grade_worker reap REQ_FD REPLY_FD   (trusted, outside the sandbox)
    python -m ckpt_course.grade_worker serve REQ_FD REPLY_FD  (runs the learner's code)

`reap` makes itself a child subreaper (Linux prctl), starts `serve`, and waits for every process
of the tree: orphans the learner's code leaves behind are reparented to it, killed when the worker
ends, and counted. It prints one JSON line: how the worker ended and the peak RSS in bytes (the
sum over the tree of each process's ru_maxrss from os.wait4: splitting work across processes
cannot make it look smaller).

`serve` reads an init message (the cells), shuts itself in a Landlock sandbox where the kernel
offers it (write only to its own folder, read only the Python installation, no TCP, no signals
or ptrace out of the sandbox), runs the cells in an IPython shell, then answers requests. Its
replies are DATA only: see `to_wire`. Nothing it prints is read by anyone.

This module imports no torch at import time; tensors are (de)serialised with torch.save /
torch.load(weights_only=True) only when a message holds one.
"""

from __future__ import annotations

import ctypes
import io
import json
import os
import signal
import struct
import sys
from pathlib import Path

MAX_MESSAGE = 32 * 2**20  # bytes in one message, all its frames together
TEXT_LINES, TEXT_CHARS = 3, 300  # what a learner's error message keeps
HEADER = struct.Struct(">Q")


class WireError(ValueError):
    """A message that is not data, or too big."""


# ---------------------------------------------------------------- the wire format


def to_wire(value) -> tuple[bytes, list[bytes]]:
    """Data -> (JSON bytes, tensor blobs). Data: None, bool, int, float, str, list, tuple,
    set, frozenset, dict, plain CPU torch.Tensor. Exact types only: a subclass (an int whose
    __eq__ lies, a proxy) is refused, as is anything else, so nothing but data ever crosses."""
    blobs: list[bytes] = []

    def encode(x):
        kind = type(x)
        if x is None or kind in (bool, int, float, str):
            return x
        if kind is list:
            return [encode(v) for v in x]
        if kind is tuple:
            return {"tuple": [encode(v) for v in x]}
        if kind is dict:
            return {"dict": [[encode(k), encode(v)] for k, v in x.items()]}
        if kind in (set, frozenset):
            return {kind.__name__: [encode(v) for v in x]}
        if _is_plain_tensor(x):
            blobs.append(tensor_bytes(x))
            return {"tensor": len(blobs) - 1}
        raise WireError(f"a {kind.__module__}.{kind.__qualname__} is not data: return only "
                        "numbers, strings, bools, None, lists, tuples, sets, dicts and tensors")

    return json.dumps(encode(value)).encode(), blobs


def from_wire(text: bytes, blobs: list[bytes]):
    """The inverse of to_wire. Only JSON and torch.load(weights_only=True) tensors: no pickle."""
    try:
        tree = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise WireError(f"not JSON: {e}") from None

    def decode(x):
        if isinstance(x, list):
            return [decode(v) for v in x]
        if not isinstance(x, dict):
            return x
        if set(x) == {"tuple"} and isinstance(x["tuple"], list):
            return tuple(decode(v) for v in x["tuple"])
        if set(x) == {"dict"} and isinstance(x["dict"], list):
            pairs = [(decode(k), decode(v)) for k, v in x["dict"]]
            return {_hashable(k): v for k, v in pairs}
        for kind in (set, frozenset):
            if set(x) == {kind.__name__} and isinstance(x[kind.__name__], list):
                return kind(_hashable(decode(v)) for v in x[kind.__name__])
        if set(x) == {"tensor"} and type(x["tensor"]) is int and 0 <= x["tensor"] < len(blobs):
            return _load_tensor(blobs[x["tensor"]])
        raise WireError(f"unknown object {sorted(x)!r}")

    try:
        return decode(tree)
    except (TypeError, ValueError, RecursionError) as e:
        raise WireError(f"not data: {e}") from None


def _hashable(x):
    return tuple(x) if isinstance(x, list) else x


def tensor_bytes(t) -> bytes:
    import torch

    buffer = io.BytesIO()
    torch.save(t.detach().clone(), buffer)  # clone: only this tensor's storage, not a big base
    return buffer.getvalue()


def _is_plain_tensor(x) -> bool:
    torch = sys.modules.get("torch")
    return (torch is not None and type(x) is torch.Tensor and x.layout == torch.strided
            and x.device.type == "cpu")


def _load_tensor(blob: bytes):
    import torch

    try:
        t = torch.load(io.BytesIO(blob), weights_only=True, map_location="cpu")
    except Exception as e:  # weights_only refuses any pickle that is not plain tensors
        raise WireError(f"not a plain tensor: {type(e).__name__}: {_first_lines(str(e))}") \
            from None
    if type(t) is not torch.Tensor:
        raise WireError(f"a {type(t).__name__} where a tensor was expected")
    return t


def send(fd: int, value) -> None:
    text, blobs = to_wire(value)
    frames = [text, *blobs]
    data = HEADER.pack(len(frames)) + b"".join(HEADER.pack(len(f)) + f for f in frames)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def receive(read_exact) -> object:
    """One message via read_exact(n) -> bytes; WireError past MAX_MESSAGE bytes."""
    (count,) = HEADER.unpack(read_exact(HEADER.size))
    frames, total = [], 0
    if count < 1 or count > 4096:
        raise WireError(f"a message of {count} frames")
    for _ in range(count):
        (size,) = HEADER.unpack(read_exact(HEADER.size))
        total += size
        if total > MAX_MESSAGE:
            raise WireError(f"more than {MAX_MESSAGE // 2**20} MB")
        frames.append(read_exact(size))
    return from_wire(frames[0], frames[1:])


def blocking_reader(fd: int):
    def read_exact(n: int) -> bytes:
        chunks = []
        while n:
            chunk = os.read(fd, min(n, 2**20))
            if not chunk:
                raise EOFError
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)

    return read_exact


def error_data(e: BaseException) -> dict:
    """An exception as a learner reads it: its type and the first lines of its message."""
    text = f"{e.msg} (line {e.lineno} of the cell)" if isinstance(e, SyntaxError) else str(e)
    return {"type": type(e).__name__, "message": _first_lines(text)}


def _first_lines(text: str) -> str:
    lines = [line[:TEXT_CHARS] for line in text.strip().splitlines()[:TEXT_LINES]]
    return "\n".join(lines)


# ---------------------------------------------------------------- the reaper


def reap(req_fd: int, reply_fd: int) -> int:
    """Run `serve` as a child; wait for the whole tree; print how it ended and its peak RSS."""
    subreaper = sys.platform.startswith("linux") and _prctl(36, 1) == 0  # PR_SET_CHILD_SUBREAPER
    for fd in (req_fd, reply_fd):
        os.set_inheritable(fd, True)
    argv = [sys.executable, "-m", "ckpt_course.grade_worker", "serve", str(req_fd), str(reply_fd)]
    quiet = [(os.POSIX_SPAWN_OPEN, fd, os.devnull, os.O_RDWR, 0) for fd in (0, 1, 2)]
    worker = os.posix_spawn(sys.executable, argv, os.environ, file_actions=quiet)
    os.close(req_fd)
    os.close(reply_fd)
    signal.signal(signal.SIGTERM, lambda *_: _kill_children())  # the grader's timeout
    status, peak = None, 0
    while True:
        try:
            pid, wait_status, usage = os.wait4(-1, 0)
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        peak += usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        if pid == worker:
            status = os.waitstatus_to_exitcode(wait_status)
            _kill_children()  # nothing the learner started outlives the worker
    print(json.dumps({"exit": status, "peak": peak, "subreaper": subreaper}), flush=True)
    return 0


def _kill_children() -> None:
    me = os.getpid()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == me:
            try:
                os.kill(int(stat.parent.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


def _prctl(option: int, value: int) -> int:
    return ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0)


# ---------------------------------------------------------------- the sandbox (Linux Landlock)

_EXECUTE, _WRITE_FILE, _READ_FILE, _READ_DIR, _TRUNCATE, _IOCTL_DEV = 1, 2, 4, 8, 1 << 14, 1 << 15
_READ = _EXECUTE | _READ_FILE | _READ_DIR


def sandbox(folder: str) -> str:
    """Confine this process and its children: write only under `folder`, read only what Python
    needs, no TCP, no signals to or ptrace of processes outside. Returns "" or why not."""
    if not sys.platform.startswith("linux"):
        return f"no Landlock on {sys.platform}"
    libc = ctypes.CDLL(None, use_errno=True)
    abi = libc.syscall(444, None, 0, 1)  # landlock_create_ruleset(NULL, 0, VERSION)
    if abi < 1:
        return f"the kernel offers no Landlock (errno {ctypes.get_errno()})"
    handled = (1 << 13) - 1 | (1 << 13 if abi >= 2 else 0) | (_TRUNCATE if abi >= 3 else 0) \
        | (_IOCTL_DEV if abi >= 5 else 0)
    fields = [handled] + ([3] if abi >= 4 else []) + ([3] if abi >= 6 else [])  # net, scope
    attr = struct.pack(f"{len(fields)}Q", *fields)
    ruleset = libc.syscall(444, attr, len(attr), 0)
    if ruleset < 0:
        return f"landlock_create_ruleset failed (errno {ctypes.get_errno()})"
    file_rights = handled & (_EXECUTE | _WRITE_FILE | _READ_FILE | _TRUNCATE | _IOCTL_DEV)
    rules = [(p, _READ) for p in _readable()] + [("/dev", _READ | (handled & _IOCTL_DEV)),
                                                  ("/dev/null", file_rights), (folder, handled)]
    for path, rights in rules:
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            continue
        if not os.path.isdir(path):
            rights &= file_rights
        rule = struct.pack("=Qi", rights & handled, fd)
        libc.syscall(445, ruleset, 1, rule, 0)  # LANDLOCK_RULE_PATH_BENEATH
        os.close(fd)
    if _prctl(38, 1) != 0 or libc.syscall(446, ruleset, 0) != 0:  # NO_NEW_PRIVS, restrict_self
        return f"landlock_restrict_self failed (errno {ctypes.get_errno()})"
    os.close(ruleset)
    return ""


def _readable() -> set[str]:
    import site

    import ckpt_course

    system = ["/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin", "/etc", "/proc", "/sys"]
    python = [sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.dirname(os.__file__),
              os.path.dirname(os.path.realpath(sys.executable)), *site.getsitepackages(),
              os.path.dirname(ckpt_course.__file__)]
    return {os.path.realpath(p) for p in system + python}


# ---------------------------------------------------------------- the worker


def serve(req_fd: int, reply_fd: int) -> int:
    """Run the cells the grader sends, then answer its calls until the request pipe closes."""
    read = blocking_reader(req_fd)
    init = receive(read)
    folder = os.getcwd()
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    config = Config()
    config.HistoryManager.enabled = False
    config.InteractiveShell.colors = "nocolor"
    shell = InteractiveShell.instance(config=config)
    why_not = sandbox(folder) if init["sandbox"] else "not asked for"
    send(reply_fd, {"sandbox": why_not})
    run_cell = shell.run_cell  # bound now: an answer that rebinds shell.run_cell changes nothing
    for source in init["cells"]:
        send(reply_fd, {"running": True})  # so the grader knows which cell a crash was in
        result = run_cell(source, store_history=False)
        error = result.error_before_exec or result.error_in_exec
        send(reply_fd, {"error": None if error is None else error_data(error)})
    while True:
        try:
            request = receive(read)
        except EOFError:
            return 0
        reply = _answer(request, shell.user_ns)
        try:
            send(reply_fd, reply)
        except (WireError, RecursionError) as e:  # nothing was written: send says why instead
            send(reply_fd, {"not_data": _first_lines(str(e) or type(e).__name__)})


def _answer(request: dict, namespace: dict) -> dict:
    args, kwargs = request.get("args", []), request.get("kwargs", {})
    try:
        if "probe" in request:  # the trusted reference, in a worker without learner answers
            import importlib

            module, _, name = request["probe"].partition(":")
            fn = getattr(importlib.import_module(module), name)
        elif request["call"] in namespace:
            fn = namespace[request["call"]]
        else:
            raise NameError(f"name {request['call']!r} is not defined")
        result = fn(*args, **kwargs)
        return {"returned": None if request.get("discard") else result}  # a peak: only it counts
    except BaseException as e:  # SystemExit and KeyboardInterrupt too: the learner raised them
        return {"raised": error_data(e)}


if __name__ == "__main__":
    role, req, reply = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    sys.exit({"reap": reap, "serve": serve}[role](req, reply))
