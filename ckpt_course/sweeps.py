"""Measurement loops the lessons repeat: where a training step's memory goes, and the every-N dial.

Three questions, each answered by running real steps under a ``MemoryMeter``:

- Where does the memory of a training step go? ``step_breakdown(model, batch_size, seq_len)``
  runs AdamW steps on a copy of the model; its record splits the last one's peak into parameters,
  gradients, optimizer state, activations and temporaries. Measure step 2, not step 1: AdamW
  creates its state (two moments per parameter) during the first ``optimizer.step()``, so only
  from step 2 on is every category present. ``breakdown_sweep`` repeats it over sizes.
- What does checkpointing ONE block change? ``CheckpointBlocks((1,))`` is ``segments:1``, the
  policy that wraps only the named blocks in ``torch.utils.checkpoint``; every tool that takes a
  policy (``measure_step``, ``measure_recompute``, ``check_gradients``, ``train``) accepts it.
- How does the segment size N of ``every-N`` move memory and recompute? ``dial(model, batch)``
  measures every N from 1 to L once (saved bytes after forward, peak, recompute FLOPs, the
  live-bytes timeline), so a slider can redraw from the measurements without running anything.

Byte counts are exact live tensor bytes, the same on every device; on CUDA a breakdown also
carries the allocator's own peak.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, fields

import torch

from .meter import MemoryMeter
from .policies import Segments, applied
from .recompute import count_step
from .step import StepRecord, check_run, make_batch, make_optimizer, run_step, seeded
from .tape import record_tape
from .train import measure_step
from .units import fmt_bytes, fmt_flops


# ---------------------------------------------------------------- where a step's memory goes
def _on(batch, device):
    return tuple(t.to(device) for t in batch)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def step_breakdown(model, batch_size: int, seq_len: int | None = None, step: int = 2,
                   lr: float = 1e-3, seed: int = 0) -> StepRecord:
    """Run ``step`` AdamW training steps on a copy of ``model`` (the model itself is untouched)
    and return the last one's record: ``categories`` splits its peak. The batch is counted
    (as activations: the first layer keeps it for its weight gradient)."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"step counts from 1 (the first training step), got {step!r}")
    device = check_run(model, batch_size=batch_size, seq_len=seq_len)
    model = copy.deepcopy(model).train()
    optimizer = make_optimizer(model, lr)
    generator = torch.Generator().manual_seed(seed)
    meter = MemoryMeter()
    with seeded(seed, device), meter:
        meter.track(model, optimizer)
        for k in range(1, step + 1):
            batch = make_batch(model, batch_size, seq_len, generator, device)
            record = run_step(model, optimizer, batch, meter, count_batch=True, step=k)
            del batch
    meter.untrack()
    record.meter = None
    return record


def breakdown_sweep(model, sizes, step: int = 2) -> list[StepRecord]:
    """``step_breakdown`` for each ``(batch_size, seq_len)`` in ``sizes``."""
    return [step_breakdown(model, b, t, step=step) for b, t in sizes]


def autocast_step(model, batch, dtype=torch.bfloat16) -> tuple[StepRecord, StepRecord, dict]:
    """One forward + backward in fp32 and one under ``torch.autocast`` (``dtype``), each measured
    with the meter; and the autocast tape's activation bytes by dtype: what autocast leaves in
    fp32 (ops on its fp32 list, such as layer norm and log-softmax, save fp32 tensors)."""
    def mixed_loss(part):
        with torch.autocast(_device(model).type, dtype=dtype):
            return model.loss(part)

    plain = measure_step(model, batch=batch)
    mixed = measure_step(model, batch=batch, loss_fn=mixed_loss)
    by_dtype: dict[str, int] = {}
    for entry in record_tape(mixed_loss, batch, model=model).entries:
        if not entry.is_param:
            name = str(entry.dtype).removeprefix("torch.")
            by_dtype[name] = by_dtype.get(name, 0) + entry.nbytes
    return plain, mixed, by_dtype


def estimate_categories(estimate, policy: str = "none") -> dict[str, int]:
    """A ``MemoryEstimate`` (``ckpt_course.estimate.model_memory``) as a breakdown dict, to plot
    next to measured ones. Its activations are the peak's; temporaries are not estimated."""
    return {"parameters": estimate.param_bytes, "gradients": estimate.grad_bytes,
            "optimizer state": estimate.optimizer_bytes,
            "activations": estimate.activations[policy], "temporaries": 0}


# ---------------------------------------------------------------- checkpoint chosen blocks
def CheckpointBlocks(indices=(0,), preserve_rng_state: bool = True) -> Segments:  # noqa: N802
    """The ``Segments`` policy that checkpoints only the blocks at ``indices``, each alone
    (lesson 1's name for it); ``preserve_rng_state=False`` reads
    ``segments:1;preserve_rng_state=False``."""
    if not indices or not all(isinstance(i, int) and i >= 0 for i in indices):
        raise ValueError(f"indices must be a non-empty tuple of block numbers (ints >= 0), "
                         f"got {indices!r}")
    return Segments(tuple((i, i + 1) for i in sorted(set(indices))), preserve_rng_state)


# ---------------------------------------------------------------- the every-N dial
@dataclass
class DialPoint(StepRecord):
    """One setting of the dial: the ``measure_step`` record of ``every-N`` (``n`` = 0 stands for
    no checkpointing), with its recompute and a plain step's FLOPs."""

    n: int = 0

    def __str__(self) -> str:
        return (f"{self.policy}: saved {fmt_bytes(self.saved_bytes)}, peak above baseline "
                f"{fmt_bytes(self.peak_above_baseline)}, recompute "
                f"{fmt_flops(self.recompute_flops)} (+{self.overhead:.0%})")


@dataclass
class Dial:
    """``every-N`` measured for each N, and no checkpointing (``none``) for reference."""

    n_layers: int
    none: DialPoint
    points: list[DialPoint]  # in order of n

    def at(self, n: int) -> DialPoint:
        for p in self.points:
            if p.n == n:
                return p
        raise KeyError(f"N={n} was not measured; measured: {[p.n for p in self.points]}")

    @property
    def sqrt_n(self) -> float:
        return math.sqrt(self.n_layers)

    def best(self) -> DialPoint:
        """The N with the lowest peak (the smallest N among equals)."""
        return min(self.points, key=lambda p: (p.peak_bytes, p.n))

    def __str__(self) -> str:
        return "\n".join(str(p) for p in [self.none, *self.points])


def dial(model, batch, ns=None, loss_fn=None, seed: int = 0) -> Dial:
    """Measure ``every-N`` for each N in ``ns`` (default 1..L) and no policy, once each: one
    forward+backward under a meter (``measure_step``) and one count of ops and FLOPs
    (``count_step``, as ``measure_recompute`` does, with the no-policy step counted only once).
    ``loss_fn`` changes the memory step only; FLOPs are counted on ``model.loss``."""
    n_layers = len(model.blocks)
    ns = list(range(1, n_layers + 1) if ns is None else ns)
    if not ns or not all(isinstance(n, int) and 1 <= n <= n_layers for n in ns):
        raise ValueError(f"ns must be segment sizes from 1 to {n_layers} (the model's blocks), "
                         f"got {ns!r}")
    batch = _on(batch, _device(model))

    plain = count_step(model, batch, seed)

    def point(n):
        policy = "none" if n == 0 else f"every-{n}"
        m = measure_step(model, policy, batch=batch, loss_fn=loss_fn, seed=seed)
        with applied(model, policy):
            backward_flops = count_step(model, batch, seed).backward.flops
        m.recompute_flops, m.step_flops = backward_flops - plain.backward.flops, plain.flops
        return DialPoint(**{f.name: getattr(m, f.name) for f in fields(m)}, n=n)

    return Dial(n_layers, point(0), [point(n) for n in ns])
