"""Plan where to checkpoint: the placement that fits a memory budget with the least recompute.

A model is a chain: a prefix (embeddings), blocks 0..L-1, a suffix (final norm, head, loss). A
*placement* cuts the blocks into segments; a checkpointed segment keeps only its input during
forward and recomputes its blocks once at the start of its backward, a plain block keeps its tape.
``optimal(costs, budget)`` finds, by an exact dynamic program over the chain, the placement with
the fewest recomputed FLOPs whose predicted peak fits the budget (like rotor, or Griewank's
revolve restricted to one level of recomputation). ``Prediction.policy`` is the placement as
a ``Segments`` policy (``segments:0-2,5``), which every command and ``train`` accept::

    costs = measure_costs(model, batch_size=8)  # or config_costs("70b", 1, 4096): fake tensors
    plan = make_plan(costs, budget="40MiB")     # print(plan): the plan next to none/full/sqrt
    train(model, plan.policy, budget="40MiB")   # fits, and peaks where predict() said

The memory model (live bytes, as the meter counts them), for a placement:
- forward, segment s: F0 + Kept(<s) + s's input if no block before keeps it + s's own peak.
  Kept(<s): what the segments before keep (a plain block its tape, a checkpointed segment its
  input). F0 = parameters + optimizer state + what the prefix keeps.
- backward, segment s = blocks [i, j): B0 + Kept(<s) + kept(s) + the gradients of blocks >= j's
  parameters + the gradient of x_j, then inside s the recompute and each block's backward,
  one after another. B0 = F0 + what the suffix's backward leaves (its gradients, the loss).
  Behind this: a later segment's backward gives back exactly what it kept and leaves its
  parameters' gradients and the gradient of its input.
- optimizer step: parameters + gradients + optimizer state + the step's temporaries.
The peak is the largest; the DP adds up the same terms. Assumptions: blocks run in order, once
each; a block's backward allocates nothing before it first reads a saved tensor (true of the
course models). Against the meter (``measure_peaks``: AdamW steps on one batch, step 2 on) it is
exact to the byte for the tiny GPT (sdpa or naive attention, with or without dropout), Llama
and the hand-trace net, for every placement tried; tests check it. ``accumulate=True`` measures
a micro-batch after the first under gradient accumulation (every gradient already there), also
exact. ``sharding.shard`` (FSDP / ZeRO-3) and ``config_costs``' optimizer terms are estimates.
The measuring lives in ``costs.py`` (its docstring says what is measured); this module predicts
and plans.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from torch import nn

from .costs import ChainCosts, config_costs, measure_costs  # noqa: F401 (re-exported)
from .meter import parse_budget
from .policies import NoCheckpoint, Policy, Segments, _Segmented, parse_policy
from .train import train
from .units import fmt_bytes, fmt_flops

# ---------------------------------------------------------------- placements
# A placement: segments covering blocks 0..L-1 in order, each (start, stop, checkpointed).
Placement = tuple[tuple[int, int, bool], ...]


def placement_from_checkpointed(n: int, ranges) -> Placement:
    """Blocks outside the checkpointed ``ranges`` run plain, one segment per block."""
    ranges = sorted((int(a), int(b)) for a, b in ranges)
    out, i = [], 0
    for a, b in ranges:
        if not (i <= a < b <= n):
            raise ValueError(f"checkpointed ranges must be ordered, disjoint, non-empty and "
                             f"within 0..{n}: got {ranges}")
        out += [(k, k + 1, False) for k in range(i, a)] + [(a, b, True)]
        i = b
    return tuple(out + [(k, k + 1, False) for k in range(i, n)])


def checkpointed(placement: Placement) -> tuple[tuple[int, int], ...]:
    return tuple((i, j) for i, j, c in placement if c)


def every_k_placement(n: int, k: int) -> Placement:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"every-K needs an integer K >= 1, got {k!r}")
    return placement_from_checkpointed(n, [(i, min(i + k, n)) for i in range(0, n, k)])


def all_placements(n: int):
    """Every placement of ``n`` blocks (F(2n+1) of them, about 2.6^n): for brute force."""
    if n == 0:
        yield ()
        return
    for rest in all_placements(n - 1):  # extend a placement of blocks 0..n-2 by block n-1
        yield (*rest, (n - 1, n, False))
        yield (*rest, (n - 1, n, True))
        if rest and rest[-1][2]:
            yield (*rest[:-1], (rest[-1][0], n, True))



# ---------------------------------------------------------------- the memory model
# An event is one moment the model predicts: (live bytes, phase, block, detail). Segment events
# leave out Kept(<s), what the segments before keep, which predict() and the DP add.
Event = tuple[int, str, int, str]


def _left_holds(costs: ChainCosts, prev, k: int) -> bool:
    """Is x_k kept by what runs before it: a plain block that saves its output (ReLU), or, for
    x_0, the prefix or the caller (a batch made outside the meter)?"""
    if k == 0:
        return costs.trunk.prefix_keeps_input
    return not prev[2] and costs.layers[k - 1].saves_output


def _boundary_bytes(costs: ChainCosts, k: int) -> int:
    """Bytes of x_k, the input of block k (x_L: the last block's output), as the meter counts."""
    if k == 0 and not costs.trunk.input_counted:
        return 0
    return costs.layers[k].input_bytes if k < costs.n else costs.layers[-1].output_bytes


def segment_kept(costs: ChainCosts, seg, left_held: bool) -> int:
    """Bytes segment ``seg`` keeps from its forward to its backward: its input if no block before
    keeps it (a checkpoint always keeps it; a plain block if it saves it), and a plain block's
    tape."""
    i, j, ckpt = seg
    x = 0 if left_held else _boundary_bytes(costs, i)
    if ckpt:
        return x
    c = costs.layers[i]
    return x * c.saves_input + c.kept_bytes


def segment_recompute_flops(costs: ChainCosts, seg) -> int:
    """A checkpointed segment re-runs its blocks' forwards; the last one stops at its last save."""
    i, j, ckpt = seg
    if not ckpt:
        return 0
    return sum(c.forward_flops for c in costs.layers[i:j - 1]) + costs.layers[j - 1].recompute_flops


def segment_events(costs: ChainCosts, seg, left_held: bool) -> list[Event]:
    """The peak moments of segment ``seg``'s forward and backward, minus Kept(<seg)."""
    i, j, ckpt = seg
    layers, trunk = costs.layers, costs.trunk
    x_i = 0 if left_held else _boundary_bytes(costs, i)
    # forward: parameters, optimizer state, the prefix's tape, x_i, then the block(s)
    t = trunk.base_bytes + trunk.prefix_kept + x_i
    if not ckpt:
        events = [(t + layers[i].forward_peak, "forward", i, "")]
    else:
        events = [(t + (_boundary_bytes(costs, k) if k > i else 0)
                   + layers[k].forward_peak_unsaved, "forward", k, "checkpointed")
                  for k in range(i, j)]
    # backward starts with: what forward left minus what the segments after gave back, i.e.
    # base + prefix + suffix's leftovers + Kept(<s) + kept(s) + their gradients + grad of x_j
    t = (trunk.base_bytes + trunk.prefix_kept + trunk.suffix_left + segment_kept(
        costs, seg, left_held) + sum(c.grad_bytes for c in layers[j:]) + _boundary_bytes(costs, j))
    if ckpt:  # recompute: plain forwards, the last one stopping at its last save
        for k in range(i, j):
            c = layers[k]
            if k < j - 1:  # it makes its output, the next block's input, too
                events.append((t + c.forward_peak, "recompute", k, f"{i}-{j - 1}"))
                t += c.kept_bytes + c.output_bytes * (not c.saves_output)
            else:
                events.append((t + c.recompute_peak, "recompute", k, f"{i}-{j - 1}"))
                t += c.recompute_kept
            if k > i and not (c.saves_input or layers[k - 1].saves_output):
                t -= _boundary_bytes(costs, k)  # x_k: nobody keeps it once block k has run
    for k in range(j - 1, i - 1, -1):
        c = layers[k]
        if ckpt:  # the checkpoint keeps x_i to the end; x_k inside, if the block below saves it
            held, back = k == i or layers[k - 1].saves_output, c.checkpointed_backward
        else:
            held, back = left_held, c.backward
        events.append((t + back.peak(held), "backward", k, "checkpointed" if ckpt else ""))
        t += back.change(held)
    return events


def trunk_events(costs: ChainCosts, kept_all: int, last_left_held: bool) -> list[Event]:
    """Prefix forward, suffix forward and backward, prefix backward, optimizer step."""
    trunk, layers = costs.trunk, costs.layers
    base, held = trunk.base_bytes, last_left_held
    x_last = 0 if held else _boundary_bytes(costs, costs.n)
    t = base + trunk.prefix_kept + kept_all + x_last
    grads = costs.gradient_bytes
    after = base + trunk.prefix_kept + trunk.suffix_left + grads
    if layers and layers[0].needs_input_grad:
        after += _boundary_bytes(costs, 0)  # the gradient of x_0
    return [
        (base + trunk.prefix_peak, "forward", -1, "prefix"),
        (t + trunk.suffix_forward_peak(held), "forward", costs.n, "suffix"),
        (t + trunk.suffix_kept(held) + trunk.suffix_backward_peak(held), "backward", costs.n,
         "suffix"),
        (after + trunk.prefix_backward_peak, "backward", -1, "prefix"),
        (base + trunk.backward_left + grads + trunk.optimizer_peak, "optimizer", -1, ""),
    ]


def describe_event(event: Event) -> str:
    """(live, "recompute", 3, "2-3") -> 'recompute of block 3 (segment 2-3), at the start of
    its backward'."""
    _, phase, k, detail = event
    if phase == "optimizer":
        return "optimizer step"
    if detail in ("prefix", "suffix"):
        what = {"prefix": "embeddings", "suffix": "final layers and loss"}[detail]
        return f"{phase} of the {detail} ({what})"
    if phase == "recompute":
        return f"recompute of block {k} (segment {detail}), at the start of its backward"
    return f"{phase} of block {k}" + (" (checkpointed)" if detail else "")


@dataclass(frozen=True)
class Prediction:
    """What the memory model says about one placement."""

    placement: Placement
    peak_bytes: int
    where: str  # the moment of the peak, in words
    phase: str  # "forward", "recompute", "backward" or "optimizer"
    block: int  # the block running then (-1: prefix or optimizer, L: suffix)
    recompute_flops: int
    kept_bytes: int  # what forward keeps for backward, all segments together
    step_flops: int  # forward + backward FLOPs of a plain step

    @property
    def policy(self) -> Segments:
        return Segments(checkpointed(self.placement))

    @property
    def overhead(self) -> float:
        """Recomputed FLOPs / FLOPs of a plain step."""
        return self.recompute_flops / self.step_flops if self.step_flops else 0.0


def predict(costs: ChainCosts, placement) -> Prediction:
    """The memory model for one placement (or policy): peak live bytes, where, recompute."""
    placement = as_placement(costs.n, placement)
    events, kept, flops, prev = [], 0, 0, None
    for seg in placement:
        left = _left_holds(costs, prev, seg[0])
        events += [(e[0] + kept, *e[1:]) for e in segment_events(costs, seg, left)]
        kept += segment_kept(costs, seg, left)
        flops += segment_recompute_flops(costs, seg)
        prev = seg
    last_held = _left_holds(costs, prev, costs.n) if prev is not None else True
    events += trunk_events(costs, kept, last_held)
    top = max(events, key=lambda e: e[0])
    return Prediction(placement, top[0], describe_event(top), top[1], top[2], flops, kept,
                      costs.step_flops)


def as_placement(n: int, placement) -> Placement:
    """A placement from a placement, a whole-block policy, or its string like "every-2"."""
    if isinstance(placement, (str, Policy)):
        policy = parse_policy(placement)
        if not isinstance(policy, (Segments, _Segmented, NoCheckpoint)):
            raise ValueError(f"the planner models whole-block checkpointing (none, full, every-K, "
                             f"sqrt, segments:...), not {policy}")
        return placement_from_checkpointed(n, [(r.start, r.stop) for r in policy.segments(n)])
    placement = tuple((int(a), int(b), bool(c)) for a, b, c in placement)
    i = 0
    for a, b, _ in placement:
        if a != i or b <= a:
            raise ValueError(f"a placement covers blocks 0..{n - 1} with consecutive segments "
                             f"(start, stop, checkpointed); got {placement}")
        i = b
    if i != n:
        raise ValueError(f"the placement covers {i} blocks; the model has {n}")
    return placement


# ---------------------------------------------------------------- the dynamic program
def optimal(costs: ChainCosts, budget) -> Prediction | None:
    """The placement with the fewest recomputed FLOPs whose predicted peak fits ``budget``
    (bytes, or a string like "40MiB"), and among those the lowest peak; None if none fits.
    Exact for the memory model. The DP below finds the fewest FLOPs; asking it again just under
    the peak it found, until the FLOPs go up, gives the lowest peak at those FLOPs (the DP's
    states know kept bytes, not the peak so far, so it cannot break the tie itself)."""
    best = _cheapest(costs, parse_budget(budget))
    while best is not None:
        lower = _cheapest(costs, best.peak_bytes - 1)
        if lower is None or lower.recompute_flops > best.recompute_flops:
            return best
        best = lower
    return None


def _cheapest(costs: ChainCosts, budget: float) -> Prediction | None:
    """A placement with the fewest recomputed FLOPs whose predicted peak fits ``budget``.

    Scan the chain left to right. A state is (boundary i, does the block before keep x_i?);
    in it we keep every (Kept, FLOPs) pair no other pair beats on both: Kept, the bytes the
    segments so far keep, is all the future needs to know of the past, since every later
    moment's live bytes are Kept plus terms of its own segment. A segment [i, j) is feasible
    from a pair if Kept + its highest moment fits; it adds its kept bytes and recompute.
    About L^2 segments per state, each checked in O(L): fast for L in the hundreds.
    """
    n = costs.n
    start = (0, _left_holds(costs, None, 0))
    fronts = {start: [(0, 0, None)]}  # state -> [(kept, flops, back pointer)]
    for i in range(n):
        for left in (False, True):
            front = fronts.get((i, left))
            if not front:
                continue
            front[:] = _pareto(front)
            for j in range(i + 1, n + 1):
                for ckpt in ((False, True) if j == i + 1 else (True,)):
                    seg = (i, j, ckpt)
                    top = max(e[0] for e in segment_events(costs, seg, left))
                    kept = segment_kept(costs, seg, left)
                    flops = segment_recompute_flops(costs, seg)
                    nxt = (j, _left_holds(costs, seg, j))
                    for index, (k, f, _) in enumerate(front):
                        if k + top <= budget:
                            fronts.setdefault(nxt, []).append(
                                (k + kept, f + flops, ((i, left), index, seg)))
    best = None
    for left in (False, True):
        for k, f, back in _pareto(fronts.get((n, left), [])):
            if max(e[0] for e in trunk_events(costs, k, left)) <= budget:
                if best is None or (f, k) < best[:2]:
                    best = (f, k, back)
    if best is None:
        return None
    placement, back = [], best[2]
    while back is not None:
        state, index, seg = back
        placement.append(seg)
        back = fronts[state][index][2]
    return predict(costs, tuple(reversed(placement)))


def _pareto(points):
    """Keep the points no other point beats on both kept bytes and FLOPs (fewest bytes first)."""
    out = []
    for p in sorted(points, key=lambda p: (p[0], p[1])):
        if not out or p[1] < out[-1][1]:
            out.append(p)
    return out


def brute_force(costs: ChainCosts, budget) -> Prediction | None:
    """The same answer as ``optimal`` by trying every placement (about 2.6^L): for tests."""
    budget = parse_budget(budget)
    fits = [p for p in map(functools.partial(predict, costs), all_placements(costs.n))
            if p.peak_bytes <= budget]
    return min(fits, key=lambda p: (p.recompute_flops, p.peak_bytes), default=None)


def optimal_frontier(costs: ChainCosts, most: int = 200) -> list[Prediction]:
    """The exact memory-recompute frontier, Pareto points only (each peaks lower and recomputes
    more than the one before). Walks down from no checkpointing: each step asks for the
    cheapest placement (lowest peak among equally cheap) peaking strictly below the last."""
    out, budget = [], predict(costs, "none").peak_bytes
    while len(out) < most:
        best = optimal(costs, budget)
        if best is None:
            break
        out.append(best)
        budget = best.peak_bytes - 1
    return out


def measure_peaks(model: nn.Module, policy="none", batch_size: int = 8,
                  seq_len: int | None = None, steps: int = 2, seed: int = 0) -> list[int]:
    """Peak live bytes of each of ``steps`` AdamW training steps under ``policy``, measured by
    ``train``'s meter: what ``predict`` predicts for a step after the first (optimizer state
    present). Batches are made outside the meter, as ``predict`` leaves them out."""
    records = train(model, policy, steps=steps, batch_size=batch_size, seq_len=seq_len,
                    seed=seed, count_recompute=False, progress=False)
    model.zero_grad(set_to_none=True)
    return [r.peak_bytes for r in records]


# ---------------------------------------------------------------- the plan and its report
@dataclass
class Plan:
    """The optimal placement under a budget, next to the usual policies."""

    costs: ChainCosts
    budget: float
    best: Prediction | None  # None: nothing fits
    alternatives: dict[str, Prediction]  # "none", "full", "every-2", ..., "sqrt"

    @property
    def fits(self) -> bool:
        return self.best is not None

    @property
    def policy(self) -> Segments:
        if self.best is None:
            raise ValueError(f"nothing fits in {fmt_bytes(self.budget)}: {self.advice()}")
        return self.best.policy

    def best_every_k(self) -> tuple[str, Prediction] | None:
        """The every-K (full is every-1) that fits with the least recompute, if any."""
        fitting = [(name, p) for name, p in self.alternatives.items()
                   if (name == "full" or name.startswith("every-")) and p.peak_bytes <= self.budget]
        return min(fitting, key=lambda item: item[1].recompute_flops, default=None)

    def lowest_peak(self) -> tuple[str, Prediction]:
        return min(self.alternatives.items(), key=lambda kv: kv[1].peak_bytes)

    def advice(self) -> str:
        """Why nothing fits, with the numbers, and what to do."""
        c = self.costs
        fixed = c.param_bytes + c.optimizer_bytes
        if c.param_bytes >= self.budget:
            return (f"the parameters alone need {fmt_bytes(c.param_bytes)}, more than the budget "
                    f"{fmt_bytes(self.budget)}: no checkpoint policy can help. Shard parameters, "
                    f"gradients and optimizer state over several devices (FSDP / ZeRO-3) or "
                    f"offload them to CPU memory")
        name, low = self.lowest_peak()
        return (f"the lowest peak is {fmt_bytes(low.peak_bytes)} ({name}, at "
                f"{low.where}), {fmt_bytes(low.peak_bytes - self.budget)} over the budget; "
                f"parameters and optimizer state alone take {fmt_bytes(fixed)}. Use a smaller "
                f"micro-batch with gradient accumulation, offload, or shard")

    def table(self) -> list[dict]:
        """One row per policy compared, for printing or pandas."""
        rows = [("optimal", self.best)] if self.best is not None else []
        every = self.best_every_k()
        names = ["none", "full", "every-2", "sqrt"] + ([every[0]] if every else [])
        rows += [(n, self.alternatives[n]) for n in dict.fromkeys(names) if n in self.alternatives]
        return [dict(policy=n if n != "optimal" else f"optimal: {p.policy}",
                     peak_bytes=p.peak_bytes, fits=p.peak_bytes <= self.budget,
                     recompute_flops=p.recompute_flops, overhead=p.overhead, where=p.where)
                for n, p in rows]

    def report(self) -> str:
        c = self.costs
        layer = c.layers[0]
        tape = layer.kept_bytes + layer.input_bytes * layer.saves_input
        lines = [f"Plan for {c.name}: {c.n} blocks, budget {fmt_bytes(self.budget)}",
                 f"  parameters {fmt_bytes(c.param_bytes)}, optimizer state "
                 f"{fmt_bytes(c.optimizer_bytes)}, gradients of the blocks "
                 f"{fmt_bytes(c.gradient_bytes)}",
                 f"  block 0 keeps {fmt_bytes(tape)} plain, "
                 f"{fmt_bytes(layer.input_bytes)} (its input) checkpointed; forward "
                 f"{fmt_flops(layer.forward_flops)}; a plain step {fmt_flops(c.step_flops)}",
                 *(f"  ({note})" for note in c.notes), ""]
        head = f"  {'policy':<34} {'peak':>11}  {'fits':<4} {'recompute':>12} {'of a step':>9}"
        lines += [head, "  " + "-" * (len(head) - 2)]
        for r in self.table():
            lines.append(f"  {r['policy'][:34]:<34} {fmt_bytes(r['peak_bytes']):>11}  "
                         f"{'yes' if r['fits'] else 'no':<4} {fmt_flops(r['recompute_flops']):>12} "
                         f"{r['overhead']:>+9.1%}")
        lines.append("")
        if self.best is None:
            lines.append(f"Nothing fits: {self.advice()}.")
        else:
            b = self.best
            lines.append(f"Optimal: {b.policy} keeps {fmt_bytes(b.kept_bytes)} for backward; "
                         f"predicted peak {fmt_bytes(b.peak_bytes)} ({b.where}); recompute "
                         f"{fmt_flops(b.recompute_flops)} = {b.overhead:+.1%} of a plain step.")
        return "\n".join(lines)

    __str__ = report


def make_plan(costs: ChainCosts, budget) -> Plan:
    """The optimal placement under ``budget`` and the usual policies' predictions."""
    budget = parse_budget(budget)
    n = costs.n
    alternatives = {"none": predict(costs, "none"), "full": predict(costs, "full")}
    for k in range(2, n + 1):
        alternatives[f"every-{k}"] = predict(costs, every_k_placement(n, k))
    alternatives["sqrt"] = predict(costs, "sqrt")
    return Plan(costs, budget, optimal(costs, budget), alternatives)
