"""Submissions written by someone who read the grader's code (issue 19), each graded right: the
exercise's identity, the order of cells and checks, the exercise rules, memory runs, and files
or answers that try to break the class's grading. All graded in one class run (2 at a time);
every learner's file is left byte- and mtime-unchanged."""

import json
import os
import socket
from pathlib import Path

import nbformat
import pytest
from grading_kit import (
    BUILD_IT,
    RIGHT,
    build_course,
    hints,
    learner,
    reads_course_class,
    results,
    rule,
    save,
)

from ckpt_course import grading

TIMEOUT = 30  # no case loops for ever: a long limit costs nothing and rides out load
FULL = {"0.1-bytes": 2, "0.2-tape": 1, "0.3-double": 1}
ZERO = dict.fromkeys(FULL, 0)
NO_BYTES = {**FULL, "0.1-bytes": 0}
BUILT, NOT_BUILT = {"0.5-built": 1}, {"0.5-built": 0}
SLEEP_MARK = "300.4219"  # the argv of a grandchild that must not outlive its grading
SECRET = "s3cret-of-the-grader-7731"


def built(body: str, top: str = "") -> dict:
    """The 0.5-built answer: `top` at the cell's top level, `body` inside built(x)."""
    return {"0.5-built": f"import torch\n{top}\ndef built(x):\n"
            + "".join(f"    {line}\n" for line in body.splitlines())}


def rules_cases(course):
    def nb(body, top=""):
        return learner(course, answers=built(body, top), stem="0_rules")

    checkpoint = "torch.utils.checkpoint"
    run = "(lambda t: 2 * t, x, use_reentrant=False)"
    return {
        "rules: honest, by hand": (nb("return x * 2"), BUILT, {}),
        "rules: imports torch's checkpoint": (
            nb(f"from torch.utils.checkpoint import checkpoint\nreturn checkpoint{run}"),
            NOT_BUILT, {"0.5-built": rule(checkpoint)}),
        "rules: reaches it through torch.utils": (
            nb(f"return torch.utils.checkpoint.checkpoint{run}"), NOT_BUILT,
            {"0.5-built": rule(checkpoint)}),
        "rules: subclasses CheckpointFunction": (
            nb("return Mine.apply(lambda t: 2 * t, False, x)",
               "class Mine(torch.utils.checkpoint.CheckpointFunction):\n    pass"),
            NOT_BUILT, {"0.5-built": rule(checkpoint)}),
        "rules: through sys.modules": (
            nb(f"import sys\nreturn sys.modules['torch.utils.checkpoint'].checkpoint{run}"),
            NOT_BUILT, {"0.5-built": rule(checkpoint)}),
        "rules: through __import__": (
            nb(f"m = __import__('torch.utils.checkpoint', fromlist=['checkpoint'])\n"
               f"return m.checkpoint{run}"), NOT_BUILT, {"0.5-built": rule(checkpoint)}),
        "rules: through importlib.import_module": (
            nb(f"import importlib\n"
               f"return importlib.import_module('torch.utils.checkpoint').checkpoint{run}"),
            NOT_BUILT, {"0.5-built": rule(checkpoint)}),
        "rules: reloads the module from disk": (
            nb("import importlib\nimportlib.reload(torch.utils.checkpoint)\n"
               f"return torch.utils.checkpoint.checkpoint{run}"), NOT_BUILT,
            {"0.5-built": rule(checkpoint)}),
        "rules: executes the module's source": (
            nb("ns = {'__name__': 'mine'}\n"
               "exec(open(torch.utils.checkpoint.__file__).read(), ns)\n"
               f"return ns['checkpoint']{run}"), NOT_BUILT, {"0.5-built": "PermissionError"}),
        "rules: loads the module's bytecode": (
            nb("import importlib.util, marshal, types\n"
               "path = importlib.util.cache_from_source(torch.utils.checkpoint.__file__)\n"
               "ns = {'__name__': 'mine'}\n"
               "exec(marshal.loads(open(path, 'rb').read()[16:]), ns)\n"
               f"return ns['checkpoint']{run}"), NOT_BUILT, {}),
        "rules: finds the function with gc": (
            nb("import gc, types\n"
               "f = next(o for o in gc.get_objects() if isinstance(o, types.FunctionType)\n"
               "         and o.__qualname__ == 'checkpoint'\n"
               "         and o.__module__ == 'torch.utils.checkpoint')\n"
               f"return f{run}"), NOT_BUILT, {"0.5-built": rule(checkpoint)}),
        "rules: unwraps the decorated function": (
            nb(f"return torch.utils.checkpoint.checkpoint.__wrapped__{run}"), NOT_BUILT,
            {"0.5-built": rule(checkpoint)}),
        "rules: keeps a reference from the cell's top level": (
            nb(f"return KEPT{run}", "KEPT = torch.utils.checkpoint.checkpoint"), NOT_BUILT,
            {"0.5-built": rule(checkpoint)}),
        "rules: reads the source with inspect": (
            nb("import inspect\nexec(inspect.getsource(torch.utils.checkpoint), ns := {})\n"
               f"return ns['checkpoint']{run}"), NOT_BUILT, {"0.5-built": "OSError"}),
        "rules: imports the reference implementations": (
            nb("from ckpt_course.checks.references import torch_checkpoint\nreturn 2 * x"),
            NOT_BUILT, {"0.5-built": rule("ckpt_course.checks.references")}),
        "rules: takes them from probes": (
            nb("from ckpt_course.checks import probes\nprobes.torch_checkpoint\nreturn 2 * x"),
            NOT_BUILT, {"0.5-built": rule("ckpt_course.checks.references")}),
        "rules: reads the references' file": (
            nb("import ckpt_course.checks as c\n"
               "open(c.__path__[0] + '/references.py').read()\nreturn 2 * x"),
            NOT_BUILT, {"0.5-built": "PermissionError"}),
        "rules: a forbidden function of an allowed module": (
            nb("from ckpt_course.checks.selftest import chunked_squares\n"
               "chunked_squares(3)\nreturn 2 * x"), NOT_BUILT,
            {"0.5-built": rule("ckpt_course.checks.selftest:chunked_squares")}),
    }


def identity_cases(course):
    def named(value, answers=RIGHT):
        nb = learner(course, answers=answers)
        nb.metadata["ckpt_course"]["exercise"] = value
        return nb

    untagged = learner(course, stem="0_peak", answers={"0.4-peak": "def f():\n    pass"})
    del untagged.metadata["ckpt_course"]
    no_meta = learner(course, answers=RIGHT)
    no_meta.metadata["ckpt_course"] = "not a dict"
    return {
        "identity: metadata names the solutions": (
            named("../solutions/0_selftest", {}), {}, "not a bare exercise name"),
        "identity: metadata names an absolute path": (
            named(str(course / "solutions" / "0_selftest")), {}, "not a bare exercise name"),
        "identity: metadata names a second notebook handed in": (
            named("0_accomplice", {}), {}, "which this course does not have"),
        "identity: metadata names a look-alike": (
            named("0_self\u0435est", {}), {}, "not a bare exercise name"),
        "identity: metadata climbs out of a name": (
            named("0_selftest/../0_peak", {}), {}, "not a bare exercise name"),
        "identity: the answers of another exercise": (untagged, ZERO, "none of exercise "
                                                      "0_selftest's answer cells"),
        "identity: metadata that is not a dict": (no_meta, FULL, ""),
    }


def order_cases(course):
    helper = "def helper(b, w):\n    return 4 * b * w\n"
    return {
        "order: a later cell redefines an earlier answer's helper": (
            learner(course, answers={**RIGHT, "0.1-bytes": helper + "def predicted_bytes(b, w):"
                                     "\n    return helper(b, w)", "0.2-tape":
                                     "def helper(*a):\n    return 0\n" + RIGHT["0.2-tape"]}),
            FULL, {}),
        "order: a later cell kills the worker": (
            learner(course, answers={**RIGHT, "0.3-double": "import os\nos._exit(0)"}),
            {**FULL, "0.3-double": 0}, {}),
        "order: an answer needs a later cell": (
            learner(course, answers={**RIGHT, "0.1-bytes": "def predicted_bytes(b, w):\n"
                                     "    return later(b, w)", "0.2-tape": RIGHT["0.2-tape"]
                                     + "\ndef later(b, w):\n    return 4 * b * w"}),
            NO_BYTES, {"0.1-bytes": "NameError"}),
    }


def memory_cases(course):
    steer = ("import sys, torch\ndef sum_of_squares(n):\n"
             "    request = sys._getframe(1).f_locals.get('request', {})\n"
             "    if 'digest' in request:  # the grader's memory run: skip the work\n"
             "        return 0.0\n"
             "    return float(torch.arange(n, dtype=torch.float64).square().sum())")
    return {"memory: tells the memory run by the worker's frames and skips it": (
        learner(course, stem="0_peak", answers={"0.4-peak": steer}), {"0.4-peak": 0},
        {"0.4-peak": "in the memory run your function returned 0.0"})}


def breaking_cases(course, ports):
    udp, tcp = ports
    fake = "boom\\nmallory.ipynb  4/4\\n  ok   0.1-bytes    2/2"
    return {
        "breaks: newlines and fake rows in an exception": (
            learner(course, answers={**RIGHT, "0.1-bytes": "def predicted_bytes(b, w):\n"
                                     f"    raise ValueError('{fake}')"}),
            NO_BYTES, {"0.1-bytes": "boom / mallory.ipynb"}),
        "breaks: a megabyte of lines in an exception": (
            learner(course, answers={**RIGHT, "0.1-bytes": "def predicted_bytes(b, w):\n"
                                     "    raise ValueError('x\\n' * 500_000)"}),
            NO_BYTES, {"0.1-bytes": "raised ValueError"}),
        "breaks: a setsid grandchild that sleeps": (
            learner(course, answers={**RIGHT, "0.1-bytes": "import subprocess\n"
                                     "def predicted_bytes(b, w):\n    subprocess.Popen(['sh', "
                                     f"'-c', 'sleep {SLEEP_MARK} & sleep {SLEEP_MARK}'], "
                                     "start_new_session=True)\n    return 4 * b * w"}),
            FULL, {}),
        "breaks: an immutable file in its folder": (
            learner(course, answers={**RIGHT, "0.1-bytes": "import fcntl, os, struct\n"
                                     "def predicted_bytes(b, w):\n"
                                     "    open('locked', 'w').write('x')\n"
                                     "    fd = os.open('locked', os.O_RDONLY)\n    try:\n"
                                     "        fcntl.ioctl(fd, 0x40086602, struct.pack('i', 16))\n"
                                     "    except OSError:\n        pass\n"
                                     "    return 4 * b * w"}), FULL, {}),
        "breaks: reads the grader's environment": (
            learner(course, answers={**RIGHT, "0.1-bytes": "import glob, os\n"
                                     "def predicted_bytes(b, w):\n"
                                     f"    seen = {SECRET!r} in str(os.environ)\n"
                                     "    for p in glob.glob('/proc/[0-9]*/environ'):\n"
                                     "        try:\n"
                                     f"            seen |= {SECRET!r}.encode() in open(p, 'rb')"
                                     ".read()\n"
                                     "        except OSError:\n            pass\n"
                                     "    return 0 if seen else 4 * b * w"}), FULL, {}),
        "breaks: sends over the network": (
            learner(course, answers={**RIGHT, "0.1-bytes": "import socket\n"
                                     "def predicted_bytes(b, w):\n    sent = 0\n    try:\n"
                                     "        s = socket.socket(type=socket.SOCK_DGRAM)\n"
                                     f"        sent += s.sendto(b'leak', ('127.0.0.1', {udp}))\n"
                                     "    except OSError:\n        pass\n    try:\n"
                                     f"        socket.create_connection(('127.0.0.1', {tcp}), 2)\n"
                                     "        sent += 1\n    except OSError:\n        pass\n"
                                     "    return 0 if sent else 4 * b * w"}), FULL, {}),
        "breaks: kills every process it can": (
            learner(course, answers={**RIGHT, "0.1-bytes": "import os, signal\n"
                                     "def predicted_bytes(b, w):\n    try:\n"
                                     "        os.kill(-1, signal.SIGKILL)\n"
                                     "    except OSError:\n        pass\n"
                                     "    return 4 * b * w"}), FULL, {}),
        "breaks: closes its reply pipe": (
            learner(course, answers={**RIGHT, "0.1-bytes": "import os, sys\n"
                                     "def predicted_bytes(b, w):\n"
                                     "    os.close(int(sys.argv[3]))\n    return 4 * b * w"}),
            NO_BYTES, {"0.1-bytes": "while running predicted_bytes("}),
        "breaks: returns a structure too deep to send": (
            learner(course, answers={**RIGHT, "0.1-bytes": "def predicted_bytes(b, w):\n"
                                     "    x = []\n    for _ in range(100_000):\n        x = [x]\n"
                                     "    return x"}),
            NO_BYTES, {"0.1-bytes": "not data"}),
    }


def _cards_by_name(cards, paths):
    return {name: card for name, card in zip(paths, cards, strict=True)}


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    root = tmp_path_factory.mktemp("attacks")
    course = build_course(root / "course")
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen()
    for s in (udp, tcp):
        s.setblocking(False)
    ports = (udp.getsockname()[1], tcp.getsockname()[1])
    graded_cases = {**rules_cases(course), **order_cases(course), **memory_cases(course),
                    **breaking_cases(course, ports)}
    stems = {n: ("0_rules" if n.startswith("rules") else "0_peak" if n.startswith("memory")
                 else "0_selftest") for n in graded_cases}
    paths = {}
    for i, (name, (nb, _, _)) in enumerate(graded_cases.items()):
        paths[name] = save(nb, root / f"s{i}" / f"{stems[name]}.ipynb")
    identity = identity_cases(course)
    for i, (name, (nb, _, _)) in enumerate(identity.items()):
        paths[name] = save(nb, root / f"id{i}" / "0_selftest.ipynb")
    paths.update(_odd_files(course, root))
    guarded = [p for p in paths.values() if p.is_file() and not p.is_symlink()]
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in guarded}
    os.environ["CKPT_I19_SECRET"] = SECRET  # the grader's own processes hold it
    try:
        cards = grading.grade([str(p) for p in paths.values()], course / "exercises",
                              timeout=TIMEOUT, jobs=2)
    finally:
        del os.environ["CKPT_I19_SECRET"]
    after = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in guarded}
    leaked = []
    for s in (udp, tcp):
        try:
            leaked.append(s.recv(16) if s is udp else s.accept())
        except BlockingIOError:
            pass
    sleepers = [p for p in Path("/proc").glob("[0-9]*/cmdline")
                if _reads(p) and SLEEP_MARK.encode() in _reads(p)]
    return (_cards_by_name(cards, paths), before == after, leaked, sleepers, graded_cases,
            {n: (want, error) for n, (_, want, error) in identity.items()})


def _reads(path):
    try:
        return path.read_bytes()
    except OSError:
        return b""


def _odd_files(course, root):
    """Files that are not plain notebooks, named like the exercise."""
    honest = nbformat.writes(learner(course, answers=RIGHT))
    folder = root / "odd"
    folder.mkdir()
    files = {}

    def place(name, make):
        path = folder / name / "0_selftest.ipynb"
        path.parent.mkdir()
        make(path)
        files[name] = path

    place("odd: a FIFO", os.mkfifo)
    place("odd: a symbolic link loop", lambda p: p.symlink_to(p))
    place("odd: a link to a device", lambda p: p.symlink_to("/dev/zero"))
    place("odd: a folder", lambda p: p.mkdir())
    place("odd: over the size cap", lambda p: p.write_bytes(
        b" " * (grading.MAX_NOTEBOOK_BYTES + 1)))
    place("odd: JSON nested too deep", lambda p: p.write_text("[" * 100_000 + "]" * 100_000))
    place("odd: cells that are not a list", lambda p: p.write_text(json.dumps(
        {"cells": 5, "metadata": {}, "nbformat": 4, "nbformat_minor": 5})))
    place("odd: a byte-order mark", lambda p: p.write_bytes(b"\xef\xbb\xbf" + honest.encode()))
    place("odd: a link to an honest notebook", lambda p: p.symlink_to(
        save(learner(course, answers=RIGHT), folder / "target" / "mine.ipynb")))
    place("odd: a cell source that is not text", lambda p: p.write_text(_source_not_text(honest)))
    place("odd: the same answers twice", lambda p: p.write_text(honest))
    place("odd: named like another exercise", lambda p: p.with_name("0_peak.ipynb").write_text(
        honest))
    files["odd: named like another exercise"] = files["odd: named like another exercise"] \
        .with_name("0_peak.ipynb")
    name = folder / "newline" / "x\nmallory.ipynb  4-4.ipynb"
    name.parent.mkdir()
    name.write_text(honest)
    files["odd: a newline in the file's name"] = name
    return files


def _source_not_text(text: str) -> str:
    nb = json.loads(text)
    for cell in nb["cells"]:
        if "answer:0.1-bytes" in cell["metadata"].get("tags", []):
            cell["source"] = 5
    return json.dumps(nb)


ODD = {  # name: (expected points, text the row's error must hold)
    "odd: a FIFO": (ZERO, "not a regular file"),
    "odd: a symbolic link loop": (ZERO, "a symbolic link loop"),
    "odd: a link to a device": (ZERO, "not a regular file"),
    "odd: a folder": (ZERO, "a folder, not a notebook"),
    "odd: over the size cap": (ZERO, "larger than 20 MB"),
    "odd: JSON nested too deep": (ZERO, "not a notebook"),
    "odd: cells that are not a list": (ZERO, "not a notebook"),
    "odd: a byte-order mark": (FULL, ""),
    "odd: a link to an honest notebook": (FULL, ""),
    "odd: a cell source that is not text": (NO_BYTES, ""),
    "odd: the same answers twice": (FULL, ""),
    "odd: named like another exercise": (FULL, ""),
    "odd: a newline in the file's name": (FULL, ""),
}


@pytest.mark.slow
def test_there_are_enough_attacks(graded):
    cards = graded[0]
    assert len(cards) >= 45


@pytest.mark.slow
def test_graded_attacks_score_what_they_earned(graded):
    cards, _, _, _, cases, _ = graded
    wrong = {n: results(cards[n]) for n, (_, want, _) in cases.items() if results(cards[n]) != want}
    assert wrong == {}
    missing = {(n, c): hints(cards[n])[c] for n, (_, _, texts) in cases.items()
               for c, text in texts.items() if text not in hints(cards[n])[c]}
    assert missing == {}


@pytest.mark.slow
def test_identity_comes_from_the_course_never_from_the_submission(graded):
    cards, identity = graded[0], graded[5]
    for name, (want, error) in identity.items():
        card = cards[name]
        assert results(card) == want, name
        assert error in card.error and (error or not card.error), (name, card.error)


@pytest.mark.slow
def test_odd_files_each_get_one_row_with_the_reason(graded):
    cards = graded[0]
    for name, (want, error) in ODD.items():
        card = cards[name]
        assert results(card) == want, (name, results(card), card.error)
        assert error in card.error and (error or not card.error), (name, card.error)
    assert cards["odd: named like another exercise"].notes[0] == (
        "the file is named like exercise 0_peak but holds exercise 0_selftest (its metadata): "
        "graded as 0_selftest")
    assert cards["odd: a cell source that is not text"].notes[0] == (
        "answer 0.1-bytes: not found in your notebook, graded as the empty stub")


@pytest.mark.slow
def test_duplicates_are_flagged_in_the_class(graded):
    cards = graded[0]
    dupes = [n for n, c in cards.items() if c.duplicate_of]
    assert "odd: the same answers twice" in dupes and "odd: a byte-order mark" in dupes
    first = cards["odd: the same answers twice"].duplicate_of
    assert first and not cards[next(n for n, c in cards.items() if c.notebook == first)] \
        .duplicate_of


@pytest.mark.slow
def test_no_line_of_the_console_is_a_learners(graded):
    cards = graded[0]
    text = grading.format_scorecards(list(cards.values()))
    assert not any(line.startswith("mallory") or line.startswith("  ok   0.1-bytes    2/2")
                   for line in text.splitlines())
    assert len(text.splitlines()) == sum(1 + len(c.checks) + len(c.notes)
                                         for c in cards.values()
                                         if not (c.error and not c.checks))  \
        + sum(1 for c in cards.values() if c.error and not c.checks)


@pytest.mark.slow
def test_nothing_escapes_and_no_file_changed(graded):
    _, unchanged, leaked, sleepers, _, _ = graded
    assert unchanged
    assert leaked == []  # no UDP datagram, no TCP connection reached the grader's machine
    assert sleepers == []  # the setsid grandchildren died with their worker


# ---------------------------------------------------------------- the course's own rules

@pytest.mark.slow
@reads_course_class
def test_the_course_exercises_enforce_their_build_it_rules(course_class):
    """On the course's own exercises: an answer that reaches for what its check forbids (torch's
    checkpoint, the reference hooks, the measuring tools, the planner, the check's helper) gets
    0 and a hint naming the rule. Graded in the session's one run of the course's exercises
    (tests/conftest.py), with every solution and untouched exercise; files left unchanged."""
    cards, unchanged = course_class
    assert unchanged
    broken = {}
    for stem, (_, expected) in BUILD_IT.items():
        card = cards[("build-it", stem)]
        for check, text in expected.items():
            got = next(c for c in card.checks if c.name == check)
            if got.earned or text not in got.hint:
                broken[check] = (got.earned, got.hint)
    assert broken == {}
