"""A time model of checkpointing, built from measured op times rather than FLOPs.

FLOPs count only matmuls and attention, so a FLOP model scores layer norm, GELU, adds, views and
copies at zero time and predicts too little. This model times every op instead:

1. ``profile_step`` times one plain step op by op (every aten op, keyed by its name and the
   shapes of its tensor arguments: the qkv matmul and the MLP's are different entries), and
   times plain steps, unprofiled, for their wall clock;
2. ``recomputed`` counts the ops backward re-runs under a policy (backward with the policy
   minus backward without, keyed the same way: ``recompute.measure_recompute`` by shape);
3. ``predict`` prices them: each recomputed op at its measured forward time plus forward's
   measured per-op overhead (autograd recording, Python), and the bytes offload moves at the
   measured copy time per byte. Predicted step = plain step + that.

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
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils.checkpoint import checkpoint

from .models import longest_sequence
from .policies import HostStore, Selective, applied, parse_policy
from .recompute import BOOKKEEPING, EXTRA_FLOP_FORMULAS
from .step import make_batch, make_optimizer, run_step, seeded

OpKey = tuple  # (aten name, shapes of its tensor arguments)


def op_key(func, args) -> OpKey:
    shapes = tuple(tuple(a.shape) for a in torch.utils._pytree.tree_leaves(args)
                   if isinstance(a, torch.Tensor))
    return str(func.overloadpacket), shapes


class OpTimer(TorchDispatchMode):
    """Counts and times every aten op that runs inside it, by ``op_key``."""

    def __init__(self, device=None):
        super().__init__()
        self.cuda = device is not None and torch.device(device).type == "cuda"
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
        start = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        self._seconds[key] += time.perf_counter() - start
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
    """A plain step: its ops timed one by one, and its phases' wall clock (unprofiled medians)."""

    forward: OpTimes
    backward: OpTimes
    forward_s: float
    backward_s: float
    optimizer_s: float
    step_s: float
    copy_s_per_byte: float  # moving a saved tensor to host memory or back, per byte
    hook_s_per_tensor: float = 0.0  # offload's pack + unpack of one saved tensor, bytes aside
    device: str = "cpu"

    @property
    def overhead_per_op_s(self) -> float:
        """Forward's wall clock not spent inside ops (autograd recording, Python), per op."""
        return max(0.0, self.forward_s - self.forward.total_s) / sum(self.forward.calls.values())

    @property
    def backward_over_forward(self) -> float:
        return self.backward_s / self.forward_s


def _median_times(timers: list[OpTimer]) -> OpTimes:
    seconds = [t.seconds for t in timers]
    return OpTimes(timers[0].calls, {k: statistics.median(s.get(k, 0.0) for s in seconds)
                                     for k in seconds[0]})


def copy_seconds_per_byte(device, nbytes: int = 1 << 20, repeats: int = 20) -> float:
    """Median time to move ``nbytes`` the way ``HostStore`` does (a clone on a CPU-only machine,
    pinned device-to-host and back on CUDA), per byte moved."""
    device = torch.device(device)
    x = torch.empty(nbytes // 4, device=device)
    times = []
    with _disable_current_modes():
        for _ in range(repeats + 1):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            host = x.to("cpu", copy=True) if device.type == "cuda" else x.clone()
            back = host.to(device, copy=True) if device.type == "cuda" else host.clone()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
            del host, back
    return statistics.median(times[1:]) / (2 * x.numel() * x.element_size())


def _interleaved_seconds(runs: dict, x, repeats: int) -> dict[str, float]:
    """Median seconds of forward + backward of each ``runs[name](x)``, taking turns."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats + 1):
        for name, run in runs.items():
            start = time.perf_counter()
            run(x).sum().backward()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t[1:]) for name, t in times.items()}


def mechanism_costs(device, n: int = 200, repeats: int = 15) -> dict[str, float]:
    """Offload's saved-tensor hooks per saved tensor, bytes aside: a chain of ``n`` ``sin`` ops
    (each saves its input) on a tiny tensor, under the hooks minus without."""
    x = torch.ones(4, device=device, requires_grad=True)
    store = HostStore()

    def chain(t):
        for _ in range(n):
            t = t.sin()
        return t

    def offloaded(t):
        with store.hooks(()):
            return chain(t)

    s = _interleaved_seconds({"plain": chain, "hooks": offloaded}, x, repeats)
    return {"hook_s_per_tensor": max(0.0, s["hooks"] - s["plain"]) / n}


def selective_seconds_per_op(model, policy: Selective, repeats: int = 15) -> float:
    """Selective checkpointing's bookkeeping per op of a region (its policy function on every op
    of forward, its cache on every op of the recompute): one block on a tiny input (one token,
    so that the ops themselves are nearly free), under ``policy`` minus a plain checkpoint of
    the same block, divided by the block's ops."""
    block = model.blocks[0]
    x = block_input(model, make_batch(model, 1, 1 if longest_sequence(model) else None), 0)
    ops = OpTimer()
    with ops, torch.no_grad():
        block(x)

    def plain(t):
        return checkpoint(block, t, use_reentrant=False)

    def selective(t):
        return checkpoint(block, t, use_reentrant=False, context_fn=policy.context_fn)

    s = _interleaved_seconds({"checkpoint": plain, "selective": selective}, x, repeats)
    return max(0.0, s["selective"] - s["checkpoint"]) / sum(ops.calls.values())




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


def _profiled_pass(model, batch, seed, device) -> tuple[OpTimer, OpTimer]:
    forward, backward = OpTimer(device), OpTimer(device)
    model.zero_grad(set_to_none=True)
    with seeded(seed, device):
        with forward:
            loss = model.loss(batch)
        with backward:
            loss.backward()
    model.zero_grad(set_to_none=True)
    return forward, backward


def profile_step(model, batch, rounds: int = 5, seed: int = 0) -> StepProfile:
    """Medians over ``rounds`` rounds (after a warm-up) of a plain step, timed as a whole, then a
    forward + backward timed op by op: interleaved, so that both see the same machine load.
    The steps run on a copy of the model (AdamW changes its weights)."""
    model = copy.deepcopy(model)
    device = next(model.parameters()).device
    optimizer = make_optimizer(model)
    records, passes = [], []
    for r in range(rounds + 1):
        record = run_step(model, optimizer, batch)
        timers = _profiled_pass(model, batch, seed, device)
        if r:
            records.append(record)
            passes.append(timers)
    med = {k: statistics.median(r.phase_s[k] for r in records) for k in records[0].phase_s}
    return StepProfile(
        forward=_median_times([f for f, _ in passes]),
        backward=_median_times([b for _, b in passes]),
        forward_s=med["forward"], backward_s=med["backward"], optimizer_s=med["optimizer"],
        step_s=statistics.median(r.time_s for r in records),
        copy_s_per_byte=copy_seconds_per_byte(device), device=device.type,
        **mechanism_costs(device))


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
    """What backward runs in addition under a policy: ops by ``op_key`` and offload traffic."""

    policy: str
    ops: Counter  # op_key -> extra calls in backward (bookkeeping left out)
    bytes_moved: int  # to host and back (offload), else 0
    tensors_moved: int  # saved tensors packed to host (offload), else 0
    sac_ops: int = 0  # ops run under selective checkpointing's bookkeeping (its regions' forward)
    sac_s_per_op: float = 0.0  # that bookkeeping's measured cost per op


def recomputed(model, batch, policy, seed: int = 0) -> Recomputed:
    """Backward with ``policy`` minus backward without, op by op (shapes included)."""
    policy = parse_policy(policy)
    plain = _backward_calls(model, batch, seed)
    with applied(model, policy) as handle:
        with_policy = _backward_calls(model, batch, seed)
    ops = Counter({k: n for k, n in (with_policy - plain).items() if k[0] not in BOOKKEEPING})
    stats = handle.stats
    sac_ops, sac_s = 0, 0.0
    if isinstance(policy, Selective):
        sac_ops, sac_s = _block_forward_ops(model, batch, seed), selective_seconds_per_op(model,
                                                                                          policy)
    return Recomputed(str(policy), ops, stats.bytes_to_host + stats.bytes_to_device,
                      stats.tensors_to_host, sac_ops, sac_s)


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
    recompute_s: float  # recomputed ops at their measured forward time, plus per-op overhead
    copy_s: float  # offload's bytes at the measured copy time per byte, plus its hooks
    op_seconds: dict = field(default_factory=dict)  # op name -> its share of recompute_s

    @property
    def extra_s(self) -> float:
        return self.recompute_s + self.copy_s

    @property
    def ratio(self) -> float:
        return 1 + self.extra_s / self.plain_s


def predict(profile: StepProfile, what: Recomputed) -> Prediction:
    """Price ``what`` with ``profile``'s op times. Offload's copies back (``aten.clone`` in
    backward, on a CPU-only machine) are priced as bytes moved, not as recomputed ops."""
    op_seconds: defaultdict[str, float] = defaultdict(float)
    for key, n in what.ops.items():
        if what.bytes_moved and key[0] == "aten.clone":
            continue
        per_call = (profile.forward.per_call(key) if key in profile.forward.calls
                    else profile.backward.per_call(key) if key in profile.backward.calls else 0.0)
        op_seconds[key[0]] += n * (per_call + profile.overhead_per_op_s)
    copy_s = (what.bytes_moved * profile.copy_s_per_byte
              + what.tensors_moved * profile.hook_s_per_tensor)
    if what.sac_ops:
        op_seconds["selective bookkeeping"] = what.sac_ops * what.sac_s_per_op
    return Prediction(what.policy, profile.step_s, sum(op_seconds.values()), copy_s,
                      dict(sorted(op_seconds.items(), key=lambda kv: -kv[1])))


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
