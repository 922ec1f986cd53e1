"""Exercise checks, one module per phase (``phase1`` ... ``phase4``), and what they share.

The protocol (PROTOCOL.md, grading.py): a check calls the learner's callables with DATA only
(None, bool, int, float, str, lists/tuples/dicts of them, plain CPU tensors) and uses only the
data they return, so the grader can run it in its own process against ``Remote`` proxies of a
worker that holds the learner's code. A check never inspects a function object.

- Inputs come from ``rng()`` (a ``random.Random``) seeded by ``seed()``: fixed in a notebook, so
  a learner sees the same hints on every run; the grader picks a secret one with ``set_seed``.
  Sizes, blocks and budgets differ from those the lessons and the exercise cells show.
- A wrong answer raises ``CheckFailed(hint)``; the hint says what was missed, never the number.
- Points: the check cell's ``points:N`` tag (read by the grader). Partial credit: a check made of
  independent parts uses ``Parts``; it returns the fraction of parts passed when some pass and
  some fail, *after printing each failed part's hint* (the grader scores the return value; the
  printed hints are for the learner's notebook). When no part passes it raises ``CheckFailed``
  with the hints, as any check does. A check that returns None scored full marks.
- ``peak_of(fn, *args)``: the peak memory of one call. Locally ``fn`` is a plain function: the
  call runs here under ``MemoryMeter`` and the result is exact live tensor bytes. In the grader
  ``fn`` is a ``Remote``: the call runs in a fresh worker and the result is that process's peak
  RSS. ``peak_of("ckpt_course.checks.probes:name", *args, like=fn)`` measures a trusted probe the
  same way as ``fn`` is measured, so checks only ever compare peaks of the same kind.
"""

from __future__ import annotations

import importlib
import random
import re
import statistics

DEFAULT_SEED = 20240611  # what a notebook uses; the grader overrides it with set_seed
_seed = DEFAULT_SEED


class CheckFailed(AssertionError):
    """A wrong answer, with a hint that teaches."""

    def _render_traceback_(self) -> list[str]:
        # IPython shows this instead of a traceback: the hint, not the checker's own code.
        return [f"CheckFailed: {self}"]


def forbids(*targets: str):
    """Declare what a check's answer may not use: modules ("torch.utils.checkpoint", all of its
    code) or classes and functions ("torch.autograd.graph:save_on_cpu"). In the grader's worker
    they are unusable from the first answer cell on (grade_worker.apply_rules), and a call that
    reaches one raises PermissionError("rule broken: ...") naming it, which the hint shows."""
    def mark(check):
        check.forbidden = tuple(targets)
        return check

    return mark


def expect(condition: bool, hint: str) -> None:
    if not condition:
        raise CheckFailed(hint)


def passed(what: str) -> None:
    print(f"Correct: {what}")


# ---------------------------------------------------------------- seeds
def seed() -> int:
    """The seed of this grading run (fixed in a notebook, secret in the grader)."""
    return _seed


def set_seed(value: int) -> None:
    """Set the seed the next checks draw their inputs from (the grader calls it)."""
    global _seed
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"set_seed needs an int, got {type(value).__name__}")
    _seed = value


def rng(salt: str) -> random.Random:
    """A generator for one check, from the run's seed and the check's name: each check draws the
    same inputs whatever ran before it."""
    return random.Random(f"{_seed}:{salt}")


# ---------------------------------------------------------------- calling the learner
def call(fn, *args, name: str = "your function"):
    """``fn(*args)``, with whatever it raises turned into a hint (NotImplementedError, an
    untouched stub, goes through as itself)."""
    try:
        return fn(*args)
    except NotImplementedError:
        raise
    except CheckFailed:
        raise
    except Exception as e:  # noqa: BLE001 - the learner's code may raise anything
        shown = ", ".join(_short(a) for a in args)
        raise CheckFailed(f"{name}({shown}) raised {type(e).__name__}: {e}") from None


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


MAX_POLICY_CHARS = 300


def learner_policy(text, largest: int = 1000):
    """A policy string an answer returned, parsed only once it is small: at most
    MAX_POLICY_CHARS characters and no number above ``largest`` (a block count, a K), so a short
    string such as ``segments:0..3000000`` cannot make the grader build millions of segments.
    Raises CheckFailed saying what is wrong, TypeError/ValueError as parse_policy does."""
    from ..policies import parse_policy

    if not isinstance(text, str):
        raise TypeError(f"a policy is a string, not {type(text).__name__}")
    if len(text) > MAX_POLICY_CHARS:
        raise CheckFailed(f"a policy string of {len(text):,} characters: a policy for this "
                          f"exercise fits in {MAX_POLICY_CHARS}")
    too_big = [n for n in re.findall(r"\d+", text) if len(n) > 6 or int(n) > largest]
    if too_big:
        raise CheckFailed(f"{_short(text)} names {too_big[0][:12]}: numbers in this policy go "
                          f"up to {largest}")
    return parse_policy(text)


# ---------------------------------------------------------------- partial credit
class Parts:
    """Independent parts of one check, for partial credit::

        parts = Parts()
        with parts("the gradients"):
            expect(...)
        with parts("the bytes moved"):
            expect(...)
        return parts.score()  # None: all passed; a fraction: some did (their hints printed)

    A part fails on ``CheckFailed``; anything else (a stub's NotImplementedError) propagates.
    """

    def __init__(self):
        self.passed: list[str] = []
        self.failed: list[tuple[str, str]] = []

    def __call__(self, name: str):
        return _Part(self, name)

    def score(self) -> float | None:
        total = len(self.passed) + len(self.failed)
        if not self.failed:
            return None
        hints = "; ".join(f"{name}: {hint}" for name, hint in self.failed)
        if not self.passed:
            raise CheckFailed(hints)
        for name, hint in self.failed:
            print(f"Not yet ({name}): {hint}")
        print(f"Partly right: {', '.join(self.passed)} ({len(self.passed)}/{total})")
        return len(self.passed) / total


class _Part:
    def __init__(self, parts: Parts, name: str):
        self.parts, self.name = parts, name

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        if kind is None:
            self.parts.passed.append(self.name)
            return False
        if issubclass(kind, CheckFailed):
            self.parts.failed.append((self.name, str(error)))
            return True
        return False


# ---------------------------------------------------------------- memory
def peak_of(fn, *args, like=None) -> int:
    """Peak memory of ``fn(*args)``: comparable only with other ``peak_of`` results.

    ``fn`` is a callable, or ``"module:function"`` naming a trusted probe, measured the way
    ``like`` (the learner's callable) is measured. A ``Remote`` (its type has ``peak`` and
    ``reference_peak``) measures in a fresh worker process (peak RSS); anything else runs here
    under ``MemoryMeter`` (exact live tensor bytes).
    """
    remote = fn if not isinstance(fn, str) else like
    if remote is not None and callable(getattr(type(remote), "peak", None)):
        if isinstance(fn, str):
            return int(remote.reference_peak(fn, *args))
        return int(remote.peak(*args))
    target = _probe(fn) if isinstance(fn, str) else fn
    return _metered_peak(target, *args)


def measure(fn, spec, like=None, keys=None) -> dict:
    """One memory run of ``fn(spec)`` (or of the probe ``"module:function"``, measured like
    ``like``): ``{"peak": bytes, "digest": of the result (its ``keys``; ``keys="value"``: the
    result itself, for a small one), "host_bytes": bytes its host store received}``. In the
    grader a ``Remote`` runs it in a fresh worker, where the
    peak is the tree's RSS and the host bytes are counted by the trusted reaper; here it runs
    under ``MemoryMeter`` and the host bytes are the result's own ``"bytes_to_host"``."""
    remote = fn if not isinstance(fn, str) else like
    if remote is not None and callable(getattr(type(remote), "measure", None)):
        if isinstance(fn, str):
            return remote.measure_reference(fn, spec, keys=keys)
        return remote.measure(spec, keys=keys)
    from ..grade_worker import digest
    from ..meter import MemoryMeter

    target = _probe(fn) if isinstance(fn, str) else fn
    meter = MemoryMeter()
    with meter:
        result = target(spec)
    host = result.get("bytes_to_host", 0) if isinstance(result, dict) else 0
    value = result if keys == "value" else digest(result, keys)
    return {"peak": meter.peak_bytes, "digest": value, "host_bytes": host}


def memory_runs(fn, spec, reference: str, without: str, keys=None) -> dict:
    """The three memory runs a memory claim is judged on (see ``measure``): ``"mine"``,
    ``"reference"`` (the mechanism done right, from ``references``) and ``"none"`` (no
    mechanism at all, from ``probes``), all measured the same way."""
    def runs() -> dict:
        return {"mine": measure(fn, spec, keys=keys),
                "reference": measure(f"ckpt_course.checks.references:{reference}", spec, like=fn,
                                     keys=keys),
                "none": measure(f"ckpt_course.checks.probes:{without}", spec, like=fn)}

    return {**runs(), "again": runs}


def expect_peak_near(runs: dict, hint: str, result_hint: str = "") -> None:
    """One rule for every memory claim: the learner's memory run gives the reference's result
    (so it cannot be told apart and skipped) and peaks like the reference: within a quarter of
    the gap between it and no mechanism at all."""
    mine, right = runs["mine"], runs["reference"]
    expect(mine["digest"] == right["digest"], result_hint or
           "in the memory run (a bigger input) your result differs from the reference's: it "
           "must be right at every size, not only at the small ones")
    where = _place_in_gap(runs)
    if DOUBTFUL[0] < where <= DOUBTFUL[1] and callable(runs.get("again")):
        # In the grader a peak is a process's RSS, which moves with what else the machine does:
        # a correct answer measured above the line once on a loaded machine (5/8 for the
        # course's own solution; 8/8 in each of five later runs, about 0.05 of the gap). Near
        # the line, measure twice more and judge each kind by its median. An answer that keeps
        # what no mechanism keeps sits near 1, far from the doubt, and is not measured again.
        rounds = [runs, runs["again"](), runs["again"]()]
        where = _place_in_gap({kind: {"peak": statistics.median(r[kind]["peak"] for r in rounds)}
                               for kind in ("mine", "reference", "none")})
    expect(where <= DOUBTFUL[0], hint)


DOUBTFUL = (0.25, 0.6)  # where in the gap a peak passes (<= 0.25), or is measured again


def _place_in_gap(runs: dict) -> float:
    """Where the learner's peak sits between the reference's (0) and no mechanism's (1)."""
    right, none = runs["reference"]["peak"], runs["none"]["peak"]
    return (runs["mine"]["peak"] - right) / max(none - right, 1)


def _probe(spec: str):
    module, _, name = spec.partition(":")
    if module not in ("ckpt_course.checks.probes", "ckpt_course.checks.references",
                      "ckpt_course.checks.selftest") or not name:
        raise ValueError(f"a probe is 'ckpt_course.checks.probes:<function>', not {spec!r}")
    return getattr(importlib.import_module(module), name)


def _metered_peak(fn, *args) -> int:
    from ..meter import MemoryMeter

    meter = MemoryMeter()
    with meter:
        result = fn(*args)
    del result
    return meter.peak_bytes
