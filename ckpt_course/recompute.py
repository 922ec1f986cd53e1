"""What backward recomputes under a checkpoint policy: ops by name, and FLOPs.

Checkpointing trades memory for compute: backward re-runs (part of) the forward. To see exactly
what it re-runs, count one training step twice, without and with the policy, and subtract::

    r = measure_recompute(model, batch, "full")
    r.flops                        # FLOPs backward spent re-running forward
    r.ops                          # Counter({'aten.addmm': 4, 'aten.relu': 4, 'aten.t': 4})
    r.overhead                     # r.flops / FLOPs of a plain forward + backward

Two real torch tools do the counting, forward and backward separately:
- ``torch.utils.flop_counter.FlopCounterMode`` counts FLOPs of matmuls, attention and convolutions
  (elementwise ops count 0 FLOPs there). On CPU, SDPA runs
  ``_scaled_dot_product_flash_attention_for_cpu``, which torch's table leaves out; we add it with
  torch's own SDPA formulas so CPU and CUDA report the same attention FLOPs.
- A ``TorchDispatchMode`` sees every aten op that runs and counts it by name (``aten.addmm``),
  cheap ones and views included.

Recompute = backward(policy) - backward(no policy): backward with checkpointing runs the forward
ops of checkpointed regions again, and the difference is exactly those ops (plus the copies back
from host memory under ``offload``, which recomputes nothing). Note what torch does *not*
recompute: non-reentrant checkpoint stops its re-run as soon as every saved tensor has been
rebuilt, so a region's trailing ops are skipped (a GPT block's final dropout multiply and
residual ``add``); ``every-2`` still re-runs them in each segment's first block, ``full`` never.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode

from .policies import applied, parse_policy
from .units import fmt_flops

aten = torch.ops.aten


def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query, key, value)


def _cpu_sdpa_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)


EXTRA_FLOP_FORMULAS = {
    aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flops,
}


# Checkpoint detaches its inputs and each tensor it rebuilds, and asks tensors their device:
# free bookkeeping, not recompute.
BOOKKEEPING = frozenset({"aten.detach", "prim.device"})


class OpCounter(TorchDispatchMode):
    """Counts every aten op that runs inside it, by name: ``ops["aten.addmm"]``."""

    def __init__(self):
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


@dataclass
class Counts:
    """What one phase (a forward or a backward) ran."""

    ops: Counter[str] = field(default_factory=Counter)  # op name -> times it ran
    flops: int = 0
    flops_by_op: dict[str, int] = field(default_factory=dict)  # only ops with a FLOP formula

    def __str__(self):
        return f"{fmt_flops(self.flops)} in {sum(self.ops.values())} ops"


@contextlib.contextmanager
def counting():
    """``with counting() as c: ...``: afterwards ``c`` holds the ops and FLOPs that ran inside."""
    counts = Counts()
    flops = flop_counter.FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS)
    with flops, OpCounter() as ops:
        yield counts
    counts.ops = ops.ops
    counts.flops = flops.get_total_flops()
    by_op = flops.get_flop_counts().get("Global", {})
    counts.flops_by_op = {str(op): n for op, n in by_op.items()}


@dataclass
class StepCounts:
    forward: Counts
    backward: Counts

    @property
    def flops(self) -> int:
        return self.forward.flops + self.backward.flops


def _batch_device(batch) -> torch.device:
    first = batch[0] if isinstance(batch, (tuple, list)) else batch
    return first.device


def count_step(model: torch.nn.Module, batch, seed: int = 0) -> StepCounts:
    """Count forward and backward of ``model.loss(batch)`` separately.

    Leaves no trace: the global RNG and the parameters' ``.grad`` are as they were before.
    """
    grads = [p.grad for p in model.parameters()]
    device = _batch_device(batch)
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)  # same dropout masks for every policy compared
            for p in model.parameters():
                p.grad = None
            with counting() as forward:
                loss = model.loss(batch)
            with counting() as backward:
                loss.backward()
    finally:
        for p, g in zip(model.parameters(), grads, strict=True):
            p.grad = g
    return StepCounts(forward, backward)


@dataclass
class Recompute:
    """What backward recomputed under ``policy``, compared with the same step under no policy."""

    policy: str
    flops: int  # backward FLOPs with the policy minus without
    flops_by_op: dict[str, int]  # the same, per op (ops whose FLOPs did not change are left out)
    ops: Counter[str]  # ops that ran more often in backward with the policy (detach left out)
    baseline: StepCounts  # the step without policy
    with_policy: StepCounts

    @property
    def forward_flops(self) -> int:
        return self.baseline.forward.flops

    @property
    def step_flops(self) -> int:
        """Forward + backward FLOPs without the policy."""
        return self.baseline.flops

    @property
    def overhead(self) -> float:
        """Recomputed FLOPs / a plain step's FLOPs: 0.33 is the textbook "one more forward"."""
        return self.flops / self.step_flops if self.step_flops else 0.0

    def __str__(self):
        top = ", ".join(f"{n} x{c}" for n, c in self.ops.most_common(5))
        plain = fmt_flops(self.step_flops)
        return (f"{self.policy}: recomputes {fmt_flops(self.flops)} "
                f"(+{self.overhead:.0%} of a plain step's {plain}); ops: {top or 'none'}")


def measure_recompute(model: torch.nn.Module, batch, policy, seed: int = 0) -> Recompute:
    """Run one forward + backward of ``model.loss(batch)`` with no policy and with ``policy``."""
    policy = parse_policy(policy)
    baseline = count_step(model, batch, seed)
    with applied(model, policy):
        with_policy = count_step(model, batch, seed)
    before, after = baseline.backward, with_policy.backward
    flops_by_op = {op: after.flops_by_op.get(op, 0) - before.flops_by_op.get(op, 0)
                   for op in after.flops_by_op.keys() | before.flops_by_op.keys()}
    return Recompute(
        policy=str(policy),
        flops=after.flops - before.flops,
        flops_by_op={op: n for op, n in sorted(flops_by_op.items()) if n},
        ops=Counter({op: n for op, n in (after.ops - before.ops).items() if op not in BOOKKEEPING}),
        baseline=baseline,
        with_policy=with_policy,
    )
