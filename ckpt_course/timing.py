"""A time model of checkpointing, built from measured op times rather than FLOPs.

FLOPs count only matmuls and attention, so a FLOP model scores layer norm, GELU, adds, views and
copies at zero time and predicts too little. This model times every op instead:

1. ``profile_step`` times one plain step op by op (every aten op, keyed by its name and the
   shapes of its tensor arguments: the qkv matmul and the MLP's are different entries), and
   times plain steps, unprofiled, as a whole;
2. ``recomputed`` counts the ops backward re-runs under a policy (backward with the policy
   minus backward without, keyed the same way: ``recompute.measure_recompute`` by shape), and
   tries the policy's mechanism on one block at the step's own input (``block_trial``);
3. ``predict`` prices them: each recomputed op at its measured time in the plain step, and the
   mechanism at what the block trial took beyond its own recomputed ops, scaled to the step per
   recomputed op (a checkpoint), per op of its regions (selective checkpointing) or per byte
   moved (offload). Predicted step = plain step + that.

Where the time goes beyond the recomputed ops (measured here, 2026-12, tiny GPT, batch 8, one
thread, CPU time): a checkpoint's re-run kernels run about 20% slower than the same kernels in
forward (their inputs left the cache long ago) and each re-run op costs 10-20 us of hooks and
autograd recording, against 6 us per op in forward; selective checkpointing's bookkeeping costs
about 8 ms per block at this size against 2 ms on a one-token input (so a one-token
measurement under-predicted it by 10%); offload's copies write into fresh pages (about 1 GB/s,
against 20 GB/s for a copy into memory just freed, so a hot copy benchmark under-predicted it
by 11-20%). Hence the trial on one real block, not constants or a tiny input.

Ops are timed in a ``TorchDispatchMode`` (``perf_counter`` around each op on CPU, CUDA events on
GPU) rather than read from ``torch.profiler``'s table: the profiler's events nest (``aten::linear``
holds ``aten::addmm``) and its shape records list default arguments, so matching them to the ops
that backward recomputes would be guesswork; the mode sees exactly the ops ``OpCounter`` counts.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import torch
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode

from .policies import Offload, Selective, applied, parse_policy
from .recompute import BOOKKEEPING, EXTRA_FLOP_FORMULAS
from .step import make_optimizer, run_step, seeded
from .units import check_positive_int

OpKey = tuple  # (aten name, shapes of its tensor arguments)

# What a second is: "wall" (perf_counter, what a learner waits) or "cpu" (this process's CPU
# time: on a machine shared with other jobs, the time the step was actually run, without the
# time it waited for a core; equal to wall on a quiet machine with one torch thread).
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def clock_fn(clock: str):
    """The timer function of ``clock`` ("wall" or "cpu")."""
    if clock not in CLOCKS:
        raise ValueError(f"clock is 'wall' or 'cpu', not {clock!r}")
    return CLOCKS[clock]


def op_key(func, args) -> OpKey:
    shapes = tuple(tuple(a.shape) for a in torch.utils._pytree.tree_leaves(args)
                   if isinstance(a, torch.Tensor))
    return str(func.overloadpacket), shapes


class OpTimer(TorchDispatchMode):
    """Counts and times every aten op that runs inside it, by ``op_key``."""

    def __init__(self, device=None, clock: str = "wall"):
        super().__init__()
        self.cuda = device is not None and torch.device(device).type == "cuda"
        self._clock = clock_fn(clock)
        self.calls: Counter[OpKey] = Counter()
        self._seconds: defaultdict[OpKey, float] = defaultdict(float)
        self._events: list[tuple[OpKey, object, object]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        key = op_key(func, args)
        self.calls[key] += 1
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = func(*args, **(kwargs or {}))
            end.record()
            self._events.append((key, start, end))
            return out
        start = self._clock()
        out = func(*args, **(kwargs or {}))
        self._seconds[key] += self._clock() - start
        return out

    @property
    def seconds(self) -> dict[OpKey, float]:
        if self._events:
            torch.cuda.synchronize()
            for key, start, end in self._events:
                self._seconds[key] += start.elapsed_time(end) / 1e3
            self._events.clear()
        return dict(self._seconds)


@dataclass
class OpTimes:
    """One phase's ops: calls and seconds per ``op_key`` (medians over profiled steps)."""

    calls: Counter
    seconds: dict

    @property
    def total_s(self) -> float:
        return sum(self.seconds.values())

    def per_call(self, key: OpKey) -> float:
        return self.seconds[key] / self.calls[key]

    def by_name(self) -> dict[str, float]:
        """Seconds per op name, largest first."""
        out: defaultdict[str, float] = defaultdict(float)
        for (name, _), s in self.seconds.items():
            out[name] += s
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))


@dataclass
class StepProfile:
    """A plain step: its ops timed one by one, and its phases' times (unprofiled medians)."""

    forward: OpTimes
    backward: OpTimes
    forward_s: float
    backward_s: float
    optimizer_s: float
    step_s: float
    device: str = "cpu"
    clock: str = "wall"  # what its seconds are (``CLOCKS``); the mechanisms are timed the same

    @property
    def overhead_per_op_s(self) -> float:
        """Forward's time not spent inside ops (autograd recording, Python), per op."""
        return max(0.0, self.forward_s - self.forward.total_s) / sum(self.forward.calls.values())

    @property
    def backward_over_forward(self) -> float:
        return self.backward_s / self.forward_s

    def op_seconds(self, key: OpKey) -> float:
        """One call of the op ``key``: its forward time if forward runs it (a recomputed op),
        else its backward time, else 0 (an op the plain step never ran)."""
        for phase in (self.forward, self.backward):
            if key in phase.calls:
                return phase.per_call(key)
        return 0.0


def _median_times(timers: list[OpTimer]) -> OpTimes:
    seconds = [t.seconds for t in timers]
    return OpTimes(timers[0].calls, {k: statistics.median(s.get(k, 0.0) for s in seconds)
                                     for k in seconds[0]})


def _synced(device, clock):
    """``clock``, after waiting for ``device``'s queued work (CUDA runs ops asynchronously)."""
    timer, cuda = clock_fn(clock), torch.device(device).type == "cuda"

    def now():
        if cuda:
            torch.cuda.synchronize(device)
        return timer()
    return now


@dataclass
class BlockTrial:
    """One block at the step's own input, run plain and under a policy's mechanism (a
    checkpoint, selective checkpointing or offload) in turns, the median of the differences:
    what the mechanism costs beyond the ops a plain profile prices.

    Measured, not modelled from constants, because the mechanisms' costs depend on sizes and on
    the machine: re-run kernels are slower than in forward (their inputs are no longer in
    cache, their outputs go to fresh memory), selective checkpointing's bookkeeping costs
    about 4 times more per op at real sizes than on a one-token input, and offload's copies
    write into fresh pages, which the operating system maps and zeroes first (about 1 GB/s
    here against 20 GB/s for a copy into memory just freed)."""

    extra_s: float  # the block under the mechanism minus plain
    recomputed: Counter  # op_key -> extra calls in the block's backward (bookkeeping left out)
    ops: int  # ops of the block's forward
    bytes_moved: int = 0  # offload: to host and back, in one forward + backward
    error_s: float = 0.0  # the standard error of ``extra_s`` (the median of the differences)

    def residual_s(self, profile: StepProfile) -> float:
        """``extra_s`` less its recomputed ops at the profile's times: the mechanism itself."""
        return max(0.0, self.extra_s - sum(n * profile.op_seconds(k)
                                           for k, n in self.recomputed.items()))


def mechanism(policy) -> str:
    """The mechanism ``policy`` runs its regions under, as a one-block policy: itself for
    selective checkpointing and offload, else a plain checkpoint ("full"). Policies with the
    same mechanism can share one ``block_trial``."""
    policy = parse_policy(policy)
    return str(policy if isinstance(policy, Selective | Offload) else parse_policy("full"))


def block_trial(model, batch, policy, repeats: int = 20, clock: str = "wall") -> BlockTrial:
    """The model's first block on the input it gets from ``batch``: forward + backward plain and
    under ``policy``'s mechanism (on copies of the block), taking turns (first one, then the
    other first), ``repeats`` rounds after a warm-up: the median of the rounds' differences
    (each round's two runs see the same load); and, in one more run of each, its ops and
    offload's bytes."""
    clock_fn(clock)
    check_positive_int("repeats", repeats)
    policy = parse_policy(policy)
    x = block_input(model, batch, 0)
    plain, inside = copy.deepcopy(model.blocks[0]), copy.deepcopy(model.blocks[0])
    now = _synced(x.device, clock)
    with applied(inside, mechanism(policy), blocks=[inside]) as handle:
        runs = {"plain": plain, "policy": inside}
        times: dict[str, list[float]] = {name: [] for name in runs}
        for r in range(repeats + 1):
            for name, block in sorted(runs.items(), reverse=r % 2 == 1):  # each goes first
                start = now()
                block(x).sum().backward()
                if r:
                    times[name].append(now() - start)
        handle.stats.reset()
        calls = {}
        for name, block in runs.items():
            out = block(x)
            with OpTimer() as counter:
                out.sum().backward()
            calls[name] = counter.calls
        bytes_moved = handle.stats.bytes_to_host + handle.stats.bytes_to_device
    with OpTimer() as counter, torch.no_grad():
        plain(x)
    recomputed = _extra_calls(calls["policy"], calls["plain"], bool(bytes_moved))
    differences = [a - b for a, b in zip(times["policy"], times["plain"], strict=True)]
    return BlockTrial(statistics.median(differences), recomputed, sum(counter.calls.values()),
                      bytes_moved, median_error(differences))


def median_error(values: list[float]) -> float:
    """The standard error of the median of ``values``: 1.2533 sigma / sqrt(n), sigma estimated
    from the interquartile range (IQR / 1.349, robust to the outliers a shared machine makes);
    0 for fewer than 2 values."""
    if len(values) < 2:
        return 0.0
    q = statistics.quantiles(values, n=4)
    return 1.2533 * (q[2] - q[0]) / 1.349 / len(values) ** 0.5


def _extra_calls(with_policy: Counter, plain: Counter, offloaded: bool) -> Counter:
    """Ops backward runs in addition under a policy: bookkeeping left out, and offload's copies
    back (``aten.clone`` on a CPU-only machine), which are priced as bytes moved."""
    return Counter({k: n for k, n in (with_policy - plain).items()
                    if k[0] not in BOOKKEEPING and not (offloaded and k[0] == "aten.clone")})


def block_input(model, batch, index: int) -> torch.Tensor:
    """What block ``index`` receives in a forward of ``model.loss(batch)``."""
    seen = []
    hook = model.blocks[index].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            model.loss(batch)
    finally:
        hook.remove()
    return seen[0].detach().requires_grad_()


def _timed_pass(model, batch, seed, now) -> tuple[float, float]:
    """Forward and backward of ``model.loss(batch)``, each timed with ``now``, ops untimed."""
    model.zero_grad(set_to_none=True)
    with seeded(seed, next(model.parameters()).device):
        start = now()
        loss = model.loss(batch)
        mid = now()
        loss.backward()
        end = now()
    model.zero_grad(set_to_none=True)
    return mid - start, end - mid


def _profiled_pass(model, batch, seed, device, clock) -> tuple[OpTimer, OpTimer]:
    forward, backward = OpTimer(device, clock), OpTimer(device, clock)
    model.zero_grad(set_to_none=True)
    with seeded(seed, device):
        with forward:
            loss = model.loss(batch)
        with backward:
            loss.backward()
    model.zero_grad(set_to_none=True)
    return forward, backward


def profile_step(model, batch, rounds: int = 5, seed: int = 0, clock: str = "wall"
                 ) -> StepProfile:
    """Medians over ``rounds`` rounds (after a warm-up) of a plain step timed as a whole, a
    forward + backward timed phase by phase, and one timed op by op: interleaved, so that all
    three see the same machine load. The steps run on a copy of the model (AdamW changes its
    weights). ``clock``: "wall", or "cpu" on a machine shared with other jobs (``CLOCKS``)."""
    clock_fn(clock)  # a wrong clock or count is refused before any work
    check_positive_int("rounds", rounds)
    model = copy.deepcopy(model)
    device = next(model.parameters()).device
    now = _synced(device, clock)
    optimizer = make_optimizer(model)
    steps, phases, passes = [], [], []
    for r in range(rounds + 1):
        start = now()
        run_step(model, optimizer, batch, guard=False)
        step_s = now() - start
        timed = _timed_pass(model, batch, seed, now)
        timers = _profiled_pass(model, batch, seed, device, clock)
        if r:
            steps.append(step_s)
            phases.append(timed)
            passes.append(timers)
    forward_s, backward_s = (statistics.median(p[i] for p in phases) for i in (0, 1))
    step_s = statistics.median(steps)
    return StepProfile(
        forward=_median_times([f for f, _ in passes]),
        backward=_median_times([b for _, b in passes]),
        forward_s=forward_s, backward_s=backward_s,
        optimizer_s=max(0.0, step_s - forward_s - backward_s), step_s=step_s,
        device=device.type, clock=clock)


def _backward_calls(model, batch, seed) -> Counter:
    device = next(model.parameters()).device
    counter = OpTimer()  # counting only: CPU timing is free and its times are not used
    model.zero_grad(set_to_none=True)
    with seeded(seed, device):
        loss = model.loss(batch)
        with counter:
            loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.calls


@dataclass
class Recomputed:
    """What a policy adds to a plain step: the ops backward re-runs (by ``op_key``), offload's
    traffic, and one block tried under the policy's mechanism, which prices the rest."""

    policy: str
    ops: Counter  # op_key -> extra calls in backward (bookkeeping left out)
    bytes_moved: int  # to host and back (offload), else 0
    tensors_moved: int  # saved tensors packed to host (offload), else 0
    region_ops: int = 0  # selective checkpointing: ops of its regions' forward, each one priced
    trial: BlockTrial | None = None  # None: the policy adds nothing (none)


def recomputed(model, batch, policy, seed: int = 0, clock: str = "wall",
               trial: BlockTrial | None = None) -> Recomputed:
    """Backward with ``policy`` minus backward without, op by op (shapes included), and the
    first block tried under the policy's mechanism on this machine, timed with ``clock``; or
    ``trial``, one already made for the same mechanism (``mechanism``), model and batch."""
    clock_fn(clock)
    policy = parse_policy(policy)
    plain = _backward_calls(model, batch, seed)
    with applied(model, policy) as handle:
        with_policy = _backward_calls(model, batch, seed)
    stats = handle.stats
    bytes_moved = stats.bytes_to_host + stats.bytes_to_device
    what = Recomputed(str(policy), _extra_calls(with_policy, plain, bool(bytes_moved)),
                      bytes_moved, stats.tensors_to_host)
    if isinstance(policy, Selective):
        what.region_ops = _block_forward_ops(model, batch, seed)
    if what.ops or what.bytes_moved or what.region_ops:
        what.trial = trial if trial is not None else block_trial(model, batch, policy,
                                                                  clock=clock)
    return what


def _block_forward_ops(model, batch, seed) -> int:
    """Ops that run inside the model's blocks in one forward."""
    counter, inside = OpTimer(), []
    hooks = [h for b in model.blocks for h in (
        b.register_forward_pre_hook(lambda m, a: inside.append(counter.__enter__())),
        b.register_forward_hook(lambda m, a, o: counter.__exit__(None, None, None)))]
    try:
        with seeded(seed), torch.no_grad():
            model.loss(batch)
    finally:
        for h in hooks:
            h.remove()
    return sum(counter.calls.values())


@dataclass
class Prediction:
    """A policy's step time, predicted from a plain step's measured op times."""

    policy: str
    plain_s: float
    recompute_s: float  # recomputed ops at their measured times, plus the mechanism's overhead
    copy_s: float  # offload's copies, from its block trial
    op_seconds: dict = field(default_factory=dict)  # op name -> its share of recompute_s
    error_s: float = 0.0  # the standard error of the mechanism's share, from its block trial

    @property
    def extra_s(self) -> float:
        return self.recompute_s + self.copy_s

    @property
    def ratio(self) -> float:
        return 1 + self.extra_s / self.plain_s


def predict(profile: StepProfile, what: Recomputed) -> Prediction:
    """Price ``what`` with ``profile``'s op times: each recomputed op at its measured time in
    the plain step, and the mechanism at what its block trial measured beyond those times
    (``BlockTrial.residual_s``), scaled to the step by its own measure: per recomputed op for a
    checkpoint (re-run kernels running slower, autograd recording, the checkpoint's hooks), per
    op of its regions for selective checkpointing (its policy function on every op of forward,
    every op looked up or re-run in backward), per byte moved for offload."""
    op_seconds: defaultdict[str, float] = defaultdict(float)
    for key, n in what.ops.items():
        op_seconds[key[0]] += n * profile.op_seconds(key)
    copy_s, scale, trial = 0.0, 0.0, what.trial
    if trial is not None:
        residual = trial.residual_s(profile)
        if what.bytes_moved:
            scale = what.bytes_moved / trial.bytes_moved
            copy_s = residual * scale
        elif what.region_ops:
            scale = what.region_ops / trial.ops
            op_seconds["selective bookkeeping"] = residual * scale
        elif trial.recomputed:
            scale = sum(what.ops.values()) / sum(trial.recomputed.values())
            op_seconds["checkpoint overhead"] = residual * scale
    return Prediction(what.policy, profile.step_s, sum(op_seconds.values()), copy_s,
                      dict(sorted(op_seconds.items(), key=lambda kv: -kv[1])),
                      trial.error_s * scale if trial is not None else 0.0)


def predict_policy(model, batch, policy, profile: StepProfile | None = None,
                   seed: int = 0) -> Prediction:
    """``predict(profile_step(model, batch), recomputed(model, batch, policy))``."""
    profile = profile if profile is not None else profile_step(model, batch, seed=seed)
    return predict(profile, recomputed(model, batch, policy, seed))


def flop_free(prediction: Prediction) -> dict[str, float]:
    """The part of a prediction a FLOP model prices at zero: ops without a FLOP formula."""
    counted = {str(op) for op in (*flop_counter.flop_registry, *EXTRA_FLOP_FORMULAS)}
    return {op: s for op, s in prediction.op_seconds.items() if op not in counted}


def format_predictions(predictions: dict[str, Prediction], measured: dict[str, float]) -> str:
    """Predicted and measured step-time ratios, with the throughput each policy loses."""
    lines = [f"{'policy':<24}{'predicted':>10}{'measured':>10}{'throughput lost':>17}  "
             "FLOP-free ops priced (ms)"]
    for policy, pred in predictions.items():
        free = ", ".join(f"{op.removeprefix('aten.')} {s * 1e3:.1f}"
                         for op, s in list(flop_free(pred).items())[:3])
        if pred.copy_s:
            free = ", ".join(filter(None, [free, f"copies {pred.copy_s * 1e3:.1f}"]))
        lost = 1 - 1 / measured[policy]
        lines.append(f"{policy:<24}{pred.ratio:>9.2f}x{measured[policy]:>9.2f}x{lost:>16.0%}  "
                     f"{free or '-'}")
    return "\n".join(lines)
