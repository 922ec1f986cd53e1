"""Submissions that try to forge a grade, each graded right: 0 for the forgery, full marks for
the honest answers mixed in. All graded in one class run (2 at a time), see `graded`."""

import json
import sys

import nbformat
import pytest
from grading_kit import RIGHT, build_course, hints, learner, results, save

from ckpt_course import grading

TIMEOUT = 8  # seconds per cell and per call: the endless loops cost this much
FULL = {"0.1-bytes": 2, "0.2-tape": 1, "0.3-double": 1}
NO_BYTES = {**FULL, "0.1-bytes": 0}
WRONG = "\ndef predicted_bytes(batch, width):\n    return 0\n"


def _landlock_abi() -> int:
    """The kernel's Landlock version (0: none): the sandboxed submissions need it."""
    if not sys.platform.startswith("linux"):
        return 0
    import ctypes

    return max(0, ctypes.CDLL(None).syscall(444, None, 0, 1))


LANDLOCK = _landlock_abi()


def submissions(course, root):
    """{name: (notebook, expected points per check, {check: text its hint must hold})}."""
    files = {"own": root / "own" / "0_selftest.ipynb",
             "pristine": course / "exercises" / "0_selftest.ipynb",
             "source": course / "exercises" / "src" / "0_selftest.py",
             "neighbour": root / "honest" / "0_selftest.ipynb",
             "marker": root / "pwned"}
    paths = {k: str(v) for k, v in files.items()}
    evil = f"""
import os, pickle, sys
class Evil:
    def __reduce__(self):
        return (os.system, ("touch {paths['marker']}",))
"""
    s = {
        "honest": (learner(course, answers=RIGHT), FULL, {}),
        "rebinds checks": (
            learner(course, answers={**RIGHT, "0.1-bytes": "checks.bytes_of = lambda fn: None\n"
                                     "checks = None" + WRONG}),
            NO_BYTES, {"0.1-bytes": "returned 0"}),
        "patches the package": (
            learner(course, answers={**RIGHT, "0.1-bytes":
                                     "import ckpt_course.checks as c, ckpt_course.checks.selftest"
                                     " as s\ns.bytes_of = s.expect = lambda *a: None\n"
                                     "c.CheckFailed = Exception" + WRONG}), NO_BYTES, {}),
        "patches IPython": (
            learner(course, answers={**RIGHT, "0.1-bytes":
                                     "ip = get_ipython()\n"
                                     "ip.events.register('post_run_cell', lambda r: print('ok'))\n"
                                     "ip.run_cell = lambda *a, **k: None\n"
                                     "ip.showtraceback = lambda *a, **k: None" + WRONG}),
            NO_BYTES, {}),
        "patches builtins and sys hooks": (
            learner(course, answers={**RIGHT, "0.1-bytes":
                                     "import builtins, sys\nsys.displayhook = print\n"
                                     "sys.excepthook = lambda *a: print('Correct')\n"
                                     "builtins.isinstance = lambda *a: True\n"
                                     "builtins.AssertionError = Exception" + WRONG}),
            NO_BYTES, {}),
        "prints Correct": (
            learner(course, answers={**RIGHT, "0.1-bytes": "print('Correct: all passed\\n' * 99)"
                                     + WRONG.replace("return 0", "print('Correct')\n    return 0")
                                     }), NO_BYTES, {}),
        "exits while defining": (
            learner(course, answers={**RIGHT, "0.1-bytes": "import os\nos._exit(0)"}),
            NO_BYTES, {"0.1-bytes": "NotImplementedError"}),
        "exits when called": (
            learner(course, answers={**RIGHT, "0.1-bytes": "import os\ndef predicted_bytes(b, w):"
                                     "\n    os._exit(3)", "0.2-tape": RIGHT["0.2-tape"] +
                                     "\nimport sys\nsys.exit(0)",
                                     "0.3-double": "def doubled(x):\n    raise SystemExit(0)"}),
            {**FULL, "0.1-bytes": 0, "0.3-double": 0},
            {"0.1-bytes": "your code exited (os._exit/sys.exit) with code 3 while running "
             "predicted_bytes(", "0.3-double": "raised SystemExit"}),
        "crashes": (
            learner(course, answers={**RIGHT, "0.1-bytes": "import ctypes\ndef predicted_bytes"
                                     "(b, w):\n    ctypes.string_at(0)", "0.2-tape":
                                     RIGHT["0.2-tape"] + "\nraise KeyboardInterrupt",
                                     "0.3-double": "def doubled(x):\n    raise KeyboardInterrupt"
                                     }), {**FULL, "0.1-bytes": 0, "0.3-double": 0},
            {"0.1-bytes": "the worker crashed while running predicted_bytes(",
             "0.3-double": "raised KeyboardInterrupt"}),
        "edits, deletes and reorders check cells": (
            _reordered(learner(course, answers={**RIGHT, "0.1-bytes": WRONG},
                               drop=["check:0.1-bytes"],
                               checks={"0.2-tape": "pass", "0.3-double": "checks = None"})),
            NO_BYTES, {}),
        "duplicated answer cells, the last one wins": (
            _duplicated(learner(course, answers=RIGHT), "0.1-bytes", WRONG),
            NO_BYTES, {"0.1-bytes": "returned 0"}),
        "huge outputs": (
            learner(course, answers={**RIGHT, "0.1-bytes": "print('x' * 100_000_000)\n"
                                     "def predicted_bytes(b, w):\n    print('y' * 100_000_000)\n"
                                     "    return 4 * b * w", "0.2-tape":
                                     "def saved_tensor_count(layers):\n"
                                     "    return 'x' * 40_000_000"}),
            {**FULL, "0.2-tape": 0}, {"0.2-tape": "more than 32 MB"}),
        "endless loops": (
            learner(course, answers={**RIGHT, "0.1-bytes": "while True:\n    pass",
                                     "0.2-tape": "def saved_tensor_count(layers):\n"
                                     "    while True:\n        pass"}),
            {**FULL, "0.1-bytes": 0, "0.2-tape": 0},
            {"0.1-bytes": "NotImplementedError", "0.2-tape": f"timed out after {TIMEOUT} s "
             "while running saved_tensor_count("}),
        "objects that run code when unpickled": (
            learner(course, answers={**RIGHT, "0.1-bytes": evil + "def predicted_bytes(b, w):\n"
                                     "    return Evil()", "0.3-double": evil +
                                     "import gc\n"  # find the worker module's globals
                                     "for d in gc.get_objects():\n"
                                     "    if isinstance(d, dict) and 'to_wire' in d:\n"
                                     "        d['tensor_bytes'] = lambda t: pickle.dumps(Evil())\n"
                                     + RIGHT["0.3-double"]}),
            {**FULL, "0.1-bytes": 0, "0.3-double": 0},
            {"0.1-bytes": "returned something that is not data: a __main__.Evil is not data",
             "0.3-double": "not a plain tensor"}),
        "proxies that equal anything": (
            learner(course, answers={**RIGHT, "0.1-bytes": "class Yes(int):\n"
                                     "    def __eq__(self, other):\n        return True\n"
                                     "def predicted_bytes(b, w):\n    return Yes(0)",
                                     "0.3-double": "import torch\nclass T(torch.Tensor):\n"
                                     "    def __eq__(self, o):\n        return True\n"
                                     "def doubled(x):\n    return x.as_subclass(T)"}),
            {**FULL, "0.1-bytes": 0, "0.3-double": 0},
            {"0.1-bytes": "Yes is not data", "0.3-double": "T is not data"}),
    }
    if LANDLOCK:
        writes = "".join(f"    try:\n        open({p!r}, 'a').write('hacked')\n"
                         f"    except OSError as e:\n        errors.append(e.errno)\n"
                         for p in (paths["own"], paths["pristine"], paths["source"]))
        s["writes the grader's and its own files"] = (
            learner(course, answers={**RIGHT, "0.1-bytes": "def predicted_bytes(b, w):\n"
                                     f"    errors = []\n{writes}"
                                     "    return 4 * b * w if len(errors) == 3 else 0"}),
            FULL, {})
        s["reads a neighbour's answers"] = (
            learner(course, answers={**RIGHT, "0.1-bytes": "import json\n"
                                     f"nb = json.load(open({paths['neighbour']!r}))\n"
                                     "exec(''.join(nb['cells'][3]['source']))"}),
            NO_BYTES, {"0.1-bytes": "NameError"})
    if LANDLOCK >= 6:  # signals scoped to the sandbox
        s["kills its reaper"] = (
            learner(course, answers={**RIGHT, "0.1-bytes": "import os, signal\n"
                                     "def predicted_bytes(b, w):\n"
                                     "    os.kill(os.getppid(), signal.SIGKILL)\n"
                                     "    return 0"}),
            NO_BYTES, {"0.1-bytes": "raised PermissionError"})
    return s, files


def _reordered(nb):
    nb.cells = nb.cells[::-1]
    return nb


def _duplicated(nb, name, source):
    copy = next(c for c in nb.cells if c.metadata.get("tags") == [f"answer:{name}"])
    twin = nbformat.from_dict(json.loads(json.dumps(copy)))
    twin.source, twin.id = source, "my-copy"
    nb.cells.append(twin)
    return nb


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    root = tmp_path_factory.mktemp("adversarial")
    course = build_course(root / "course")
    subs, files = submissions(course, root)
    paths = {}
    for i, (name, (nb, _, _)) in enumerate(subs.items()):
        folder = "honest" if name == "honest" else "own" if "own files" in name else f"s{i}"
        paths[name] = save(nb, root / folder / "0_selftest.ipynb")
    guarded = [p for p in (files["pristine"], files["source"], *paths.values())]
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in guarded}
    cards = grading.grade(list(paths.values()), course / "exercises", timeout=TIMEOUT, jobs=2)
    after = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in guarded}
    return {n: (card, subs[n][1], subs[n][2]) for n, card in zip(subs, cards, strict=True)}, \
        before == after, files


@pytest.mark.slow
def test_every_forgery_scores_zero_and_every_honest_answer_full(graded):
    cards, _, _ = graded
    assert len(cards) >= 15
    wrong = {name: results(card) for name, (card, want, _) in cards.items()
             if results(card) != want}
    assert wrong == {}


@pytest.mark.slow
def test_hints_name_the_real_cause(graded):
    cards, _, _ = graded
    missing = {(name, check): hints(card)[check]
               for name, (card, _, expected) in cards.items()
               for check, text in expected.items() if text not in hints(card)[check]}
    assert missing == {}


@pytest.mark.slow
def test_no_file_changed_and_no_pickle_ran(graded):
    _, unchanged, files = graded
    assert unchanged and not files["marker"].exists()


@pytest.mark.slow
def test_a_cell_that_kills_the_worker_is_noted_and_graded_as_its_stub(graded):
    cards, _, _ = graded
    for name, why in (("exits while defining", "your code exited (os._exit/sys.exit) with "
                       "code 0 while running answer 0.1-bytes"),
                      ("endless loops", f"timed out after {TIMEOUT} s while running answer "
                       "0.1-bytes: an endless loop?")):
        assert cards[name][0].notes == [f"answer 0.1-bytes: {why}; graded as the stub"]
