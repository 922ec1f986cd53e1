"""What the planner needs to know about a model, measured: each block's bytes and FLOPs.

``measure_costs(model)`` runs each block alone under a ``MemoryMeter`` and returns
``ChainCosts``; ``config_costs("70b", batch, seq)`` does the same for one block of a big config on
fake tensors, times L. ``plan.py`` turns these costs into predictions and placements (its
docstring gives the memory model that uses them). Before any block is measured, one watched
forward of the model (``recording.py``) records how it calls its blocks and what it hands them,
and refuses what the planner cannot predict exactly; this module measures each block as
recorded there.

What is measured (``measure_costs``; ``config_costs`` does it for one fake block times L)
Each block alone, under a ``MemoryMeter``, with a stand-in for the block above (its backward
makes the gradient of the block's output) and below (it keeps the gradient of the input):
the bytes of its input and output, what its forward keeps besides them, whether it keeps its
input or output (ReLU's output is kept by ReLU *and* by the next Linear: counted once), the peaks
of its forward, of its forward inside a checkpoint, of the recompute (which torch's
non-reentrant checkpoint stops at the last saved tensor), and of its backward, plain and after a
recompute (checkpoint hands each recomputed tensor over once, so it dies as soon as the op that
reads it is done: a little earlier than in a plain backward). Each backward is measured twice:
with the block's input kept alive by someone else, and without. FLOPs come from
``FlopCounterMode``. The prefix and suffix are measured on the model with its blocks cut out,
the optimizer step on the real optimizer; with ``suffix=True``, also with the suffix
checkpointed, fully and at the op-level points of its own Pareto set (``measure_suffixes``).
Each block runs with the arguments the model gave it besides the hidden state and under the
autocast the model ran it under (mixed precision in its forward), its forward only.
A block whose forward would not run the same when recomputed (it holds a ``torch.Generator``,
which checkpoint does not restore, or its recompute changes its Python attributes or its own
buffers: a step counter, a running mean updated in place) gets ``replays=False`` and only the
options that re-run nothing (offload); the plan never checkpoints it, and its report says so
(``ChainCosts.notes``).
A weight tied across blocks gets its gradient from the last of them (backward meets it first):
the blocks before are measured with that gradient already there, so it is counted once. A
block that returns a view of a larger tensor is refused, and so, while the model first runs
(``recording._record_calls``), is what no term of the memory model holds: a suffix that reads
a tensor made before the last block returned, a tensor the forward makes and passes the
blocks, blocks that all return their input, a block that changes its input in place or keeps a
tensor with a graph that the model reads after the blocks. A parameter the model passes its blocks
gets its gradient from the last block that uses it (or the suffix); parameters the backward
never reaches get no optimizer state. A checkpointed segment's first block is measured also
with its input kept by the checkpoint alone (``first_backward``), and every block also as one
that is not its segment's last, its recompute run whole before its backward starts
(``interior_backward``: a last block's backward runs the ops that read no saved tensor before
its recompute). The model's own
code between blocks is watched (``recording._Joints``): nothing, or the residual add (``x = x +
block(x)``, then measured with each block: ``LayerCost.residual``); anything else is refused.
Tensors the model gives a block besides its input are replayed as given, those that carry its
graph as detached copies whose gradient is counted (``LayerCost.extra_grad_bytes``); a batch
input that requires grad keeps its gradient all step (in ``base_bytes``). ``times=True``:
each option's forward + backward time, and the plain forward's alone (``FORWARD``), for the
time objective.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.checkpoint import checkpoint

from . import step
from .meter import MemoryMeter
from .policies import find_blocks
from .recompute import EXTRA_FLOP_FORMULAS
from .recording import (
    _carries_graph,
    _check_distinct,
    _Given,
    _given_gradients,
    _last_users,
    _record_calls,
    _storage_ref,
    _tensor_id,
    check_no_policy,
)
from .units import check_positive_int


# ---------------------------------------------------------------- costs of one block
@dataclass(frozen=True)
class Backward:
    """A block's backward, from the moment the gradient of its output exists (its tape and that
    gradient live) to its end: the highest live bytes above that start, and the change at the
    end. "held": something else keeps the block's input alive throughout; "free": only the
    block keeps it, so it dies in the block's backward."""

    peak_held: int = 0
    peak_free: int = 0
    change_held: int = 0
    change_free: int = 0

    def peak(self, held: bool) -> int:
        return self.peak_held if held else self.peak_free

    def change(self, held: bool) -> int:
        return self.change_held if held else self.change_free


@dataclass(frozen=True)
class LayerCost:
    """One block, measured alone. Every peak is in bytes above the live bytes at its start."""

    input_bytes: int  # x: what a checkpointed segment starting here keeps
    output_bytes: int  # the next block's input
    saved_bytes: int  # what a plain forward keeps besides its input and output
    saves_input: bool = True
    saves_output: bool = False
    forward_flops: int = 0
    recompute_flops: int = 0  # up to its last saved tensor: a segment's last block stops there
    backward_flops: int = 0
    grad_bytes: int = 0  # its parameters' gradients
    needs_input_grad: bool = True  # does backward make a gradient for x (the next block down)?
    forward_peak: int = 0  # plain forward (input live)
    forward_peak_unsaved: int = 0  # forward inside a checkpoint: keeps nothing
    recompute_peak: int = 0  # recompute as a segment's last block: from the gradient of its output
    recompute_kept: int = 0  # ... to the end of the recompute, which stops at its last save
    backward: Backward = Backward()  # plain
    # after a recompute: checkpoint hands each saved tensor over once, so it dies as soon as
    # the op that reads it is done, a little earlier than in a plain backward
    checkpointed_backward: Backward = Backward()
    # it returns its input itself (nn.Identity, Dropout(0)): x_{k+1} is x_k, it saves nothing,
    # and under any policy it keeps nothing (a checkpoint that saves nothing keeps no input)
    returns_input: bool = False
    # after a recompute, as the first block of a checkpointed segment: "held", someone before
    # keeps x (as ``checkpointed_backward``'s); "free", only the checkpoint keeps it, which
    # lets it go with the last saved tensor of its region, in this block's backward (so a
    # light block's gradient sums can run after x is gone). None: taken as always held
    first_backward: Backward | None = None
    # ``checkpointed_backward`` and ``first_backward`` for a block that is not its segment's
    # last: its recompute ran whole, with the segment's, before its backward starts, so the
    # ops of its backward that read no saved tensor (the gradient of ``h * 0.5``) run after
    # it; a last block's backward runs those first, and its recompute when it first reads
    # one. None: as a last block's
    interior_backward: Backward | None = None
    interior_first_backward: Backward | None = None

    def first_checkpointed_backward(self) -> Backward:
        """The backward of this block as a checkpointed segment's first (``first_backward``)."""
        if self.first_backward is not None:
            return self.first_backward
        back = self.checkpointed_backward
        return replace(back, peak_free=back.peak_held, change_free=back.change_held)
    # its forward run again does what it did: no torch.Generator of its own (checkpoint
    # restores only the global random stream) and no Python state its recompute changes (a
    # step counter, a buffer of its own updated in place). False: it runs plain or offloaded
    # only, never inside a checkpoint
    replays: bool = True
    # the model's own loop adds the block's input to its output (``x = x + block(x)``): x_{k+1}
    # is that sum, not the block's output. Measured with the add (outside any checkpoint, as it
    # runs), so every number above is the block and its add; a checkpointed segment cannot run
    # past it (block k+1 gets the sum, not block k's output), so segments end at this block
    residual: bool = False
    # no input needing a gradient and no trainable parameter (frozen leading blocks): it
    # records no graph, so a checkpoint around it keeps and recomputes nothing; a checkpointed
    # segment of such blocks only is the same as plain (``plan.predict`` takes it so)
    frozen: bool = False
    # gradients of the model's other tensors that carry a graph (FiLM's conditioning, a
    # decoder's memory: ``block(x, c)``) of which this block is the last user: its backward
    # makes them first (the blocks before add into them in place), and they stay until the
    # prefix's backward takes them
    extra_grad_bytes: int = 0
    # it gets such a tensor (``extra_grad_bytes`` or not): inside a checkpointed segment of
    # several blocks, the segment's record of a later block's call keeps it alive to the end of
    # the step, which the memory model does not count, so no segment runs on into this block
    given_graph: bool = False
    # the autocast regions the model ran it under (``recording._autocast_state``): a
    # checkpointed segment recomputes every block under its first block's, so a segment ends
    # where this changes
    autocast: tuple = ()

    def segment_backward(self, first: bool, last: bool) -> Backward:
        """The backward of this block inside a checkpointed segment, after its recompute:
        ``first``, the segment's first block (its input kept by the checkpoint); ``last``, its
        last (the recompute stopped at its last saved tensor)."""
        if not last:
            whole = self.interior_first_backward if first else self.interior_backward
            if whole is not None:
                return whole
        return self.first_checkpointed_backward() if first else self.checkpointed_backward

    @property
    def kept_bytes(self) -> int:
        """What a plain forward keeps for backward beyond its input (its output if it saves it)."""
        return self.saved_bytes + self.output_bytes * self.saves_output

    @classmethod
    def simple(cls, input_bytes: int, saved_bytes: int, flops: int, grad_bytes: int = 0):
        """A block with no transients: keeps its input and ``saved_bytes`` more; its backward
        frees them and leaves the gradient of its input and of its parameters. For hand
        calculations and tests (Chen's chain: ``simple(1, 0, 1)`` is one unit per layer)."""
        a, s, g = input_bytes, saved_bytes, grad_bytes
        back = Backward(g + a, g + a, g - s, g - s - a)
        return cls(a, a, s, True, False, flops, flops, 2 * flops, g, True,
                   forward_peak=s + a, forward_peak_unsaved=a, recompute_peak=s,
                   recompute_kept=s, backward=back, checkpointed_backward=back)


@dataclass(frozen=True)
class OptionCost:
    """One block under a one-block option (selective, offload), measured as a plain block is:
    the option's region is part of the block, so the memory model treats it as a plain block
    with these numbers. ``recompute_flops``: what its backward runs beyond a plain backward."""

    layer: LayerCost
    recompute_flops: int = 0
    host_bytes: int = 0  # offload: bytes its forward copies to host memory


# Not a policy: in ``ChainCosts.times``, the seconds of a block's plain forward alone, which a
# checkpointed segment's blocks but the last re-run in full (``plan.segment_time_ns``).
FORWARD = "forward"

# The menu every block gets: torch's selective checkpointing (keep matmul and attention outputs;
# keep only attention's; recompute only the elementwise activations) and offload to host.
MENU = ("selective:save=mm,sdpa", "selective:save=sdpa", "selective:recompute=gelu,silu,relu",
        "offload")


def check_menu(menu) -> tuple[str, ...]:
    """The menu as a tuple of one-block option strings (selective:..., offload), or a one-line
    error naming the fix, before anything is measured."""
    from .policies import Offload, Selective, parse_policy

    fix = f"pass a tuple of one-block options such as costs.MENU = {MENU}"
    if isinstance(menu, str) or not isinstance(menu, (tuple, list)):
        raise TypeError(f"menu: {fix}; got {menu!r}")
    for option in menu:
        if not isinstance(option, str) or not isinstance(parse_policy(option), (Selective,
                                                                                 Offload)):
            raise ValueError(f"menu option {option!r} is not a one-block option (full and "
                             f"plain are always tried): {fix}")
    return tuple(menu)


@dataclass(frozen=True)
class TrunkCost:
    """Everything but the blocks: prefix (embeddings), suffix (norm, head, loss), optimizer."""

    base_bytes: int = 0  # live before forward: parameters, buffers, optimizer state
    prefix_peak: int = 0  # prefix forward, above base
    prefix_kept: int = 0  # what the prefix keeps for backward (x_0 included if it keeps it)
    prefix_keeps_input: bool = True  # is x_0 kept by the prefix (or the caller) all step long?
    input_counted: bool = True  # does the meter count x_0 at all? (a batch made outside: no)
    # suffix forward and backward; "held": the last block keeps x_L too
    suffix_forward_peak_held: int = 0
    suffix_forward_peak_free: int = 0
    suffix_backward_peak_held: int = 0
    suffix_backward_peak_free: int = 0
    suffix_kept_held: int = 0  # what the suffix forward adds (x_L excluded)
    suffix_kept_free: int = 0  # the same, when x_L may go (it drops x_L if it does not keep it)
    suffix_left: int = 0  # what the suffix's backward leaves: its parameters' gradients
    prefix_backward_peak: int = 0  # prefix backward, above what is live when it starts
    backward_left: int = 0  # what the whole trunk leaves after backward: its gradients, the loss
    suffix_grad_bytes: int = 0  # gradients of the suffix's parameters (in suffix_left)
    grad_bytes: int = 0  # gradients of all the trunk's parameters (in backward_left)
    optimizer_peak: int = 0  # the optimizer step, above base + all gradients
    flops: int = 0  # forward + backward FLOPs of prefix and suffix (as they are)
    # how the suffix runs: "" as it is, else a menu's suffix option ("full",
    # "selective:ops=..."), measured under it; and what its backward re-runs (FLOPs)
    suffix: str = ""
    recompute_flops: int = 0
    # the prefix (embeddings) inside the checkpointed segment at block 0 (a menu's
    # prefix=full): can it be (x_0 dies when block 0 returns, nothing else of the prefix stays
    # outside that region), the FLOPs its recompute runs, and "full" on the trunk the
    # planner derives for it (``plan.with_trunk``), whose prefix keeps its saved tensors again
    # from the recompute to its backward (``prefix_backward_kept``; -1: ``prefix_kept``)
    prefix_recomputable: bool = False
    prefix_forward_flops: int = 0
    # the ops SAC's policy sees before block 0 (``op_choices.prefix_ops``): under prefix=full a
    # selective:ops= block 0 counts its positions from the prefix's first op (-1: the prefix
    # draws random numbers, and block 0 has no op-level option with it inside)
    prefix_ops: int = 0
    # bytes of the batch's storages the prefix views (a reshape of a 3-D batch for a Linear):
    # the meter counts them in prefix_kept, and they stay all step, the prefix inside or not
    prefix_batch_views: int = 0
    # under prefix=full, what later blocks keep of the prefix's tensors all step (made in the
    # region, kept outside it: a Hugging Face model's position ids), batch views aside
    prefix_kept_outside: int = 0
    # of the forward's tensors alive when the blocks start, the bytes still alive after the
    # step's backward (the batch's views; a wrapper's cached block arguments): kept all step
    prefix_survivors: int = 0
    prefix: str = ""
    prefix_backward_kept: int = -1

    def suffix_forward_peak(self, held):
        return self.suffix_forward_peak_held if held else self.suffix_forward_peak_free

    def suffix_backward_peak(self, held):
        return self.suffix_backward_peak_held if held else self.suffix_backward_peak_free

    def suffix_kept(self, held):
        return self.suffix_kept_held if held else self.suffix_kept_free


@dataclass(frozen=True)
class ChainCosts:
    """A model as a chain of measured blocks between a measured trunk."""

    layers: tuple[LayerCost, ...]
    trunk: TrunkCost = TrunkCost()
    name: str = "model"
    param_bytes: int = 0  # parameters and buffers (in trunk.base_bytes)
    optimizer_bytes: int = 0  # optimizer state (in trunk.base_bytes)
    notes: tuple[str, ...] = ()  # assumptions behind the numbers, for the report
    # per block: option (a one-block policy string, see MENU) -> the block measured under it
    menu: tuple[dict[str, OptionCost], ...] = ()
    # per block: option ("none", "full" and the menu's) -> measured seconds of its forward +
    # backward alone (interleaved medians), and FORWARD -> its plain forward's alone; empty
    # when not measured (fake tensors)
    times: tuple[dict[str, float], ...] = ()
    # per block: option -> the spread of its measured seconds (half the interquartile range);
    # empty: not measured (the time objective then takes the medians as exact)
    spreads: tuple[dict[str, float], ...] = ()
    # the trunk measured under each checkpointed-suffix option (``TrunkCost.suffix``), besides
    # ``trunk`` (the suffix as it is); empty: not measured (``measure_costs(..., suffix=True)``)
    suffixes: tuple[TrunkCost, ...] = ()

    @property
    def n(self) -> int:
        return len(self.layers)

    @property
    def step_flops(self) -> int:
        """Forward + backward FLOPs of a plain step."""
        return self.trunk.flops + sum(c.forward_flops + c.backward_flops for c in self.layers)

    @property
    def gradient_bytes(self) -> int:
        """Gradients of the blocks' parameters."""
        return sum(c.grad_bytes for c in self.layers)


# ---------------------------------------------------------------- measuring the costs
class _Meter(MemoryMeter):
    """A meter with a timeline and one extra: ``mark_next_op(name)`` notes the timeline position
    just before the next op runs (so a window can start after frees that happen between ops)."""

    def __init__(self):
        super().__init__(timeline=True)
        self.marks: dict[str, int] = {}
        self._pending: str | None = None
        self._after: str | None = None

    def mark(self, name: str) -> None:
        self.marks[name] = len(self.timeline)

    def mark_next_op(self, name: str) -> None:
        self._pending = name

    def mark_after_next_op(self, name: str) -> None:
        self._after = name

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self._pending is not None:
            self.mark(self._pending)
            self._pending = None
        after, self._after = self._after, None
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if after is not None:
            self.mark(after)
        return out

    def live_at(self, index: int, default: int) -> int:
        """Live bytes just before timeline position ``index``."""
        return self.timeline[index - 1].live_bytes if index > 0 else default

    def window_peak(self, start: int, stop: int | None, floor: int) -> int:
        """Highest live bytes at timeline positions start..stop-1, and at least ``floor``."""
        return max([p.live_bytes for p in self.timeline[start:stop]] + [floor])


class _Source(torch.autograd.Function):
    """A block input made inside the meter (a copy), whose gradient is kept in ``stash``, as the
    block below would keep it until its own backward."""

    @staticmethod
    def forward(ctx, x, stash):
        ctx.stash = stash
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        ctx.stash.append(grad)
        return None, None


class _Sink(torch.autograd.Function):
    """Ends the graph after a block: its backward makes the gradient of the block's output, as
    the block above would, then marks the meter. Its output has no bytes."""

    @staticmethod
    def forward(ctx, out, meter):
        ctx.meter, ctx.shape, ctx.dtype = meter, out.shape, out.dtype
        return out.new_empty(0)

    @staticmethod
    def backward(ctx, grad):
        g = torch.zeros(ctx.shape, dtype=ctx.dtype, device=grad.device)
        ctx.meter.mark("backward")
        return g, None


class _SavingTail(torch.autograd.Function):
    """Inside a checkpoint, after the block: it saves an empty tensor, so the recompute runs
    the whole block and stops here, at the start of backward, before the block's own backward
    (which then starts at the meter's ``checkpointed_backward`` mark)."""

    @staticmethod
    def forward(ctx, out):
        ctx.save_for_backward(out.new_empty(0))
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        ctx.saved_tensors  # noqa: B018 (reading it runs the recompute)
        return grad


def _flop_counter():
    return torch.utils.flop_counter.FlopCounterMode(display=False,
                                                    custom_mapping=EXTRA_FLOP_FORMULAS)


def _grad_bytes(module: nn.Module, existing=frozenset()) -> int:
    """Bytes of the module's gradients, but those named in ``existing`` (made before it ran),
    and of the parameters the model passes it whose gradient it makes (``_Given.outside``)."""
    own = sum(p.grad.untyped_storage().nbytes() for name, p in module.named_parameters()
              if p.grad is not None and name not in existing)
    return own + sum(p.grad.untyped_storage().nbytes() for p, exists in _outside(existing)
                     if not exists and p.grad is not None)


def _outside(existing) -> tuple:
    return existing.outside if isinstance(existing, _Given) else ()


def _count_outside(meter, existing, accumulate: bool) -> None:
    """The gradients of passed parameters that exist before the block's backward made again
    under the meter (the block's other arguments are counted from the start, from
    ``_OTHER_ARGUMENTS``): backward may replace one rather than add into it in place, and the
    meter must see the old one go, as it does in training (where the old one was made under
    it)."""
    for p, exists in _outside(existing):
        if exists or accumulate:
            p.grad = torch.zeros_like(p)


def _forget_outside(existing) -> None:
    """Drops the gradients of the parameters passed from outside, as ``zero_grad`` does the
    block's own."""
    for p, _ in _outside(existing):
        p.grad = None


class _MarkRecomputeEnd:
    """The recompute context of a checkpoint: marks the meter when the recompute ends (it stops
    early by raising, which passes through here), and again at the next op."""

    def __init__(self, meter):
        self.meter = meter

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.meter.mark("recomputed")
        self.meter.mark_next_op("checkpointed_backward")
        return False


def _existing_gradients(module: nn.Module, accumulate: bool, existing=frozenset()) -> None:
    """No gradients, or (``accumulate``) zero gradients already there, as in the micro-batches
    after the first under gradient accumulation: backward then adds into them in place.
    ``existing``: the parameters (by name) whose gradients exist anyway: weights tied to a
    later block, whose backward (it runs first) made their gradient."""
    module.zero_grad(set_to_none=True)
    for name, p in module.named_parameters():
        if accumulate or name in existing:
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
    for p, exists in _outside(existing):
        p.grad = torch.zeros_like(p) if accumulate or exists else None


def _run_layer(block, x_like, keep_input: bool, checkpointed: bool, accumulate: bool = False,
               existing=frozenset(), copy: bool = True, residual: bool = False,
               tail: bool = False):
    """One forward + backward of ``block`` alone, under a meter; returns the meter and facts.
    ``keep_input=False``: only the block keeps its input (we drop our reference after forward;
    inside a checkpoint the block gets a copy made in the checkpointed region, and we keep the
    checkpoint's own input, as a segment keeps its first input: the block's input then dies
    once in its backward, as a block's inside a segment does, whatever blocks surround it).
    ``copy=False`` with both: the block gets the checkpoint's own input, which we drop: only
    the checkpoint keeps it, as for a segment's first block whose input nobody else keeps.
    ``tail``: a checkpoint ending after the block (``_SavingTail``): its recompute runs the whole
    block before the block's backward starts, as for a block that is not its segment's last."""
    _existing_gradients(block, accumulate, existing)
    meter, stash, packs = _Meter(), [], []

    def pack(t):
        packs.append(len(meter.timeline))
        return t

    def fn(x):
        out = block(x) if keep_input or not copy else block(x.clone())
        return _SavingTail.apply(out) if tail else out

    def run_block(x):
        if not checkpointed:
            with torch.autograd.graph.saved_tensors_hooks(pack, _same):
                return block(x)
        return checkpoint(fn, x, use_reentrant=False,
                          context_fn=lambda: (contextlib.nullcontext(), _MarkRecomputeEnd(meter)))

    def run(x):  # the model's add, if it has one, runs outside the block's checkpoint
        return x + run_block(x) if residual else run_block(x)

    with meter:
        meter.track(block)
        _count_outside(meter, existing, accumulate)
        # the model's other arguments to the block, made before it ran
        meter.count(*(_OTHER_ARGUMENTS[-1] if _OTHER_ARGUMENTS else ()))
        x = _Source.apply(x_like, stash)
        meter.mark("start")
        start = meter.live_bytes
        with meter.phase("forward"):
            out = run(x)
        meter.mark("forward")
        x_ref, out_ref, a_out = _storage_ref(x), _storage_ref(out), out.untyped_storage().nbytes()
        returns_input = out is x or not isinstance(x, FakeTensor) and (  # fake: no pointers
            out.untyped_storage().data_ptr() == x.untyped_storage().data_ptr())
        a_in = x.untyped_storage().nbytes()
        sink = _Sink.apply(out, meter)
        del out
        if not keep_input and (not checkpointed or not copy):
            del x  # inside a checkpoint, x stays: the block's own input is its copy
        info = dict(start=start, kept=meter.live_bytes - start, a_in=a_in, a_out=a_out,
                    saves_input=x_ref() is not None, saves_output=out_ref() is not None,
                    returns_input=returns_input,
                    last_pack=packs[-1] if packs else meter.marks["start"])
        state = _python_state(block)
        if sink.requires_grad:
            with meter.phase("backward"):
                torch.autograd.backward(sink, torch.empty(0, device=sink.device))
        info.update(graph=sink.requires_grad,
                    grad_bytes=0 if accumulate else _grad_bytes(block, existing),
                    needs_input_grad=bool(stash), end=meter.live_bytes,
                    replays=_python_state(block) == state)  # the recompute changed nothing
        if checkpointed and "backward" in meter.marks and "recomputed" not in meter.marks:
            # it saved nothing (nn.Identity, Dropout(0)), so no recompute ran: an empty one
            meter.marks["recomputed"] = meter.marks["checkpointed_backward"] = \
                meter.marks["backward"]
        del sink
        stash.clear()
    meter.untrack()
    block.zero_grad(set_to_none=True)
    _forget_outside(existing)
    return meter, info


def _same(t):
    return t


_MODULE_FIELDS = frozenset(vars(nn.Module()))  # nn.Module's own bookkeeping


def _python_state(block: nn.Module) -> tuple:
    """The plain Python attributes of a block and its submodules (``_fingerprint``: numbers,
    strings, the length and items of a list), and the versions of its buffers but BatchNorm's
    running statistics (a policy's recompute leaves those as forward left them): what a forward
    that counts its calls, or updates a running mean of its own in place, changes."""
    norms = {id(t) for m in block.modules()
             if isinstance(m, nn.modules.batchnorm._NormBase) for t in m.buffers()}
    return tuple((name, k, _fingerprint(v)) for name, m in block.named_modules()
                 for k, v in vars(m).items() if k not in _MODULE_FIELDS and k != "forward") + \
        tuple((name, t._version) for name, t in block.named_buffers()
              if id(t) not in norms and not t.is_inference())


def _generators(block: nn.Module) -> list[str]:
    """Names of the ``torch.Generator`` attributes of a block and its submodules: a recompute
    draws from them again, where checkpoint restores only the global random stream."""
    return [f"{name}.{k}" if name else k for name, m in block.named_modules()
            for k, v in vars(m).items() if isinstance(v, torch.Generator)]


def _why_no_replay(block: nn.Module, layer: LayerCost) -> str | None:
    """Why a recompute of this block would not do what its forward did, or None."""
    generators = _generators(block)
    if generators:
        return f"a torch.Generator attribute ({generators[0]})"
    if not layer.replays:
        return ("a forward that does not repeat itself (state it changes, such as a step counter "
                "or a buffer updated in place, or random numbers from a stream checkpoint does "
                "not restore)")
    return None


def _window(meter, info, begin: str, end: str | None = None) -> tuple[int, int]:
    """(peak above the start, change) of the meter's timeline from mark ``begin`` to mark
    ``end`` (or the end of the run)."""
    if begin not in meter.marks:
        return 0, 0
    b = meter.marks[begin]
    at = meter.live_at(b, info["start"])
    stop = meter.marks[end] if end is not None else None
    last = meter.live_at(stop, at) if stop is not None else info["end"]
    return meter.window_peak(b, stop, at) - at, last - at


def _layer_flops(block, x_like) -> tuple[int, int, int]:
    """(forward, forward up to the last saved tensor, backward) FLOPs of the block. Counted in
    a run of their own: FlopCounterMode's module tracking holds gradients a little longer."""
    block.zero_grad(set_to_none=True)
    forward, backward, at_pack = _flop_counter(), _flop_counter(), [0]

    def pack(t):
        at_pack[0] = forward.get_total_flops()
        return t

    x = _Source.apply(x_like, [])
    with forward, torch.autograd.graph.saved_tensors_hooks(pack, _same):
        out = block(x)
    sink = _Sink.apply(out, _Meter())
    if sink.requires_grad:
        with backward:
            torch.autograd.backward(sink, torch.empty(0, device=sink.device))
    block.zero_grad(set_to_none=True)
    return forward.get_total_flops(), at_pack[0], backward.get_total_flops()


def measure_layer(block: nn.Module, x_like: torch.Tensor, accumulate: bool = False,
                  existing=frozenset(), residual: bool = False) -> LayerCost:
    """Measure one block alone on an input like ``x_like`` (its requires_grad says whether the
    block must make the gradient of its input). Real or fake tensors. Four runs under a meter
    (plain and checkpointed, each with the input kept by someone else or not) and one to count
    FLOPs. ``accumulate``: its parameters' gradients exist already (they are then not the
    block's: ``grad_bytes`` is 0); ``existing``: those of the parameters named (weights tied
    to a later block: their gradient is counted there, once); ``residual``: the model adds the
    block's input to its output (``LayerCost.residual``), measured with that add."""
    runs = {}
    with torch.random.fork_rng(devices=[]):
        for checkpointed in (False, True):
            for keep in (True, False):
                runs[checkpointed, keep] = _run_layer(block, x_like, keep, checkpointed,
                                                      accumulate, existing, residual=residual)
        runs["first"] = _run_layer(block, x_like, False, True, accumulate, existing, copy=False,
                                   residual=residual)
        for name, keep, copied in (("whole", True, True), ("whole free", False, True),
                                   ("whole first", False, False)):
            runs[name] = _run_layer(block, x_like, keep, True, accumulate, existing, copied,
                                    residual=residual, tail=True)
        block.zero_grad(set_to_none=True)
        forward_flops, recompute_flops, backward_flops = _layer_flops(block, x_like)
    ckpt_meter, ckpt = runs[True, True]
    recompute_peak, recompute_kept = _window(ckpt_meter, ckpt, "backward", "checkpointed_backward")
    return replace(
        _plain_cost(runs, forward_flops, backward_flops), recompute_flops=recompute_flops,
        replays=not _generators(block) and all(runs[True, keep][1]["replays"]
                                              for keep in (True, False)),
        forward_peak_unsaved=_window(ckpt_meter, ckpt, "start", "forward")[0],
        recompute_peak=recompute_peak, recompute_kept=recompute_kept,
        checkpointed_backward=(back := _backward(runs, True, "checkpointed_backward")),
        first_backward=_first_backward(back, runs["first"]),
        interior_backward=(whole := _backward({(True, True): runs["whole"], (True, False):
                                               runs["whole free"]}, True,
                                              "checkpointed_backward")),
        interior_first_backward=_first_backward(whole, runs["whole first"]),
        residual=residual)


def _first_backward(checkpointed: Backward, run) -> Backward:
    """A segment's first block after its recompute: held as ``checkpointed``, free from ``run``
    (the checkpoint alone keeps the input)."""
    peak, change = _window(*run, "checkpointed_backward")
    return replace(checkpointed, peak_free=peak, change_free=change)


def _backward(runs, checkpointed: bool, begin: str) -> Backward:
    (peak_h, change_h), (peak_f, change_f) = (_window(*runs[checkpointed, keep], begin)
                                              for keep in (True, False))
    return Backward(peak_h, peak_f, change_h, change_f)


def _plain_cost(runs, forward_flops: int, backward_flops: int) -> LayerCost:
    """The plain-block part of a LayerCost, from the plain runs (input held and not)."""
    (m, held), (_, free) = runs[False, True], runs[False, False]
    start, a_out = held["start"], held["a_out"]
    return LayerCost(
        input_bytes=held["a_in"], output_bytes=a_out,
        saved_bytes=held["kept"] - a_out * free["saves_output"],
        saves_input=free["saves_input"], saves_output=free["saves_output"],
        forward_flops=forward_flops, backward_flops=backward_flops,
        grad_bytes=held["grad_bytes"], needs_input_grad=held["needs_input_grad"],
        returns_input=held["returns_input"], frozen=not held["graph"],
        forward_peak=m.window_peak(m.marks["start"], m.marks["forward"], start) - start,
        backward=_backward(runs, False, "backward"))


def measure_option(block: nn.Module, x_like: torch.Tensor, option: str, plain: LayerCost,
                   accumulate: bool = False, existing=frozenset(),
                   reference=None) -> OptionCost:
    """``block`` under a one-block ``option`` (``MENU``), measured as a plain block: two runs
    under a meter (input held by someone else, and not) and one to count FLOPs. With the
    plain block's gradients (``reference``, ``_gradients_under``), an option whose gradients
    differ is refused (``ChangesGradients``): e.g. keeping an op output that the block then
    changes in place through views autograd does not check (``nn.GRU``'s gates on CPU)."""
    from .policies import applied

    with torch.random.fork_rng(devices=[]), applied(block, option, blocks=[block]) as handle:
        runs = {}
        for keep in (True, False):
            handle.stats.reset()
            runs[False, keep] = _run_layer(block, x_like, keep, False, accumulate, existing,
                                           residual=plain.residual)
        host = handle.stats.bytes_to_host
        block.zero_grad(set_to_none=True)
        forward_flops, _, backward_flops = _layer_flops(block, x_like)
    if reference is not None and not _same_gradients(reference,
                                                     _gradients_under(block, x_like, option)):
        raise ChangesGradients(f"{option} changes the block's gradients")
    layer = replace(_plain_cost(runs, forward_flops, backward_flops), residual=plain.residual)
    return OptionCost(layer, backward_flops - plain.backward_flops, host)


class ChangesGradients(ValueError):
    """An option under which a block's gradients differ from plain's (``_gradients_under``)."""


def _gradients_under(block: nn.Module, x_like: torch.Tensor, option: str | None = None):
    """The gradients of one forward + backward of ``block`` alone, its parameters' and its
    input's, under ``option`` (None: plain), from a fixed random stream and a fixed random
    gradient of its output (a zero one, as the meter's runs use, would hide a difference);
    None for fake tensors, which hold no values to compare."""
    from .policies import applied

    if isinstance(x_like, FakeTensor):
        return None
    with torch.random.fork_rng(devices=[]), (applied(block, option, blocks=[block]) if option
                                             else contextlib.nullcontext()):
        torch.manual_seed(0)
        x = x_like.detach().clone().requires_grad_(x_like.requires_grad)
        out = block(x)
        if not out.requires_grad:
            return []
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
        out.backward(g.to(dtype=out.dtype, device=out.device))
    grads = [p.grad for p in block.parameters()] + [x.grad]
    block.zero_grad(set_to_none=True)
    return grads


def _repeats(block: nn.Module, x_like: torch.Tensor) -> bool:
    """Two plain runs of the block alone give the same gradients (``_gradients_under``): else
    its forward draws from a stream checkpoint does not restore (Python's ``random``, a
    generator held somewhere no scan finds) or counts its calls, and no option may re-run it."""
    return _same_gradients(_gradients_under(block, x_like), _gradients_under(block, x_like))


def _same_gradients(a, b) -> bool:
    """Bit for bit (None where both have none)."""
    if a is None or b is None:
        return True
    return len(a) == len(b) and all(
        (u is None and v is None) or (u is not None and v is not None and torch.equal(u, v))
        for u, v in zip(a, b, strict=True))


def measure_menu(block: nn.Module, x_like: torch.Tensor, plain: LayerCost, options=MENU,
                 accumulate: bool = False, existing=frozenset(),
                 dropped: list | None = None) -> dict[str, OptionCost]:
    """Each option of the menu for one block; an option the block cannot run is left out,
    but one naming op positions the block does not have is refused (``OpPositionError``):
    a typo'd or stale position, not an option the block lacks. An option that changes the
    block's gradients is left out too, and named in ``dropped``."""
    from .policies import OpPositionError

    # a block whose forward does not replay alike (its own counter or generator: only offload
    # is offered, which re-runs nothing) would differ from itself: not compared
    out, reference = {}, _gradients_under(block, x_like) if plain.replays else None
    for option in options:
        try:
            out[option] = measure_option(block, x_like, option, plain, accumulate, existing,
                                         reference)
        except OpPositionError:
            raise
        except ChangesGradients:
            if dropped is not None:
                dropped.append(option)
        except (RuntimeError, ValueError):
            continue  # e.g. a selective variant naming ops the block does not have is fine,
            # but one that torch refuses (an op it cannot cache) is no option
    return out


def measure_times(block: nn.Module, x_like: torch.Tensor, options, rounds: int = 15
                  ) -> dict[str, float]:
    """Seconds of one forward + backward of ``block`` alone under each option ("none", "full"
    and one-block policies), interleaved round by round, ``rounds`` rounds after one warm-up:
    none's median, and each other option's median time over none's in the same round added to
    it (``medians_and_spreads``): the planner's per-block numbers."""
    return measure_times_and_spreads(block, x_like, options, rounds)[0]


def measure_times_and_spreads(block: nn.Module, x_like: torch.Tensor, options,
                              rounds: int = 15) -> tuple[dict[str, float], dict[str, float]]:
    """``measure_times``' seconds, and each option's spread: what its time over plain may be off
    by (``medians_and_spreads``). The time objective prices an option at its median difference
    plus its spread, so that it wins only by more than that. ``FORWARD`` among the options:
    the plain forward alone (what a block that is not a segment's last re-runs)."""
    import time

    from .policies import applied

    times = {o: [] for o in options}
    with torch.random.fork_rng(devices=[]):
        for r in range(rounds + 1):
            for option in options:
                with applied(block, "none" if option == FORWARD else option, blocks=[block]):
                    x = x_like.detach().clone().requires_grad_(x_like.requires_grad)
                    start = time.perf_counter()
                    out = block(x)
                    if option != FORWARD:
                        out.backward(torch.ones_like(out))
                    if r:
                        times[option].append(time.perf_counter() - start)
                    del out
                block.zero_grad(set_to_none=True)
    return medians_and_spreads(times)


def medians_and_spreads(times: dict[str, list[float]]) -> tuple[dict[str, float],
                                                                 dict[str, float]]:
    """Seconds per option from its rounds (``times[option][r]``, options run in turn in round
    r), and its spread: half the distance between the quartiles. With "none" among them, each
    option is taken against none round by round, since a round's runs see the same machine load
    and a load that slows both cancels: its seconds are none's median plus the median of its
    rounds' differences, its spread that of the differences, and none's spread 0 (its noise is
    in theirs). Without "none", each option's own median and spread."""
    import statistics

    def spread(series):
        q = statistics.quantiles(series, n=4) if len(series) > 1 else [series[0]] * 3
        return (q[2] - q[0]) / 2

    plain = times.get("none")
    if plain is None:
        return ({o: statistics.median(t) for o, t in times.items()},
                {o: spread(t) for o, t in times.items()})
    base = statistics.median(plain)
    over = {o: [a - b for a, b in zip(t, plain, strict=True)] for o, t in times.items()}
    return ({o: base + statistics.median(d) for o, d in over.items()},
            {o: spread(d) for o, d in over.items()})


class _Cut(torch.autograd.Function):
    """Stands in for all the blocks when the trunk is measured: a new output like the last
    block's; the input is stashed (kept alive) until backward reaches it, as the first block
    would keep it; optionally the output is saved, as a last block that saves its output."""

    @staticmethod
    def forward(ctx, x, anchor, like, meter, stash, keep_output, residual=False, tail=True,
                *extras):
        meter.mark("cut")
        stash.append(x)
        # x_0 as it comes in: under prefix=full the policy frees it once block 0 returns
        meter.cut_input = (x.untyped_storage().nbytes(), _storage_ref(x))
        meter.cut_live = [r for r in meter._live.values() if r.category == "activations"]
        out = torch.zeros(like.shape, dtype=like.dtype, device=x.device)
        meter.mark("suffix")
        # residual: the model adds x to this output (x gets its gradient through that add);
        # tail: no stand-in comes after this one (its backward ends the suffix's)
        ctx.meter, ctx.stash, ctx.needs = meter, stash, x.requires_grad and not residual
        ctx.tail = tail
        # the model's other tensors given to the blocks that carry a graph: their gradients,
        # which the blocks' backwards make, go back to the prefix (zeros, as a stand-in)
        ctx.extras = [(t.shape, t.dtype) if t.requires_grad else None for t in extras]
        stash.extend(extras)  # alive until the blocks' backward is done, as the blocks keep them
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        if keep_output:
            ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        if ctx.tail:
            _suffix_done(ctx.meter)
        ctx.stash.clear()
        g = torch.zeros(ctx.x_shape, dtype=ctx.x_dtype, device=grad.device) if ctx.needs else None
        extras = [None if e is None else torch.zeros(e[0], dtype=e[1], device=grad.device)
                  for e in ctx.extras]
        ctx.meter.mark_next_op("prefix_backward")
        return g, None, None, None, None, None, None, None, *extras


def _suffix_done(meter) -> None:
    """The suffix's backward has made the gradient of the last block's output: mark it."""
    meter.mark("cut_backward")
    meter.suffix_grads = meter.breakdown()["gradients"]


class _Tail(torch.autograd.Function):
    """The last block's stand-in in a model that adds each block's input to its output
    (``LayerCost.residual``): a new output like its input, which the model's add (counted in
    the block's costs) makes the last block's output from; its backward marks where the
    suffix's backward ended, as ``_Cut``'s does in a chain."""

    @staticmethod
    def forward(ctx, x, meter):
        ctx.meter = meter
        return torch.zeros_like(x)

    @staticmethod
    def backward(ctx, grad):
        _suffix_done(ctx.meter)
        return None, None


@contextlib.contextmanager
def _blocks_cut_out(model, like, meter, stash, keep_output: bool, residual: bool = False):
    """Inside, the model's first block runs ``_Cut`` and the other blocks pass their input
    through: the trunk runs as if the blocks had no cost. (Instance forwards, removed after, as
    policies install theirs; the module tree stays whole, so every parameter is still counted.)
    ``residual``: the model adds each block's input to its output (``LayerCost.residual``);
    those adds are counted in the blocks' costs, so the suffix starts after the last one (its
    forward, and its backward up to the gradient of that sum)."""
    blocks = find_blocks(model)

    def cut(x, *args, **kwargs):
        anchor = torch.empty(0, requires_grad=True)  # makes the output need a gradient
        extras = [t for t in [*args, *kwargs.values()] if _carries_graph(t)]
        out = _Cut.apply(x, anchor, like, meter, stash, keep_output, residual,
                         not residual or len(blocks) == 1, *extras)
        return _then_suffix(out)

    def _then_suffix(out):
        if residual:
            meter.mark_after_next_op("suffix")  # the model's add
        return out

    def tail(x, *args, **kwargs):
        return _then_suffix(_Tail.apply(x, meter))

    rest = [_pass_through] * (len(blocks) - 2) + [tail if residual else _pass_through]
    for block, forward in zip(blocks, [cut] + rest[:len(blocks) - 1], strict=True):
        block.forward = forward
    try:
        yield
    finally:
        for block in blocks:
            del block.forward


def _pass_through(x, *args, **kwargs):
    return x


def _suffix_run(model, option: str, prefix: bool = False):
    """The suffix checkpointed under ``option`` (a menu's suffix option; "": as it is), and
    with ``prefix`` the prefix inside block 0's checkpoint (block 0: the blocks' stand-in)."""
    from .policies import Menu, _suffix_region, suffix_applied

    if prefix:
        return suffix_applied(model, None, Menu(((0, 1, "full", ()),), option, "full"))
    region = _suffix_region(option)
    return suffix_applied(model, region) if region is not None else contextlib.nullcontext()


def _run_trunk(model, batch, like, keep_output: bool, accumulate: bool = False,
               suffix: str = "", prefix: bool = False, residual: bool = False):
    meter, stash = _Meter(), []
    _existing_gradients(model, accumulate)
    with _blocks_cut_out(model, like, meter, stash, keep_output, residual), \
            _suffix_run(model, suffix, prefix), meter:
        meter.track(model)
        start = meter.live_bytes
        with meter.phase("forward"):
            loss = model.loss(batch)
        meter.mark("forward_end")
        a0, x0_ref = meter.cut_input
        batch_storages = {id(t.untyped_storage()) for t in batch}
        counted = id(x0_ref()) not in batch_storages
        with meter.phase("backward"):
            loss.backward()
        end = meter.live_bytes
    meter.untrack()
    grads = 0 if accumulate else _grad_bytes(model)
    model.zero_grad(set_to_none=True)
    survivors = sum(r.nbytes for r in meter.cut_live if r() is not None)
    return meter, dict(start=start, end=end, counted=counted, a0=a0, grads=grads,
                       survivors=survivors,
                       suffix_grads=0 if accumulate else meter.suffix_grads,
                       keeps_x0=x0_ref() is not None)


def _trunk_flops(model, batch, like, suffix: str = "") -> int:
    counter = _flop_counter()
    with _blocks_cut_out(model, like, _Meter(), [], False), _suffix_run(model, suffix), counter:
        model.loss(batch).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def measure_trunk(model: nn.Module, batch, like: torch.Tensor,
                  accumulate: bool = False, suffix: str = "", prefix: bool = False,
                  residual: bool = False) -> TrunkCost:
    """Prefix and suffix of ``model``, measured with its blocks cut out (``like``: a tensor
    like the last block's output). ``base_bytes`` is the parameters (and, if ``accumulate``,
    every gradient, there from the start). ``suffix``: the suffix checkpointed under this
    menu suffix option (``policies._Trunk``), measured the same way: its recompute, at the
    start of the suffix's backward, is inside the suffix's backward peak; ``flops`` is then
    the suffix's FLOPs with that recompute (``measure_suffixes`` makes it a difference).
    ``residual``: the model adds each block's input to its output (``_blocks_cut_out``)."""
    option = suffix  # (``suffix`` names a timeline mark below)
    with torch.random.fork_rng(devices=[]):
        free_meter, free = _run_trunk(model, batch, like, False, accumulate, suffix, prefix,
                                      residual)
        held_meter, held = _run_trunk(model, batch, like, True, accumulate, suffix, prefix,
                                      residual)
        flops = _trunk_flops(model, batch, like, suffix)
    a_last = like.untyped_storage().nbytes()
    values = {}
    for variant, m, info in (("free", free_meter, free), ("held", held_meter, held)):
        cut, suffix, fwd_end = m.marks["cut"], m.marks["suffix"], m.marks["forward_end"]
        bwd_in = m.marks["cut_backward"]
        at_cut, at_suffix = m.live_at(cut, info["start"]), m.live_at(suffix, info["start"])
        at_fwd_end, at_bwd_in = m.live_at(fwd_end, at_suffix), m.live_at(bwd_in, at_suffix)
        values[variant] = dict(
            fwd_peak=m.window_peak(suffix, fwd_end, at_suffix) - at_suffix,
            kept=at_fwd_end - at_suffix,
            bwd_peak=m.window_peak(fwd_end, bwd_in, at_fwd_end) - at_fwd_end,
            left=at_bwd_in - at_cut - a_last * (1 + (variant == "held")),
        )
    m, info = free_meter, free
    start, at_cut = info["start"], m.live_at(m.marks["cut"], info["start"])
    counted, keeps = info["counted"], info["keeps_x0"] or not info["counted"]
    prefix_kept = at_cut - start - (info["a0"] if counted and not keeps else 0)
    if "prefix_backward" in m.marks:
        b = m.marks["prefix_backward"]
        at = m.live_at(b, start)
        prefix_bwd = m.window_peak(b, None, at) - at
    else:
        prefix_bwd = 0
    return TrunkCost(
        base_bytes=start,
        prefix_peak=m.window_peak(0, m.marks["cut"], start) - start,
        prefix_kept=prefix_kept,
        prefix_survivors=info["survivors"],
        prefix_keeps_input=keeps,
        input_counted=counted,
        suffix_forward_peak_held=values["held"]["fwd_peak"],
        suffix_forward_peak_free=values["free"]["fwd_peak"],
        suffix_backward_peak_held=values["held"]["bwd_peak"],
        suffix_backward_peak_free=values["free"]["bwd_peak"],
        suffix_kept_held=values["held"]["kept"],
        suffix_kept_free=values["free"]["kept"],
        suffix_left=values["free"]["left"],
        prefix_backward_peak=prefix_bwd,
        backward_left=info["end"] - start,
        suffix_grad_bytes=info["suffix_grads"],
        grad_bytes=info["grads"],
        flops=flops,
        suffix=option,
    )


def measure_suffixes(model: nn.Module, batch, like: torch.Tensor, plain: TrunkCost,
                     accumulate: bool = False, points: int = 0,
                     residual: bool = False) -> tuple[TrunkCost, ...]:
    """The trunk under each checkpointed-suffix option: ``full`` (keeps the last block's
    output only) and up to ``points`` points of the suffix's exact Pareto set over which op
    outputs to keep (``op_choices.suffix_choices``: the zero-FLOP point, recomputing the final
    norm and the log-softmax and keeping the head's output, among them). Each measured like
    the trunk as it is (``measure_trunk``), its ``recompute_flops`` the FLOPs its backward
    runs beyond ``plain``'s. An option the suffix cannot run (its measurement raises) is left
    out, as a block's menu option is. Returns ``plain`` with the prefix's facts
    (``_prefix_facts``) and the options' trunks."""
    from .op_choices import suffix_choices

    facts = _prefix_facts(model, batch, like, plain, accumulate)
    plain = replace(plain, **facts)
    options = ["full"]
    if points:
        options += [c.policy for c in suffix_choices(model, batch, like, points) if c.keep]
    out = []
    for option in options:
        try:
            trunk = measure_trunk(model, batch, like, accumulate, option, residual=residual)
        except (RuntimeError, ValueError):
            continue
        out.append(replace(trunk, flops=plain.flops,
                           recompute_flops=max(0, trunk.flops - plain.flops), **facts))
    return plain, tuple(out)


class _PrefixEnd(Exception):
    pass


def _prefix_facts(model, batch, like, plain: TrunkCost, accumulate: bool) -> dict:
    """Whether the prefix can run inside block 0's checkpoint (``prefix=full``) exactly as the
    planner derives it: x_0 counted and dead once block 0 returns. Either nothing holds it
    then, or (a model that says its forward holds it unread in a local: a Hugging Face
    Llama's ``inputs_embeds``, ``HFCausalLM.frees_prefix_output``) the policy frees it
    (``policies._release_prefix_output``), and then no later block is given it, no op after
    block 0 reads it and nothing holds it past the forward. And, measured with the prefix
    inside that checkpoint, nothing of the prefix left outside it but what is kept all step.
    And the FLOPs of the prefix's forward, which its recompute runs again."""

    blocks, read, alive = find_blocks(model), [], []
    x0 = {}  # block 0's input: "storage" (a weak reference), "freeable" by the policy

    def reads(values) -> bool:
        storage = x0["storage"]() if x0 else None
        return storage is not None and any(
            isinstance(t, torch.Tensor) and t.untyped_storage()._cdata == storage._cdata
            for t in tree_leaves(values))

    class Probe(TorchDispatchMode):  # after block 0 returned: is x_0 alive, does an op read it?
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if x0 and not alive:
                alive.append(x0["storage"]() is not None)
            if reads((args, kwargs)):
                read.append(func)
            return func(*args, **(kwargs or {}))

    def later(x, *args, **kwargs):  # a later block given x_0 (``block(x, x0)``) reads it
        if reads((args, kwargs)):
            read.append("a block's argument")
        return x

    batch_storages = {id(t.untyped_storage()): t.untyped_storage().nbytes() for t in batch
                      if isinstance(t, torch.Tensor)}
    viewed = {}

    class BatchViews(TorchDispatchMode):  # a view of the batch the prefix makes (a reshape)
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            for t in tree_leaves(result):
                if isinstance(t, torch.Tensor) and id(t.untyped_storage()) in batch_storages:
                    viewed[id(t.untyped_storage())] = batch_storages[id(t.untyped_storage())]
            return result

    def first(x, *args, **kwargs):
        x0.update(storage=_storage_ref(x), freeable=x._base is None and x.is_floating_point())
        return out

    counter = _flop_counter()

    def count_until_block0(x, *args, **kwargs):
        raise _PrefixEnd

    out = like.detach().clone()
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        for block, forward in zip(blocks, [first] + [later] * (len(blocks) - 1), strict=True):
            block.forward = forward
        try:
            with Probe():
                model.loss(batch)
            outlives = bool(x0) and x0["storage"]() is not None
            blocks[0].forward = count_until_block0
            with contextlib.suppress(_PrefixEnd), counter, BatchViews():
                model.loss(batch)
        finally:
            for block in blocks:
                del block.forward
    freed = getattr(model, "frees_prefix_output", False) and x0.get("freeable", False)
    dies = bool(x0) and (alive == [False] or freed and not read and not outlives)
    ok = dies and plain.input_counted and not plain.prefix_keeps_input
    views = sum(viewed.values())
    if ok:
        inside = measure_trunk(model, batch, like, accumulate, prefix=True)
        # the meter counts a view of the batch (made outside it) when it first sees it, and
        # the batch outlives the step; besides those, what the prefix made and something keeps
        # all step (the HF wrapper's cached block arguments: position ids) stays outside the
        # region. Anything else left outside (a local of the forward holding the token
        # embeddings until it returns, as GPT-2's does) is not in the planner's terms: refused
        outside = inside.prefix_kept - views
        ok = (0 <= outside <= plain.prefix_kept - views
              and inside.prefix_survivors == views + outside)
    from .op_choices import prefix_ops

    return dict(prefix_recomputable=ok, prefix_forward_flops=counter.get_total_flops(),
                prefix_ops=prefix_ops(model, batch) if ok else 0,
                prefix_batch_views=views if ok else 0,
                prefix_kept_outside=outside if ok else 0)


def _optimizer_cost(model: nn.Module, make_optimizer, trained=None) -> tuple[int, int]:
    """(optimizer state bytes, peak of a step above parameters + gradients + state), measured
    on a step after the first (the first one creates the state). lr=0 leaves the model as is.
    ``trained``: the ids of the parameters that get a gradient
    (``recording._parameters_reached``; None: all): the optimizer skips the others, as in
    training, so they get no state."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params)
    for p in params:
        if trained is None or id(p) in trained:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    meter = MemoryMeter()
    with meter:
        meter.track(model, optimizer)
        meter.reset_peak()
        optimizer.step()
        state, peak = meter.breakdown()["optimizer state"], meter.peak_bytes - meter.live_bytes
    meter.untrack()
    model.zero_grad(set_to_none=True)
    return state, peak


def _adamw_lr0(params):
    return step.make_optimizer(params, lr=0.0)  # train()'s optimizer, changing nothing


def _layer_key(block: nn.Module, x: torch.Tensor, extras=((), {})):
    """Blocks with equal keys are measured once. Beyond type, repr and parameter shapes, the
    key holds every plain attribute of the block and its submodules (a flag or a layer index
    that ``repr`` does not show can change what a block saves: HF layers differ by
    ``layer_idx``, so each is measured) and what the model passes besides the hidden state."""
    params = tuple((n, tuple(p.shape), p.dtype, p.requires_grad)
                   for n, p in block.named_parameters())
    attributes = tuple((name, k, _fingerprint(v)) for name, m in block.named_modules()
                       for k, v in vars(m).items() if not k.startswith("_"))
    args, kwargs = extras
    called = (tuple(map(_fingerprint, args)),
              tuple((k, _fingerprint(v)) for k, v in sorted(kwargs.items())))
    return (type(block), repr(block), params, tuple(x.shape), x.dtype, x.requires_grad,
            block.training, attributes, called)


def _fingerprint(value):
    """What of an attribute or argument decides a measurement: a tensor's shape and kind, a
    plain value itself, anything else by identity (equal only when it is the same object)."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype, value.requires_grad, value.device)
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype, torch.device)):
        return value
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, tuple(map(_fingerprint, value)))
    return ("object", id(value))


@contextlib.contextmanager
def _called_as_in_model(block: nn.Module, extras, fresh: bool = False, batch=()):
    """While a block is measured alone as ``block(x)``, it gets the other arguments the model
    gave it (``extras``: (args after the hidden state, kwargs)): a block measured without its
    mask or gate is not the block the model runs. Those that carry the model's graph come as
    detached copies whose gradient exists already (the block adds into it), or, ``fresh``,
    does not (this block is their last user: its backward makes it, ``extra_grad_bytes``).
    The model made them (or they are its parameters) before the block ran: the block's meter
    knows them from its start (``_run_layer``), so that a view of one, which an op inside the
    block makes, is not counted as the block's. The batch's own tensors are left as they are."""
    args, kwargs = extras
    if not args and not kwargs:
        yield
        return
    batch_storages = {_tensor_id(t)[0] for t in batch if isinstance(t, torch.Tensor)}
    # a tensor that carries the model's graph is replayed as a copy that does not (its
    # requires_grad kept), which the block's several measured backwards can each go through
    copies = {id(t): _detached(t) for t in [*args, *kwargs.values()] if _carries_graph(t)}
    args = tuple(copies.get(id(t), t) for t in args)
    kwargs = {k: copies.get(id(t), t) for k, t in kwargs.items()}
    for t in copies.values():  # its gradient there already: added into in place
        t.grad = None if fresh else torch.zeros_like(t)

    def fill(module, call_args, call_kwargs):
        if len(call_args) == 1 and not call_kwargs:
            if fresh:  # made by this block's backward, each time it runs
                for t in copies.values():
                    t.grad = None
            return (*call_args, *args), dict(kwargs)
        return None

    handle = block.register_forward_pre_hook(fill, with_kwargs=True)
    _OTHER_ARGUMENTS.append([t for t in [*args, *kwargs.values()] if isinstance(t, torch.Tensor)
                   and _tensor_id(t)[0] not in batch_storages])
    try:
        yield
    finally:
        handle.remove()
        _OTHER_ARGUMENTS.pop()


# the tensors the model gives the block being measured besides its input (``_called_as_in_model``)
_OTHER_ARGUMENTS: list[list[torch.Tensor]] = []


@contextlib.contextmanager
def _autocast_as_in_model(block: nn.Module, state):
    """While a block is measured alone, each of its forwards (a recompute's too) runs under the
    autocast ``state`` the model ran it under (``recording._autocast_state``), and only its
    forward, as in the model (backward runs outside autocast; checkpoint replays the recompute
    under the state its forward had)."""
    if not state:
        yield
        return
    open_ = []

    def enter(module, args):
        stack = contextlib.ExitStack()
        for device, dtype in state:
            stack.enter_context(torch.autocast(device, dtype=dtype))
        open_.append(stack)

    def leave(module, args, out):
        if open_:
            open_.pop().close()

    handles = [block.register_forward_pre_hook(enter),
               block.register_forward_hook(leave, always_call=True)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def measure_costs(model: nn.Module, batch_size: int | None = None, seq_len: int | None = None,
                  seed: int = 0, optimizer=_adamw_lr0, accumulate: bool = False, menu=(),
                  times: bool = False, rounds: int = 15, op_points: int = 0,
                  suffix: bool = False) -> ChainCosts:
    """Measure every block and the trunk of a course model (``.blocks``, ``.example_batch``,
    ``.loss``) for one training step on a batch of ``batch_size`` x ``seq_len``, the way
    ``train`` runs it (AdamW unless ``optimizer`` says otherwise; ``None``: no optimizer).
    ``accumulate``: a micro-batch after the first under gradient accumulation, where every
    gradient exists from the start. ``menu``: the one-block options measured for each distinct
    block (``MENU``; the default ``()``: plain and checkpointed only); ``times``: also time
    each option (``rounds`` interleaved medians), for the planner's time objective.
    ``op_points``: also up to this many op-level options per distinct block, the points of its
    exact Pareto set of (kept bytes, recompute FLOPs) over which op outputs a checkpoint keeps
    (``op_choices``), each a ``selective:ops=...`` option measured like the menu's.
    ``suffix``: also the trunk with its suffix (final norm, head, loss) checkpointed, fully and
    at up to ``op_points`` op-level points (``measure_suffixes``), for the planner to choose
    from (``ChainCosts.suffixes``), and whether the prefix can run inside block 0's
    checkpoint (``prefix=full``; ``TrunkCost.prefix_recomputable``)."""
    menu = check_menu(menu)
    if not isinstance(suffix, bool):
        raise ValueError(f"suffix is True (also measure the checkpointed suffix's options) or "
                         f"False; got {suffix!r}")
    check_op_points(op_points)
    if batch_size is not None:  # (a learner's model adapted by auto plans the batch it was given)
        check_positive_int("batch_size", batch_size)
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds is a whole number of timing rounds >= 1, such as 15; got "
                         f"{rounds!r}")
    blocks = find_blocks(model)
    _check_distinct(blocks)
    check_no_policy(blocks, "measure the model as it is")
    model.train()
    size = {} if batch_size is None else {"batch_size": batch_size}
    batch = model.example_batch(seq_len=seq_len, generator=torch.Generator().manual_seed(seed),
                                **size)
    with _batch_gradients_there(batch) as batch_grads, step.kept_python_streams():
        costs = _measure_chain(model, blocks, batch, accumulate, menu, times, rounds, op_points,
                               suffix, optimizer)
    trunk = replace(costs.trunk, base_bytes=costs.trunk.base_bytes + batch_grads)
    costs = replace(costs, trunk=trunk, suffixes=tuple(
        replace(t, base_bytes=t.base_bytes + batch_grads) for t in costs.suffixes))
    if optimizer is _adamw_lr0:
        _check_plain_step(model, batch, costs, accumulate)
    return costs


@contextlib.contextmanager
def _batch_gradients_there(batch):
    """Inside, each batch tensor that requires grad (a leaf: input saliency, adversarial
    training) has a zero ``.grad``, as it has in every step after the first (backward adds
    into it and it stays); yields its bytes, which the step holds throughout. The tensors'
    own ``.grad`` is put back after."""
    leaves = [t for t in batch if isinstance(t, torch.Tensor) and t.requires_grad and t.is_leaf]
    before = [t.grad for t in leaves]
    try:
        for t in leaves:
            t.grad = torch.zeros_like(t)
        yield sum(t.grad.untyped_storage().nbytes() for t in leaves)
    finally:
        for t, grad in zip(leaves, before, strict=True):
            t.grad = grad


def _measure_chain(model, blocks, batch, accumulate, menu, times, rounds, op_points, suffix,
                   optimizer) -> ChainCosts:
    """``measure_costs`` on the batch made."""
    inputs, outputs, extras, trained, trunk_uses, autocasts, residual = _record_calls(
        model, blocks, batch)
    cache, layers, menus, timed, unreplayed, changed = {}, [], [], [], {}, []
    given = _given_gradients(blocks, extras, *trunk_uses)
    last_uses = _last_users(extras)
    for block, x, called, made, autocast, adds, fresh in zip(
            blocks, inputs, extras, given, autocasts, residual, last_uses, strict=True):
        key = (_layer_key(block, x, called), made, autocast, adds, fresh)
        if key not in cache:
            with _called_as_in_model(block, called, bool(fresh), batch), \
                    _autocast_as_in_model(block, autocast):
                layer = measure_layer(block, x, accumulate, made, adds)
                if layer.replays and not _repeats(block, x):
                    layer = replace(layer, replays=False)
                why = _why_no_replay(block, layer)
                ops = () if why else _op_options(block, x, op_points)
                options = measure_menu(block, x, layer, _replaying_options(menu, ops, why),
                                       accumulate, made, dropped := [])
                if dropped:
                    changed.append(f"block {len(layers)}: {', '.join(dropped)} left out (its "
                                   f"gradients differ from plain's under them)")
                cache[key] = (layer, options, measure_times_and_spreads(
                    block, x, ("none", FORWARD, "full", *options), rounds) if times
                              else (None, None))
        _forget_outside(made)
        if not cache[key][0].replays:
            unreplayed.setdefault(_why_no_replay(block, cache[key][0]), []).append(len(layers))
        args, kwargs = called
        layers.append(replace(cache[key][0], extra_grad_bytes=fresh, given_graph=any(
            map(_carries_graph, [*args, *kwargs.values()])), autocast=autocast))
        menus.append(cache[key][1])
        timed.append(cache[key][2])
    trunk = measure_trunk(model, batch, outputs[0], accumulate, residual=residual[-1])
    suffixes = ()
    if suffix:
        trunk, suffixes = measure_suffixes(model, batch, outputs[0], trunk, accumulate,
                                           op_points, residual[-1])
    params = sum(t.untyped_storage().nbytes() for t in [*model.parameters(), *model.buffers()])
    state = 0
    if optimizer is not None:
        state, peak = _optimizer_cost(model, optimizer, trained)
        trunk = replace(trunk, base_bytes=trunk.base_bytes + state, optimizer_peak=peak)
        suffixes = tuple(replace(t, base_bytes=t.base_bytes + state, optimizer_peak=peak)
                         for t in suffixes)
    notes = _chain_notes(layers)
    shape = "x".join(map(str, batch[0].shape))
    name = f"{type(model).__name__} (batch {shape}{', accumulating' if accumulate else ''})"
    return ChainCosts(tuple(layers), trunk, name=name, param_bytes=params,
                      optimizer_bytes=state,
                      notes=(*notes, *_replay_notes(unreplayed), *changed),
                      menu=tuple(menus) if menu or op_points else (),
                      times=tuple(t for t, _ in timed) if times else (),
                      spreads=tuple(s for _, s in timed) if times else (),
                      suffixes=suffixes)


def _check_plain_step(model: nn.Module, batch, costs: ChainCosts, accumulate: bool) -> None:
    """The memory model checked against the meter once, on a plain step (two AdamW steps on a
    copy of the model, step 2 as predicted; ``accumulate``: each of two micro-batches), before
    anyone plans with it: what the model keeps that no measured part shows (a tensor stored on
    a block, a forward hook collecting the blocks' outputs, a block's output read after later
    blocks) meters above the prediction and is refused in one line, never planned on. Real
    tensors only (fake ones are never run)."""
    from .plan import predict

    if any(isinstance(t, FakeTensor) for t in [*model.parameters(), *batch]):
        return
    work = copy_of(model, "measure_costs checks its prediction on")
    optimizer = step.make_optimizer(work, lr=0.0)
    meter = MemoryMeter()

    def one_step():
        return [tuple(batch), tuple(batch)] if accumulate else tuple(batch)

    with torch.random.fork_rng(devices=[]), _batch_gradients_there(batch):
        step.run_step(work, optimizer, one_step())  # makes the optimizer state
        with meter:
            meter.track(work, optimizer)
            meter.count(*(t.grad for t in batch if isinstance(t, torch.Tensor)
                          and t.grad is not None))  # held all step, as in training
            peak = step.run_step(work, optimizer, one_step(), meter, step=2).peak_bytes
            meter.untrack()
    predicted = predict(costs, "none").peak_bytes
    if peak > predicted:  # the OOM side; above the meter is safe, and said nowhere as exact
        raise ValueError(
            f"the planner's memory model does not hold for "
            f"{type(getattr(model, 'inner', model)).__name__}: it predicts "
            f"{predicted:,} B for a plain step, the meter measures {peak:,} B "
            f"({peak - predicted:+,} B): the model holds memory that the parts the planner "
            f"measures do not show (e.g. a tensor stored on a block, a hook collecting outputs, "
            f"a block's output read after later blocks), so nothing is planned on it; take that "
            f"out while planning")


def copy_of(model: nn.Module, why: str) -> nn.Module:
    """A deep copy of ``model``, or a one-line error naming what cannot be copied (an open
    file, a lock, a tensor with a graph kept on a module) and why a copy is made."""
    try:
        return copy.deepcopy(model)
    except Exception as error:  # noqa: BLE001 (any object's own refusal to be copied)
        where = _uncopyable(model)
        raise ValueError(f"{why} a copy of the model, and {where or 'it'} cannot be copied "
                         f"({type(error).__name__}: {str(error).splitlines()[0][:120]}): keep "
                         f"it outside the model while planning") from None


def _uncopyable(model: nn.Module) -> str | None:
    """The first attribute of a module of ``model`` that deep copy refuses, named (inside
    auto_checkpoint's adapter, from the learner's model)."""
    for path, module in getattr(model, "inner", model).named_modules():
        for name, value in vars(module).items():
            if name.startswith("_"):
                continue
            try:
                copy.deepcopy(value)
            except Exception:  # noqa: BLE001
                return f"its attribute {path + '.' if path else ''}{name}"
    return None


def _replaying_options(menu, op_options, why) -> tuple[str, ...]:
    """The one-block options a block is measured under: all, or for a block whose recompute
    would not replay its forward (``why``) those that run no recompute (offload)."""
    if why is None:
        return (*menu, *op_options)
    return tuple(option for option in menu if option.startswith("offload"))


def _replay_notes(unreplayed: dict[str, list[int]]) -> tuple[str, ...]:
    """One line per reason a block cannot be recomputed, for the plan's report."""
    return tuple(f"block{'s' if len(ks) > 1 else ''} {', '.join(map(str, ks))}: {why}; a "
                 f"recompute would run the forward again differently (gradients unlike "
                 f"plain's), so {'they run' if len(ks) > 1 else 'it runs'} plain or offloaded "
                 f"only" for why, ks in unreplayed.items())


def _chain_notes(layers) -> tuple[str, ...]:
    """What the report says about how the chain was measured, where it is not x = block(x)."""
    notes = []
    if any(c.residual for c in layers):
        notes.append("the model adds each block's input to its output (x = x + block(x)): "
                     "blocks measured with that add; checkpointed segments of one block only")
    if any(c.given_graph for c in layers[1:]):
        notes.append("blocks get a tensor that carries the model's graph (e.g. a conditioning): "
                     "its gradient counted; no checkpointed segment runs on into such a block")
    return tuple(notes)


def _detached(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_(True)


def check_op_points(op_points) -> None:
    if isinstance(op_points, bool) or not isinstance(op_points, int) or op_points < 0:
        raise ValueError(f"op_points is how many op-level options to measure per block, a whole "
                         f"number >= 0 such as 6; got {op_points!r}")


def _op_options(block: nn.Module, x: torch.Tensor, points: int) -> tuple[str, ...]:
    """The op-level options of one block (``op_choices``), as menu option strings."""
    if not points:
        return ()
    from .op_choices import choices

    return tuple(c.policy for c in choices(block, x, points))


# ---------------------------------------------------------------- big configs, on fake tensors
def config_by_name(name: str):
    """A named config: the Llama presets ("70b", "llama-7b", ...) or "gpt" / "gpt-24" (tiny
    GPTs that also run for real)."""
    from .models import GPTConfig, llama_config

    gpts = {"gpt": GPTConfig(), "gpt-24": GPTConfig(n_layer=24)}
    if name in gpts:
        return gpts[name]
    try:
        return llama_config(name)
    except ValueError:
        raise ValueError(f"unknown config {name!r}; choose one of: {', '.join(config_names())}") \
            from None


def config_names() -> list[str]:
    from .models import LLAMA_PRESETS

    return ["gpt", "gpt-24", *(n.removeprefix("llama-") for n in LLAMA_PRESETS)]


def config_costs(cfg, batch_size: int, seq_len: int, dtype: torch.dtype = torch.bfloat16,
                 optimizer: str = "adamw", menu=(), op_points: int = 0) -> ChainCosts:
    """Costs of a config (``LlamaConfig`` or ``GPTConfig``, or a name such as "70b") measured
    on fake tensors: one block, times ``n_layer``, and the trunk on a one-block model.

    Parameters, gradients and activations are in ``dtype``; the optimizer state follows
    ``ckpt_course.estimate`` (AdamW: two fp32 moments, 8 bytes per parameter) and its step's
    temporaries are taken as two fp32 copies of the largest parameter (torch's AdamW makes two
    such temporaries per parameter). Seconds for 70B, a few hundred MB of process memory.
    ``menu`` and ``op_points``: as in ``measure_costs``, on the fake block."""
    from . import estimate
    from .models import GPTConfig, Llama, TinyGPT

    menu = check_menu(menu)
    check_op_points(op_points)
    if isinstance(cfg, str):
        cfg = config_by_name(cfg)
    estimate._check(cfg, batch_size, seq_len, dtype)
    if optimizer not in estimate.OPTIMIZER_BYTES_PER_PARAM:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of "
                         f"{list(estimate.OPTIMIZER_BYTES_PER_PARAM)}")
    with estimate._fake(dtype), torch.random.fork_rng(devices=[]):
        block = estimate._block(cfg).train()
        x = torch.randn(batch_size, seq_len, cfg.d_model, requires_grad=True)
        layer = measure_layer(block, x)
        options = measure_menu(block, x, layer, (*menu, *_op_options(block, x, op_points)))
        one = (Llama(cfg.with_layers(1)) if not isinstance(cfg, GPTConfig)
               else TinyGPT(replace(cfg, n_layer=1))).train()
        batch = one.example_batch(batch_size, seq_len)
        trunk = measure_trunk(one, batch, torch.randn(batch_size, seq_len, cfg.d_model))
        n_params = estimate.parameter_count(cfg)
        largest = max(p.numel() for p in one.parameters())
    params = n_params * dtype.itemsize
    state = n_params * estimate.OPTIMIZER_BYTES_PER_PARAM[optimizer]
    trunk = replace(trunk, base_bytes=params + state, optimizer_peak=2 * 4 * largest)
    notes = (f"{getattr(cfg, 'name', 'gpt')} on fake tensors: one block measured, times "
             f"{cfg.n_layer}; {str(dtype).removeprefix('torch.')} parameters, gradients and "
             f"activations; {optimizer} state {estimate.OPTIMIZER_BYTES_PER_PARAM[optimizer]} B "
             f"per parameter",)
    return ChainCosts((layer,) * cfg.n_layer, trunk, name=getattr(cfg, "name", "gpt"),
                      param_bytes=params, optimizer_bytes=state, notes=notes,
                      menu=(options,) * cfg.n_layer if menu or op_points else ())


