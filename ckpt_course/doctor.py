"""The OOM doctor: run training until it runs out of memory, say where and why, prescribe the
cheapest fix the planner finds, apply it, and show that it fits and what it costs.

    report = doctor(model, budget="4.5MiB", batch_size=8)
    print(report)          # diagnosis, prescription with its arithmetic, verification

1. Diagnose. Train a few AdamW steps under the budget. On CPU the budget is the meter's: an
   allocation that would take live tensor bytes above it raises ``torch.OutOfMemoryError``, as
   a smaller GPU would. On CUDA it is real: ``torch.cuda.set_per_process_memory_fraction`` caps
   the caching allocator. The doctor's meter also follows modules (forward hooks; in backward,
   the autograd node running, traced back to the module whose forward made it), so the report
   says which op failed, in which module and layer, forward or backward, in which step, and
   what was alive then, by category and by layer.
   Step 2 matters: AdamW creates its state (two moments per parameter) in step 1's
   ``optimizer.step()``, so step 1's forward and backward run without it and step 2's carry
   it all along. A budget between the two fails in step 2 only.
2. Prescribe, cheapest first: a checkpoint placement (``ckpt_course.plan``); else the same with a
   smaller micro-batch and gradient accumulation (the micro-batches after the first run with
   every gradient already allocated); else offloading saved tensors to host memory; else
   sharding over devices. A budget below the parameters alone gets sharding or offload, with
   the numbers.
3. Verify. Run the fix under the same budget and compare peak and recompute with the plan.
"""

from __future__ import annotations

import copy
import re
import statistics
from dataclasses import dataclass, field

import torch
from torch import nn

from .costs import MENU
from .meter import MemoryMeter, parse_budget
from .models import GPTConfig, TinyGPT
from .plan import Prediction, _optimal, measure_costs, predict, segment_flops
from .policies import applied, parse_policy
from .recompute import measure_recompute
from .sharding import _min_devices, shard
from .step import StepRecord, check_run, make_batch, make_optimizer, run_step, seeded
from .tape import layer_of
from .units import fmt_bytes, fmt_flops


# ---------------------------------------------------------------- following modules
class _Modules:
    """Which module is running. Forward (and a checkpoint's recompute): a stack kept by module
    hooks. Backward: the autograd node running, looked up in a map from nodes to the module
    whose forward created them (filled by walking new graph nodes when a module's forward ends;
    the innermost module claims a node first). Nodes take no weak references, so the map keys
    are ids, cleared every step."""

    def __init__(self, model: nn.Module):
        self.stack: list[tuple[str, set]] = []
        self.nodes: dict[int, str] = {}
        self.handles = []
        for name, module in model.named_modules():
            if name:
                self.handles += [
                    module.register_forward_pre_hook(self._enter(name)),
                    module.register_forward_hook(self._leave(name), always_call=True),
                ]

    def _enter(self, name):
        def hook(module, args):
            stops = {id(a.grad_fn) for a in args if isinstance(a, torch.Tensor) and a.grad_fn}
            self.stack.append((name, stops))
        return hook

    def _leave(self, name):
        def hook(module, args, output):
            _, stops = self.stack.pop()
            outputs = output if isinstance(output, (tuple, list)) else (output,)
            todo = [o.grad_fn for o in outputs if isinstance(o, torch.Tensor) and o.grad_fn]
            while todo:  # claim the nodes this forward made, back to its inputs
                node = todo.pop()
                if node is None or id(node) in self.nodes or id(node) in stops:
                    continue
                if type(node).__name__ == "AccumulateGrad":
                    continue
                self.nodes[id(node)] = name
                todo += [n for n, _ in node.next_functions]
        return hook

    def current(self) -> str:
        if self.stack:
            return self.stack[-1][0]
        node = torch._C._current_autograd_node()
        return self.nodes.get(id(node), "") if node is not None else ""

    def clear(self):
        self.nodes.clear()

    def remove(self):
        for h in self.handles:
            h.remove()


class _DoctorMeter(MemoryMeter):
    """A ``MemoryMeter`` that also remembers which module allocated each live storage, and on
    an out-of-memory error what was alive, by category and by layer."""

    def __init__(self, model: nn.Module, budget=None, timeline: bool = False):
        super().__init__(budget=budget, timeline=timeline)
        self.modules = _Modules(model)
        self.owner: dict[int, str] = {}  # storage key -> module that allocated it
        self.failure: dict | None = None
        self.peak_module = ""
        self.peak_layers: dict[str, int] = {}

    def _add(self, storage, key, category):
        ref = super()._add(storage, key, category)
        self.owner[key] = self.modules.current()
        return ref

    def _forget(self, ref) -> bool:
        gone = super()._forget(ref)
        if gone:
            self.owner.pop(ref.key, None)
        return gone

    def _new_peak(self, func) -> None:
        super()._new_peak(func)
        self.peak_module = self.modules.current()

    def _refuse(self, func, new) -> str:
        refs = new if isinstance(new, list) else [new]
        tried = sum(r.nbytes for r in refs)
        message = super()._refuse(func, new)
        self._record_failure(str(func), tried, message)
        return message

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        try:
            return super().__torch_dispatch__(func, types, args, kwargs)
        except torch.OutOfMemoryError as error:  # CUDA's own, from the allocator
            if self.failure is None:
                found = re.search(r"Tried to allocate ([\d.]+) ([KMG]i?B)", str(error))
                units = {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30}
                tried = int(float(found[1]) * units.get(found[2], 1)) if found else 0
                self._record_failure(str(func), tried, str(error))
            raise

    def _record_failure(self, op: str, tried: int, message: str) -> None:
        module = self.modules.current()
        self.failure = dict(op=op, tried=tried, live=self.live_bytes, phase=self._phase,
                            module=module, layer=layer_of(module),
                            breakdown=self.breakdown(), by_layer=self.by_layer(),
                            message=message)

    def by_layer(self) -> dict[str, int]:
        """Live activations and temporaries by the layer that made them ("blocks.2", "head")."""
        out: dict[str, int] = {}
        for key, ref in self._live.items():
            if ref.category in ("activations", "temporaries"):
                layer = layer_of(self.owner.get(key, "")) or "(outside any module)"
                out[layer] = out.get(layer, 0) + ref.nbytes
        return out


# ---------------------------------------------------------------- running steps
@dataclass
class OOM:
    """Where a run ran out of memory, and what was alive then."""

    step: int
    micro_batch: int
    phase: str | None
    op: str
    module: str
    layer: str
    tried_bytes: int
    live_bytes: int
    budget: float
    breakdown: dict[str, int]
    by_layer: dict[str, int]
    message: str


@dataclass
class Run:
    """Training steps under a budget: the steps that ran (``StepRecord``s), and the OOM that
    stopped them. A run, not a step: it holds several, and the failure."""

    policy: str
    batch_size: int
    micro_batches: int
    budget: float | None
    steps: list[StepRecord] = field(default_factory=list)
    oom: OOM | None = None
    offloaded_bytes: int = 0  # to host per step, under the offload policy
    timeline: list[tuple[int, int, str | None]] | None = None  # (step, live bytes, phase)

    @property
    def peak_bytes(self) -> int:
        return max((s.peak_bytes for s in self.steps), default=0)

    @property
    def fits(self) -> bool:
        return self.oom is None


def _micro_batches(model, batch_size, seq_len, parts, generator, device=None) -> list:
    """``parts`` micro-batches of ``batch_size // parts`` samples, each made by the model (a
    slice of one batch would keep, and make the meter count, the whole batch's storage)."""
    return [make_batch(model, batch_size // parts, seq_len, generator, device)
            for _ in range(parts)]


def run_steps(model: nn.Module, budget=None, policy="none", batch_size: int = 8,
              seq_len: int | None = None, steps: int = 3, micro_batches: int = 1,
              seed: int = 0, copy_model: bool = True, timeline: bool = False) -> Run:
    """Train ``steps`` AdamW steps (lr 1e-3, as ``train``) of ``batch_size`` samples, each in
    ``micro_batches`` micro-batches with gradient accumulation, under ``policy`` and ``budget``;
    stop at the first out-of-memory error. A fresh batch every step (not counted by the meter,
    as ``train`` and ``predict``); dropout seeded by ``seed``; the model is copied first unless
    ``copy_model=False``. ``timeline``: keep live bytes after every allocation and free."""
    return _run_steps(model, None if budget is None else parse_budget(budget), policy,
                      batch_size, seq_len, steps, micro_batches, seed, copy_model, timeline)


def _run_steps(model, budget: float | None, policy, batch_size, seq_len=None, steps=3,
               micro_batches=1, seed=0, copy_model=True, timeline=False) -> Run:
    """``run_steps`` with the budget already parsed (bytes, or None)."""
    device = check_run(model, batch_size=batch_size, steps=steps, seq_len=seq_len,
                       micro_batches=micro_batches)
    policy = parse_policy(policy)
    model = copy.deepcopy(model) if copy_model else model
    model.train()
    cuda = device.type == "cuda"
    optimizer = make_optimizer(model)
    meter = _DoctorMeter(model, budget=None if cuda else budget, timeline=timeline)
    starts = []
    run = Run(str(policy), batch_size, micro_batches, budget)
    generator = torch.Generator().manual_seed(seed)
    if cuda and budget is not None:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total), device)
    try:
        with seeded(seed, device), applied(model, policy) as handle, meter:
            meter.track(model, optimizer)
            for step in range(1, steps + 1):
                parts = _micro_batches(model, batch_size, seq_len, micro_batches, generator,
                                       device)
                starts.append(len(meter.timeline or ()))
                meter.modules.clear()
                try:
                    record = run_step(model, optimizer, parts, meter, step=step,
                                      policy=str(policy), guard=budget is not None)
                except torch.OutOfMemoryError as error:
                    run.oom = _oom(meter, error, step, budget)
                    break
                record.peak_module, record.meter = meter.peak_module, None
                run.steps.append(record)
            run.offloaded_bytes = handle.stats.bytes_to_host // max(len(run.steps), 1)
        if timeline:
            bounds = [*starts, len(meter.timeline)]
            run.timeline = [(k + 1, p.live_bytes, p.phase) for k in range(len(starts))
                            for p in meter.timeline[bounds[k]:bounds[k + 1]]]
    finally:
        meter.modules.remove()
        meter.untrack()
        if cuda and budget is not None:
            torch.cuda.set_per_process_memory_fraction(1.0, device)
            torch.cuda.empty_cache()
    return run


def _oom(meter, error, step, budget) -> OOM:
    if meter.failure is None:  # raised outside any op the meter saw (CUDA)
        meter._record_failure("(outside an op)", 0, str(error))
    f = meter.failure
    meter.failure = None
    return OOM(step=step, micro_batch=error.micro_batch, phase=f["phase"], op=f["op"],
               module=f["module"], layer=f["layer"], tried_bytes=f["tried"],
               live_bytes=f["live"], budget=budget, breakdown=f["breakdown"],
               by_layer=f["by_layer"], message=f["message"])


# ---------------------------------------------------------------- explaining
_WHY = {
    "forward": "forward keeps each block's tape for backward, so live memory climbs block by "
               "block",
    "backward": "at the start of backward every tape is still alive and the gradients of the "
                "loss and the last layers appear on top of them; later, parameter gradients "
                "pile up as tapes are freed",
    "optimizer": "the optimizer step holds parameters, all gradients, its state and its "
                 "temporaries at once",
}


def explain(oom: OOM, steps: list[StepRecord]) -> str:
    """The diagnosis in words, with the numbers."""
    where = oom.module or ("the optimizer step" if oom.phase == "optimizer" else "no module")
    micro = f", micro-batch {oom.micro_batch}" if oom.micro_batch > 1 else ""
    layer = f" (layer {oom.layer})" if oom.layer and oom.layer != oom.module else ""
    lines = [f"Out of memory in step {oom.step}{micro}, {oom.phase or 'outside any phase'}, "
             f"at {oom.op} in {where}{layer}: tried to allocate "
             f"{fmt_bytes(oom.tried_bytes)} with {fmt_bytes(oom.live_bytes)} live, budget "
             f"{fmt_bytes(oom.budget)}.",
             "Alive then, by category: " + ", ".join(
                 f"{c} {fmt_bytes(b)}" for c, b in oom.breakdown.items() if b) + "."]
    layers = sorted(oom.by_layer.items(), key=lambda kv: -kv[1])
    if layers:
        lines.append("Activations and temporaries, by layer: " + ", ".join(
            f"{name} {fmt_bytes(b)}" for name, b in layers[:8]) + ("; ..." if len(layers) > 8
                                                                  else "") + ".")
    state = oom.breakdown.get("optimizer state", 0)
    if oom.step >= 2 and steps and state:
        lines.append(f"Why step {oom.step} and not step 1: AdamW made its state "
                     f"({fmt_bytes(state)}) in step 1's optimizer step, so step 1's forward and "
                     f"backward ran without it (step 1 peaked at {fmt_bytes(steps[0].peak_bytes)}"
                     f", {steps[0].peak_phase}); from step 2 on it is alive all step long.")
    if oom.phase in _WHY:
        lines.append(f"Why {oom.phase}: {_WHY[oom.phase]}.")
    return "\n".join(lines)


# ---------------------------------------------------------------- prescribing
@dataclass
class Fix:
    """A prescription: what to change, what the planner predicts, and the arithmetic."""

    kind: str  # "policy", "micro-batch", "offload", "shard", or "none" (it already fits)
    policy: str = "none"
    micro_batches: int = 1
    devices: int = 1
    predicted: Prediction | None = None
    arithmetic: list[str] = field(default_factory=list)

    def __str__(self):
        return "\n".join(self.arithmetic)


def _divisors_above_one(n: int) -> list[int]:
    return [d for d in range(2, n + 1) if n % d == 0]


def prescribe(model: nn.Module, budget, batch_size: int = 8, seq_len: int | None = None,
              menu=MENU) -> Fix:
    """The cheapest fix the planner finds, in order: a placement from the ``menu`` (every block
    plain, checkpointed, selective or offloaded; ``()``: plain or checkpointed only); a
    placement and a smaller micro-batch with gradient accumulation; offload; sharding. With
    the arithmetic."""
    return _prescribe(model, parse_budget(budget), batch_size, seq_len, menu)


def _prescribe(model, budget: float, batch_size: int, seq_len, menu) -> Fix:
    """``prescribe`` with the budget already parsed (bytes)."""
    costs = measure_costs(model, batch_size, seq_len, menu=menu)
    none = predict(costs, "none")
    lines = [f"Without checkpointing the planner predicts a peak of {fmt_bytes(none.peak_bytes)} "
             f"({none.where}): parameters {fmt_bytes(costs.param_bytes)} + optimizer state "
             f"{fmt_bytes(costs.optimizer_bytes)} + what the step adds; budget "
             f"{fmt_bytes(budget)}."]
    if none.peak_bytes <= budget:
        return Fix("none", predicted=none, arithmetic=lines + ["It fits as it is."])
    if costs.param_bytes >= budget:
        return _shard_or_offload(costs, budget, lines, params_alone=True)
    best = _optimal(costs, budget, _recompute_only)
    if best is not None:
        lines.append(_placement_words(best, budget))
        return Fix("policy", str(best.policy), predicted=best, arithmetic=lines)
    t = costs.trunk
    step = t.base_bytes + t.backward_left + costs.gradient_bytes + t.optimizer_peak
    if step > budget:  # no activation policy or micro-batch lowers the optimizer step
        lines.append(f"The optimizer step alone needs {fmt_bytes(step)}: parameters "
                     f"{fmt_bytes(costs.param_bytes)} + gradients "
                     f"{fmt_bytes(costs.gradient_bytes + t.grad_bytes)} + AdamW state "
                     f"{fmt_bytes(costs.optimizer_bytes)} + its temporaries "
                     f"{fmt_bytes(t.optimizer_peak)}, more than the budget: no checkpoint "
                     f"policy or micro-batch lowers it.")
        return _shard_or_offload(costs, budget, lines, params_alone=False)
    full = predict(costs, "full")
    lines.append(f"No placement fits: the lowest, every block checkpointed, still peaks at "
                 f"{fmt_bytes(full.peak_bytes)} ({full.where}).")
    for parts in _divisors_above_one(batch_size):
        micro = measure_costs(model, batch_size // parts, seq_len, accumulate=True, menu=menu)
        best = _optimal(micro, budget, _recompute_only)
        if best is not None:
            grads = micro.trunk.base_bytes - costs.trunk.base_bytes
            lines.append(f"Micro-batches of {batch_size // parts} ({parts} per step, gradients "
                         f"accumulated): from the second micro-batch on, all gradients "
                         f"({fmt_bytes(grads)}) are alive during forward and backward; with "
                         f"that counted, " + _placement_words(best, budget, lowercase=True))
            return Fix("micro-batch", str(best.policy), micro_batches=parts, predicted=best,
                       arithmetic=lines)
    lines.append(f"Not even micro-batches of 1 sample fit ({fmt_bytes(budget)}).")
    return _shard_or_offload(costs, budget, lines, params_alone=False, model=model,
                             batch_size=batch_size, seq_len=seq_len)


def _recompute_only(costs, segment) -> int | None:
    """The FLOPs objective without offload: the doctor tries recompute, then micro-batches,
    and offloads only after both (``_shard_or_offload``)."""
    return None if segment[2] == "offload" else segment_flops(costs, segment)


def _placement_words(best: Prediction, budget: float, lowercase: bool = False) -> str:
    text = (f"Checkpoint {best.policy} (the fewest recomputed FLOPs that fit): it keeps "
            f"{fmt_bytes(best.kept_bytes)} for backward and peaks at "
            f"{fmt_bytes(best.peak_bytes)} ({best.where}), {fmt_bytes(budget - best.peak_bytes)}"
            f" under the budget, for {fmt_flops(best.recompute_flops)} of recompute = "
            f"{best.overhead:+.1%} of a plain step's FLOPs.")
    return text[0].lower() + text[1:] if lowercase else text


def _shard_or_offload(costs, budget, lines, params_alone, model=None, batch_size=None,
                      seq_len=None) -> Fix:
    fixed = costs.param_bytes + costs.optimizer_bytes
    if params_alone:
        lines.append(f"The parameters alone need {fmt_bytes(costs.param_bytes)} (with AdamW's "
                     f"state {fmt_bytes(fixed)}), more than the budget {fmt_bytes(budget)}: no "
                     f"checkpoint policy, micro-batch or activation offload can help.")
    elif model is not None:  # offload the saved tensors to host memory: measure it
        run = _run_steps(model, None, "offload", batch_size, seq_len, steps=2)
        if run.peak_bytes <= budget:
            lines.append(f"Offload every block's saved tensors to host memory: the measured "
                         f"peak is {fmt_bytes(run.peak_bytes)}, for "
                         f"{fmt_bytes(run.offloaded_bytes)} copied to host and back each step.")
            return Fix("offload", "offload", arithmetic=lines)
        lines.append(f"Offloading the saved tensors still peaks at {fmt_bytes(run.peak_bytes)} "
                     f"(measured).")
    found = _min_devices(costs, budget)
    if found is None:
        full = predict(shard(costs, 1024), "full")
        lines.append(f"Sharding splits parameters, gradients and optimizer state, not "
                     f"activations: even over 1024 devices, with every block checkpointed, a "
                     f"step peaks at {fmt_bytes(full.peak_bytes)} ({full.where}). Shard and use "
                     f"smaller micro-batches, or offload parameters and optimizer state "
                     f"({fmt_bytes(fixed)}) to CPU memory (ZeRO-Offload).")
        return Fix("shard", devices=0, arithmetic=lines)
    n, best = found
    sharded = fixed + costs.gradient_bytes + costs.trunk.grad_bytes  # the gradients split too
    lines.append(f"Shard parameters, gradients and optimizer state over {n} devices (FSDP / "
                 f"ZeRO-3): each keeps {fmt_bytes(sharded / n)} of them plus one block's "
                 f"parameters while it runs; with {best.policy} the planner predicts "
                 f"{fmt_bytes(best.peak_bytes)} per device ({best.overhead:+.1%} recompute). "
                 f"Or offload parameters and optimizer state to CPU memory (ZeRO-Offload): "
                 f"{fmt_bytes(fixed)} leave the device.")
    return Fix("shard", str(best.policy), devices=n, predicted=best, arithmetic=lines)


# ---------------------------------------------------------------- verifying
@dataclass
class Verification:
    """The fix, run under the same budget, against the prediction."""

    run: Run
    predicted_peak: int | None
    recompute_flops: int | None  # measured
    predicted_recompute_flops: int | None
    step_time_ratio: float | None  # median step time with the fix / without (no budget)
    step_time_range: tuple[float, float] | None = None  # least and most of the rounds' ratios

    def __str__(self):
        r = self.run
        if not r.fits:
            return f"The fix did NOT fit: {explain(r.oom, r.steps).splitlines()[0]}"
        lines = [f"With the fix, {len(r.steps)} steps fit: peak {fmt_bytes(r.peak_bytes)} "
                 f"(budget {fmt_bytes(r.budget)})"
                 + (f", predicted {fmt_bytes(self.predicted_peak)}" if self.predicted_peak
                    else "") + "."]
        if self.recompute_flops is not None:
            lines.append(f"Recompute: measured {fmt_flops(self.recompute_flops)}, predicted "
                         f"{fmt_flops(self.predicted_recompute_flops or 0)}.")
        if self.step_time_ratio is not None:
            spread = ("" if self.step_time_range is None else
                      " ; round by round {:.2f}x to {:.2f}x".format(*self.step_time_range))
            lines.append(f"Step time: {self.step_time_ratio:.2f}x the plain step (median of "
                         f"interleaved steps, no meter{spread}: a clock moves with whatever "
                         f"else the machine runs, the bytes above do not).")
        return "\n".join(lines)


def step_time_ratio(model, policy, batch_size, seq_len=None, micro_batches=1, repeats=5) -> float:
    """Median time of a step under ``policy`` (and micro-batches) / a plain step, interleaved."""
    plain, fixed = step_times(model, policy, batch_size, seq_len, micro_batches, repeats)
    return statistics.median(fixed) / statistics.median(plain)


def step_times(model, policy, batch_size, seq_len=None, micro_batches=1,
               repeats=5) -> tuple[list[float], list[float]]:
    """Seconds of ``repeats`` plain steps and as many under ``policy`` (and micro-batches),
    interleaved (plain, fixed, plain, fixed, ...) after one warm-up of each, no meter."""
    model = copy.deepcopy(model).train()
    parts = {n: _micro_batches(model, batch_size, seq_len, n, torch.Generator().manual_seed(0))
             for n in {1, micro_batches}}
    optimizer = make_optimizer(model)

    def step(policy, n):
        with applied(model, parse_policy(policy)):
            return run_step(model, optimizer, list(parts[n])).time_s

    step("none", 1), step(policy, micro_batches)  # warm up
    plain, fixed = [], []
    for _ in range(repeats):
        plain.append(step("none", 1))
        fixed.append(step(policy, micro_batches))
    return plain, fixed


def verify(model, fix: Fix, budget, batch_size: int = 8, seq_len: int | None = None,
           steps: int = 3, timing: bool = True) -> Verification:
    """Run the prescription under the same budget; compare with the prediction."""
    return _verify(model, fix, parse_budget(budget), batch_size, seq_len, steps, timing)


def _verify(model, fix: Fix, budget: float, batch_size, seq_len, steps, timing) -> Verification:
    """``verify`` with the budget already parsed (bytes)."""
    run = _run_steps(model, budget, fix.policy, batch_size, seq_len, steps,
                     micro_batches=fix.micro_batches)
    measured = predicted = None
    if fix.kind in ("policy", "micro-batch"):
        micro = model.example_batch(batch_size // fix.micro_batches, seq_len,
                                    generator=torch.Generator().manual_seed(0))
        measured = measure_recompute(copy.deepcopy(model), micro, parse_policy(fix.policy)).flops
        predicted = fix.predicted.recompute_flops if fix.predicted else None
    ratio = spread = None
    if timing and run.fits and fix.kind in ("policy", "micro-batch", "offload"):
        plain, fixed = step_times(model, fix.policy, batch_size, seq_len, fix.micro_batches)
        ratio = statistics.median(fixed) / statistics.median(plain)
        rounds = [f / p for p, f in zip(plain, fixed, strict=True)]
        spread = (min(rounds), max(rounds))
    peak = fix.predicted.peak_bytes if fix.predicted and fix.kind != "shard" else None
    return Verification(run, peak, measured, predicted, ratio, spread)


# ---------------------------------------------------------------- all together
@dataclass
class DoctorReport:
    budget: float
    run: Run  # the original setup under the budget
    fix: Fix | None
    verification: Verification | None
    note: str = ""  # said first (the demo says what it is)

    def __str__(self):
        parts = [self.note] if self.note else []
        if self.run.oom is None:
            parts.append(f"No out-of-memory error in {len(self.run.steps)} steps: peak "
                         f"{fmt_bytes(self.run.peak_bytes)} within {fmt_bytes(self.budget)}.")
        else:
            parts += ["DIAGNOSIS", explain(self.run.oom, self.run.steps)]
        if self.fix is not None and self.run.oom is not None:
            parts += ["", "PRESCRIPTION", str(self.fix)]
        if self.verification is not None:
            parts += ["", "VERIFICATION", str(self.verification)]
        return "\n".join(parts)


def demo_budget(model: nn.Module, batch_size: int = 8, seq_len: int | None = None) -> float:
    """Lesson 4's budget: a quarter of the way from step 1's peak to step 2's, so step 1 fits
    and step 2, carrying AdamW's state, runs out of memory."""
    step1, step2 = (s.peak_bytes for s in _run_steps(model, None, "none", batch_size, seq_len,
                                                     steps=2).steps)
    return step1 + (step2 - step1) // 4


def doctor(model: nn.Module, budget=None, batch_size: int = 8, seq_len: int | None = None,
           steps: int = 3, policy="none", timing: bool = True, menu=MENU) -> DoctorReport:
    """Diagnose, prescribe, verify (see the module docstring). Without a ``budget``, lesson 4's
    demo: the budget that makes step 2 run out of memory (``demo_budget``), said first."""
    note = ""
    if budget is None:
        budget = demo_budget(model, batch_size, seq_len)
        note = (f"No budget given: lesson 4's demo. Budget {fmt_bytes(budget)}, between step 1's "
                f"peak and step 2's, so step 2 runs out of memory (AdamW's state appears).")
    budget = parse_budget(budget)  # once, here: everything below takes bytes
    run = _run_steps(model, budget, policy, batch_size, seq_len, steps)
    if run.oom is None:
        return DoctorReport(budget, run, None, None, note)
    fix = _prescribe(model, budget, batch_size, seq_len, menu)
    verification = None
    if fix.kind in ("policy", "micro-batch", "offload"):
        verification = _verify(model, fix, budget, batch_size, seq_len, steps, timing)
    return DoctorReport(budget, run, fix, verification, note)


DEMO_CONFIG = GPTConfig(n_layer=6, d_model=64, n_head=4, seq_len=64)  # lesson 4's, on CPU
DEMO_BATCH = 8


def demo(timing: bool = True) -> DoctorReport:
    """Lesson 4's embedded demo: its tiny GPT (seed 0), batch 8, the budget of ``demo_budget``:
    the step-2 out-of-memory error, diagnosed, prescribed for and verified."""
    with seeded(0):
        model = TinyGPT(DEMO_CONFIG)
    return doctor(model, None, DEMO_BATCH, timing=timing)
