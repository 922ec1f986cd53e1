"""Which op outputs a checkpointed block keeps: the exact Pareto set, per op instance.

A block checkpointed with selective checkpointing (SAC) keeps its input and the outputs of the
ops its policy caches, and its backward re-runs the rest. ``block_ops(block, x)`` lists the op
instances of one forward, in the order SAC's policy function sees them (every aten op but
``SAC_IGNORED_OPS``), each with its FLOPs (``FlopCounterMode``'s formulas), the new storage bytes
its outputs make, which op's decision it follows, and whether the recompute reaches it.
``pareto(ops)`` is the exact set of (bytes kept, recompute FLOPs) over which instances to keep;
``choices(block, x, points)`` thins it to at most ``points`` and names each as a
``selective:ops=...`` policy, which ``costs.measure_costs(..., op_points=N)`` measures like any
other menu option (so the planner's predicted peaks are the meter's, to the byte).

The model, and why it is exact for torch's non-reentrant checkpoint with a SAC policy:
- The recompute re-runs the block's forward function; SAC's cached mode replaces each op it
  cached in forward (by op and call number) with the cached tensor, and runs every other op.
  So the recompute runs every op instance that is not cached, up to the early stop.
- The early stop: the recompute ends at the pack of the last tensor the forward saved for
  backward. Which tensors autograd saves does not depend on SAC (autograd sits above the
  caching mode, a cached op's node saves what it always saves), so the stop is the same op
  position for every choice: the number of ops dispatched when the forward's last pack ran.
- A choice is made per *group*, as ``policies._sac_policy`` makes it: an op whose output lives
  in a storage an earlier op of the block made (views, in-place ops) follows that op;
  uninitialised allocations (``empty_like``) and what fills them are always recomputed; ops
  that draw random numbers all follow the first of them. So the recompute FLOPs of a choice are
  the FLOPs of the groups it does not keep, counted up to the stop: a sum, exactly.
- Bytes kept: each kept group's new storages, counted once (an op writing into or viewing an
  earlier storage adds nothing; a view of the block's input adds nothing, the checkpoint keeps
  the input anyway; the block's output is the next block's input and is counted at 0 too).
  These bytes rank the choices; the planner uses only what the meter measures for them.
The Pareto set is then a 0/1 knapsack's frontier over the groups that cost FLOPs before the
stop (keeping a group that costs none only adds bytes), found by merging frontiers group by
group: exact, and small (a GPT block has five such groups, a Llama block eight).

Across the prefix's boundary: under a menu's ``prefix=full`` block 0's region opens where the
model's forward starts, so the embeddings are recomputed with it and x_0 is not kept (what
torch.compile does on small models: ``bench/planner_compile.py``). Block 0 may keep the same
op outputs there, its positions counted from the prefix's first op (``prefix_ops``);
``plan._options_with_prefix`` predicts it from the option's own measurement.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.checkpoint import SAC_IGNORED_OPS

from .policies import _ALLOCATIONS, SelectiveOps, _draws_random, _packets, find_blocks
from .recompute import EXTRA_FLOP_FORMULAS


@dataclass(frozen=True)
class OpInstance:
    """One op of a block's forward, at ``index`` in the order SAC's policy function sees it."""

    index: int
    op: str  # aten name, e.g. "aten.addmm"
    flops: int  # its forward FLOPs (FlopCounterMode): what recomputing it costs
    new_bytes: int  # storage bytes its outputs make that no earlier op of the block made
    group: int  # the index of the op whose keep-or-recompute decision it follows
    forced: bool  # always recomputed (an uninitialised allocation and what fills it)
    recomputed: bool  # before the early stop: the recompute reaches it unless it is kept
    saved_for_backward: bool  # autograd saves one of its outputs: backward reads it


@dataclass(frozen=True)
class Choice:
    """One point of a block's Pareto set: keep the outputs of ``keep`` (group indices)."""

    keep: tuple[int, ...]
    kept_bytes: int
    recompute_flops: int

    @property
    def policy(self) -> str:
        """The one-block option string (``selective:ops=...``); keeping nothing is ``full``."""
        return str(SelectiveOps(indices=self.keep)) if self.keep else "full"


class _Recorder(TorchDispatchMode):
    """Records every op SAC's policy function would see, with its FLOPs and output storages."""

    def __init__(self, flop_registry):
        super().__init__()
        self.registry, self.ops = flop_registry, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func not in SAC_IGNORED_OPS:
            formula = self.registry.get(func._overloadpacket)
            flops = formula(*args, **kwargs, out_val=out) if formula else 0
            self.ops.append((func, args, kwargs, out, flops))
        return out


def block_ops(block: nn.Module, x_like: torch.Tensor) -> list[OpInstance]:
    """The op instances of one forward of ``block`` on an input like ``x_like`` (real tensors),
    grouped as ``_sac_policy`` decides them, with the early stop of a recompute."""
    counter = torch.utils.flop_counter.FlopCounterMode(display=False,
                                                       custom_mapping=EXTRA_FLOP_FORMULAS)
    recorder, packs = _Recorder(counter.flop_registry), []

    def pack(t):
        packs.append((len(recorder.ops), t.untyped_storage()))
        return t

    x = x_like.detach().clone().requires_grad_(x_like.requires_grad)
    with torch.random.fork_rng(devices=[]), torch.autograd.graph.saved_tensors_hooks(
            pack, lambda t: t), recorder:
        out = block(x)
    stop = packs[-1][0] if packs else 0
    saved = {id(s) for _, s in packs}
    before = [x, *block.parameters(), *block.buffers()]
    ops = _grouped(recorder.ops, stop, saved, before, out)
    block.zero_grad(set_to_none=True)
    return ops


def _grouped(recorded, stop: int, saved: set, before, out) -> list[OpInstance]:
    """``_sac_policy``'s rules as groups: storage makers, forced allocations, random ops.
    ``before``: tensors alive before the forward (input, parameters): views of them add no
    bytes, nor does the block's output (the next block's input)."""
    made = {}  # id(storage) -> (weakref, group index)
    forced_groups, random_group = set(), []
    free = {id(t.untyped_storage()) for t in [*before, *tree_leaves(out)]
            if isinstance(t, torch.Tensor)}
    allocations = _packets(_ALLOCATIONS)
    result = []
    for index, (func, args, kwargs, output, flops) in enumerate(recorded):
        outputs = [t for t in tree_leaves(output) if isinstance(t, torch.Tensor)]
        inherited = [made[id(t.untyped_storage())][1] for t in outputs
                     if id(t.untyped_storage()) in made
                     and made[id(t.untyped_storage())][0]() is t.untyped_storage()]
        group = inherited[0] if inherited else index
        if not inherited and func._overloadpacket in allocations:
            forced_groups.add(index)
        if _draws_random(func, args, kwargs):
            if not random_group:
                random_group.append(group)
            elif not inherited:
                group = random_group[0]
        new = 0
        for t in outputs:
            storage = t.untyped_storage()
            if id(storage) not in made or made[id(storage)][0]() is not storage:
                made[id(storage)] = (weakref.ref(storage), group)
                new += 0 if id(storage) in free else storage.nbytes()
        result.append(OpInstance(index, str(func._overloadpacket), flops, new, group,
                                 group in forced_groups, index < stop,
                                 any(id(t.untyped_storage()) in saved for t in outputs)))
    return result


def recompute_flops(ops: list[OpInstance], keep) -> int:
    """The model: FLOPs a checkpoint with ``SelectiveOps(keep)`` re-runs in backward (the ops
    before the early stop whose group is not kept; a forced group is never kept)."""
    keep = set(keep)
    return sum(o.flops for o in ops
               if o.recomputed and (o.forced or o.group not in keep))


def kept_bytes(ops: list[OpInstance], keep) -> int:
    """The model: new storage bytes the kept groups hold (besides the block's input)."""
    keep = set(keep)
    return sum(o.new_bytes for o in ops if not o.forced and o.group in keep)


def pareto(ops: list[OpInstance]) -> list[Choice]:
    """The exact Pareto set of (kept bytes, recompute FLOPs) over which groups to keep, from
    keeping nothing to keeping every group that costs FLOPs; by kept bytes, ascending."""
    items = {}  # group -> (bytes, flops saved by keeping it)
    for o in ops:
        if not o.forced:
            b, f = items.get(o.group, (0, 0))
            items[o.group] = (b + o.new_bytes, f + o.flops * o.recomputed)
    total = recompute_flops(ops, ())
    front = [(0, 0, ())]  # (bytes, flops saved, groups kept)
    for group, (b, f) in sorted(items.items()):
        if f == 0:
            continue  # keeping it adds bytes and saves nothing
        merged = sorted(front + [(fb + b, ff + f, (*keep, group)) for fb, ff, keep in front],
                        key=lambda p: (p[0], -p[1]))
        front, best = [], -1
        for p in merged:
            if p[1] > best:
                front.append(p)
                best = p[1]
    return [Choice(keep, kb, total - saved) for kb, saved, keep in front]


def thin(front: list[Choice], points: int) -> list[Choice]:
    """At most ``points`` choices of a Pareto set, keeping nothing left out (that is ``full``,
    always on the menu): the one keeping the most, then for evenly spaced byte levels between
    the smallest and the largest the choice with the least recompute at or under that level.
    So the points cover the byte range the way a budget sweeps it, each the best at its level."""
    candidates = [c for c in front if c.keep]
    if points < 1 or not candidates:
        return []
    if len(candidates) <= points:
        return candidates
    low, high = candidates[0].kept_bytes, candidates[-1].kept_bytes
    chosen = {}
    for k in range(points):  # one point: the highest level (the zero-FLOP point)
        level = high if points == 1 else low + (high - low) * k // (points - 1)
        best = max((c for c in candidates if c.kept_bytes <= level), key=lambda c: c.kept_bytes)
        chosen[best.keep] = best
    return sorted(chosen.values(), key=lambda c: c.kept_bytes)


def choices(block: nn.Module, x_like: torch.Tensor, points: int) -> list[Choice]:
    """The thinned Pareto set of one block: the op-level options the planner may use."""
    return thin(pareto(block_ops(block, x_like)), points)


# ---------------------------------------------------------------- the suffix's ops
class _Recording:
    """A suffix region (``policies._Trunk``) that checkpoints nothing: it records the ops
    and the saved tensors of the suffix's forward, from the last block's return on."""

    def __init__(self, recorder: _Recorder):
        self.recorder, self.packs, self.first = recorder, [], []

    def region(self, replay, params, store, args, kwargs):
        def pack(t):
            self.packs.append((len(self.recorder.ops), t.untyped_storage()))
            return t

        self.first.append(args[0])
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), self.recorder:
            yield


def suffix_ops(model: nn.Module, batch, like: torch.Tensor) -> list[OpInstance]:
    """The op instances of ``model``'s suffix (what runs after its last block: final norm,
    head and, for a course model, the loss), in the order a checkpointed suffix's selective
    policy sees them, grouped and with the recompute's early stop as ``block_ops`` does for a
    block: so ``pareto`` and ``thin`` give the suffix's op-level options
    (``menu:suffix=selective:ops=...``). The blocks are cut out (``costs._blocks_cut_out``;
    ``like``: a tensor like the last block's output)."""
    from .costs import _blocks_cut_out, _Meter
    from .policies import suffix_applied

    counter = torch.utils.flop_counter.FlopCounterMode(display=False,
                                                       custom_mapping=EXTRA_FLOP_FORMULAS)
    region = _Recording(_Recorder(counter.flop_registry))
    with torch.random.fork_rng(devices=[]), _blocks_cut_out(model, like, _Meter(), [], False), \
            suffix_applied(model, region):
        loss = model.loss(batch)
    if not region.first:
        return []  # no suffix ran (no last block inside the entry)
    stop = region.packs[-1][0] if region.packs else 0
    saved = {id(s) for _, s in region.packs}
    before = [region.first[0], *model.parameters(), *model.buffers(),
              *(t for t in batch if isinstance(t, torch.Tensor))]
    ops = _grouped(region.recorder.ops, stop, saved, before, loss)
    model.zero_grad(set_to_none=True)
    return ops


def suffix_choices(model: nn.Module, batch, like: torch.Tensor, points: int) -> list[Choice]:
    """The thinned Pareto set of the suffix's ops (at most ``points``; the zero-FLOP point,
    keeping every op output that costs FLOPs to make, always among them)."""
    return thin(pareto(suffix_ops(model, batch, like)), points)


# ---------------------------------------------------------------- the prefix inside block 0
class _PrefixDone(Exception):
    pass


def prefix_ops(model: nn.Module, batch) -> int:
    """How many ops SAC's policy function sees before block 0 runs, in a forward of
    ``model.loss(batch)``: under a menu's ``prefix=full`` the region at block 0 opens at the
    entry call, so the prefix's ops come first and block 0's op positions are shifted by this
    many (``plan._options_with_prefix`` shifts them). Counted as ``block_ops`` counts (every
    aten op but ``SAC_IGNORED_OPS``), with grad on as in the forward, the random state put
    back.
    -1 if one of them draws random numbers: SAC's region then gives every random op of block
    0 the prefix's decision (recompute), so an option keeping one would not keep it; the
    planner offers no op-level option with the prefix inside then (``plan``)."""
    recorder = _Recorder({})
    first = find_blocks(model)[0]

    def stop(*args, **kwargs):
        raise _PrefixDone

    first.forward = stop
    try:
        with torch.random.fork_rng(devices=[]), recorder, \
                torch.autograd.graph.saved_tensors_hooks(lambda t: None, lambda t: t):
            model.loss(batch)
    except _PrefixDone:
        draws = any(_draws_random(func, args, kwargs) for func, args, kwargs, *_ in recorder.ops)
        return -1 if draws else len(recorder.ops)
    finally:
        del first.forward
    raise RuntimeError("the model's loss never called its block 0: no prefix to count")
