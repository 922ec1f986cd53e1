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
The peak is the largest; the DP adds up the same terms. The suffix may run checkpointed too
(a menu's ``suffix=full``, or ``suffix=selective:ops=...`` at op level; ``policies._Trunk``):
``measure_costs(..., suffix=True)`` measures the whole trunk under each such option
(``ChainCosts.suffixes``) the way it measures it as it is, so the terms above hold with that
trunk's numbers (its recompute, at the start of the suffix's backward, is inside the suffix's
backward peak); ``predict`` takes the trunk of the policy's suffix option, and ``optimal`` runs
the same DP once per option, adding the suffix's recompute (``_optimal_over_suffixes``).
Measured on the course's models, a checkpointed suffix keeps less for backward but peaks the
same (its backward starts by recomputing what it dropped), so it pays only where the suffix's
forward is the peak; what it keeps less counts against torch.compile's saved bytes
(``bench/planner_compile.py``). The prefix (embeddings) may run inside the checkpointed
segment at block 0 (``prefix=full``), which then keeps only the batch: x_0 and what the
embeddings save are not kept from forward to backward. Its chain is derived from what was
measured (``_prefix_inside``), where measuring found it exact: no op reads x_0 after block 0
returns and nothing holds it past the forward (the course's GPT, a learner's model written
``x = block(x)``, a Hugging Face Llama, Mistral or Qwen, whose forward holds ``inputs_embeds``
unread to the end of its decoder: the region frees it, ``policies._release_prefix_output``);
what something keeps all step of the prefix's tensors (HF position ids, in the wrapper's block
arguments) is measured as kept outside (``TrunkCost.prefix_kept_outside``). Anything else the
forward keeps outside the region refuses it (GPT-2's forward holds its token and position
embeddings in locals to its end: its prefix stays as it is). Assumptions: blocks run in
order, once each; a block's backward allocates nothing before it first reads a saved tensor
(true of the course models). A model whose loop adds the residual (``x = x + block(x)``) is
measured with that add in each block, and a block given a tensor that carries the model's graph (a
conditioning) with its gradient; checkpointed segments there are one block long
(``_segment_reach``). A checkpointed segment of frozen blocks only runs as plain
(``_frozen_plain``).
Against the meter (``measure_peaks``: AdamW steps on one batch, step 2 on) it is
exact to the byte for the tiny GPT (sdpa or naive attention, with or without dropout), Llama
and the hand-trace net, for every placement tried; tests check it. ``accumulate=True`` measures
a micro-batch after the first under gradient accumulation (every gradient already there), also
exact. ``sharding.shard`` (FSDP / ZeRO-3) and ``config_costs``' optimizer terms are estimates.
The measuring lives in ``costs.py`` (its docstring says what is measured); this module predicts
and plans. A block that returns its input (``nn.Identity``, ``Dropout(0)``) keeps nothing under
any option: the chain is planned and predicted without it. A block whose forward does not
replay (``LayerCost.replays``: its own generator, state its recompute changes) is never placed
in a checkpointed segment, nor in a nested tree. Speed: the DP keeps Pareto fronts
as numpy arrays with exact prunings (``_cheapest``), one of them a Lagrangian lower bound on
the cost to finish; 200 blocks that all differ, with the full menu, plan in about a second,
1,000 identical blocks in a few, with the full menu too (``bench/planner_scale.py``);
``nested_optimal`` fills int64 tables when block inputs have one size (256 blocks in a few
seconds). Nested trees are chosen by Griewank's stored inputs and get the step's peak by this
same memory model (``predict_nested``, exact against the meter on every tree tried); for a peak
budget, ``optimal_with_nesting`` prices every tree that nests by that peak against the
single-level optimum, so it never peaks higher or costs more where a single level fits.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass, replace

import numpy as np
from torch import nn

from .costs import (  # noqa: F401 (re-exported)
    FORWARD,
    Backward,
    ChainCosts,
    LayerCost,
    config_costs,
    measure_costs,
)
from .meter import parse_budget
from .policies import (
    MAX_NESTING,
    Menu,
    NoCheckpoint,
    Offload,
    Policy,
    Segments,
    Selective,
    SelectiveOps,
    _check_children,
    _Segmented,
    parse_policy,
)
from .train import train
from .units import fmt_bytes, fmt_flops

# ---------------------------------------------------------------- placements
# A placement: segments covering blocks 0..L-1 in order, each (start, stop, kind): kind False
# is a plain block, True a checkpointed segment, a string a one-block option of the menu
# (``costs.MENU``: "selective:save=mm,sdpa", "offload", ...), measured as a plain block; with
# ``measure_costs(..., op_points=N)`` also points of each block's exact Pareto set over which
# op outputs to keep ("selective:ops=3,12", ``op_choices``), measured and predicted alike.
Placement = tuple[tuple[int, int, bool | str], ...]


def _is_ckpt(kind) -> bool:
    return kind is True


def _as_plain(costs: ChainCosts, k: int, kind) -> LayerCost:
    """The LayerCost block k runs as outside a checkpoint: its own, or under its option."""
    return costs.menu[k][kind].layer if isinstance(kind, str) else costs.layers[k]


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
    return tuple((i, j) for i, j, c in placement if c is True)


def every_k_placement(n: int, k: int) -> Placement:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"every-K needs an integer K >= 1, got {k!r}")
    return placement_from_checkpointed(n, [(i, min(i + k, n)) for i in range(0, n, k)])


def all_placements(n: int, options=None):
    """Every placement of ``n`` blocks (F(2n+1) of them, about 2.6^n): for brute force.
    ``options(k)``: the menu options block k may also take (a ChainCosts' menu: all of them,
    and only the checkpointed segments its model can run: ``_segment_reach``)."""
    if isinstance(options, ChainCosts):
        reach, menu = _segment_reach(options), options.menu
        options = (lambda k: tuple(menu[k])) if menu else None
        for placement in all_placements(n, options):
            if all(kind is not True or j <= reach[i] for i, j, kind in placement):
                yield placement
        return
    if n == 0:
        yield ()
        return
    for rest in all_placements(n - 1, options):  # extend a placement of blocks 0..n-2
        yield (*rest, (n - 1, n, False))
        yield (*rest, (n - 1, n, True))
        if rest and rest[-1][2] is True:
            yield (*rest[:-1], (rest[-1][0], n, True))
        for option in options(n - 1) if options else ():
            yield (*rest, (n - 1, n, option))



# ---------------------------------------------------------------- the objective
def _extra_s(costs: ChainCosts, k: int, option: str) -> tuple[float, float]:
    """(median, spread) of block k's measured extra seconds under ``option`` over plain: the
    median difference, and both spreads added (``costs.spreads``; 0 where not measured)."""
    times = costs.times[k]
    if option == FORWARD and FORWARD not in times:  # times given without it: a one-block
        option = "full"  # checkpoint's price (what it was before)
    if option == FORWARD:  # re-run in full inside a longer segment: its own forward's time
        return times[FORWARD], costs.spreads[k][FORWARD] if costs.spreads else 0.0
    spread = costs.spreads[k][option] + costs.spreads[k]["none"] if costs.spreads else 0.0
    return times[option] - times["none"], spread


def _extra_ns(costs: ChainCosts, k: int, option: str) -> int:
    """Measured extra nanoseconds of block k under ``option`` over plain, priced at the high end
    of what was measured (the median difference plus both spreads, ``costs.spreads``), so that
    an option wins over another only by more than the noise of the measurement; and at least
    1: an option does all plain does and more, so a difference at or below zero is noise, and
    plain must still win the tie (clipped to 0, offload everywhere would tie with no
    checkpointing and win on its lower peak)."""
    median, spread = _extra_s(costs, k, option)
    return max(1, round((median + spread) * 1e9))


def _timed_blocks(seg) -> list[tuple[int, str]]:
    """(block, option) whose measured time a segment's extra time adds up: a checkpointed
    segment re-runs its blocks but the last in full (``FORWARD``: their forwards' measured
    times) and its last block up to its last save, with the checkpoint's own work (its extra
    time under full); a one-block option, its own; a plain block, nothing."""
    i, j, kind = seg
    if kind is False:
        return []
    if isinstance(kind, str):
        return [(i, kind)]
    return [*((k, FORWARD) for k in range(i, j - 1)), (j - 1, "full")]


def segment_time_ns(costs: ChainCosts, seg) -> int:
    """The time objective: a segment's extra step time over plain, from the per-block times of
    ``costs.times``, each priced at its high end (``_extra_ns``)."""
    return sum(_extra_ns(costs, k, option) for k, option in _timed_blocks(seg))


def placement_time(costs: ChainCosts, placement) -> tuple[float | None, float | None]:
    """The time model's prediction for a placement (or a list of its segments): (median extra
    seconds over plain, the spread of the measurements around it, added up), so a report
    shows both, not their sum that the objective prices; (None, None) if not timed."""
    if not costs.times:
        return None, None
    parts = [_extra_s(costs, k, option) for seg in placement for k, option in _timed_blocks(seg)]
    return sum(m for m, _ in parts), sum(s for _, s in parts)


def segment_flops(costs: ChainCosts, seg) -> int:
    """Recomputed FLOPs, in 1/1024 FLOP. Each selective option adds 1/1024 FLOP, so that a tie
    (a variant that recomputes only ops the counter gives no FLOPs, such as GELU) goes to the
    plain block. FLOPs cannot price a copy, and at zero FLOPs offload would win everywhere, so
    offload is the last resort: each offloaded block costs more than all the recompute the
    chain could ever do, so the plan offloads only where nothing else fits, and then as few
    blocks as it can (the time objective prices offload by its measured time)."""
    if isinstance(seg[2], str) and seg[2].startswith("offload"):
        return _flops_ceiling(costs)
    return segment_recompute_flops(costs, seg) * 1024 + isinstance(seg[2], str)


_CEILINGS: dict[int, tuple[ChainCosts, int]] = {}


def _flops_ceiling(costs: ChainCosts) -> int:
    """More than any placement's recompute in ``segment_flops``' units (cached per chain)."""
    cached = _CEILINGS.get(id(costs))
    if cached is None or cached[0] is not costs:
        most = sum(max([c.forward_flops, *(o.recompute_flops for o in options.values())])
                   for c, options in zip(costs.layers, costs.menu or [{}] * costs.n,
                                         strict=True))
        cached = _CEILINGS[id(costs)] = (costs, 1024 * most + costs.n + 1)
        while len(_CEILINGS) > 8:
            _CEILINGS.pop(next(iter(_CEILINGS)))
    return cached[1]


OBJECTIVES = {"flops": segment_flops, "time": segment_time_ns}


def objective_fn(costs: ChainCosts, objective=None):
    """``"time"`` (the default when ``costs.times`` were measured), ``"flops"``, or a function
    ``(costs, segment) -> int`` (None: the segment is not an option): what the planner
    minimises, added up over segments."""
    if objective is None:
        objective = "time" if costs.times else "flops"
    if callable(objective):
        return objective
    if objective not in OBJECTIVES:
        raise ValueError(f"objective is 'time' or 'flops' (or a function of (costs, segment)), "
                         f"not {objective!r}")
    if objective == "time" and not costs.times:
        raise ValueError("the time objective needs measured times: measure_costs(..., "
                         "times=True), or use objective='flops'")
    return OBJECTIVES[objective]


def placement_cost(costs: ChainCosts, placement, objective=None) -> float:
    """The objective added up over the segments (infinite if one is not an option)."""
    cost = objective_fn(costs, objective)
    placement = as_placement(costs.n, placement)
    if _checkpoints_unreplayable(costs, placement):
        return math.inf
    values = [cost(costs, seg) for seg in placement]
    return math.inf if None in values else sum(values)


def _checkpoints_unreplayable(costs: ChainCosts, placement: Placement) -> bool:
    """Does a checkpointed segment hold a block whose forward does not replay
    (``LayerCost.replays``: its recompute would train differently from plain)?"""
    return any(kind is True and not all(c.replays for c in costs.layers[i:j])
               for i, j, kind in placement)


# ---------------------------------------------------------------- the memory model
# An event is one moment the model predicts: (live bytes, phase, block, detail). Segment events
# leave out Kept(<s), what the segments before keep, which predict() and the DP add.
Event = tuple[int, str, int, str]


def _left_holds(costs: ChainCosts, prev, k: int) -> bool:
    """Is x_k kept by what runs before it: a plain block that saves its output (ReLU), or, for
    x_0, the prefix or the caller (a batch made outside the meter)?"""
    if k == 0:
        return costs.trunk.prefix_keeps_input
    return prev[2] is not True and _as_plain(costs, k - 1, prev[2]).saves_output


def _boundary_bytes(costs: ChainCosts, k: int) -> int:
    """Bytes of x_k, the input of block k (x_L: the last block's output), as the meter counts."""
    if k == 0 and not costs.trunk.input_counted:
        return 0
    return costs.layers[k].input_bytes if k < costs.n else costs.layers[-1].output_bytes


def segment_kept(costs: ChainCosts, seg, left_held: bool) -> int:
    """Bytes segment ``seg`` keeps from its forward to its backward: its input if no block before
    keeps it (a checkpoint always keeps it; a plain block if it saves it), and a plain block's
    tape."""
    i, j, kind = seg
    x = 0 if left_held else _boundary_bytes(costs, i)
    if kind is True:
        return x
    c = _as_plain(costs, i, kind)
    return x * c.saves_input + c.kept_bytes


def segment_recompute_flops(costs: ChainCosts, seg) -> int:
    """A checkpointed segment re-runs its blocks' forwards; the last one stops at its last save."""
    i, j, kind = seg
    if isinstance(kind, str):
        return costs.menu[i][kind].recompute_flops
    if not kind:
        return 0
    return sum(c.forward_flops for c in costs.layers[i:j - 1]) + costs.layers[j - 1].recompute_flops


def segment_events(costs: ChainCosts, seg, left_held: bool) -> list[Event]:
    """The peak moments of segment ``seg``'s forward and backward, minus Kept(<seg)."""
    i, j, kind = seg
    ckpt = kind is True
    layers, trunk = costs.layers, costs.trunk
    x_i = 0 if left_held else _boundary_bytes(costs, i)
    label = kind if isinstance(kind, str) else ""
    # forward: parameters, optimizer state, the prefix's tape, x_i, then the block(s)
    t = trunk.base_bytes + trunk.prefix_kept + x_i
    if not ckpt:
        events = [(t + _as_plain(costs, i, kind).forward_peak, "forward", i, label)]
    else:
        events = [(t + (_boundary_bytes(costs, k) if k > i else 0)
                   + layers[k].forward_peak_unsaved, "forward", k, "checkpointed")
                  for k in range(i, j)]
    # backward starts with: what forward left minus what the segments after gave back, i.e.
    # base + prefix + suffix's leftovers + Kept(<s) + kept(s) + their gradients + grad of x_j
    t = (trunk.base_bytes + trunk.prefix_kept + trunk.suffix_left + segment_kept(
        costs, seg, left_held) + _left_by(layers[j:]) + _boundary_bytes(costs, j))
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
        if ckpt:  # x_i: kept by the block before, or by the checkpoint alone; x_k inside:
            # kept if the block below saves it; all but the last were recomputed whole
            held = left_held if k == i else layers[k - 1].saves_output
            back = c.segment_backward(k == i, k == j - 1)
        else:
            held, back = left_held, _as_plain(costs, k, kind).backward
        events.append((t + back.peak(held), "backward", k, "checkpointed" if ckpt else label))
        t += back.change(held)
    return events


def _left_by(layers) -> int:
    """What these blocks' backwards leave until the prefix's backward: their parameters'
    gradients, and those of the model's graph-carrying arguments they were the last to get."""
    return sum(c.grad_bytes + c.extra_grad_bytes for c in layers)


def trunk_events(costs: ChainCosts, kept_all: int, last_left_held: bool) -> list[Event]:
    """Prefix forward, suffix forward and backward, prefix backward, optimizer step."""
    trunk, layers = costs.trunk, costs.layers
    base, held = trunk.base_bytes, last_left_held
    x_last = 0 if held else _boundary_bytes(costs, costs.n)
    t = base + trunk.prefix_kept + kept_all + x_last
    grads = costs.gradient_bytes
    prefix_back = trunk.prefix_kept if trunk.prefix_backward_kept < 0 else \
        trunk.prefix_backward_kept  # prefix=full: its saved tensors are back by then
    after = base + prefix_back + trunk.suffix_left + grads + sum(c.extra_grad_bytes
                                                                 for c in layers)
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
    return f"{phase} of block {k}" + (f" ({detail})" if detail else "")


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
    extra_time_s: float | None = None  # the time model's extra seconds over plain (median)
    host_bytes: int = 0  # what offloaded blocks copy to host memory
    extra_time_spread_s: float | None = None  # how far the measured times spread around it
    suffix: str = ""  # how the suffix runs: "" as it is, "full", "selective:ops=..."
    prefix: str = ""  # "full": the prefix runs inside the checkpointed segment at block 0

    @property
    def policy(self) -> Policy:
        """``segments:...`` when every block is plain or checkpointed and the trunk runs as
        it is, else ``menu:...`` (with ``prefix=``, ``suffix=``)."""
        return placement_policy(self.placement, self.suffix, self.prefix)

    @property
    def overhead(self) -> float:
        """Recomputed FLOPs / FLOPs of a plain step."""
        return self.recompute_flops / self.step_flops if self.step_flops else 0.0


def predict(costs: ChainCosts, placement) -> Prediction:
    """The memory model for one placement (or policy): peak live bytes, where, recompute. A
    policy's ``suffix=`` option (``menu:0-3=full,suffix=full``) is predicted with the trunk
    measured under it (``ChainCosts.suffixes``); a placement runs the suffix ``costs.trunk``
    was measured with (as it is, unless ``with_trunk`` chose another)."""
    check_costs(costs)
    if isinstance(placement, (str, Policy)):
        policy = parse_policy(placement)
        costs = with_trunk(costs, getattr(policy, "suffix", ""), getattr(policy, "prefix", ""))
    placement = as_placement(costs.n, placement)
    if costs.trunk.prefix and placement[0][2] is False:
        raise ValueError("prefix=full runs the prefix inside the checkpointed segment at block "
                         "0: checkpoint a segment starting at block 0 (or give block 0 a "
                         "selective:ops= option)")
    folded = _folded(costs)
    if folded is not None:  # blocks that return their input: predicted on the chain without
        short, real = folded
        p = predict(short, _fold_placement(placement, real))
        top = _unfold_event((p.peak_bytes, p.phase, p.block, p.where), real, costs.n)
        return replace(p, placement=placement, block=top[2], where=_unfold_where(p, real))
    _check_segments_run(costs, placement)
    placement = _frozen_plain(costs, placement)
    for k, _, kind in placement:
        if isinstance(kind, str) and (not costs.menu or kind not in costs.menu[k]):
            raise ValueError(f"block {k} runs {kind}, an option these costs did not measure: "
                             "measure them with measure_costs(..., menu=MENU), or use a "
                             "whole-block policy (none, full, every-K, sqrt, segments:...)")
    events, kept, flops, prev = [], 0, 0, None  # (costs under prefix=full: _prefix_inside)
    for seg in placement:
        left = _left_holds(costs, prev, seg[0])
        events += [(e[0] + kept, *e[1:]) for e in segment_events(costs, seg, left)]
        kept += segment_kept(costs, seg, left)
        flops += segment_recompute_flops(costs, seg)
        prev = seg
    last_held = _left_holds(costs, prev, costs.n) if prev is not None else True
    events += trunk_events(costs, kept, last_held)
    top = max(events, key=lambda e: e[0])
    extra, spread = placement_time(costs, placement)
    host = sum(costs.menu[i][kind].host_bytes for i, _, kind in placement
               if isinstance(kind, str))
    flops += costs.trunk.recompute_flops
    return Prediction(placement, top[0], describe_event(top), top[1], top[2], flops, kept,
                      costs.step_flops, extra, host, spread, costs.trunk.suffix,
                      costs.trunk.prefix)


def _segment_reach(costs: ChainCosts) -> list[int]:
    """Per block i, the last stop j of a checkpointed segment starting there that the model can
    run and the memory model predicts: a segment ends at a block whose output the model adds
    to its input (``LayerCost.residual``), since the next block gets that sum, not the block's
    output, and before a block given a tensor that carries the model's graph
    (``LayerCost.given_graph``) or run under another autocast (a segment recomputes every
    block under its first block's). One pass from the end."""
    reach, layers = [costs.n] * costs.n, costs.layers
    for i in range(costs.n - 2, -1, -1):
        ends = layers[i].residual or layers[i + 1].given_graph or \
            layers[i].autocast != layers[i + 1].autocast
        reach[i] = i + 1 if ends else reach[i + 1]
    return reach


def _frozen_plain(costs: ChainCosts, placement: Placement) -> Placement:
    """A checkpointed segment of frozen blocks only (``LayerCost.frozen``) records no graph:
    it runs as plain blocks, keeping and recomputing nothing more."""
    out = []
    for i, j, kind in placement:
        if kind is True and all(c.frozen for c in costs.layers[i:j]):
            out += [(k, k + 1, False) for k in range(i, j)]
        else:
            out.append((i, j, kind))
    return tuple(out)


def _check_segments_run(costs: ChainCosts, placement: Placement) -> None:
    reach = _segment_reach(costs)
    for i, j, kind in placement:
        if kind is True and j > reach[i]:
            k = reach[i] - 1
            why = (f"whose output the model adds to its input (x = x + block(x)): block {k + 1} "
                   f"gets that sum, so a segment there cannot run" if costs.layers[k].residual
                   else f"and block {k + 1} runs under another torch.autocast, which a segment's "
                   f"recompute would not" if costs.layers[k].autocast !=
                   costs.layers[k + 1].autocast
                   else f"and block {k + 1} gets a tensor that carries the model's graph, which "
                   f"a segment keeps to the end of the step (not predicted)")
            raise ValueError(f"checkpointed segment {i}-{j - 1} runs past block {k}, {why}; "
                             f"checkpoint one block per segment (full), or use selective or "
                             f"offload")


def placement_policy(placement: Placement, suffix: str = "", prefix: str = "") -> Policy:
    """A placement (and how the trunk runs) as a policy string every command accepts."""
    if all(isinstance(kind, bool) for _, _, kind in placement) and not suffix and not prefix:
        return Segments(checkpointed(placement))
    return Menu(tuple((i, j, "full" if kind is True else kind, ())
                      for i, j, kind in placement if kind is not False), suffix, prefix)


def with_trunk(costs: ChainCosts, suffix: str = "", prefix: str = "") -> ChainCosts:
    """``costs`` with the trunk measured under suffix option ``suffix`` ("" as it is, "full",
    "selective:ops=...") as ``costs.trunk`` (the other measured trunks stay in ``suffixes``),
    and with ``prefix="full"`` the chain as it runs with the prefix inside the checkpointed
    segment at block 0 (``_prefix_inside``)."""
    if costs.trunk.prefix:
        raise ValueError("these costs already have the prefix inside block 0's checkpoint")
    trunks = (costs.trunk, *costs.suffixes)
    chosen = next((t for t in trunks if t.suffix == suffix), None)
    if chosen is None:
        measured = ", ".join(repr(t.suffix) for t in trunks)
        raise ValueError(f"suffix={suffix} was not measured (measured: {measured}): measure "
                         f"with measure_costs(..., suffix=True), or leave the suffix out")
    if chosen is not costs.trunk:
        costs = replace(costs, trunk=chosen, suffixes=tuple(t for t in trunks
                                                             if t is not chosen))
    if not prefix:
        return costs
    if not costs.trunk.prefix_recomputable or _folded(costs) is not None:
        raise ValueError("prefix=full was not measured as exact on this model (its x_0 "
                         "outlives block 0, or the prefix keeps something outside block 0's "
                         "checkpoint; measure_costs(..., suffix=True) checks): leave it out")
    return _prefix_inside(costs)


def _prefix_inside(costs: ChainCosts) -> ChainCosts:
    """The chain with the prefix inside the checkpointed segment at block 0 (``prefix=full``),
    in the terms of the memory model, from what was measured: the segment keeps nothing (x_0
    is the prefix's output, alive only while block 0 runs; the prefix's saved tensors S are
    the region's), so ``prefix_kept`` is 0 until the segment's recompute, which runs the
    prefix first (its forward's peak) and leaves S and x_0 (x_0 stays only if block 0 saves
    it, and then dies in block 0's backward: the checkpointed backward "free"); S stays to the
    prefix's backward. Block 0's numbers are used only as the first block of that segment
    (the objective refuses any other first segment: ``_first_checkpointed``)."""
    trunk, first = costs.trunk, costs.layers[0]
    # the batch's own storage, and what later blocks keep of the prefix's: all step, inside
    # or not
    views = trunk.prefix_batch_views + trunk.prefix_kept_outside
    x0, kept, again = first.input_bytes, trunk.prefix_kept - views, trunk.prefix_peak
    stays = kept + x0 * first.saves_input
    back = first.checkpointed_backward
    first = replace(
        first, forward_peak_unsaved=first.forward_peak_unsaved + x0,
        forward_peak=max(again, kept + x0 + first.forward_peak),
        recompute_peak=max(again, kept + x0 + first.recompute_peak),
        saved_bytes=first.saved_bytes + stays, recompute_kept=first.recompute_kept + stays,
        checkpointed_backward=replace(back, peak_held=back.peak_free,
                                      change_held=back.change_free),
        first_backward=None,  # x_0 is made inside the region: the line above, as held
        interior_backward=None, interior_first_backward=None,
        forward_flops=first.forward_flops + trunk.prefix_forward_flops,
        recompute_flops=first.recompute_flops + trunk.prefix_forward_flops)
    trunk = replace(trunk, prefix="full", prefix_kept=views, prefix_keeps_input=True,
                    prefix_backward_kept=kept + views,
                    flops=trunk.flops - trunk.prefix_forward_flops)
    return replace(costs, layers=(first, *costs.layers[1:]), trunk=trunk, suffixes=(),
                   menu=costs.menu and (_options_with_prefix(costs), *costs.menu[1:]),
                   times=(), spreads=())


def _options_with_prefix(costs: ChainCosts) -> dict:
    """Block 0's op-level options (``selective:ops=``) with the prefix inside their region
    (``prefix=full``), re-keyed by their positions counted from the prefix's first op
    (``TrunkCost.prefix_ops``). Each is a plain block in the memory model: the region keeps
    the batch, not x_0 (x_0 lives while block 0 runs and dies when it returns; the prefix's
    saved tensors S are not kept either, SAC recomputes them); its backward first recomputes
    the prefix (its forward's peak, and S and x_0 from then on), then block 0's own ops as
    under the option, freeing x_0 at its end (the option's backward "free", x_0 now made in
    it); S stays to the prefix's backward. Other options (named selective, offload) would
    act on the prefix's ops too: left out; so are all where the prefix draws random numbers
    (its first draw would decide block 0's random ops)."""
    trunk, x0 = costs.trunk, costs.layers[0].input_bytes
    kept = trunk.prefix_kept - trunk.prefix_batch_views - trunk.prefix_kept_outside
    again, flops = trunk.prefix_peak, trunk.prefix_forward_flops
    out = {}
    if trunk.prefix_ops < 0:  # the prefix draws random numbers (``op_choices.prefix_ops``)
        return out
    for option, cost in costs.menu[0].items():
        policy = parse_policy(option)
        if not isinstance(policy, SelectiveOps):
            continue
        layer, back = cost.layer, cost.layer.backward
        peak = max(again, kept + x0 + back.peak_free)
        change = back.change_free + x0 + kept
        layer = replace(layer, forward_peak=layer.forward_peak + x0,
                        backward=Backward(peak, peak, change, change),
                        forward_flops=layer.forward_flops + flops)
        shifted = SelectiveOps(indices=tuple(k + trunk.prefix_ops for k in policy.indices))
        out[str(shifted)] = replace(cost, layer=layer, recompute_flops=cost.recompute_flops + flops)
    return out


def _first_checkpointed(cost):
    """``cost`` for a chain under ``prefix=full``: a first segment that is not checkpointed is
    no option."""
    def first_checkpointed(costs, seg):  # (block 0's options are _options_with_prefix's)
        refused = seg[2] is False or isinstance(seg[2], str) and seg[2] not in costs.menu[0]
        return None if seg[0] == 0 and refused else cost(costs, seg)

    return first_checkpointed


def as_placement(n: int, placement) -> Placement:
    """A placement from a placement, a whole-block policy, or its string like "every-2"."""
    if isinstance(placement, (str, Policy)):
        policy = parse_policy(placement)
        if isinstance(policy, (Selective, Offload)):  # everywhere: a menu with one option
            policy = Menu(tuple((k, k + 1, str(policy), ()) for k in range(n)))
        if isinstance(policy, Menu):
            if any(children for *_, children in policy.items):
                raise ValueError(f"{policy} nests; nested placements are planned by "
                                 f"nested_optimal and predicted by predict_nested")
            policy.segment_policies(n)  # blocks beyond the model: one line naming the fix
            kinds = {i: (j, True if o == "full" else o) for i, j, o, _ in policy.items}
            out, k = [], 0
            while k < n:
                j, kind = kinds.get(k, (k + 1, False))
                out.append((k, j, kind))
                k = j
            return as_placement(n, out)
        if not isinstance(policy, (Segments, _Segmented, NoCheckpoint)):
            raise ValueError(f"the planner models none, full, every-K, sqrt, segments:..., "
                             f"selective:..., offload and menu:..., not {policy}")
        return placement_from_checkpointed(n, [(r.start, r.stop) for r in policy.segments(n)])
    placement = tuple((int(a), int(b), c if isinstance(c, str) else bool(c))
                      for a, b, c in placement)
    i = 0
    for a, b, _ in placement:
        if a != i or b <= a:
            raise ValueError(f"a placement covers blocks 0..{n - 1} with consecutive segments "
                             f"(start, stop, checkpointed); got {placement}")
        i = b
    if i != n:
        raise ValueError(f"the placement covers {i} blocks; the model has {n}")
    return placement


# ---------------------------------------------------------------- blocks that pass through
# A block that returns its input itself (nn.Identity, Dropout(0)) saves nothing and makes no new
# tensor: x_{k+1} is x_k. Under any policy it keeps nothing (a checkpoint whose region saves
# nothing keeps no input either), so the chain is planned and predicted without it; a segment
# of several blocks that includes it recomputes it for free.
def _folded(costs: ChainCosts) -> tuple[ChainCosts, tuple[int, ...]] | None:
    """The chain without its pass-through blocks and the indices of the blocks kept; None if
    there are none."""
    real = tuple(k for k, c in enumerate(costs.layers) if not c.returns_input)
    if len(real) == costs.n:
        return None
    if not real:
        raise ValueError("every block returns its input (nn.Identity, Dropout(0), ...): there "
                         "is nothing to checkpoint; plan a chain with at least one block that "
                         "computes its output")
    return replace(costs, layers=tuple(costs.layers[k] for k in real),
                   menu=tuple(costs.menu[k] for k in real) if costs.menu else (),
                   times=tuple(costs.times[k] for k in real) if costs.times else (),
                   spreads=tuple(costs.spreads[k] for k in real) if costs.spreads else ()), real


def _fold_placement(placement: Placement, real: tuple[int, ...]) -> Placement:
    """A placement of the whole chain as one of the chain without pass-through blocks: a segment
    of pass-through blocks only is dropped (it keeps nothing under any option)."""
    index = {k: m for m, k in enumerate(real)}
    out = []
    for i, j, kind in placement:
        inside = [index[k] for k in range(i, j) if k in index]
        if inside:
            out.append((inside[0], inside[-1] + 1, kind))
    return tuple(out)


def _unfold_placement(placement: Placement, real: tuple[int, ...], n: int) -> Placement:
    """The inverse: each segment spans its first to its last real block; the pass-through
    blocks between segments run plain."""
    out, k = [], 0
    for a, b, kind in placement:
        i, j = real[a], real[b - 1] + 1
        out += [(m, m + 1, False) for m in range(k, i)] + [(i, j, kind)]
        k = j
    return tuple(out + [(m, m + 1, False) for m in range(k, n)])


def _unfold_event(event: Event, real: tuple[int, ...], n: int) -> Event:
    live, phase, k, detail = event
    return live, phase, real[k] if 0 <= k < len(real) else (n if k >= 0 else k), detail


def _unfold_where(p: Prediction, real: tuple[int, ...]) -> str:
    """The folded prediction's words with the real block numbers."""
    import re

    def number(match):
        k = int(match[2])
        return match[1] + str(real[k] if k < len(real) else k)

    where = re.sub(r"(block )(\d+)", number, p.where)
    return re.sub(r"(segment )(\d+)-(\d+)", lambda m: f"segment {real[int(m[2])]}-"
                  f"{real[int(m[3])]}", where)


# ---------------------------------------------------------------- the dynamic program
def optimal(costs: ChainCosts, budget, objective=None) -> Prediction | None:
    """The placement with the least ``objective`` (predicted extra time by default when
    ``costs.times`` were measured, else recomputed FLOPs; see ``objective_fn``) whose predicted
    peak fits ``budget`` (bytes, or a string like "40MiB"), and among those the lowest peak;
    None if none fits. Every block may be plain, in a checkpointed segment, or (``costs.menu``)
    under one of its menu's options. Exact for the memory model. The DP below finds the least
    cost; asking it again just under the peak it found, until the cost goes up, gives the lowest
    peak at that cost (the DP's states know kept bytes, not the peak so far, so it cannot break
    the tie itself)."""
    return _optimal(check_costs(costs), parse_budget(budget), objective)


def _optimal(costs: ChainCosts, budget: float, objective=None) -> Prediction | None:
    """``optimal`` with the budget already parsed (bytes)."""
    if costs.suffixes:
        return _optimal_over_suffixes(costs, budget, objective)
    cost, table = objective_fn(costs, objective), {}
    folded = _folded(costs)
    if folded is not None:
        short, real = folded
        best = _optimal(short, budget, cost)
        return None if best is None else predict(
            costs, _unfold_placement(best.placement, real, costs.n))
    chain = table["chain"] = _Chain(costs, cost)
    bound = None
    if chain.nonnegative:  # a quick feasible placement bounds the exact search's costs
        for beam in (16, 128):  # each tighter than the last, and faster for its bound
            rough = _cheapest(costs, budget, cost, table, bound, beam)
            bound = None if rough is None else placement_cost(costs, rough.placement, cost)
            if bound is not None and chain.near_least(bound, budget):
                break
    best = _cheapest(costs, budget, cost, table, bound)
    while best is not None:
        least = placement_cost(costs, best.placement, cost)
        lower = _cheapest(costs, best.peak_bytes - 1, cost, table,
                          least if chain.nonnegative else None)
        if lower is None or placement_cost(costs, lower.placement, cost) > least:
            return best
        best = lower
    return None


def _optimal_over_suffixes(costs: ChainCosts, budget: float, objective=None):
    """The best plan over the ways the suffix can run (``costs.suffixes``): the chain's DP,
    unchanged, once per measured trunk, each plan's cost plus its suffix's (FLOPs objective:
    the suffix's recompute, plus 1/1024 FLOP so that a tie goes to the suffix as it is), the
    least cost and then the lowest peak kept. The time objective and objective functions
    price only the blocks, so they plan with ``costs.trunk`` alone."""
    cost = objective_fn(costs, objective)
    best = None
    for trunk, variant, price in _trunk_variants(costs, cost):
        found = _optimal(variant, budget, price)
        if found is None:
            continue
        total = placement_cost(variant, found.placement, price) + _suffix_price(trunk)
        if best is None or (total, found.peak_bytes) < best[0]:
            best = ((total, found.peak_bytes), found)
    return None if best is None else best[1]


def _trunk_variants(costs: ChainCosts, cost):
    """(trunk, chain, objective) per way the trunk can run: each measured suffix option, each
    with the prefix as it is and, where measured exact, inside block 0's checkpoint. Only
    the FLOPs objective prices them; the others plan with ``costs.trunk`` alone."""
    trunks = (costs.trunk, *costs.suffixes) if cost is segment_flops else (costs.trunk,)
    for trunk in trunks:
        variant = replace(costs, trunk=trunk, suffixes=())
        yield trunk, variant, cost
        if cost is segment_flops and trunk.prefix_recomputable and _folded(variant) is None:
            yield trunk, _prefix_inside(variant), _first_checkpointed(cost)


def _suffix_price(trunk) -> int:
    """A checkpointed suffix in ``segment_flops``' units (1/1024 FLOP, plus one)."""
    return trunk.recompute_flops * 1024 + 1 if trunk.suffix else 0


def _segments_from(costs: ChainCosts, i: int):
    """Every one-block segment the DP may start at block i: plain and each option (the
    checkpointed segments i..j-1 come from ``_Chain.checkpointed``, all j at once)."""
    yield (i, i + 1, False)
    for option in costs.menu[i] if costs.menu else ():
        yield (i, i + 1, option)


_NONE = -(2**62)  # "no moment yet" in int64 running maxima
_ROUNDING = 1e-9  # float64 sums of bounds: a relative allowance far above their rounding


def _finite_abs(a: np.ndarray) -> np.ndarray:
    """|a|, 0 where a is infinite (a state no way finishes from: its bound stays infinite)."""
    return np.abs(np.where(np.isfinite(a), a, 0.0))


class _Chain:
    """The DP's view of a chain for one objective, the same for every budget (so ``optimal``
    builds it once): from each state (i, left) the one-block moves, as (segment, highest
    moment, kept bytes, cost, next state), and the checkpointed segments [i, j) for every j
    as numpy arrays (highest moment, cost), in O(L) numpy operations per state:
    ``segment_events``' moments as running maxima over prefix sums, the same sums term by term
    (a test holds the two together)."""

    def __init__(self, costs: ChainCosts, cost):
        self.costs, self.cost, n = costs, cost, costs.n
        layers = costs.layers
        self.bb = np.array([_boundary_bytes(costs, k) for k in range(n + 1)], np.int64)

        def column(f, dtype=np.int64):
            return np.array([f(c) for c in layers], dtype)

        self.fpu, self.fp = column(lambda c: c.forward_peak_unsaved), column(
            lambda c: c.forward_peak)
        self.rp, self.rk = column(lambda c: c.recompute_peak), column(lambda c: c.recompute_kept)
        self.grow = column(lambda c: c.kept_bytes + c.output_bytes * (not c.saves_output))
        self.si, self.so = column(lambda c: c.saves_input, bool), column(
            lambda c: c.saves_output, bool)
        # each block's backward in a checkpointed segment: (first, last) -> held -> numbers
        self.peak, self.change = {}, {}
        for first, last in itertools.product((False, True), repeat=2):
            back = [c.segment_backward(first, last) for c in layers]
            self.peak[first, last] = {h: np.array([b.peak(h) for b in back], np.int64)
                                      for h in (False, True)}
            self.change[first, last] = {h: np.array([b.change(h) for b in back], np.int64)
                                        for h in (False, True)}
        grads = np.array([_left_by([c]) for c in layers] + [0], np.int64)
        self.grads_after = np.cumsum(grads[::-1])[::-1]  # gradients of blocks >= j
        # per block: how many blocks up to it cannot run inside a checkpoint (LayerCost.replays)
        self.unreplayed = np.cumsum(column(lambda c: not c.replays, np.int64))
        self.ff = column(lambda c: c.forward_flops, object)
        self.rf = column(lambda c: c.recompute_flops, object)
        self.one = {}
        self.ckpt = {}
        self.reach = _segment_reach(costs)
        self.frozen = column(lambda c: c.frozen, bool)
        for i in range(n):
            for left in (False, True):
                self.one[i, left] = [
                    (seg, max(e[0] for e in segment_events(costs, seg, left)),
                     segment_kept(costs, seg, left), extra, (i + 1, _left_holds(costs, seg, i + 1)))
                    for seg in _segments_from(costs, i) if (extra := cost(costs, seg)) is not None]
                self.ckpt[i, left] = self._checkpointed(i, left)
        self.need = self._least_need()
        self.dtype = self._dtype()
        # segment kinds by number, for the pool: 0 checkpointed, 1 plain, then the options
        self.kind_names = [True, False, *dict.fromkeys(
            seg[2] for moves in self.one.values() for seg, *_ in moves if seg[2] is not False)]
        self.kinds = {name: k for k, name in enumerate(self.kind_names)}
        self.ckpt = {state: (stops, tops, np.array(prices, self.dtype), x_i)
                     for state, (stops, tops, prices, x_i) in self.ckpt.items()}
        self.nonnegative = all(e >= 0 for moves in self.one.values() for *_, e, _ in moves) \
            and all((prices >= 0).all() for *_, prices, _ in self.ckpt.values())

    def _checkpointed(self, i: int, left: bool):
        """(stops j, highest moments, costs, kept bytes) of the checkpointed segments [i, j)."""
        n, trunk = self.costs.n, self.costs.trunk
        k = np.arange(i, n)
        inner = k > i
        x_i = 0 if left else int(self.bb[i])
        base = trunk.base_bytes + trunk.prefix_kept
        fwd = np.maximum.accumulate(np.where(inner, self.bb[i:n], 0) + self.fpu[i:])
        prior_saves_out = np.concatenate([[True], self.so[i:n - 1]])  # block k-1 keeps x_k
        drop = inner & ~(self.si[i:] | prior_saves_out)
        x_k = np.where(drop, self.bb[i:n], 0)
        d = np.concatenate([[0], np.cumsum(self.grow[i:] - x_k)[:-1]])  # recompute's bytes
        plain_fwd = d + self.fp[i:]  # block k's moment when it is not the segment's last
        rec = np.concatenate([[_NONE], np.maximum.accumulate(plain_fwd)[:-1]])
        last = np.maximum(rec, d + self.rp[i:])
        end = d + self.rk[i:] - x_k
        pk_last, ch_last = self._backward_numbers(i, left, prior_saves_out, True)
        pk_whole, ch_whole = self._backward_numbers(i, left, prior_saves_out, False)
        # segment [i, j): block j-1 (last) first, then blocks k < j-1, each recomputed whole:
        # at block k, pk_whole(k) + ch_last(j-1) + the changes of blocks k+1..j-2
        c = np.cumsum(ch_whole)
        before = np.maximum.accumulate(pk_whole - c)  # max over k <= m of pk_whole(k) - C(k)
        inner = np.concatenate([[_NONE], (ch_last[1:] + c[:-1] + before[:-1])])
        backward = np.maximum(pk_last, inner)
        t0 = base + trunk.suffix_left + x_i + self.grads_after[i + 1:] + self.bb[i + 1:]
        top = np.maximum.reduce([base + x_i + fwd, t0 + last, t0 + end + backward])
        prices = self._prices(i)
        unreplayed = self.unreplayed[i - 1] if i else 0
        usable = np.array([p is not None for p in prices], bool) & (
            self.unreplayed[i:] == unreplayed)  # [i, j) holds no block that cannot replay
        usable &= np.arange(i + 1, n + 1) <= self.reach[i]
        usable &= ~np.logical_and.accumulate(self.frozen[i:])  # frozen only: plain
        stops = np.arange(i + 1, n + 1)[usable]
        values = np.array([p for p, ok in zip(prices, usable, strict=True) if ok], object)
        return stops, top[usable], values, x_i

    def _backward_numbers(self, i: int, left: bool, prior_saves_out, last: bool):
        """(peak, change) of each block k >= i of a checkpointed segment starting at i, as its
        last block (``last``) or as one recomputed whole."""
        def pick(table, first):
            return np.where(prior_saves_out, table[first, last][True][i:],
                            table[first, last][False][i:])

        pk, ch = pick(self.peak, False), pick(self.change, False)
        pk[0], ch[0] = self.peak[True, last][left][i], self.change[True, last][left][i]
        return pk, ch

    def _prices(self, i: int) -> list:
        """The objective of each checkpointed segment [i, j), j = i+1..L: prefix sums for the
        built-in objectives, else the objective function itself."""
        costs, n, cost = self.costs, self.costs.n, self.cost
        if cost is segment_flops:
            ahead = np.concatenate([[0], np.cumsum(self.ff[i:])[:-1]])
            return [int(v) * 1024 for v in ahead + self.rf[i:]]
        if cost is segment_time_ns:  # blocks i..j-2 re-run whole, j-1 as a one-block checkpoint
            if getattr(self, "_times_ns", None) is None:
                self._times_ns = tuple(np.array([_extra_ns(costs, k, option) for k in range(n)],
                                                object) for option in (FORWARD, "full"))
            rerun, last = self._times_ns
            ahead = np.concatenate([[0], np.cumsum(rerun[i:n - 1])])
            return [int(v) for v in ahead + last[i:]]
        return [cost(costs, (i, j, True)) for j in range(i + 1, n + 1)]

    def _least_need(self) -> dict:
        """For each state, the fewest bytes above Kept that any way to finish the chain needs
        (its highest moment over every later segment and the trunk): a pair with Kept >
        budget - this can never finish, whatever the budget."""
        n = self.costs.n
        need = {(n, left): _trunk_need(self.costs, left)[1] for left in (False, True)}
        after = np.full(n + 1, np.inf)  # need[j, False], the state after a checkpoint
        after[n] = need[n, False]
        for i in range(n - 1, -1, -1):
            for left in (False, True):
                best = min((max(top, kept + need[nxt]) for _, top, kept, _, nxt in
                            self.one[i, left]), default=math.inf)
                stops, top, _, x_i = self.ckpt[i, left]
                if len(stops):
                    best = min(best, float(np.min(np.maximum(top, x_i + after[stops]))))
                need[i, left] = best
            after[i] = need[i, False]
        return need

    def promising(self, i: int, left: bool, front: tuple, budget: float, bound=None,
                  beam: int | None = None) -> tuple:
        """(the pairs of state (i, left)'s front (kept, cost, parents, kinds) worth going on
        with, the lambdas that bound them best). Exact: a pair goes if a lower bound on the
        cost to finish (``least_to_finish``) takes it over ``bound``, the cost of a placement
        known to fit. ``beam``: keep only that many, the one keeping the fewest bytes (it fits
        if any does), a few spread over the front and the rest those whose cost plus that
        bound is least: a guess, not exact."""
        kept, cost = front[0], front[1]
        terms = self._bound_terms(i, left, kept, budget)
        least = None if terms is None else terms.max(axis=0)
        keep = np.arange(len(kept))
        if bound is not None and least is not None:
            margin = abs(float(bound)) * 1e-9 + 1  # float rounding never drops a pair that fits
            keep = np.nonzero(cost.astype(np.float64) + least <= float(bound) + margin)[0]
        if beam is not None and len(keep) > beam:
            spread = keep[np.linspace(0, len(keep) - 1, beam // 4).round().astype(np.int64)]
            score = cost[keep].astype(np.float64) + (least[keep] if least is not None else 0)
            best = keep[np.argsort(score, kind="stable")[:beam - len(spread)]]
            keep = np.union1d(spread, best)
        best_lams = None if terms is None or not len(keep) else np.flatnonzero(
            np.bincount(terms[:, keep].argmax(axis=0), minlength=len(terms)))
        return tuple(a[keep] for a in front), best_lams

    def near_least(self, bound, budget: float) -> bool:
        """Is ``bound``, the cost of a placement that fits, within 0.5% of the lower bound on
        any placement's cost? (A wider beam would hardly tighten it: not worth its pass.)"""
        start = self.least_to_finish(0, _left_holds(self.costs, None, 0), np.zeros(1, np.int64),
                                     budget)
        return start is not None and float(bound) - start[0] <= 0.005 * abs(float(bound)) + 1

    def least_to_finish(self, i: int, left: bool, kept, budget: float):
        """A lower bound on the cost to finish the chain from state (i, left), per Kept in
        ``kept`` (None where float64 cannot hold the costs). Every way to finish keeps its
        own bytes on top of Kept, and the last forward moment holds them all, so they add up
        to at most R - Kept (R: the budget less the trunk's growing moment). For any lambda
        >= 0, cost_to_finish >= g_lambda - lambda (R - Kept), g_lambda the least (cost +
        lambda kept bytes) of any way to finish, peaks ignored: a scalar shortest path per
        lambda (``_lagrangian``), the same for every budget; the best lambda per pair."""
        terms = self._bound_terms(i, left, kept, budget)
        return None if terms is None else terms.max(axis=0)

    def _bound_terms(self, i: int, left: bool, kept, budget: float):
        """g_lambda - lambda (R - Kept) for every lambda (rows) and Kept (columns), each
        lowered by more than float64's rounding of its terms, so each stays a lower bound."""
        g, lams = self._lagrangian()
        if g is None:
            return None
        slack = self._room(budget) - kept.astype(np.float64)  # bytes the rest may keep
        here = g[i, int(left)][:, None]
        far = lams[:, None] * slack[None, :]
        return here - far - _ROUNDING * (_finite_abs(here) + np.abs(far)) - 1

    def _room(self, budget: float) -> float:
        """R: the budget less the trunk's growing moment (the least of its two)."""
        if getattr(self, "_grows", None) is None:
            self._grows = min(_trunk_need(self.costs, held)[1] for held in (False, True))
        return budget - self._grows

    def checkpoint_ranges(self, kept, cost, x_i: int, stops, prices, budget: float, bound,
                          lams) -> tuple:
        """For each checkpointed segment [i, stops[s]) out of a front (kept ascending, cost
        descending), a range (lo[s], hi[s]) of the front that holds every pair that can still
        finish within ``bound``: the pair p at state (j, False) with Kept + x_i, cost +
        price, needs, for each of ``lams`` (indices of lambdas), cost_p + lambda kept_p <=
        T = bound - price - g_lambda(j) + lambda (R - x_i). The pairs meeting it lie after
        the last that the running minimum of the left side keeps above T, and before the
        first from which the minimum of the rest stays above it: two binary searches per
        lambda, exact (a range may hold pairs that fail; they are dropped later)."""
        g, all_lams = self._lagrangian()
        lam = all_lams[lams][:, None]
        side = cost.astype(np.float64)[None, :] + lam * kept.astype(np.float64)[None, :]
        before = np.minimum.accumulate(side, axis=1)
        after = np.minimum.accumulate(side[:, ::-1], axis=1)[:, ::-1]
        ahead = g[stops, 0][:, lams].T  # (lambdas, stops)
        room = self._room(budget) - x_i
        price = prices.astype(np.float64)[None, :]
        scale = (abs(float(bound)) + np.abs(price) + _finite_abs(ahead) + lam * abs(room)
                 + np.abs(side).max(axis=1, keepdims=True))
        top = float(bound) - price - ahead + lam * room + _ROUNDING * scale + 1
        lo = np.zeros(len(stops), np.int64)
        hi = np.full(len(stops), len(kept), np.int64)
        for r in range(len(lam)):
            lo = np.maximum(lo, np.searchsorted(-before[r], -top[r], side="left"))
            hi = np.minimum(hi, np.searchsorted(after[r], top[r], side="right"))
        return lo, hi

    def _lagrangian(self):
        """(g, lambdas): g[i, left, l] the least cost + lambdas[l] * (bytes kept) of any way to
        finish the chain from state (i, left), peaks ignored; lambdas spread geometrically
        around the chain's cost per kept byte. (None, None) for costs beyond float64's range."""
        if getattr(self, "_g", None) is not None:
            return self._g
        if self.dtype is object:
            self._g = (None, None)
            return self._g
        n, lams = self.costs.n, self._exchange_rates()
        g = np.zeros((n + 1, 2, len(lams)))
        for i in range(n - 1, -1, -1):
            for left in (False, True):
                best = np.full(len(lams), np.inf)
                for _, _, more, extra, (j, held) in self.one[i, left]:
                    best = np.minimum(best, float(extra) + lams * more + g[j, int(held)])
                stops, _, prices, x_i = self.ckpt[i, left]
                if len(stops):
                    via = prices.astype(np.float64)[:, None] + g[stops, 0]
                    best = np.minimum(best, via.min(axis=0) + lams * x_i)
                g[i, int(left)] = best
        self._g = (g, lams)
        return self._g

    def _exchange_rates(self, most: int = 48) -> np.ndarray:
        """The lambdas: cost per kept byte saved when a block (or a short segment) keeps less
        than plain, the ratios at which the relaxed problem's best choice changes (where its
        bound is tightest); at most ``most`` of them, spread by quantile, and 0."""
        n, rates = self.costs.n, set()
        for i in range(n):
            for left in (False, True):
                moves = self.one[i, left]
                plain = next((m for m in moves if m[0][2] is False), None)
                if plain is None:
                    continue
                for _, _, more, extra, _ in moves:
                    for _, _, other, price, _ in moves:
                        if more < other and extra > price:
                            rates.add(float(extra - price) / (other - more))
                stops, _, prices, x_i = self.ckpt[i, left]
                tapes = np.cumsum([segment_kept(self.costs, (k, k + 1, False), k > i or left)
                                   for k in range(i, min(i + 4, n))])
                for j, price in zip(stops[:4], prices[:4], strict=False):
                    if tapes[j - i - 1] > x_i and price > 0:
                        rates.add(float(price) / (tapes[j - i - 1] - x_i))
        rates = np.array(sorted(rates))
        if len(rates) > most:
            rates = rates[np.linspace(0, len(rates) - 1, most).round().astype(np.int64)]
        return np.concatenate([[0.0], rates])

    def _dtype(self):
        """int64 while no placement's cost can overflow it; float64 for float objectives;
        else Python ints (object arrays: slower, as exact)."""
        worst = 0
        for i in range(self.costs.n):
            extras = [e for left in (False, True) for *_, e, _ in self.one[i, left]]
            arrays = [a for left in (False, True) if len(a := self.ckpt[i, left][2])]
            if any(isinstance(e, float) for e in extras + [a[0] for a in arrays]):
                return np.float64
            worst += max([*map(abs, extras), *(np.abs(a).max() for a in arrays)], default=0)
        return np.int64 if worst < 2**62 else object


def _cheapest(costs: ChainCosts, budget: float, cost, table: dict, bound=None,
              beam: int | None = None) -> Prediction | None:
    """A placement with the least cost whose predicted peak fits ``budget``.

    Scan the chain left to right. A state is (boundary i, does the block before keep x_i?);
    in it we keep every (Kept, cost) pair no other pair beats on both: Kept, the bytes the
    segments so far keep, is all the future needs to know of the past, since every later
    moment's live bytes are Kept plus terms of its own segment. A segment [i, j) is feasible
    from a pair if Kept + its highest moment fits; it adds its kept bytes and cost. Three
    exact prunings keep the fronts short: a pair whose Kept leaves less room than the least
    any way to finish needs is dropped, each front keeps its Pareto points only, and (costs
    never negative) a pair that already costs more than ``bound``, the cost of a placement
    known to fit, is dropped. Fronts are numpy arrays, fewest kept bytes first, so the pairs a
    segment fits are a prefix; every front's pairs go to one pool, and the checkpointed
    segments into a state are gathered from all earlier fronts at once. A fourth exact pruning
    (``_Chain.promising``): a pair whose cost plus a lower bound on the cost to finish exceeds
    ``bound`` is dropped; the same bound, taken at the state a checkpointed segment leads to,
    cuts the range of each front that segment takes (``_Chain.checkpoint_ranges``), before
    anything is gathered. ``beam``: keep only that many pairs per front, the fewest kept bytes
    among them and the ones whose cost plus that lower bound is least, and checkpoint at most
    4 * beam blocks at once: a quick placement that fits whenever one with such segments does
    (fitting only gets easier with fewer kept bytes), usually the cheapest but not always;
    ``optimal`` takes its cost as the bound (no bound if it found none: slower, as exact).
    """
    chain = table.get("chain") or table.setdefault("chain", _Chain(costs, cost))
    n, dtype = costs.n, chain.dtype
    pool = _Pool(dtype)
    kinds = chain.kinds
    rooms = {state: budget - need for state, need in chain.need.items()}
    after_ckpt = np.array([rooms[j, False] for j in range(n + 1)], np.float64)
    first = np.zeros((2 * n, n + 1), np.int64)  # per source state and stop j: the pool range
    stop = np.zeros((2 * n, n + 1), np.int64)  # of its pairs a checkpoint [i, j) takes
    price = np.zeros((2 * n, n + 1), dtype)
    x_in = np.zeros(2 * n, np.int64)
    start = (0, _left_holds(costs, None, 0))
    incoming = {start: [(np.zeros(1, np.int64), np.zeros(1, dtype), np.full(1, -1), 1)]}
    ends = {}
    for i in range(n + 1):
        for left in (False, True):
            chunks = incoming.pop((i, left), [])
            if not left and i:
                chunks.append(_gathered(pool, first, stop, price, x_in, 2 * i, i))
            front = _pareto_arrays(chunks, rooms[i, left], bound)
            lams = None
            if i < n and len(front[0]) > 1:
                front, lams = chain.promising(i, left, front, budget, bound, beam)
            kept, so_far, parents, kind = front
            if not len(kept):
                continue
            offset = pool.add(kept, so_far, parents, kind, i)
            if i == n:
                ends[left] = offset, kept, so_far
                continue
            for seg, top, more, extra, nxt in chain.one[i, left]:
                lo, hi = _usable(kept, so_far, budget - top, rooms[nxt] - more, bound, extra)
                if lo < hi:
                    incoming.setdefault(nxt, []).append(
                        (kept[lo:hi] + more, so_far[lo:hi] + extra,
                         np.arange(offset + lo, offset + hi), kinds[seg[2]]))
            stops, tops, prices, x_i = chain.ckpt[i, left]
            if beam is not None:  # the beam's guess: segments of at most 4 * beam blocks
                short = stops <= i + 4 * beam
                stops, tops, prices = stops[short], tops[short], prices[short]
            if len(stops):
                his = np.minimum(np.searchsorted(kept, budget - tops, side="right"),
                                 np.searchsorted(kept, after_ckpt[stops] - x_i, side="right"))
                los = np.zeros_like(his) if bound is None else len(so_far) - np.searchsorted(
                    so_far[::-1], bound - prices, side="right")
                if bound is not None and lams is not None:
                    lo, hi = chain.checkpoint_ranges(kept, so_far, x_i, stops, prices, budget,
                                                     bound, lams)
                    los, his = np.maximum(los, lo), np.minimum(his, hi)
                code = 2 * i + left
                first[code, stops], stop[code, stops] = offset + los, offset + np.maximum(his, los)
                price[code, stops], x_in[code] = prices, x_i
    best = None
    for left, (offset, kept_all, total) in ends.items():
        fixed, grows = _trunk_need(costs, left)
        ok = np.nonzero(kept_all + grows <= budget)[0] if fixed <= budget else []
        if len(ok):
            m = int(ok[-1])  # the Pareto point keeping the most that fits costs the least
            if best is None or (total[m], kept_all[m]) < best[:2]:
                best = (total[m], kept_all[m], offset + m)
    if best is None:
        return None
    return predict(costs, pool.placement(best[2], chain.kind_names))


def _usable(kept, so_far, top_room, end_room, bound, extra) -> tuple[int, int]:
    """The pairs of a front one move may take: those whose Kept fits the move's highest moment
    and the room left after it (a prefix), and whose cost stays within ``bound`` (a suffix)."""
    hi = int(min(np.searchsorted(kept, top_room, side="right"),
                 np.searchsorted(kept, end_room, side="right")))
    lo = 0 if bound is None else len(so_far) - int(np.searchsorted(so_far[::-1], bound - extra,
                                                                    side="right"))
    return lo, hi


def _gathered(pool, first, stop, price, x_in, sources: int, j: int) -> tuple:
    """The pairs checkpoints [i, j) bring to state (j, False), from every source state before
    j at once: each source's pool range, shifted by its input bytes and the segment's cost."""
    lens = stop[:sources, j] - first[:sources, j]
    rows = np.nonzero(lens > 0)[0]
    if not len(rows):
        return np.zeros(0, np.int64), np.zeros(0, pool.dtype), np.zeros(0, np.int64), 0
    lens = lens[rows]
    before = np.cumsum(lens) - lens
    index = np.repeat(first[rows, j] - before, lens) + np.arange(int(lens.sum()))
    return (pool.kept[index] + np.repeat(x_in[rows], lens),
            pool.cost[index] + np.repeat(price[rows, j], lens), index, 0)


class _Pool:
    """Every front's pairs, one after another: kept bytes, cost, the pair it came from (-1: the
    start), the kind of the segment that led here (``_Chain.kinds``) and its state's boundary."""

    def __init__(self, dtype):
        self.dtype, self.size = dtype, 0
        self.kept = np.zeros(1024, np.int64)
        self.cost = np.zeros(1024, dtype)
        self.parent = np.zeros(1024, np.int64)
        self.kind = np.zeros(1024, np.int64)
        self.at = np.zeros(1024, np.int64)

    def add(self, kept, cost, parents, kind, i: int) -> int:
        offset, self.size = self.size, self.size + len(kept)
        if self.size > len(self.kept):
            grow = max(self.size, 2 * len(self.kept))
            for name in ("kept", "cost", "parent", "kind", "at"):
                old = getattr(self, name)
                new = np.zeros(grow, old.dtype)
                new[:offset] = old[:offset]
                setattr(self, name, new)
        part = slice(offset, self.size)
        self.kept[part], self.cost[part], self.parent[part] = kept, cost, parents
        self.kind[part], self.at[part] = kind, i
        return offset

    def placement(self, entry: int, kind_names: list) -> Placement:
        """The segments that led to ``entry``, first to last."""
        out = []
        while self.parent[entry] >= 0:
            parent = int(self.parent[entry])
            out.append((int(self.at[parent]), int(self.at[entry]),
                        kind_names[int(self.kind[entry])]))
            entry = parent
        return tuple(reversed(out))


def _trunk_need(costs: ChainCosts, left_held: bool) -> tuple[float, float]:
    """The trunk's highest moments: (those that do not grow with Kept, those that do, at Kept
    0). The chain finishes within a budget iff the first fits and the second plus Kept does."""
    at0, at1 = trunk_events(costs, 0, left_held), trunk_events(costs, 1, left_held)
    fixed = max((a[0] for a, b in zip(at0, at1, strict=True) if a[0] == b[0]), default=-math.inf)
    grows = max((a[0] for a, b in zip(at0, at1, strict=True) if a[0] != b[0]), default=-math.inf)
    return fixed, grows


def _pareto_arrays(chunks: list, room: float, bound=None) -> tuple:
    """One state's candidates, (kept, cost, parents, kind) chunks, cut to the pairs that can
    still finish (Kept <= room, cost <= ``bound``) and that no other pair beats on both Kept
    and cost: (kept, cost, parents, kinds), fewest kept bytes first."""
    chunks = [c for c in chunks if len(c[0])]
    if not chunks:
        return np.zeros(0, np.int64), np.zeros(0), np.zeros(0, np.int64), np.zeros(0, np.int64)
    kept = np.concatenate([c[0] for c in chunks])
    cost = np.concatenate([c[1] for c in chunks])
    parent = np.concatenate([c[2] for c in chunks])
    kind = np.repeat([c[3] for c in chunks], [len(c[0]) for c in chunks])
    keep = kept <= room
    if bound is not None:
        keep &= cost <= bound
    kept, cost, parent, kind = kept[keep], cost[keep], parent[keep], kind[keep]
    order = np.argsort(cost, kind="stable")  # cheapest first; then keep each pair keeping
    by_cost = kept[order]  # less than all cheaper ones (of equal costs, the fewest bytes)
    if len(order):
        least = np.minimum.accumulate(by_cost)
        order = order[np.concatenate([[True], by_cost[1:] < least[:-1]])]
        order = order[np.append(cost[order][1:] != cost[order][:-1], True)][::-1]
    return kept[order], cost[order], parent[order], kind[order]


def brute_force(costs: ChainCosts, budget, objective=None) -> Prediction | None:
    """The same answer as ``optimal`` by trying every placement, menus included (and, for the
    FLOPs objective, every measured suffix option): for tests."""
    budget, cost = parse_budget(budget), objective_fn(costs, objective)
    fits = []
    for trunk, variant, price in _trunk_variants(costs, cost):
        placements = [p for p in all_placements(costs.n, variant)
                      if placement_cost(variant, p, price) < math.inf]
        fits += [(placement_cost(variant, p.placement, price) + _suffix_price(trunk), p)
                 for p in map(functools.partial(predict, variant), placements)
                 if p.peak_bytes <= budget]
    return min(fits, key=lambda f: (f[0], f[1].peak_bytes), default=(None, None))[1]


def optimal_frontier(costs: ChainCosts, most: int = 200, objective=None) -> list[Prediction]:
    """The exact memory-cost frontier, Pareto points only (each peaks lower and costs more than
    the one before). Walks down from no checkpointing: each step asks for the cheapest
    placement (lowest peak among equally cheap) peaking strictly below the last."""
    out, budget = [], predict(costs, "none").peak_bytes
    while len(out) < most:
        best = _optimal(costs, budget, objective)
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
    alternatives: dict[str, Prediction]  # "none", "full", "every-2", ..., "sqrt", menu options
    objective: str = "flops"

    @property
    def fits(self) -> bool:
        return self.best is not None

    @property
    def policy(self) -> Policy:
        if self.best is None:
            raise ValueError(f"nothing fits in {fmt_bytes(self.budget)}: {self.advice()}")
        return self.best.policy

    def best_every_k(self) -> tuple[str, Prediction] | None:
        """The every-K (full is every-1) that fits with the least recompute, if any."""
        fitting = [(name, p) for name, p in self.alternatives.items()
                   if (name == "full" or name.startswith("every-")) and p.peak_bytes <= self.budget]
        return min(fitting, key=lambda item: item[1].recompute_flops, default=None)

    def lowest_peak(self) -> tuple[str, Prediction]:
        """The lowest peak of the usual policies, also on each way of running the trunk the
        plan weighs (the FLOPs objective: every measured ``suffix=`` option, and the prefix
        inside block 0's checkpoint where measured exact; ``_trunk_variants``), named with
        its clauses: "nothing fits" never quotes a higher lowest than ``optimal`` could reach
        with these policies."""
        found = list(self.alternatives.items())
        if self.objective == "flops":
            suffixes = [t.suffix for t in (self.costs.trunk, *self.costs.suffixes)]
            for suffix, prefix in itertools.product(suffixes, ("", "full")):
                for p in ([] if not (suffix or prefix) else self.alternatives.values()):
                    with_clauses = _with_trunk_or_none(self.costs, p.placement, suffix, prefix)
                    if with_clauses is not None:
                        found.append((str(with_clauses.policy), with_clauses))
        allowed = [(name, p) for name, p in found  # none recomputes a block that does not replay
                   if not _checkpoints_unreplayable(self.costs, p.placement)]
        return min(allowed, key=lambda kv: kv[1].peak_bytes)

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
        options = [n for n in self.alternatives if n.startswith(("selective:", "offload"))]
        names = ["none", "full", "every-2", "sqrt"] + ([every[0]] if every else []) + options
        rows += [(n, self.alternatives[n]) for n in dict.fromkeys(names) if n in self.alternatives]
        return [dict(policy=n if n != "optimal" else f"optimal: {p.policy}",
                     peak_bytes=p.peak_bytes, fits=p.peak_bytes <= self.budget,
                     recompute_flops=p.recompute_flops, overhead=p.overhead, where=p.where,
                     extra_time_s=p.extra_time_s, extra_time_spread_s=p.extra_time_spread_s)
                for n, p in rows]

    def explain(self) -> str:
        """One paragraph: why each block got its option."""
        if self.best is None:
            return f"Nothing fits: {self.advice()}."
        rows = block_table(self.costs, self.best)
        chosen = [r for r in rows if r["option"] != "plain"]
        price = "predicted extra time" if self.objective == "time" else "recomputed FLOPs"
        if not chosen:
            return (f"Every block runs plain: the plain step peaks at "
                    f"{fmt_bytes(self.best.peak_bytes)}, within the budget, so nothing needs to "
                    f"be kept less.")
        plain = [r["blocks"] for r in rows if r["option"] == "plain"]
        words = "; ".join(f"block {r['blocks']} {r['option']} (keeps {fmt_bytes(r['kept_bytes'])})"
                          for r in chosen)
        return (f"The budget {fmt_bytes(self.budget)} is below the plain step's peak "
                f"({fmt_bytes(self.alternatives['none'].peak_bytes)}), so some blocks must keep "
                f"less. The planner tried every option for every block and kept the combination "
                f"with the least {price} that fits: {words}. "
                + (f"Blocks {', '.join(plain)} stay plain: the budget has room for their tapes, "
                   f"and plain costs nothing. " if plain else "")
                + f"Its peak, {fmt_bytes(self.best.peak_bytes)}, is at {self.best.where}; "
                f"any option that keeps less elsewhere would cost more {price}.")

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
        rows = self.table()
        w = max(34, *(len(r["policy"]) for r in rows))  # a policy is never cut: it is the answer
        head = (f"  {'policy':<{w}} {'peak':>11}  {'fits':<4} {'recompute':>12} {'of a step':>9}"
                + (f" {_TIME_HEAD:>17}" if c.times else ""))
        lines += [head, "  " + "-" * (len(head) - 2)]
        for r in rows:
            time = _time_text(r) if c.times else ""
            lines.append(f"  {r['policy']:<{w}} {fmt_bytes(r['peak_bytes']):>11}  "
                         f"{'yes' if r['fits'] else 'no':<4} {fmt_flops(r['recompute_flops']):>12} "
                         f"{r['overhead']:>+9.1%}{time}")
        lines.append("")
        if self.best is not None:
            lines.append(f"Per block (objective: {self.objective}):")
            blocks = block_table(c, self.best)
            w = max(36, *(len(r["option"]) for r in blocks))
            lines.append(f"  {'blocks':<7} {'option':<{w}} {'keeps':>11} {'recompute':>12}"
                         + (f" {_TIME_HEAD:>17}" if c.times else ""))
            for r in blocks:
                time = _time_text(r) if c.times else ""
                lines.append(f"  {r['blocks']:<7} {r['option']:<{w}} "
                             f"{fmt_bytes(r['kept_bytes']):>11} "
                             f"{fmt_flops(r['recompute_flops']):>12}{time}")
            lines += ["", self.explain(), ""]
        if self.best is None:
            lines.append(f"Nothing fits: {self.advice()}.")
        else:
            b = self.best
            lines.append(f"Optimal: {b.policy} keeps {fmt_bytes(b.kept_bytes)} for backward; "
                         f"predicted peak {fmt_bytes(b.peak_bytes)} ({b.where}); recompute "
                         f"{fmt_flops(b.recompute_flops)} = {b.overhead:+.1%} of a plain step.")
        return "\n".join(lines)

    __str__ = report


def _with_trunk_or_none(costs: ChainCosts, placement, suffix: str, prefix: str):
    """``placement`` predicted with the trunk run as ``suffix``/``prefix`` say, or None where
    these costs cannot (an option not measured, a prefix=full without a checkpointed block 0)."""
    try:
        return predict(costs, placement_policy(placement, suffix, prefix))
    except ValueError:
        return None


def check_costs(costs) -> ChainCosts:
    """The planner's input: a ``ChainCosts``, with a one-line error naming where one comes from."""
    if not isinstance(costs, ChainCosts):
        raise TypeError(f"costs must be a ChainCosts, from measure_costs(model, batch_size), "
                        f"config_costs('7b', 1, 4096) or hf.hf_config_costs(config, 1, 4096); "
                        f"got {type(costs).__name__}")
    return costs


def make_plan(costs: ChainCosts, budget, objective=None) -> Plan:
    """The optimal placement under ``budget`` (least ``objective``: see ``objective_fn``) and
    the usual policies' predictions, each menu option everywhere among them."""
    check_costs(costs)
    budget = parse_budget(budget)
    n = costs.n
    alternatives = {"none": predict(costs, "none"), "full": predict(costs, "full")}
    if not n or _segment_reach(costs)[0] == n:  # else some segments of several blocks cannot run
        for k in range(2, n + 1):
            alternatives[f"every-{k}"] = predict(costs, every_k_placement(n, k))
        alternatives["sqrt"] = predict(costs, "sqrt")
    for option in costs.menu[0] if costs.menu else ():
        if all(option in m for m in costs.menu):
            alternatives[option] = predict(costs, option)
    cost = objective_fn(costs, objective)
    name = objective if isinstance(objective, str) else (
        "time" if objective is None and costs.times else "flops" if objective is None
        else getattr(objective, "__name__", "custom"))
    return Plan(costs, budget, _optimal(costs, budget, cost), alternatives, name)


def block_table(costs: ChainCosts, prediction: Prediction) -> list[dict]:
    """One row per block of a placement: its option, what it keeps, recomputes and costs
    (with the trunk it runs with: ``prefix=full`` changes what block 0's segment keeps)."""
    if costs.trunk.suffix != prediction.suffix or costs.trunk.prefix != prediction.prefix:
        costs = with_trunk(costs, prediction.suffix, prediction.prefix)
    rows, prev = [], None
    for seg in prediction.placement:
        i, j, kind = seg
        left = _left_holds(costs, prev, i)
        option = "plain" if kind is False else kind if isinstance(kind, str) else (
            "full" if j == i + 1 else f"full, segment {i}-{j - 1}")
        extra, spread = placement_time(costs, [seg])
        rows.append(dict(blocks=_span_text(i, j), option=option,
                         kept_bytes=segment_kept(costs, seg, left),
                         recompute_flops=segment_recompute_flops(costs, seg),
                         host_bytes=costs.menu[i][kind].host_bytes if isinstance(kind, str) else 0,
                         extra_time_s=extra, extra_time_spread_s=spread))
        prev = seg
    return rows


_TIME_HEAD = "+time ± spread"


def _time_text(row: dict) -> str:
    """A row's extra time as the time model predicts it (the median) and the spread of the
    measurements around it: ' 1.52 ± 0.08 ms'."""
    return f" {row['extra_time_s'] * 1e3:>8.2f} ±{row['extra_time_spread_s'] * 1e3:>5.2f} ms"


def _span_text(i: int, j: int) -> str:
    return f"{i}" if j == i + 1 else f"{i}-{j - 1}"


# ---------------------------------------------------------------- nested recomputation
# Below the single-level minimum, a checkpointed segment's recompute can checkpoint again
# (Griewank's revolve, written as nested torch.utils.checkpoint: ``menu:0-7=full(0-3(0-1))``).
# The planning model is Griewank's (the step's peak comes after, from ``predict_nested``):
# what a block keeps for its backward is its input, memory is the bytes of the block inputs
# alive at once, the cost the recomputed forwards. A checkpointed
# segment [i, j) recomputes its blocks once (the last one up to its last save), storing its
# children's inputs on the way; then it reverses its children, last first. A tree is
# (start, stop, children): a child of one block is a plain block (its input is its tape).
Tree = tuple[int, int, tuple]


@dataclass(frozen=True)
class NestedPrediction:
    tree: tuple[Tree, ...]  # the top-level segments, covering 0..L-1
    stored_bytes: int  # the most block-input bytes alive at once (Griewank's model)
    recompute_flops: int
    peak_bytes: int | None = None  # the step's peak by the memory model (``predict_nested``)
    where: str = ""  # the moment of that peak, in words

    @property
    def policy(self) -> Menu:
        return Menu(tuple((a, b, "full", _inner(c)) for a, b, c in self.tree if b > a + 1))

    def report(self) -> str:
        """The tree as a policy, its predicted peak (where) and recompute, like a plan's line."""
        peak = (f"predicted peak {fmt_bytes(self.peak_bytes)} ({self.where})"
                if self.peak_bytes is not None else "no predicted peak (predict_nested says "
                "why)")
        return (f"Nested: {self.policy} stores at most {fmt_bytes(self.stored_bytes)} of block "
                f"inputs; {peak}; recompute {fmt_flops(self.recompute_flops)}.")

    __str__ = report


def _inner(children) -> tuple:
    """Children of more than one block are nested checkpoints; one-block ones run plain."""
    return tuple((a, b, _inner(c)) for a, b, c in children if b > a + 1)


def _pass_flops(costs: ChainCosts, i: int, j: int) -> int:
    return segment_recompute_flops(costs, (i, j, True))


def nested_optimal(costs: ChainCosts, budget: int) -> NestedPrediction | None:
    """The nested tree with the fewest recomputed FLOPs whose stored block inputs never exceed
    ``budget`` bytes (Griewank's model above); None if even one input at a time is too much.
    Exact: equals Griewank's binomial optimum on uniform chains and brute force on small ones.
    When every block input but the first has one size (every transformer), a vectorised
    recursion over a few room levels (``_NestedTables``) answers in seconds at hundreds of
    blocks; otherwise the recursion below, over every room the stored inputs leave. Stored
    inputs are not the step's peak (tapes are left out): to plan for a peak budget, use
    ``optimal_with_nesting``."""
    check_costs(costs)
    return _nested_in_room(costs, int(parse_budget(budget)), *_nested_setup(costs))


def _nested_setup(costs: ChainCosts) -> tuple[list[int], _NestedTables | None]:
    """The block inputs' bytes, and the int64 tables when inputs have one size and fit."""
    x = [_boundary_bytes(costs, k) for k in range(costs.n)] if costs.n else []
    if costs.n >= 2 and len(set(x[1:])) == 1 and x[1] > 0:
        tables = _NestedTables(costs, x)
        if tables.fits_int64:
            return x, tables
    return x, None


def _nested_in_room(costs: ChainCosts, room: int, x: list[int],
                    tables: _NestedTables | None) -> NestedPrediction | None:
    if tables is None:
        return _nested_by_recursion(costs, room, x)
    cost = tables.split(0, costs.n, room)
    if cost >= _INF:
        return None
    return _nested_prediction(costs, tables.tree(0, costs.n, room, True), cost)


def optimal_with_nesting(costs: ChainCosts, budget) -> Prediction | NestedPrediction | None:
    """The plan with the fewest recomputed FLOPs whose predicted step peak fits ``budget``
    (bytes, or a string like "40MiB": the peak, as ``optimal``'s), nested or not; None if
    nothing fits. Griewank's stored inputs leave out each block's tape, so a tree that stores
    fewer inputs can still peak higher (on a GPT's blocks every nested tree peaks above the
    single-level minimum): each candidate is priced by the peak ``predict_nested`` predicts.
    The candidates: the single-level optimum (``optimal(costs, budget, "flops")``, menus
    included) and ``nested_optimal``'s tree for every number of stored inputs, up to the
    first that does not nest (a tree without nesting is a single-level placement, which the
    single-level optimum already beats or ties). Where a single level fits, the answer costs
    no more, and at equal cost peaks no higher; below its minimum, it is the cheapest tree
    that fits. Ties go to the lower peak, then to the single-level plan (it runs menus). A
    ``Prediction`` or a ``NestedPrediction``: both have ``policy``, ``peak_bytes`` and
    ``recompute_flops``."""
    check_costs(costs)
    budget = parse_budget(budget)
    single = _optimal(costs, budget, segment_flops)
    best, chosen = None, single
    if single is not None:
        best = (placement_cost(costs, single.placement, segment_flops), single.peak_bytes, 0)
    replays = all(c.replays for c in costs.layers)  # a tree recomputes every block
    for tree in _nesting_trees(costs) if replays else ():
        if tree.peak_bytes is None or tree.peak_bytes > budget:
            continue
        key = (1024 * tree.recompute_flops, tree.peak_bytes, 1)
        if best is None or key < best:
            best, chosen = key, tree
    return chosen


def _nesting_trees(costs: ChainCosts):
    """``nested_optimal``'s trees that nest and that a policy can run, one per number of
    stored inputs (rooms holding the k largest inputs, k = 1, 2, ...), until the first tree
    that does not nest."""
    x, tables = _nested_setup(costs)
    rooms = itertools.accumulate(sorted(x, reverse=True))
    for room in sorted(set(rooms)):
        plan = _nested_in_room(costs, room, x, tables)
        if plan is None:
            continue
        depth = max(_depth(children) for *_, children in plan.tree)
        if depth == 0:
            return
        if depth <= MAX_NESTING:
            yield plan


def _depth(children) -> int:
    """Levels of checkpoints nested inside a segment with these children (0: none; a child of
    one block runs plain)."""
    return max((1 + _depth(c) for a, b, c in children if b > a + 1), default=0)


def _nested_prediction(costs: ChainCosts, tree, cost: int) -> NestedPrediction:
    """A planned tree with its stored bytes and, where the memory model covers the chain, its
    predicted peak (a tree deeper than a policy may nest still gets both)."""
    peak, where = (None, "") if _unmodelled(costs, tree) else _nested_peak(costs, tree)
    return NestedPrediction(tree, _simulate(costs, tree)[0], cost, peak, where)


def _unmodelled(costs: ChainCosts, tree) -> str:
    """Why ``predict_nested`` cannot vouch for a tree on this chain ("" if it can)."""
    if _folded(costs) is not None:
        return ("a nested tree over blocks that return their input (nn.Identity) is not "
                "predicted: plan single-level (optimal) on such a chain")
    if costs.n and _segment_reach(costs)[0] < costs.n:
        return ("the model adds a block's input to its output (x = x + block(x)) or gives "
                "blocks a tensor that carries its graph, so not every segment of several "
                "blocks can run: plan single-level (optimal)")
    nested = [k for a, b, children in tree if children for k in range(a, b)]
    if any(not costs.layers[k].saves_input for k in nested):
        return ("a nested segment over blocks that do not save their input is not predicted "
                "(the meter has not checked the nested model there): plan single-level "
                "(optimal), or nest only blocks that save their input")
    return ""


_INF = 2**61  # "does not fit" in the int64 tables (two of them still add up within int64)


class _NestedTables:
    """``nested_optimal``'s recursion as int64 matrices, one set per room (the bytes left for
    stored inputs): REV[i, j] the least FLOPs to reverse [i, j) with x_i stored, A[i, j] the
    least to reverse [i, j) as one or more children (the first starting at i), B[i, j] the
    same with more than one child. With one input size X for blocks 1.., a room r needs only
    room r - X (and row 0 room r - x_0): a handful of rooms, each filled column by column."""

    def __init__(self, costs: ChainCosts, x: list[int]):
        n = self.n = costs.n
        self.x = x
        ahead = [0]
        for c in costs.layers:
            ahead.append(ahead[-1] + c.forward_flops)
        recompute = [c.recompute_flops for c in costs.layers]
        passes = [[0] * (n + 1) for _ in range(n)]
        for i in range(n):
            for j in range(i + 2, n + 1):
                passes[i][j] = ahead[j - 1] - ahead[i] + recompute[j - 1]
        most = max((max(row) for row in passes), default=0)
        self.fits_int64 = most * n < _INF // 4
        self.passes = np.array(passes, np.int64) if self.fits_int64 else None
        self.rooms: dict[int, tuple] = {}

    def tables(self, room: int) -> tuple:
        """(REV, A, B) for ``room``, computed once, after the rooms below it that it needs
        (room - X, room - 2X, ...: filled in that order, bottom up, without recursion)."""
        room = min(room, sum(self.x))  # any room that stores every input is the same
        pending, r = [], room
        while r >= 0 and r not in self.rooms:
            pending.append(r)
            r -= self.x[1]
        for r in reversed(pending):
            self.rooms[r] = self._fill(r)
        return self.rooms[room]

    def _fill(self, room: int) -> tuple:
        n, x, X = self.n, self.x, self.x[1]
        rev = np.full((n, n + 1), _INF, np.int64)
        a, b = rev.copy(), rev.copy()
        if room >= sum(x):  # every input stored at once: each block reversed alone, no cost
            upper = np.triu(np.ones((n, n + 1), bool), 2)
            b[upper], a[upper], rev[upper] = 0, 0, self.passes[upper]
            rev[np.arange(n), np.arange(1, n + 1)] = a[np.arange(n), np.arange(1, n + 1)] = 0
            return rev, a, b
        if X <= room:
            below = self.tables(room - X)[1]  # A of room - X: what rows 1.. split into
            rev[np.arange(1, n), np.arange(2, n + 1)] = 0  # one block: its input is its tape
            fit = room // X  # a segment of at most this many blocks stores all its inputs:
            for j in range(3, n + 1):  # its children are its blocks, at no cost
                top = max(1, min(j - 1, j - fit))  # rows 1..top-1 split by the least of
                b[1:top, j] = np.minimum(  # children ending at m in 2..j-1
                    np.min(rev[1:top, 2:j] + below[2:j, j], axis=1), _INF)
                b[top:j - 1, j] = 0
                rev[1:j - 1, j] = np.minimum(self.passes[1:j - 1, j] + b[1:j - 1, j], _INF)
            a[1:] = np.minimum(rev[1:], b[1:])
        if x[0] <= room:  # row 0, last: with x_0 = 0 it splits into this room's own rows
            first = a if x[0] == 0 else self.tables(room - x[0])[1]
            rev[0, 1] = 0
            for m in range(1, n):
                if m >= 2:
                    rev[0, m] = min(self.passes[0, m] + b[0, m], _INF)
                b[0, m + 1:] = np.minimum(b[0, m + 1:], np.minimum(rev[0, m] + first[m, m + 1:],
                                                                   _INF))
            rev[0, n] = min(self.passes[0, n] + b[0, n], _INF) if n >= 2 else rev[0, n]
            a[0] = np.minimum(rev[0], b[0])
        return rev, a, b

    def split(self, i: int, j: int, room: int) -> int:
        return int(self.tables(room)[1][i, j])

    def tree(self, i: int, j: int, room: int, whole: bool) -> tuple:
        """The children of [i, j) that reach the least cost (a segment's own reversal if
        ``whole`` allows and it is the least)."""
        rev, a, b = self.tables(room)
        if whole and rev[i, j] == a[i, j]:
            return (self._reverse(i, j, room),)
        rest = self.tables(room - self.x[i])[1]
        for m in range(i + 1, j):
            if rev[i, m] < _INF and rev[i, m] + rest[m, j] == b[i, j]:
                return (self._reverse(i, m, room), *self.tree(m, j, room - self.x[i], True))
        raise AssertionError("no split reaches the table's value")  # the tables are exact

    def _reverse(self, i: int, j: int, room: int) -> Tree:
        return (i, j, ()) if j == i + 1 else (i, j, self.tree(i, j, room, False))


def _nested_by_recursion(costs: ChainCosts, budget: int, x: list[int]):
    """``nested_optimal`` for any block input sizes: memoised over (i, j, room)."""

    @functools.cache
    def reverse(i, j, room):  # reverse [i, j) with x_i stored, in ``room`` bytes: (cost, tree)
        if x[i] > room:
            return math.inf, None
        if j == i + 1:
            return 0, (i, j, ())
        cost, children = split(i, j, room, False)
        if children is None:
            return math.inf, None
        return _pass_flops(costs, i, j) + cost, (i, j, children)

    @functools.cache
    def split(i, j, room, whole_allowed):  # children covering [i, j), first starting at i
        best = reverse(i, j, room) if whole_allowed else (math.inf, None)
        best = (best[0], (best[1],)) if best[1] is not None else (math.inf, None)
        for m in range(i + 1, j):
            first, tree = reverse(i, m, room)
            if first == math.inf:
                continue
            rest, trees = split(m, j, room - x[i], True)
            if first + rest < best[0]:
                best = (first + rest, (tree, *trees))
        return best

    cost, tree = split(0, costs.n, int(budget), True)
    if tree is None or cost == math.inf:
        return None
    return _nested_prediction(costs, tree, cost)


def simulate_nested(costs: ChainCosts, tree) -> tuple[int, int]:
    """(most stored bytes, recomputed FLOPs) of a nested tree, by stepping through it: the
    forward stores the top-level segments' inputs; each segment's backward recomputes it,
    storing its children's inputs, and reverses them last first. An independent check of
    ``nested_optimal``'s recursion (tests), and the prediction for a given tree."""
    _check_tree(costs.n, tree)
    return _simulate(costs, tree)


def _simulate(costs: ChainCosts, tree) -> tuple[int, int]:
    """``simulate_nested`` of a tree known to be well formed (planned: it may nest deeper
    than a policy can)."""
    stored, peak, flops = [], 0, 0

    def reverse_children(children, top):
        nonlocal peak, flops
        for k, (a, _, _) in enumerate(children):  # store each child's input (the first
            stored.append(0 if k == 0 and not top else _boundary_bytes(costs, a))  # is ours)
            peak = max(peak, sum(stored))
        for a, b, grand in reversed(children):
            if b > a + 1:
                flops += _pass_flops(costs, a, b)
                reverse_children(_fill(a, b, grand), False)
            stored.pop()

    reverse_children(tuple(tree), True)
    return peak, flops


def predict_nested(costs: ChainCosts, tree) -> tuple[int, str]:
    """(peak live bytes, where) of a training step under a nested tree (or its policy,
    ``menu:0-7=full(0-3(0-1))``), by the memory model of single-level plans (this module's
    docstring) extended to nesting. The forward is that of the top-level checkpointed
    segments. A segment's backward starts as a single-level one's, recomputes its blocks with
    its children run as checkpoints (a child keeps its input; its blocks keep nothing, as in a
    checkpointed forward) and its other blocks plain (as in a single-level recompute), then
    reverses them last first: a plain block by its checkpointed backward, a child the same way,
    recursively; a block's input is held by the block before when that is a plain block that
    saves its output (never by a child checkpoint), and a child lets its input go at the end
    of its backward unless the block before holds it. No rule beyond these: each block's
    checkpointed backward is measured with the checkpoint's own input kept alive elsewhere
    (``costs._run_layer``), so "free" means the block's input dies once, as inside a segment.
    Exact to the byte against ``measure_peaks`` on every tree tried: the tiny GPT, an 8- and a
    16-block GPT whose activations dominate, and the 16-block hand-trace net where nesting
    peaks 1.5 MB below the single-level minimum (tests/test_plan_nested.py); residual
    LayerNorm-MLP, in-place, BatchNorm and dropout blocks, alone and mixed in one chain
    (tests/test_plan_heldout.py); also, by hand, 8-block llama-tiny and the GPT with dropout
    0.1. Checked on blocks that save their input (all of these). A tree without
    nesting predicts what ``predict`` does. Refused (ValueError): a chain with blocks that
    return their input (``nn.Identity``: their folding is not modelled under nesting), a nested
    segment over blocks that do not save their input (the two rules are unchecked there), and
    policies with other options than ``full`` (predict those with ``predict``)."""
    check_costs(costs)
    if isinstance(tree, (str, Policy)):
        tree = _tree_of_policy(costs.n, tree)
    _check_tree(costs.n, tree)
    if reason := _unmodelled(costs, tree):
        raise ValueError(reason)
    return _nested_peak(costs, tree)


def _nested_peak(costs: ChainCosts, tree) -> tuple[int, str]:
    events, kept, prev = [], 0, None
    for a, b, children in tree:
        seg = (a, b, True) if b > a + 1 else (a, b, False)
        left = _left_holds(costs, prev, a)
        own = (segment_events(costs, seg, left) if not children
               else _nested_segment_events(costs, (a, b, children), left))
        events += [(e[0] + kept, *e[1:]) for e in own]
        kept += segment_kept(costs, seg, left)
        prev = seg
    events += trunk_events(costs, kept, _left_holds(costs, prev, costs.n))
    top = max(events, key=lambda e: e[0])
    return top[0], describe_event(top)


def _tree_of_policy(n: int, policy) -> tuple:
    """The nested tree a ``menu:...=full(...)`` policy runs (blocks it leaves out: plain)."""
    policy = parse_policy(policy)
    items = policy.items if isinstance(policy, Menu) else None
    if items is None or any(o != "full" or b == a + 1 for a, b, o, _ in items):
        raise ValueError(f"predict_nested takes a nested tree or a menu of segments of two or "
                         f"more blocks, each full(...); predict {policy} with predict()")
    policy.segment_policies(n)  # blocks beyond the model: one line naming the fix
    return _fill(0, n, tuple((a, b, c) for a, b, _, c in items))


def _nested_segment_events(costs: ChainCosts, node, left_held: bool) -> list[Event]:
    """``segment_events`` for a checkpointed segment with children: the same forward and the
    same bytes when its backward starts, then the nested recompute and reversal."""
    i, j, _ = node
    flat = segment_events(costs, (i, j, True), left_held)
    forward = [e for e in flat if e[1] == "forward"]
    layers = costs.layers
    t = (costs.trunk.base_bytes + costs.trunk.prefix_kept + costs.trunk.suffix_left
         + segment_kept(costs, (i, j, True), left_held) + _left_by(layers[j:])
         + _boundary_bytes(costs, j))
    events: list[Event] = []
    _reverse_nested(costs, node, t, events)
    return forward + events


def _reverse_nested(costs: ChainCosts, node, t: int, events: list) -> int:
    """Recompute checkpointed segment ``node`` = (i, j, children) and run its backward from
    ``t`` live bytes, appending its moments to ``events``; returns the live bytes after it
    (its input still held: the caller lets it go)."""
    i, j, children = node
    layers, label = costs.layers, f"{i}-{j - 1}"
    kids = _fill(i, j, children)
    for n_kid, (a, b, _) in enumerate(kids):
        after_checkpoint = n_kid > 0 and kids[n_kid - 1][1] > kids[n_kid - 1][0] + 1
        if b == a + 1:  # a plain block of the recompute, as in a single-level segment
            c = layers[a]
            if b < j:
                events.append((t + c.forward_peak, "recompute", a, label))
                t += c.kept_bytes + c.output_bytes * (not c.saves_output)
            else:
                events.append((t + c.recompute_peak, "recompute", a, label))
                t += c.recompute_kept
            if a > i and not (c.saves_input or (layers[a - 1].saves_output
                                                and not after_checkpoint)):
                t -= _boundary_bytes(costs, a)  # x_a: nobody keeps it once block a has run
        else:  # a child checkpoint: its blocks keep nothing, it keeps its input
            for k in range(a, b):
                events.append((t + (_boundary_bytes(costs, k) if k > a else 0)
                               + layers[k].forward_peak_unsaved, "recompute", k, label))
            if b < j:
                t += _boundary_bytes(costs, b)  # its output, the next block's input
    for n_kid in range(len(kids) - 1, -1, -1):
        a, b, grand = kids[n_kid]
        after_checkpoint = n_kid > 0 and kids[n_kid - 1][1] > kids[n_kid - 1][0] + 1
        if b == a + 1:
            c = layers[a]
            held = a == i or (layers[a - 1].saves_output and not after_checkpoint)
            back = c.segment_backward(False, b == j)  # recomputed whole unless it is the last
            events.append((t + back.peak(held), "backward", a, "checkpointed"))
            t += back.change(held)
        else:
            t = _reverse_nested(costs, (a, b, grand), t, events)
            # the child lets its input go, unless the plain block before keeps it (its tape)
            if a > i and not (layers[a - 1].saves_output and not after_checkpoint):
                t -= _boundary_bytes(costs, a)
    return t


def _check_tree(n: int, tree) -> None:
    """A tree's top-level segments cover blocks 0..n-1 in order; children lie inside them."""
    fix = (f"a nested tree is ((start, stop, children), ...) covering blocks 0..{n - 1} in "
           f"order, e.g. nested_optimal(costs, budget).tree")
    try:
        k = 0
        for a, b, children in tree:
            if a != k or b <= a:
                raise ValueError
            _check_children(a, b, children)
            k = b
    except (TypeError, ValueError):
        raise ValueError(f"{fix}; got {tree!r}") from None
    if k != n:
        raise ValueError(f"{fix}; got {tree!r}")


def _fill(a: int, b: int, children) -> tuple:
    """Children of [a, b) with the one-block children a policy leaves out put back."""
    out, k = [], a
    for c in children:
        out += [(m, m + 1, ()) for m in range(k, c[0])] + [c]
        k = c[1]
    return tuple(out + [(m, m + 1, ()) for m in range(k, b)])


def all_trees(i: int, j: int, top: bool = True):
    """Every nested tree over [i, j) (children of a segment are a composition of it into
    smaller parts): for brute force."""
    for cut in _compositions(i, j, allow_whole=top):
        options = [[(a, b, ())] if b == a + 1 else
                   [(a, b, c) for c in all_trees(a, b, False)] for a, b in cut]
        yield from (tuple(p) for p in _product(options))


def _compositions(i, j, allow_whole):
    if i == j:
        yield ()
        return
    for m in range(i + 1, j + 1):
        for rest in _compositions(m, j, True):
            parts = ((i, m), *rest)
            if allow_whole or parts != ((i, j),):
                yield parts


def _product(lists):
    if not lists:
        yield ()
        return
    for head in lists[0]:
        for rest in _product(lists[1:]):
            yield (head, *rest)
