"""The learner's side of grading: the wire format, the worker and the reaper (see grading.py).

Two programs run from this module, each as a fresh Python process:

    python -m ckpt_course.grade_worker reap REQ_FD REPLY_FD   (trusted, outside the sandbox)
    python -m ckpt_course.grade_worker serve REQ_FD REPLY_FD  (runs the learner's code)

`reap` unshares user, PID and network namespaces where the kernel allows and forks the PID
namespace's init (else it makes itself a child subreaper), starts `serve` with a minimal
environment, and waits for every process of the tree: orphans the learner's code leaves behind
are reparented to it, killed when the worker ends (kill(-1) in the namespace, else every
descendant found in /proc, until none is left), and counted. It prints one JSON line: how the
worker ended, the peak RSS in bytes (the sum over the tree of each process's ru_maxrss from
os.wait4: splitting work across processes cannot make it look smaller), and the bytes the
worker's host store copied out through its pipe (`_HostCounter`).

`serve` reads an init message (the exercise's rules), prepares the rules, shuts itself in a
Landlock sandbox where the kernel offers it (write only to its own folder, read only the system,
the Python installation and the package, no TCP, no signals or ptrace out of the sandbox), then
answers requests one at a time: `{"run": source, "answer": bool}` runs a cell in an IPython
shell (the rules take hold before the first answer cell: `Rules`), `{"call": name, ...}` calls a
function the cells defined, `{"probe": ...}` (trusted workers only) a reference. Its replies are
DATA only: see `to_wire`; a memory run replies only a digest of its result (`digest`). Nothing it
prints is read by anyone.

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
import time
from pathlib import Path

MAX_MESSAGE = 32 * 2**20  # bytes in one message, all its frames together
TEXT_LINES, TEXT_CHARS = 3, 300  # what a learner's error message keeps
HEADER = struct.Struct(">Q")


class WireError(ValueError):
    """A message that is not data, or too big."""


MAX_INT_BITS = 8192  # about 2,466 digits: far under Python's 4,300-digit str(int) limit


# ---------------------------------------------------------------- the wire format


def to_wire(value) -> tuple[bytes, list[bytes]]:
    """Data -> (JSON bytes, tensor blobs). Data: None, bool, int, float, str, list, tuple,
    set, frozenset, dict, plain CPU torch.Tensor. Exact types only: a subclass (an int whose
    __eq__ lies, a proxy) is refused, as is anything else, so nothing but data ever crosses."""
    blobs: list[bytes] = []

    def encode(x):
        kind = type(x)
        if kind is int and x.bit_length() > MAX_INT_BITS:  # json.dumps would fail on it
            raise WireError(f"an int of {x.bit_length()} bits (about "
                            f"{int(x.bit_length() * 0.30103)} digits) is too big to be sent "
                            "back: return a number of bytes, not a giant integer")
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

_CLONE_NEWNS, _CLONE_NEWUSER, _CLONE_NEWPID, _CLONE_NEWNET = 0x20000, 0x10000000, 0x20000000, \
    0x40000000
ISOLATION_ENV = "CKPT_COURSE_ISOLATION"  # what the reaper got: "pid,net" or "" (the worker says)
HOST_FD_ENV = "CKPT_COURSE_HOST_FD"  # probes.Host copies what it stores out through this pipe


def reap(req_fd: int, reply_fd: int) -> int:
    """Run `serve` in new PID and network namespaces where the kernel allows (this process then
    forks the namespace's init, which does the rest), else as a child of this subreaper; wait for
    the whole tree; print how it ended, its peak RSS and the bytes its host store received."""
    isolation = _isolate()
    if "pid" in isolation:
        init = os.fork()
        if init:  # outside: relay the grader's SIGTERM, end as the init ends
            signal.signal(signal.SIGTERM, lambda *_: _signal(init, signal.SIGTERM))
            os.close(req_fd)
            os.close(reply_fd)
            while True:
                try:
                    return os.waitstatus_to_exitcode(os.waitpid(init, 0)[1])
                except InterruptedError:
                    continue
        _prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: the namespace dies with the outer reaper
    return _init(req_fd, reply_fd, isolation)


def _isolate() -> str:
    """Unshare what the kernel lets this (single-threaded) process unshare: a user namespace
    (so even root loses its powers over the host: no chattr +i, no mounts), a PID namespace
    (every process the learner starts dies with the namespace's init) and a network namespace
    (no network at all: not even UDP or abstract unix sockets)."""
    if not sys.platform.startswith("linux"):
        return ""
    libc = ctypes.CDLL(None, use_errno=True)
    for flags, name in ((_CLONE_NEWUSER | _CLONE_NEWPID | _CLONE_NEWNET, "user,pid,net"),
                        (_CLONE_NEWPID | _CLONE_NEWNET, "pid,net"), (_CLONE_NEWNET, "net")):
        if libc.unshare(flags) == 0:
            return name
    return ""


def _init(req_fd: int, reply_fd: int, isolation: str) -> int:
    subreaper = sys.platform.startswith("linux") and _prctl(36, 1) == 0  # PR_SET_CHILD_SUBREAPER
    in_namespace = "pid" in isolation and os.getpid() == 1
    host_r, host_w = os.pipe()
    host = _HostCounter(host_r)
    for fd in (req_fd, reply_fd, host_w):
        os.set_inheritable(fd, True)
    argv = [sys.executable, "-m", "ckpt_course.grade_worker", "serve", str(req_fd), str(reply_fd)]
    env = {**os.environ, ISOLATION_ENV: isolation, HOST_FD_ENV: str(host_w)}
    quiet = [(os.POSIX_SPAWN_OPEN, fd, os.devnull, os.O_RDWR, 0) for fd in (0, 1, 2)]
    worker = os.posix_spawn(sys.executable, argv, env, file_actions=quiet)
    for fd in (req_fd, reply_fd, host_w):
        os.close(fd)
    kill_all = _kill_namespace if in_namespace else _kill_descendants
    signal.signal(signal.SIGTERM, lambda *_: kill_all())  # the grader's timeout
    status, peak, ending = None, 0, False
    while True:
        try:
            pid, wait_status, usage = os.wait4(-1, os.WNOHANG if ending else 0)
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        if ending:
            kill_all()  # again: whatever forked or was reparented since
        if pid == 0:
            time.sleep(0.01)
            continue
        peak += usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        if pid == worker:
            status, ending = os.waitstatus_to_exitcode(wait_status), True
            kill_all()  # nothing the learner started outlives the worker
    print(json.dumps({"exit": status, "peak": peak, "subreaper": subreaper,
                      "isolation": isolation, "host_bytes": host.total()}), flush=True)
    return 0


class _HostCounter:
    """Counts, in the trusted reaper, the bytes the worker's host store copies out (a thread
    draining a pipe): the check reads this count, never a counter the learner's objects keep."""

    def __init__(self, fd: int):
        import threading

        self.fd, self.bytes = fd, 0
        self.thread = threading.Thread(target=self._drain, daemon=True)
        self.thread.start()

    def _drain(self) -> None:
        while chunk := os.read(self.fd, 2**20):
            self.bytes += len(chunk)

    def total(self) -> int:
        self.thread.join(1.0)
        return self.bytes


def _kill_namespace() -> None:
    """The namespace's init: kill(-1) reaches every other process of the namespace, setsid'd
    or double-forked ones included."""
    try:
        os.kill(-1, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _kill_descendants() -> None:
    """Without a PID namespace: every descendant of this subreaper, found by walking /proc
    (orphans are reparented to it, so a setsid'd grandchild stays a descendant)."""
    me, children = os.getpid(), {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    todo = list(children.get(me, []))
    while todo:
        pid = todo.pop()
        _signal(pid, signal.SIGKILL)
        todo.extend(children.get(pid, []))


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
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


# ---------------------------------------------------------------- the exercise's rules


class RuleBroken(PermissionError):
    """What a forbidden function raises in a worker: its message names the rule."""


class Rules:
    """What the exercise forbids, made unusable in this process for good before the first answer
    cell runs. Each target is a module ("torch.utils.checkpoint": all of its code) or a class
    or function in one ("torch.autograd.graph:save_on_cpu").

    - Every function object of that code, however it is reached (module attributes, other
      modules' imports, subclasses, closures, sys.modules, gc.get_objects), gets a body that
      raises PermissionError("rule broken: ... <target>"): the object itself is changed, so
      every reference to it is.
    - A forbidden module that is not loaded cannot be imported (a meta path finder).
    - A second Landlock layer makes the forbidden modules' files and bytecode caches
      unreadable, so they cannot be loaded again from disk. Its rules are written when the
      worker starts (before the first sandbox layer hides the folders it must list) and it
      takes effect with `enforce`.
    """

    def __init__(self, targets: list[str]):
        import importlib.util

        self.targets, self.enforced, self.why_not = list(targets), False, ""
        self.owner: dict[str, str] = {}  # a forbidden module's file -> its rule (longest wins)
        self.qualified: dict[tuple[str, str], str] = {}  # (file, qualname) -> its rule
        for target in sorted(self.targets, key=len):
            module, _, qualname = target.partition(":")
            if qualname:
                self.qualified.update({(f, qualname): target
                                       for f in _module_files(module, False)})
            else:
                self.owner.update(dict.fromkeys(_module_files(module), target))
        hidden = set(self.owner)
        for f in self.owner:
            hidden |= {os.path.realpath(importlib.util.cache_from_source(f, optimization=o))
                       for o in ("", 1, 2)}
        self.ruleset, self.why_not = _hiding_ruleset(hidden) if hidden else (-1, "")

    def enforce(self) -> str:
        """Apply the rules (once); "" or why the forbidden files stay readable."""
        import gc
        import importlib
        import linecache

        if self.enforced or not self.targets:
            return self.why_not
        self.enforced = True
        for module in {t.partition(":")[0] for t in self.targets if ":" in t}:
            # a class or function is poisoned as an object: its module must be loaded first, or
            # an answer importing it later would get a fresh, unpoisoned copy
            importlib.import_module(module)
        sys.meta_path[:0] = [_Blocker(t) for t in self.targets if ":" not in t]
        guards: dict[tuple[int, str], object] = {}
        files = {f for f, _ in self.qualified} | set(self.owner)
        real: dict[str, str] = {}  # co_filename -> its real path (realpath is slow)
        for obj in gc.get_objects():
            if type(obj) is not _FunctionType:
                continue
            code = obj.__code__
            name = code.co_filename
            if name not in real:
                real[name] = os.path.realpath(name) if name.endswith(".py") else ""
            if real[name] not in files:
                continue
            rule = self._rule_of(real[name], obj.__qualname__)
            if rule is not None:
                key = (len(code.co_freevars), rule)
                if key not in guards:
                    guards[key] = _guard_code(*key)
                obj.__code__ = guards[key]
        linecache.clearcache()
        if self.ruleset >= 0:
            libc = ctypes.CDLL(None, use_errno=True)
            if _prctl(38, 1) != 0 or libc.syscall(446, self.ruleset, 0) != 0:
                self.why_not = f"landlock_restrict_self failed (errno {ctypes.get_errno()})"
            os.close(self.ruleset)
        return self.why_not

    def _rule_of(self, path: str, qualname: str) -> str | None:
        return self.owner.get(path) or next(
            (name for (f, q), name in self.qualified.items()
             if f == path and (qualname == q or qualname.startswith(q + "."))), None)


_FunctionType = type(_prctl)


class _Blocker:
    """A meta path finder that refuses to import a forbidden module (or its submodules)."""

    def __init__(self, module: str):
        self.module = module

    def find_spec(self, name, path=None, target=None):
        if name == self.module or name.startswith(self.module + "."):
            raise RuleBroken(f"rule broken: this exercise's answers may not use {self.module}")
        return None


def _module_files(module: str, package: bool = True) -> set[str]:
    """The real paths of a module's source (a package: every file beneath it)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.origin:
        return set()
    if package and spec.submodule_search_locations:
        return {os.path.realpath(os.path.join(root, f)) for folder in
                spec.submodule_search_locations for root, _, names in os.walk(folder)
                for f in names if f.endswith(".py")}
    return {os.path.realpath(spec.origin)}


def _guard_code(freevars: int, rule: str):
    """A code object with `freevars` free variables (so it can replace any function's code)
    whose body raises PermissionError (a builtin: it works whatever the poisoned function's
    globals hold) naming the rule."""
    names = [f"_v{i}" for i in range(freevars)]
    message = f"rule broken: this exercise's answers may not use {rule}"
    source = ("def outer():\n" + "".join(f"    {n} = None\n" for n in names)
              + "    def guard(*args, **kwargs):\n"
              + (f"        ({', '.join(names)},)\n" if names else "")
              + f"        raise PermissionError({message!r})\n    return guard\n")
    namespace: dict = {}
    exec(compile(source, "<exercise rule>", "exec"), namespace)
    return namespace["outer"]().__code__


def _hiding_ruleset(hidden: set[str]) -> tuple[int, str]:
    """A Landlock ruleset under which every file stays readable but `hidden` (-1 and why not if
    the kernel has none). Landlock only grants, so it grants reading on each sibling along the
    way from / down to each hidden file; a link to a folder above one is not followed."""
    if not sys.platform.startswith("linux"):
        return -1, f"no Landlock on {sys.platform}"
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(444, None, 0, 1) < 1:
        return -1, "the kernel offers no Landlock"
    attr = struct.pack("Q", _READ_FILE)
    ruleset = libc.syscall(444, attr, len(attr), 0)
    if ruleset < 0:
        return -1, f"landlock_create_ruleset failed (errno {ctypes.get_errno()})"
    ancestors = {a for f in hidden for a in _ancestors(f)}
    todo = ["/"]
    while todo:
        try:
            entries = list(os.scandir(todo.pop()))
        except OSError:
            continue
        for entry in entries:
            real = os.path.realpath(entry.path)
            if real in hidden:
                continue
            if real in ancestors:
                if real == entry.path:  # a link to a folder above a hidden file: walked anyway
                    todo.append(real)
                continue
            try:
                fd = os.open(entry.path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                continue
            libc.syscall(445, ruleset, 1, struct.pack("=Qi", _READ_FILE, fd), 0)
            os.close(fd)
    return ruleset, ""


def _ancestors(path: str) -> list[str]:
    out, p = [], os.path.dirname(path)
    while p and p != "/":
        out.append(p)
        p = os.path.dirname(p)
    return out + ["/"]


# ---------------------------------------------------------------- result digests


def digest(value, keys=None) -> str:
    """A SHA-256 of a result (or of its `keys`, a dict's): equal for equal data, tensors by
    dtype, shape and bytes. A memory run returns only this, so its result is checked against
    the reference's without 32 MB of tensors crossing the wire."""
    import hashlib

    h = hashlib.sha256()
    if keys is not None:
        if type(value) is not dict:
            raise WireError(f"a {type(value).__name__} where a dict was expected")
        value = [value.get(k) for k in keys]

    def walk(x):
        kind = type(x)
        if x is None or kind in (bool, int, float, str):
            h.update(json.dumps([kind.__name__, x]).encode())
        elif kind in (list, tuple):
            h.update(f"{kind.__name__}{len(x)}(".encode())
            for v in x:
                walk(v)
            h.update(b")")
        elif kind is dict:
            h.update(f"dict{len(x)}(".encode())
            for k, v in x.items():
                walk(k)
                walk(v)
            h.update(b")")
        elif _is_plain_tensor(x):
            import torch

            h.update(f"tensor{x.dtype}{tuple(x.shape)}(".encode())
            flat = x.detach().contiguous().reshape(-1)  # 1-d first: a 0-d tensor has no view
            h.update(memoryview(flat.view(torch.uint8).numpy()))
            h.update(b")")
        else:
            raise WireError(f"a {kind.__module__}.{kind.__qualname__} is not data")

    walk(value)
    return h.hexdigest()


# ---------------------------------------------------------------- the worker


def serve(req_fd: int, reply_fd: int) -> int:
    """Run the cells the grader sends, one request each, and answer its calls, until the
    request pipe closes. The exercise's rules are applied before the first answer cell."""
    read = blocking_reader(req_fd)
    init = receive(read)
    folder = os.getcwd()
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    config = Config()
    config.HistoryManager.enabled = False
    config.InteractiveShell.colors = "nocolor"
    shell = InteractiveShell.instance(config=config)
    rules = Rules(init.get("rules", []))  # before the sandbox: it lists folders
    why_not = sandbox(folder) if init["sandbox"] else "not asked for"
    missing = [n for n in ("pid", "net") if n not in os.environ.get(ISOLATION_ENV, "")]
    if init["sandbox"] and missing and sys.platform.startswith("linux"):
        why_not = "; ".join(filter(None, [why_not, f"no {' or '.join(missing)} namespace"]))
    if init["sandbox"] and rules.why_not:
        why_not = "; ".join(filter(None, [why_not, f"forbidden files readable: {rules.why_not}"]))
    send(reply_fd, {"sandbox": why_not})
    run_cell = shell.run_cell  # bound now: an answer that rebinds shell.run_cell changes nothing
    while True:
        try:
            request = receive(read)
        except EOFError:
            return 0
        if "run" in request:
            if request.get("answer"):
                rules.enforce()
            result = run_cell(request["run"], store_history=False)
            error = result.error_before_exec or result.error_in_exec
            reply = {"error": None if error is None else error_data(error)}
        else:
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
        if request.get("digest") == "value":  # a memory run whose small result is checked
            return {"returned": result}
        if "digest" in request:  # a memory run: only the peak and the result's digest count
            return {"returned": digest(result, request["digest"])}
        return {"returned": result}
    except WireError as e:
        return {"not_data": _first_lines(str(e))}
    except BaseException as e:  # SystemExit and KeyboardInterrupt too: the learner raised them
        return {"raised": error_data(e)}


if __name__ == "__main__":
    role, req, reply = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    sys.exit({"reap": reap, "serve": serve}[role](req, reply))
