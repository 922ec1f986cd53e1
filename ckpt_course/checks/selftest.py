"""The grader's self-test exercise (tests/fixtures/src/0_selftest.py, 0_peak.py): tiny checks
that use every part of the check protocol (data calls, tensors, partial credit, peaks), so the
grader and its adversarial suite are tested without the course's slow phases."""

from __future__ import annotations

import torch

from . import CheckFailed, expect, forbids, measure, set_seed
from . import rng as _rng

__all__ = ["CheckFailed", "bytes_of", "tape_count", "doubled", "low_peak", "chunked_squares",
           "built", "set_seed"]


def bytes_of(fn) -> None:
    """0.1: fn(batch, width) -> bytes of a float32 (batch, width) activation."""
    rng = _rng("bytes")
    for _ in range(3):
        batch, width = rng.randint(2, 99), rng.randint(2, 99)
        got = fn(batch, width)
        expect(type(got) is int and got == 4 * batch * width,
               f"predicted_bytes({batch}, {width}) returned {got!r}. Count the elements "
               "(batch x width), then the bytes of one float32.")


def tape_count(fn) -> float | None:
    """0.2, two parts for partial credit: the tape grows linearly; two tensors per layer."""
    rng = _rng("tape")
    small, big = rng.randint(2, 9), rng.randint(10, 40)
    a, b = fn(small), fn(big)
    linear = type(a) is int and type(b) is int and a * big == b * small
    exact = linear and a == 2 * small
    if linear and exact:
        return None
    if not linear:
        raise CheckFailed("the tape grows linearly with depth: k times the layers keep k times "
                          "the tensors")
    print("two per layer: each Linear+ReLU pair keeps its input and its ReLU output")
    return 0.5


def doubled(fn) -> None:
    """0.3: fn(x) -> 2 * x, a tensor in and a tensor out."""
    rng = _rng("doubled")
    x = torch.randn(rng.randint(2, 9), rng.randint(2, 9),
                    generator=torch.Generator().manual_seed(rng.randrange(2**31)))
    got = fn(x)
    expect(isinstance(got, torch.Tensor) and got.shape == x.shape and torch.equal(got, 2 * x),
           f"doubled(x) of shape {tuple(x.shape)} must return a tensor of the same shape, "
           "each element twice x's")


def chunked_squares(n: int) -> float:
    """The trusted probe for low_peak: sum of i**2 for i < n, a million at a time."""
    total = 0.0
    for start in range(0, n, 2**20):
        total += torch.arange(start, min(n, start + 2**20), dtype=torch.float64).square().sum()
    return float(total)


def low_peak(fn) -> None:
    """0.4 (0_peak.py): fn(n) -> sum of i**2 for i < n, without holding all n at once; the
    memory run must return the right sum too (so it cannot be told apart and skipped)."""
    n = _rng("peak").randint(20_000_000, 24_000_000)  # float64: 160-190 MB per whole tensor
    want = (n - 1) * n * (2 * n - 1) / 6

    def right(got) -> bool:
        return type(got) is float and abs(got - want) <= 1e-9 * want

    got = fn(n)
    expect(right(got), f"sum_of_squares({n}) returned {got!r}: the sum of i*i for i in "
           "range(n), a float")
    mine = measure(fn, n, keys="value")
    reference = measure("ckpt_course.checks.selftest:chunked_squares", n, like=fn, keys="value")
    expect(right(mine["digest"]), "in the memory run your function returned "
           f"{mine['digest']!r}: it must give the sum there too")
    expect(mine["peak"] <= reference["peak"] + 100 * 2**20,
           "right sum, but it held all n numbers at once: add them up a chunk at a time")


@forbids("torch.utils.checkpoint", "ckpt_course.checks.selftest:chunked_squares")
def built(fn) -> None:
    """0.5 (0_rules.py): fn(x) -> 2 * x, built by hand: the answer may not use torch's
    checkpoint (nor this module's chunked_squares), whatever route it takes to them."""
    rng = _rng("built")
    x = torch.randn(rng.randint(2, 9), rng.randint(2, 9),
                    generator=torch.Generator().manual_seed(rng.randrange(2**31)))
    got = fn(x)
    expect(isinstance(got, torch.Tensor) and torch.equal(got, 2 * x),
           f"built(x) of shape {tuple(x.shape)} must return 2 * x")
