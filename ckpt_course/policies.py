"""Checkpoint policies: which activations a model keeps for backward, and which it recomputes.

A policy acts on ``model.blocks``, the model's sequence of layers. A block's forward may take
any positional and keyword arguments, tensors or not, and return a tensor or a tuple (a Hugging
Face decoder layer: ``layer(hidden_states, attention_mask=..., position_embeddings=(cos, sin))``)::

    with applied(model, "every-2"):         # or: handle = apply_policy(model, "every-2")
        model.loss(batch).backward()         #     ...; handle.remove()

The policies, each written as a short string that ``parse_policy`` reads and ``str`` writes back:

- ``none``: every block keeps everything autograd saves.
- ``full`` (= ``every-1``): each block runs under a non-reentrant ``torch.utils.checkpoint``.
  Forward keeps only each block's inputs; backward re-runs the block's forward to rebuild the rest.
- ``every-K``: segments of K consecutive blocks, one checkpoint per segment, which keeps only the
  segment's inputs. Fewer stored inputs, but backward rebuilds a whole segment at once. Unlike
  ``torch.utils.checkpoint.checkpoint_sequential``, the last segment is checkpointed too
  (``checkpoint_sequential`` always runs its last segment plainly, so ``segments=1`` saves nothing).
- ``sqrt``: segments of K = ceil(sqrt(L)) blocks (Chen et al. 2016, "Training deep nets with
  sublinear memory cost"): ceil(L / K) <= K segment inputs stay stored and backward rebuilds one
  segment of K blocks at a time, so memory grows like sqrt(L), not L.
- ``segments:0-2,5``: checkpoint exactly these segments (inclusive block numbers; ``a-b`` is one
  segment, ``a..b`` is blocks a to b each alone), every other block plain: what the planner
  prints. ``segments:none`` checkpoints nothing. ``segments:1;preserve_rng_state=False`` is the
  switch a home-made checkpoint forgets: the recompute draws new dropout masks, so gradients are
  no longer those of the forward that ran (lesson 1 shows it).
- ``selective:save=OPS``: each block checkpointed, but the outputs of the named ops are kept
  (torch's selective activation checkpointing, ``CheckpointPolicy.MUST_SAVE``) and only the rest
  is recomputed. ``save=mm`` keeps the matmuls: backward re-runs only cheap elementwise ops.
- ``selective:recompute=OPS``: the inverse; recompute only the named ops, keep all other outputs.
  ``recompute=attn-core`` (alias ``attn-core``) is Megatron's "recompute only the attention core".
- ``selective:ops=0,7,12``: selective by op *instance*: keep the outputs of the ops at these
  positions in each block's forward, recompute the rest (what ``op_choices`` plans per block).
- ``offload``: nothing is recomputed; each block's saved tensors are copied to host memory in
  forward and copied back in backward (``torch.autograd.graph.saved_tensors_hooks``).

How a policy is applied: each block gets an instance ``forward`` that runs its own forward with
the arguments the model passed. A segment is one checkpoint region that opens when the model
calls the segment's first block and closes when its last block returns, so each block still gets
its own keyword arguments; the recompute replays the segment's blocks with the arguments each
was called with, feeding each the previous block's recomputed output. ``remove()`` deletes the
instance attributes again: parameters, state_dict and module tree are never touched. Assumed:
the model calls a segment's blocks in order, once each, and feeds each output (or one element of
it) to the next block, with nothing in between that autograd saves.

All checkpointing is torch's non-reentrant checkpoint (``use_reentrant=False`` behaviour) with
``preserve_rng_state=True`` unless a segments policy turns it off: the recompute replays the same
dropout masks, so gradients are bit-identical to no policy.
"""

from __future__ import annotations

import contextlib
import functools
import math
import sys
import warnings
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils._pytree import tree_flatten, tree_leaves, tree_unflatten
from torch.utils.checkpoint import (
    CheckpointPolicy,
    _checkpoint_without_reentrant_generator,
    create_selective_checkpoint_contexts,
    noop_context_fn,
)

from .units import fmt_bytes, shown

ACCEPTED = ("none, full, every-K (K >= 1), sqrt, segments:a-b,c (inclusive block numbers), "
            "selective:save=OPS, selective:recompute=OPS, selective:ops=0,7,12, attn-core, "
            "offload, "
            "menu:0-1=full,2=selective:save=mm,3=offload,4-7=full(4-5)")

# ---------------------------------------------------------------- op names for selective policies
_SDPA = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_for_cpu",
         "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
         "_scaled_dot_product_fused_attention_overrideable")
_SOFTMAX = ("_softmax", "_safe_softmax")
_DROPOUT = ("native_dropout", "bernoulli", "bernoulli_")

# Short names -> aten ops (overload packets). A short name stands for every aten op that carries
# the computation on some device: a Linear is addmm (with bias) or mm, a batched matmul is bmm.
OP_NAMES: dict[str, tuple[str, ...]] = {
    "mm": ("mm", "addmm", "bmm", "baddbmm"),
    "sdpa": _SDPA,
    "softmax": _SOFTMAX,
    "gelu": ("gelu",),
    "silu": ("silu",),
    "relu": ("relu",),
    "layernorm": ("native_layer_norm",),
    # Dropout's random draw. On CPU the mask is made in place (empty_like, bernoulli_, div_),
    # a chain the rules in _sac_policy always recompute, so naming it changes nothing there.
    "dropout": _DROPOUT,
    # softmax(QK^T / sqrt(d)) V with its scaling, causal masking and dropout. Naive attention (and
    # SDPA's math path, used on CPU when dropout > 0) spells these with generic ops: elementwise
    # div/mul/add/masked_fill/where, and the contiguous copies (clone) matmul makes for bmm. So
    # every such op is recomputed, inside attention or not: cheap, and here they hold T x T.
    "attn-core": ("bmm", "baddbmm", *_SDPA, *_SOFTMAX, *_DROPOUT, "div", "mul", "add",
                  "masked_fill", "where", "clone"),
}

# Allocations whose output is uninitialised: nothing worth keeping, and recomputing them makes the
# in-place chain that fills them (CPU dropout: empty_like -> bernoulli_ -> div_) recompute too.
_ALLOCATIONS = ("empty_like", "empty", "new_empty", "empty_strided", "new_empty_strided")


@functools.cache
def _packets(names: tuple[str, ...]) -> frozenset:
    return frozenset(getattr(torch.ops.aten, n) for n in names if hasattr(torch.ops.aten, n))


# ---------------------------------------------------------------- the policies
@dataclass(frozen=True)
class Policy:
    """Base class. A policy cuts the blocks into segments and says how a segment runs: by
    default each segment is one checkpoint region (``context_fn`` and ``preserve_rng_state`` as
    in ``torch.utils.checkpoint.checkpoint``)."""

    preserve_rng_state = True  # a class default; ``Segments`` makes it a field

    def segments(self, n_blocks: int) -> list[range]:
        """Blocks grouped as the policy runs them; the first block of each range is a boundary."""
        return [range(i, i + 1) for i in range(n_blocks)]

    def segment_policies(self, n_blocks: int) -> list[tuple[range, Policy]]:
        """Each segment with the policy its region runs under (a ``Menu`` mixes them)."""
        return [(s, self) for s in self.segments(n_blocks)]

    def context_fn(self):
        """The (forward, recompute) contexts of one checkpoint region."""
        return noop_context_fn()

    def region(self, replay, params, store: HostStore, args, kwargs):
        """A generator that opens the segment's region at its first ``next`` and closes it at
        the second; ``replay(*args, **kwargs)`` re-runs the segment for the recompute.

        torch's ``checkpoint(fn, ...)`` needs the whole segment as one function, but the model
        calls each block itself with its own arguments; torch's composable ``checkpoint(module)``
        (``torch.distributed._composable``) opens and closes the same non-reentrant region from
        module hooks with this generator, and so do we, from the first and last block's call."""
        return _checkpoint_without_reentrant_generator(
            replay, self.preserve_rng_state, self.context_fn, "default", False, True,
            *args, **kwargs)

    def describe(self, n_blocks: int) -> str:
        """Which blocks start a checkpointed segment, in words, e.g. for a lesson's table."""
        groups = " ".join("[" + " ".join(str(i) for i in s) + "]" for s in self.segments(n_blocks))
        starts = ", ".join(str(s.start) for s in self.segments(n_blocks))
        return (f"{self} on {n_blocks} blocks: segments {groups}, boundaries at blocks {starts}; "
                f"{self._what(n_blocks)}")

    def _what(self, n_blocks: int) -> str:
        return "backward recomputes each segment's forward once"


@dataclass(frozen=True)
class NoCheckpoint(Policy):
    def segments(self, n_blocks: int) -> list[range]:
        return []

    def describe(self, n_blocks: int) -> str:
        return f"none on {n_blocks} blocks: nothing checkpointed, every block keeps its activations"

    def __str__(self):
        return "none"


class _Segmented(Policy):
    """Segments of ``segment_size(L)`` consecutive blocks, each one checkpoint region."""

    def segment_size(self, n_blocks: int) -> int:
        raise NotImplementedError

    def segments(self, n_blocks: int) -> list[range]:
        k = self.segment_size(n_blocks)
        return [range(i, min(i + k, n_blocks)) for i in range(0, n_blocks, k)]


@dataclass(frozen=True)
class EveryK(_Segmented):
    """Segments of ``k`` consecutive blocks. ``EveryK(1)`` is ``full``."""

    k: int = 1

    def __post_init__(self):
        if not isinstance(self.k, int) or isinstance(self.k, bool) or self.k < 1:
            raise ValueError(f"every-K needs an integer K >= 1, got {self.k!r}")

    def segment_size(self, n_blocks: int) -> int:
        return self.k

    def __str__(self):
        return "full" if self.k == 1 else f"every-{self.k}"


@dataclass(frozen=True)
class Sqrt(_Segmented):
    """Segments of K = ceil(sqrt(L)) blocks: ceil(L / K) <= K segment inputs stay stored."""

    def segment_size(self, n_blocks: int) -> int:
        return math.ceil(math.sqrt(n_blocks))

    def _what(self, n_blocks):
        k = self.segment_size(n_blocks)
        return f"K = ceil(sqrt({n_blocks})) = {k}; backward recomputes each segment's forward once"

    def __str__(self):
        return "sqrt"


@dataclass(frozen=True)
class Segments(Policy):
    """Checkpoint exactly the given block ranges; every other block runs plain.

    ``Segments(((0, 3), (5, 6)))`` checkpoints blocks 0-2 as one segment (one stored input, one
    recompute of three blocks) and block 5 alone. Ranges are half-open ``(start, stop)``, as
    ``range``. Written as text: ``segments:0-2,5`` (inclusive block numbers).
    """

    ranges: tuple[tuple[int, int], ...] = ()
    preserve_rng_state: bool = True

    def __post_init__(self):
        try:
            ranges = tuple(sorted((_block_number(a), _block_number(b)) for a, b in self.ranges))
        except (TypeError, ValueError):
            raise ValueError(f"Segments needs (start, stop) pairs of block numbers, e.g. "
                             f"((0, 3), (5, 6)); got {self.ranges!r}") from None
        for k, (a, b) in enumerate(ranges):
            after = ranges[k + 1][0] if k + 1 < len(ranges) else math.inf
            if not 0 <= a < b <= after:
                raise ValueError(f"segments must be non-empty, start at block 0 or later and not "
                                 f"overlap; got {list(ranges)}")
        if not isinstance(self.preserve_rng_state, bool):
            raise TypeError(f"preserve_rng_state is True or False, not {self.preserve_rng_state!r}")
        object.__setattr__(self, "ranges", ranges)

    @classmethod
    def parse(cls, text: str) -> Segments:
        """``"segments:0-2,5"`` -> ``Segments(((0, 3), (5, 6)))``."""
        policy = parse_policy(text if text.strip().startswith("segments:") else f"segments:{text}")
        if not isinstance(policy, Segments):
            raise ValueError(f"{text!r} is not a segments policy (segments:0-2,5)")
        return policy

    def segments(self, n_blocks: int) -> list[range]:
        if self.ranges and self.ranges[-1][1] > n_blocks:
            raise ValueError(f"{self} reaches block {self.ranges[-1][1] - 1}, but the model has "
                             f"{n_blocks} blocks (0..{n_blocks - 1}): name blocks below {n_blocks}")
        return [range(a, b) for a, b in self.ranges]

    def _what(self, n_blocks):
        rng = "" if self.preserve_rng_state else " with fresh random numbers (dropout masks differ)"
        return f"backward recomputes each checkpointed segment's forward once{rng}; others plain"

    def __str__(self):
        parts, k, r = [], 0, self.ranges
        while k < len(r):  # runs of single blocks, one after another, read "a..b"
            m = k
            while m + 1 < len(r) and r[m][1] - r[m][0] == 1 and r[m + 1] == (r[m][1], r[m][1] + 1):
                m += 1
            a, b = r[k]
            parts.append(f"{a}..{r[m][0]}" if m > k + 1 else f"{a}" if b == a + 1 and m == k
                         else f"{a}-{b - 1}" if m == k else f"{a},{r[m][0]}")
            k = m + 1
        rng = "" if self.preserve_rng_state else ";preserve_rng_state=False"
        return "segments:" + (",".join(parts) or "none") + rng


def _block_number(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(value)
    return value


@dataclass(frozen=True)
class Selective(Policy):
    """Each block checkpointed with torch's selective activation checkpointing (SAC).

    ``mode="save"``: keep the outputs of ``ops``, recompute the rest.
    ``mode="recompute"``: recompute ``ops``, keep the outputs of everything else.
    SAC keeps op *outputs* for the replay, not what autograd would save: ``recompute=OPS`` also
    keeps outputs autograd never needs (a residual add's), and can hold more than no policy at all.
    """

    ops: tuple[str, ...] = ("mm",)
    mode: str = "save"

    def __post_init__(self):
        if self.mode not in ("save", "recompute"):
            raise ValueError(f"selective mode must be 'save' or 'recompute', not {self.mode!r}")
        unknown = [op for op in self.ops if op not in OP_NAMES]
        if unknown or not self.ops:
            raise ValueError(f"unknown op name(s) {unknown or ['']} in {self}; known: "
                             f"{', '.join(OP_NAMES)}")

    def context_fn(self):
        # A fresh policy function per region: its bookkeeping covers one region's forward.
        named = _packets(tuple(n for op in self.ops for n in OP_NAMES[op]))
        return create_selective_checkpoint_contexts(_sac_policy(named, self.mode),
                                                    allow_cache_entry_mutation=True)

    def _what(self, n_blocks):
        verb = "keeps the outputs of" if self.mode == "save" else "recomputes only"
        return f"each block {verb} {', '.join(self.ops)}"

    def __str__(self):
        return f"selective:{self.mode}={','.join(self.ops)}"


@dataclass(frozen=True)
class SelectiveOps(Selective):
    """Selective checkpointing by op *instance*: keep the outputs of the ops at these positions
    in the block's forward (0-based, in the order SAC's policy function sees the ops:
    every aten op but ``SAC_IGNORED_OPS``), recompute the rest. What ``op_choices`` plans: the
    exact Pareto set of one block is a set of such instances, not of op names (a GPT block's
    first matmul may be worth keeping and its last not). Deterministic: the recompute replays
    the forward's decisions by position (SAC caches per op and call number), and the region's
    rules (views follow their maker, ...) are ``_sac_policy``'s. Text:
    ``selective:ops=0,7,12``."""

    indices: tuple[int, ...] = ()

    def __post_init__(self):
        indices = self.indices
        if (not isinstance(indices, tuple) or not indices
                or any(isinstance(k, bool) or not isinstance(k, int) or k < 0 for k in indices)
                or len(set(indices)) != len(indices)):
            raise ValueError(f"selective:ops= needs distinct op positions >= 0 (whole numbers "
                             f"such as selective:ops=0,7,12); got {indices!r}")
        object.__setattr__(self, "indices", tuple(sorted(indices)))

    def context_fn(self, where: str = "the block"):
        """``where``: what the region checkpoints, named if a position is beyond its ops."""
        keep, ops = frozenset(self.indices), [0]
        forward, recompute = create_selective_checkpoint_contexts(
            _sac_policy(frozenset(), "save", lambda index: index in keep, ops),
            allow_cache_entry_mutation=True)
        return _PositionsChecked(forward, self, ops, where), recompute

    def _what(self, n_blocks):
        positions = ", ".join(map(str, self.indices))
        return f"each block keeps the outputs of its ops at positions {positions}"

    def __str__(self):
        return "selective:ops=" + ",".join(map(str, self.indices))


class OpPositionError(ValueError):
    """A ``selective:ops=`` position beyond the ops its region runs (``_PositionsChecked``)."""


class _PositionsChecked:
    """A ``SelectiveOps`` region's forward context: when the region's forward ends, a kept
    position beyond the ops it ran is refused (a typo'd or stale position, which positions
    become when the block's code or torch changes, would otherwise keep nothing, silently:
    ``full``). Raised at the first forward, before any backward or optimizer step."""

    def __init__(self, mode, policy: SelectiveOps, ops: list, where: str):
        self.mode, self.policy, self.ops, self.where = mode, policy, ops, where

    def __enter__(self):
        return self.mode.__enter__()

    def __exit__(self, *exc):
        suppressed = self.mode.__exit__(*exc)
        beyond = [k for k in self.policy.indices if k >= self.ops[0]]
        if exc[0] is None and beyond:
            n = self.ops[0]
            raise OpPositionError(f"{self.policy} names op position {beyond[0]}, but "
                                  f"{self.where} runs {n} ops (positions 0-{n - 1}): name "
                                  f"positions below {n} (op_choices.block_ops and suffix_ops "
                                  f"list them)")
        return suppressed


def _sac_policy(named: frozenset, mode: str, keep_index=None, ops: list | None = None):
    """The policy function SAC calls on every op of a region's forward (never during recompute).
    ``keep_index(position)``: decide by the op's position in the region's forward instead of
    by name (``SelectiveOps``); ``ops[0]``: how many ops the region's forward has run.

    Naming ops is not enough; three rules keep the replay exact and the cache lean:
    - an op whose output lives in a storage an earlier op of the region made (a view, an in-place
      op, ``_unsafe_view``) follows that op. SAC replays a cached op by handing back the cached
      tensor, so a cached matmul with a recomputed ``y.mul_(2)`` would multiply twice, and a cached
      view of a recomputed output would keep that whole output alive;
    - uninitialised allocations (``empty_like``) are always recomputed: nothing to keep, and the
      in-place chain that fills them (CPU dropout: bernoulli_, div_) follows them;
    - ops that draw random numbers all get the first such op's decision: a cached op does not
      advance the RNG during recompute, so a later recomputed one would draw a different mask.
    """
    made = {}  # id(storage) -> (weakref to storage, policy of the op that made it)
    random_policy = []

    position = [-1]

    def by_name(op):
        hit = keep_index(position[0]) if keep_index else op.overloadpacket in named
        keep = hit if mode == "save" else not hit
        return CheckpointPolicy.MUST_SAVE if keep else CheckpointPolicy.PREFER_RECOMPUTE

    def maker_policy(tensor):
        entry = made.get(id(tensor.untyped_storage()))
        return entry[1] if entry and entry[0]() is tensor.untyped_storage() else None

    def policy_fn(ctx, op, *args, **kwargs):
        position[0] += 1
        if ops is not None:
            ops[0] = position[0] + 1
        outputs = [t for t in torch.utils._pytree.tree_leaves(ctx.op_output)
                   if isinstance(t, torch.Tensor)]
        inherited = [p for p in map(maker_policy, outputs) if p is not None]
        if inherited:
            policy = inherited[0]
        elif op.overloadpacket in _packets(_ALLOCATIONS):
            policy = CheckpointPolicy.PREFER_RECOMPUTE
        else:
            policy = by_name(op)
        if _draws_random(op, args, kwargs):
            if not random_policy:
                random_policy.append(policy)
            elif policy != random_policy[0]:
                if inherited:
                    raise RuntimeError(
                        f"selective checkpointing would cache one random op and recompute {op}, "
                        "so recomputed dropout masks would differ: name all dropout-like ops "
                        "alike (add or remove 'dropout' and 'sdpa' together)")
                policy = random_policy[0]
        for t in outputs:
            if maker_policy(t) is None:
                storage = t.untyped_storage()
                made[id(storage)] = (weakref.ref(storage), policy)
        return policy

    return policy_fn


def _draws_random(op, args, kwargs) -> bool:
    if torch.Tag.nondeterministic_seeded not in op.tags:
        return False
    names = [a.name for a in op._schema.arguments]
    if "dropout_p" not in names:  # e.g. bernoulli_, native_dropout
        return True
    i = names.index("dropout_p")  # attention kernels draw only when dropout_p > 0
    p = kwargs.get("dropout_p", args[i] if i < len(args) else 0.0)
    return p > 0


# ---------------------------------------------------------------- offload to host memory
@dataclass
class OffloadStats:
    """Bytes (and tensors) moved by the offload policy: to host in forward, back in backward."""

    bytes_to_host: int = 0
    bytes_to_device: int = 0
    tensors_to_host: int = 0
    tensors_to_device: int = 0

    def reset(self):
        self.bytes_to_host = self.bytes_to_device = 0
        self.tensors_to_host = self.tensors_to_device = 0

    def __str__(self):
        return (f"to host {fmt_bytes(self.bytes_to_host)} ({self.tensors_to_host} tensors), "
                f"back {fmt_bytes(self.bytes_to_device)} ({self.tensors_to_device} tensors)")


@dataclass
class _HostCopy:
    """A saved tensor's copy in host memory, plus what is needed to bring it back."""

    device: torch.device
    host: object  # a CPU tensor, or on CUDA what save_on_cpu's pack hook returned
    nbytes: int
    storage: weakref.ref = field(repr=False)  # the original, to recognise a second save of it
    uses: int = 0  # saves of it that backward has not read yet
    on_device: torch.Tensor | None = field(default=None, repr=False)  # back, and still needed


class HostStore:
    """Pack/unpack hooks that move saved tensors to host memory, counting the bytes.

    CUDA (any non-CPU device): ``torch.autograd.graph.save_on_cpu(pin_memory=True)`` makes the
    copies. On a CPU-only machine the "host" is this store: copies are made with every dispatch
    mode disabled, so a memory meter (a ``TorchDispatchMode``) sees them leave; the copy back in
    backward is a fresh tensor the meter does see. Parameters and buffers (and views of them,
    such as the ``weight.t()`` Linear saves, or a slice of a rotary table all layers share) stay
    put: they are in device memory anyway, and a host copy of a shared one would come back once
    and stay on the device from the last block's backward to the first's. A tensor saved twice
    (ReLU's output, saved again by the next block's matmul) goes to host once and comes back once:
    the copy back is shared by its uses in backward and dropped after the last one.
    """

    def __init__(self):
        self.stats = OffloadStats()
        self._copies = weakref.WeakValueDictionary()  # a copy lives as long as autograd holds it
        self._movers = {}

    def hooks(self, params):
        skip = {id(p.untyped_storage()) for p in params}
        return torch.autograd.graph.saved_tensors_hooks(
            functools.partial(self.pack, skip=skip), self.unpack)

    def pack(self, t: torch.Tensor, skip=frozenset()):
        storage = t.untyped_storage()
        if id(storage) in skip:
            return t
        key = (id(storage), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t._version)
        copy = self._copies.get(key)
        if copy is None or copy.storage() is not storage:
            with _disable_current_modes():  # host memory is not device memory
                on_cpu = t.device.type == "cpu"
                host = t.detach().clone() if on_cpu else self._mover(t.device).pack_hook(t)
            copy = _HostCopy(t.device, host, t.numel() * t.element_size(), weakref.ref(storage))
            self._copies[key] = copy
            self.stats.bytes_to_host += copy.nbytes
            self.stats.tensors_to_host += 1
        copy.uses += 1
        return copy

    def unpack(self, copy):
        if isinstance(copy, torch.Tensor):
            return copy
        tensor = copy.on_device
        if tensor is None:
            self.stats.bytes_to_device += copy.nbytes
            self.stats.tensors_to_device += 1
            if copy.device.type == "cpu":
                tensor = copy.host.clone()  # a new "device" tensor, visible to memory meters
            else:
                tensor = self._mover(copy.device).unpack_hook(copy.host)
        copy.uses -= 1
        copy.on_device = tensor if copy.uses > 0 else None
        return tensor

    def _mover(self, device: torch.device):
        kind = device.type
        if kind not in self._movers:
            self._movers[kind] = torch.autograd.graph.save_on_cpu(
                pin_memory=kind == "cuda", device_type=kind)
        return self._movers[kind]


@dataclass(frozen=True)
class Offload(Policy):
    """Each block runs under a ``HostStore``'s saved-tensor hooks; nothing is recomputed."""

    def region(self, replay, params, store, args, kwargs):
        with store.hooks(params):
            yield

    def _what(self, n_blocks):
        return "each block's saved tensors go to host memory, nothing is recomputed"

    def __str__(self):
        return "offload"


# ---------------------------------------------------------------- a menu: an option per block
# A nested checkpoint: (start, stop, children), half-open; its recompute checkpoints each child
# again (recursively), the other blocks of the segment run plain in the recompute.
Nest = tuple[int, int, tuple]


@dataclass(frozen=True)
class Nested(Policy):
    """One checkpoint region whose recompute checkpoints ``children`` (sub-segments) again:
    Griewank's multi-level recomputation with nested non-reentrant ``torch.utils.checkpoint``.
    Only inside a ``Menu`` (``menu:0-7=full(0-3(0-1),4-5)``)."""

    children: tuple[Nest, ...] = ()

    def __post_init__(self):
        _check_children(0, math.inf, self.children)

    def segment_policies(self, n_blocks: int) -> list[tuple[range, Policy]]:
        raise ValueError(f"{self} is a nested checkpoint, which runs only inside a menu: write "
                         f"'menu:0-{n_blocks - 1}=full(0-1)', or Menu(((0, {n_blocks}, 'full', "
                         f"((0, 2, ()),)),))")

    def __str__(self):
        return "full" + _children_text(self.children)


def _children_text(children) -> str:
    if not children:
        return ""
    return "(" + ",".join(_span(a, b) + _children_text(c) for a, b, c in children) + ")"


def _span(a: int, b: int, sep: str = "-") -> str:
    return f"{a}" if b == a + 1 else f"{a}{sep}{b - 1}"


@dataclass(frozen=True)
class Menu(Policy):
    """An option per block: what the planner prints when it mixes them.

    ``items``: (start, stop, option, children), half-open, ordered; ``option`` is ``"full"``
    (one checkpoint over start..stop-1, with ``children`` checkpointed again in its recompute:
    nesting) or a one-block policy string (``selective:...``, ``offload``), then stop = start + 1.
    Blocks in no item run plain. Text: ``menu:0-1=full,2..3=selective:save=mm,sdpa,4=offload``;
    for ``full``, ``a-b`` is one segment and ``a..b`` each block alone; other options act on one
    block, so ``a-b`` and ``a..b`` both mean each block alone. ``menu:0-7=full(0-3(0-1),4-5)``:
    blocks 0-7 one checkpoint whose recompute checkpoints 0-3 (whose recompute checkpoints 0-1)
    and 4-5.

    ``suffix``: how the trunk after the last block (final norm, head, loss) runs: ``""`` as it
    is, ``"full"`` one checkpoint keeping only the last block's output, or a selective option
    over the suffix's own ops (``selective:ops=...``, positions counted from the suffix's first
    op; ``op_choices.suffix_ops``). Text: ``menu:0-3=full,suffix=full``; ``menu:suffix=full``
    alone leaves every block plain. How the suffix runs: ``_Trunk``."""

    items: tuple[tuple[int, int, str, tuple], ...] = ()
    suffix: str = ""
    # "full": the prefix (embeddings) runs inside the checkpointed segment at block 0, which
    # then keeps the batch only and recomputes prefix and blocks: ``menu:0-1=full,prefix=full``;
    # on a model whose forward holds the prefix's output x_0 unread in a local, x_0 is freed
    # when block 0 returns (``_release_prefix_output``)
    prefix: str = ""

    def __post_init__(self):
        try:
            items = tuple((_block_number(a), _block_number(b), str(o), tuple(c))
                          for a, b, o, c in self.items)
        except (TypeError, ValueError):
            raise ValueError(f"menu items are (start, stop, option, children) with whole block "
                             f"numbers, e.g. ((0, 2, 'full', ()), (2, 3, 'offload', ())); got "
                             f"{self.items!r}") from None
        previous = 0
        for a, b, option, children in items:
            if not previous <= a < b:
                raise ValueError(f"menu items must be ordered, non-empty and not overlap; got "
                                 f"{[i[:3] for i in items]}")
            if option != "full":
                if b != a + 1 or children:
                    raise ValueError(f"{option} acts on one block; write {a}..{b - 1}={option}")
                if not isinstance(parse_policy(option), (Selective, Offload)):
                    raise ValueError(f"a menu option is full, selective:... or offload, not "
                                     f"{option!r}")
            _check_children(a, b, children)
            previous = b
        object.__setattr__(self, "items", items)
        object.__setattr__(self, "suffix", _suffix_option(self.suffix))
        if self.prefix not in ("", "full"):
            raise ValueError(f"a menu's prefix is '' or 'full', not {self.prefix!r}")
        if self.prefix and items and items[0][3]:
            raise ValueError("prefix=full runs the prefix inside the checkpointed segment at "
                             "block 0, which cannot hold nested checkpoints: drop the segment's "
                             "children, e.g. menu:0-3=full,prefix=full")
        if self.prefix and not (items and items[0][0] == 0 and (
                items[0][2] == "full" or isinstance(parse_policy(items[0][2]), SelectiveOps))):
            raise ValueError("prefix=full runs the prefix inside the checkpointed segment at "
                             "block 0: give one, e.g. menu:0-1=full,prefix=full (or block 0 "
                             "at selective:ops=..., its positions counted from the prefix's "
                             "first op)")

    def segments(self, n_blocks: int) -> list[range]:
        return [s for s, _ in self.segment_policies(n_blocks)]

    def segment_policies(self, n_blocks: int) -> list[tuple[range, Policy]]:
        if self.items and self.items[-1][1] > n_blocks:
            raise ValueError(f"{self} reaches block {self.items[-1][1] - 1}, but the model has "
                             f"{n_blocks} blocks: name blocks below {n_blocks}")
        return [(range(a, b), Nested(c) if o == "full" else parse_policy(o))
                for a, b, o, c in self.items]

    def _what(self, n_blocks):
        return "each block runs under its own option; blocks not named run plain"

    def __str__(self):
        parts, k, items = [], 0, self.items
        while k < len(items):  # runs of one-block items with one option read "a..b=option"
            a, b, option, children = items[k]
            m = k
            while (m + 1 < len(items) and items[m + 1][:3] == (items[m][1], items[m][1] + 1, option)
                   and b == a + 1 and not children and not items[m + 1][3]):
                m += 1
            span = _span(a, b) if m == k else f"{a}..{items[m][0]}"
            parts.append(f"{span}={option}{_children_text(children)}")
            k = m + 1
        if self.prefix:
            parts.append(f"prefix={self.prefix}")
        if self.suffix:
            parts.append(f"suffix={self.suffix}")
        return "menu:" + (",".join(parts) or "none")


def _suffix_option(option) -> str:
    """A menu's suffix option, normalised: "", "full" or a selective option's text."""
    if not isinstance(option, str):
        raise ValueError(f"a menu's suffix is '', 'full' or 'selective:...', not {option!r}")
    option = option.strip()
    if option in ("", "full"):
        return option
    # a selective option's own error says what is wrong with it; any other text is no option
    region = parse_policy(option) if option.lower().startswith("selective:") else None
    if not isinstance(region, Selective):
        raise ValueError(f"the suffix runs full or selective:... (e.g. suffix=selective:ops=0,3), "
                         f"not {option!r}")
    return str(region)


MAX_NESTING = 32  # levels of nested checkpoints (Griewank's optimum for n blocks is ~log2 n)
MAX_BLOCK = 100_000  # block numbers: no model has this many blocks ('0..10**9' would never end)


def _check_children(a: int, b, children, depth: int = 1) -> None:
    """Nested segments: (start, stop, children) tuples of whole numbers inside a..b-1, smaller,
    ordered, disjoint, at most ``MAX_NESTING`` levels deep."""
    if depth > MAX_NESTING:
        raise ValueError(f"nested checkpoints go at most {MAX_NESTING} levels deep: nest less")
    if not isinstance(children, (tuple, list)):
        raise ValueError(f"nested segments are a tuple of (start, stop, children) tuples such "
                         f"as ((0, 2, ()),), got {children!r}")
    previous = a
    for c in children:
        if (not isinstance(c, (tuple, list)) or len(c) != 3 or any(
                isinstance(k, bool) or not isinstance(k, int) for k in c[:2])):
            raise ValueError(f"a nested segment is (start, stop, children) with whole block "
                             f"numbers, such as (0, 2, ()); got {c!r}")
        ca, cb, grand = c
        if not previous <= ca < cb <= b or (ca, cb) == (a, b):
            inside = ("start at block 0 or later" if b == math.inf
                      else f"lie inside {_span(a, b)}, be smaller")
            raise ValueError(f"nested segments must {inside}, ordered and not overlap; got "
                             f"{_span(ca, cb)}")
        _check_children(ca, cb, grand, depth + 1)
        previous = cb


def _split_top(text: str) -> list[str]:
    """Split at commas outside parentheses."""
    parts, depth, start = [], 0, 0
    for k, ch in enumerate(text):
        depth += (ch == "(") - (ch == ")")
        if depth < 0:
            raise ValueError("unbalanced parentheses")
        if ch == "," and depth == 0:
            parts.append(text[start:k])
            start = k + 1
    if depth:
        raise ValueError("unbalanced parentheses")
    return [*parts, text[start:]]


def _is_number(text: str) -> bool:
    """ASCII digits only: str.isdigit() also takes '²', which int() refuses."""
    text = text.strip()
    return text.isascii() and text.isdigit()


def _block_span(first: str, last: str, text: str) -> tuple[int, int]:
    a, b = int(first), int(last or first) + 1
    if b > MAX_BLOCK:
        raise ValueError(f"block {b - 1} in {text!r} is beyond any model (at most "
                         f"{MAX_BLOCK - 1}): name the model's blocks")
    return a, b


def _parse_span(text: str) -> tuple[int, int, bool]:
    each = ".." in text
    first, _, last = text.partition(".." if each else "-")
    if not _is_number(first) or (last and not _is_number(last)):
        raise ValueError(f"write inclusive block numbers 'a-b' or 'a..b', not {text!r}")
    a, b = _block_span(first, last, text)
    if b <= a:
        raise ValueError(f"in {text!r} write the first block first")
    return a, b, each


def _depth(text: str) -> int:
    """The deepest parenthesis level of ``text``, counted without recursion."""
    depth = deepest = 0
    for ch in text:
        depth += (ch == "(") - (ch == ")")
        deepest = max(deepest, depth)
    return deepest


def _parse_children(text: str) -> tuple:
    text = text.strip()
    if not text:
        return ()
    if not (text.startswith("(") and text.endswith(")")):
        raise ValueError(f"nested segments go in parentheses after full: full(0-3,4-5), "
                         f"not full{text}")
    children = []
    for part in _split_top(text[1:-1]):
        head, paren, rest = part.strip().partition("(")
        if not head.strip() and paren:
            raise ValueError("a nested segment names its blocks before its parentheses: "
                             "full(0-3(0-1)), not full((0-1))")
        a, b, each = _parse_span(head)
        if each:
            raise ValueError("a nested segment is one span 'a-b'")
        children.append((a, b, _parse_children(paren + rest)))
    return tuple(children)


def _parse_menu(spec: str, body: str) -> Menu:
    import re

    fix = ("write 'menu:0-1=full,2=selective:save=mm,sdpa,3=offload' (inclusive block numbers; "
           "full(4-5) nests)")
    if body.strip() == "none":
        return Menu()
    pieces = []
    try:
        if _depth(body) > MAX_NESTING:
            raise ValueError(f"nested checkpoints go at most {MAX_NESTING} levels deep")
        for piece in _split_top(body):  # a piece without 'N=' continues an op list: mm,sdpa
            if not piece.strip():  # an empty item is skipped, as in a segments list
                continue
            if re.match(r"\s*(\d+\s*((-|\.\.)\s*\d+\s*)?|suffix\s*|prefix\s*)=",
                        piece) or not pieces:
                pieces.append(piece)
            else:
                pieces[-1] += "," + piece
        items, trunk = [], {}
        for piece in pieces:
            span, eq, option = piece.partition("=")
            if not eq:
                raise ValueError(f"{piece!r} names no option")
            if span.strip() in ("suffix", "prefix"):
                trunk[span.strip()] = _trunk_clause(span.strip(), option, trunk)
                continue
            a, b, each = _parse_span(span)
            option = option.strip()
            if option.startswith("full"):
                children = _parse_children(option.removeprefix("full"))
                if each and children:
                    raise ValueError("nest one span: a-b=full(...)")
                items += ([(k, k + 1, "full", ()) for k in range(a, b)] if each
                          else [(a, b, "full", children)])
            else:
                option = str(parse_policy(option))
                items += [(k, k + 1, option, ()) for k in range(a, b)]
        return Menu(tuple(items), trunk.get("suffix", ""), trunk.get("prefix", ""))
    except ValueError as error:
        raise ValueError(f"bad policy {shown(spec)}: {error}; {fix}") from None


def _trunk_clause(name: str, option: str, seen: dict) -> str:
    """A menu's ``suffix=`` or ``prefix=`` clause, given once and naming an option: an empty
    or repeated clause would otherwise be dropped, or a later one win, without a word."""
    accepted = "full or selective:..." if name == "suffix" else "full"
    if name in seen:
        raise ValueError(f"{name}= is given twice: give it once")
    if not option.strip():
        raise ValueError(f"{name}= names no option: write {name}={accepted}, or leave the "
                         f"clause out")
    return _suffix_option(option) if name == "suffix" else option.strip()


# ---------------------------------------------------------------- parsing
_SIMPLE = {"none": NoCheckpoint(), "full": EveryK(1), "sqrt": Sqrt(), "offload": Offload(),
           "attn-core": Selective(("attn-core",), "recompute")}


def parse_policy(spec) -> Policy:
    """A ``Policy`` from a string such as ``"every-2"``, ``"segments:0-2,5"`` or
    ``"selective:save=mm,sdpa"`` (``str(policy)`` reads back). Policy objects pass through."""
    if isinstance(spec, Policy):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"a policy is a Policy or a string ({ACCEPTED}), not {type(spec).__name__}")
    s = spec.strip().lower()
    if s in _SIMPLE:
        return _SIMPLE[s]
    if s.startswith("every-"):
        k = s.removeprefix("every-")
        if not _is_number(k) or len(k) > 7 or int(k) < 1:
            raise ValueError(f"bad policy {shown(spec)}: K in every-K must be an integer >= 1; "
                             f"accepted: {ACCEPTED}")
        if int(k) >= MAX_BLOCK:
            raise ValueError(f"bad policy {shown(spec)}: K in every-K must be below {MAX_BLOCK:,} "
                             f"(no model has that many blocks): use e.g. every-2")
        return EveryK(int(k))
    if s.startswith("segments:"):
        return _parse_segments(spec, s.removeprefix("segments:"))
    if s.startswith("menu:"):
        return _parse_menu(spec, s.removeprefix("menu:"))
    if s.startswith("selective:"):
        mode, eq, ops = s.removeprefix("selective:").partition("=")
        if mode == "ops" and eq:
            return _parse_op_positions(spec, ops)
        if not eq or mode not in ("save", "recompute"):
            raise ValueError(f"bad policy {spec!r}: OPS are comma-separated names from "
                             f"{', '.join(OP_NAMES)}; accepted: {ACCEPTED}")
        return Selective(tuple(o.strip() for o in ops.split(",") if o.strip()), mode)
    raise ValueError(f"unknown policy {spec!r}; accepted: {ACCEPTED}")


def _parse_op_positions(spec: str, body: str) -> SelectiveOps:
    parts = [p.strip() for p in body.split(",")]
    if not all(map(_is_number, parts)) or len(set(map(int, parts))) != len(parts):
        raise ValueError(f"bad policy {shown(spec)}: selective:ops= takes distinct op positions "
                         f"in the block's forward, whole numbers from 0: 'selective:ops=0,7,12'")
    return SelectiveOps(indices=tuple(int(p) for p in parts))


def _parse_segments(spec: str, body: str) -> Segments:
    body, _, option = body.partition(";")
    option = option.replace(" ", "")
    if option not in ("", "preserve_rng_state=false", "preserve_rng_state=true"):
        raise ValueError(f"bad policy {spec!r}: the only option of segments is "
                         f"';preserve_rng_state=False'")
    ranges = []
    for part in filter(None, (p.strip() for p in body.split(","))):
        if part == "none":
            continue
        each = ".." in part
        first, _, last = part.partition(".." if each else "-")
        if not _is_number(first) or (last and not _is_number(last)):
            raise ValueError(f"bad policy {spec!r}: write inclusive block numbers, 'a-b' for one "
                             f"segment, 'a..b' for each block alone: 'segments:0-2,5..7'")
        try:
            a, b = _block_span(first, last, part)
        except ValueError as error:
            raise ValueError(f"bad policy {spec!r}: {error}") from None
        if b <= a:
            raise ValueError(f"bad policy {spec!r}: in 'a-b' write the first block first")
        ranges += [(k, k + 1) for k in range(a, b)] if each else [(a, b)]
    if not ranges and body.strip() != "none":
        raise ValueError(f"bad policy {spec!r}: name the blocks, e.g. 'segments:0-1,4-5' "
                         f"(or 'segments:none')")
    return Segments(tuple(ranges), option != "preserve_rng_state=false")


# ---------------------------------------------------------------- applying and removing
class _Link:
    """In a recorded call: "this argument is leaf ``index`` of the previous block's output"."""

    def __init__(self, index: int):
        self.index = index


class _Region:
    """One segment: its blocks, called by the model one after another, in one region.

    The first block's call opens the region (``policy.region``) with that block's arguments,
    which the region keeps for the recompute; each later block's arguments are recorded, with
    the previous block's output replaced by a ``_Link`` (so the region does not keep it alive);
    the last block's return closes the region. An error inside closes it too, so no hooks stay
    installed and the model can run again."""

    def __init__(self, handle: AppliedPolicy, blocks: list[nn.Module], policy: Policy,
                 forwards=None):
        self.handle, self.blocks, self.policy = handle, blocks, policy
        # the blocks' own, bound before any override; under nesting, the inner regions' calls
        self.forwards = forwards or [b.forward for b in blocks]
        self._open = None  # the running region's generator
        self._calls = None  # later blocks' recorded arguments, for this forward's recompute
        self._previous = None  # the leaves of the last block's output, until the next call
        self._next = 0
        self._early = False  # opened at the entry call (a menu's prefix=full)
        # under prefix=full, free x_0 when block 0 returns (the model says its forward holds
        # it unread: ``HFCausalLM.frees_prefix_output``)
        self.frees_prefix_output = False

    def open_at_entry(self, replay, args, kwargs) -> None:
        """``prefix=full``: open at the start of the entry call (``_Trunk``), so the prefix's
        saved tensors are the region's too; ``replay`` re-runs the entry call."""
        self._abandon()
        params = [t for b in self.blocks for t in (*b.parameters(), *b.buffers())]
        self._open = self.policy.region(replay, params, self.handle.store, args, kwargs)
        next(self._open)
        self._calls, self._early = None, True

    def __call__(self, k: int, args, kwargs):
        if self._early and k == 0 and self._open is not None:
            pass  # opened at the entry: the prefix ran inside
        elif k == 0:
            self._early = False
            self._abandon()
            self._calls = []
            params = [t for b in self.blocks for t in (*b.parameters(), *b.buffers())]
            replay = functools.partial(_replay, self.blocks, self.forwards, self._calls)
            self._open = self.policy.region(replay, params, self.handle.store, args, kwargs)
            next(self._open)
        else:
            self._record(k, args, kwargs)
        try:
            out = self.forwards[k](*args, **kwargs)
        except BaseException as error:
            self._abandon(error)
            raise
        if k == 0 and self._early and self.frees_prefix_output and args:
            _release_prefix_output(args[0], out)
        if k == len(self.blocks) - 1:
            region, self._open, self._previous = self._open, None, None
            next(region, None)  # closes it (the generator ends)
        else:
            self._previous, self._next = tree_leaves(out), k + 1
        return out

    @property
    def is_open(self) -> bool:
        return self._open is not None

    def _record(self, k: int, args, kwargs) -> None:
        leaves, spec = tree_flatten((args, kwargs))
        previous = {id(t): i for i, t in enumerate(self._previous or ())
                    if isinstance(t, torch.Tensor)}
        linked = [_Link(previous[id(t)]) if isinstance(t, torch.Tensor) and id(t) in previous
                  else t for t in leaves]
        if self._open is None or k != self._next or not any(isinstance(t, _Link) for t in linked):
            error = RuntimeError(
                f"block {k} of a checkpointed segment ran without block {k - 1}'s output: a "
                f"multi-block segment needs the model to call its blocks in order, feeding each "
                f"output to the next; use full, selective or offload (one block per segment)")
            self._abandon(error)
            raise error
        if self._calls is not None:  # (a region opened at the entry replays the entry call)
            self._calls.append((linked, spec))

    def _abandon(self, error: BaseException | None = None) -> None:
        """Close a region left open (an error in a block, or a forward that stopped early)."""
        region, self._open, self._previous, self._next = self._open, None, None, 0
        self._early = False
        if region is None:
            return
        with contextlib.suppress(BaseException):
            region.throw(error or RuntimeError("forward stopped inside a checkpointed segment"))


def _replay(blocks, forwards, calls, *args, **kwargs):
    """The segment's recompute: each block with its recorded arguments, the links filled in
    with the previous block's recomputed output. Running statistics are not updated twice."""
    with _running_stats_kept(blocks):
        out = forwards[0](*args, **kwargs)
        for forward, (linked, spec) in zip(forwards[1:], calls, strict=True):
            previous = tree_leaves(out)
            leaves = [previous[t.index] if isinstance(t, _Link) else t for t in linked]
            args_k, kwargs_k = tree_unflatten(leaves, spec)
            out = forward(*args_k, **kwargs_k)
    return out


@contextlib.contextmanager
def _running_stats_kept(blocks):
    """During a recompute, BatchNorm-like modules in training mode run as in forward but leave
    their running statistics as forward left them (a second update is lesson 3b's pitfall): the
    replay runs with momentum 0 (new = 1 * old + 0 * batch: the same bits while the batch's
    statistics are finite) and ``num_batches_tracked`` is put back. Nothing is copied, so the
    planner's byte counts hold, and the same tensors are saved as in forward (turning
    ``track_running_stats`` off would save fewer, and checkpoint refuses that). The lesson's
    fix, ``pitfalls.buffers_restored``, clones the buffers instead. A buffer another module
    updates in place during the replay is reported once: nothing generic undoes it."""
    with _disable_current_modes():  # outside selective checkpointing's own dispatch mode
        norms = [(m, m.momentum, None if m.num_batches_tracked is None
                  else int(m.num_batches_tracked)) for b in blocks for m in b.modules()
                 if isinstance(m, nn.modules.batchnorm._NormBase) and m.training
                 and m.track_running_stats]
    theirs = {id(t) for m, _, _ in norms for t in m.buffers()}
    versions = {id(t): _version(t) for b in blocks for t in b.buffers() if id(t) not in theirs}
    for m, _, _ in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        with torch.no_grad(), _disable_current_modes():
            for m, momentum, tracked in norms:
                m.momentum = momentum
                if tracked is not None:
                    m.num_batches_tracked.fill_(tracked)
        # in ``finally``: checkpoint ends a recompute early by raising through here
        changed = [name for b in blocks for name, t in b.named_buffers()
                   if id(t) in versions and _version(t) != versions[id(t)]]
        if changed:
            warnings.warn(f"the recompute updated buffer {changed[0]} a second time (its "
                          f"forward changes it in place): checkpoint this block with offload "
                          f"or not at all", stacklevel=2)


def _version(t: torch.Tensor):
    return None if t.is_inference() else t._version


class _Forward:
    """The instance ``forward`` a policy gives a block; it knows which handle installed it.
    With a checkpointed suffix, the last block's return opens the suffix's region."""

    def __init__(self, handle: AppliedPolicy, run, index: int, last: bool = False):
        self.handle, self.run, self.index, self.last = handle, run, index, last

    def __call__(self, *args, **kwargs):
        suffix = self.handle.suffix
        if suffix is not None:
            suffix.check_closed(self.index)
        out = self.run(*args, **kwargs)
        if suffix is not None and self.last:
            suffix.open(out)
        return out


def _release_prefix_output(x0, out) -> None:
    """``prefix=full`` on a model whose forward holds the prefix's output ``x0`` in a local,
    unread, to its end (a Hugging Face Llama's ``inputs_embeds``: the model says so,
    ``HFCausalLM.frees_prefix_output``): block 0 has returned, and ``x0`` (made inside the
    region, so nothing saved it) would stay alive past the point the planner counts it dead,
    so its storage is freed here; the tensor reads NaN from one shared element from then on.
    Only such models: on another model a later read could turn into a plausible wrong number
    (a mask ``x0 > 0`` is all False), so there x_0 stays as the model keeps it and the planner
    offers prefix=full only where it dies by itself (``costs._prefix_facts``). Left alone: the
    batch or a parameter (no ``grad_fn``), a view (freeing it frees nothing), integer tensors,
    a fake tensor, and a block that hands ``x0`` back."""
    if not (type(x0) is torch.Tensor and x0.grad_fn is not None and x0._base is None
            and x0.is_floating_point() and torch.is_grad_enabled()):
        return
    storage = x0.untyped_storage()
    if any(isinstance(t, torch.Tensor) and t.untyped_storage()._cdata == storage._cdata
           for t in tree_leaves(out)):
        return
    with _disable_current_modes():
        x0.data = _nan_like(x0.dtype, x0.device).expand(x0.shape)


@functools.cache
def _nan_like(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """One NaN element per dtype and device, made once outside any meter: what a released
    prefix output reads (``_release_prefix_output``)."""
    return torch.full((1,), float("nan"), dtype=dtype, device=device)


# ---------------------------------------------------------------- the suffix as a checkpoint
class _Trunk:
    """The trunk around the blocks under a menu's ``suffix=`` and ``prefix=`` clauses.

    ``suffix=full`` (or ``suffix=selective:...``): what runs after the last block (final norm,
    head and, for a course model, the loss) as one checkpoint region. ``prefix=full``: the
    checkpointed segment at block 0 opens at the start of the entry call, so the prefix
    (embeddings) runs inside it; its recompute calls the entry again (``_replay_prefix``).

    The region opens when the last block returns inside a call of the *entry*, and closes when
    the entry returns. The entry: ``model.loss`` for a model with the course protocol
    (``.loss`` and ``.example_batch``: the loss's log-softmax is inside), else its ``forward``
    (a learner's model, whose loss is the learner's own code: the suffix is then the final
    layers only); a module named by
    ``model.suffix_entry`` has its ``forward`` as the entry (``auto``'s adapter names the
    learner's model). The recompute (at the start of the suffix's backward) calls the entry
    again with the arguments it was called with: the prefix (embeddings) runs under
    ``no_grad`` from the random state the entry started with (it saves nothing and makes the
    values it made in forward; its transient tensors are part of the suffix's measured
    backward), then the blocks stand aside: block 0 returns the region's input (the last
    block's output) with grad on again and the random state the region opened with, the
    others pass their input through. So the recompute runs the suffix's ops again on the same
    values, and the checkpoint's early stop ends it at the suffix's last saved tensor.
    Assumed (as for a multi-block segment, and checked by the planner when it measures):
    each block runs once per forward, in order, its first argument the hidden state, its
    output the next block's input; re-running the code before the first block makes the same
    values (true of any deterministic prefix; BatchNorm statistics are not updated twice).
    A model whose suffix cannot run this way is planned with its suffix as it is: the planner
    leaves out a suffix option whose measurement fails."""

    def __init__(self, handle: AppliedPolicy, model: nn.Module, region: Policy,
                 entry: nn.Module | None = None):
        self.handle, self.model, self.region = handle, model, region
        named = entry if entry is not None else getattr(model, "suffix_entry", None)
        if isinstance(named, nn.Module):
            self.owner, self.name = named, "forward"
        elif all(callable(getattr(model, name, None)) for name in ("loss", "example_batch")):
            self.owner, self.name = model, "loss"
        else:
            self.owner, self.name = model, "forward"
        if isinstance(vars(self.owner).get(self.name), _Entry):
            raise RuntimeError(f"{type(self.owner).__name__}.{self.name} already runs a "
                               f"checkpointed suffix: remove that policy first")
        self.raw = getattr(self.owner, self.name)
        self._call = None  # (args, kwargs, random state) of the entry call running now
        self._open = None  # the region's generator while it is open
        self._replaying = None  # (the region's input, random state) during its recompute
        self.first = None  # under prefix=full, the region of the checkpointed segment at 0
        setattr(self.owner, self.name, _Entry(self))

    def enter(self, args, kwargs):
        if self._call is not None:  # called again inside itself: the outer call holds
            return self.raw(*args, **kwargs)
        self._call = (args, kwargs, _random_state(tree_leaves((args, kwargs))))
        if self.first is not None:
            self.first.open_at_entry(functools.partial(self._replay_prefix, self.first),
                                     args, kwargs)
        try:
            out = self.raw(*args, **kwargs)
        except BaseException as error:
            self._abandon(error)
            if self.first is not None:
                self.first._abandon(error)
            raise
        finally:
            self._call = None
        region, self._open = self._open, None
        if region is not None:
            next(region, None)  # closes it
        return out

    def open(self, out) -> None:
        """The last block returned ``out``: the suffix starts (inside an entry call only)."""
        if self._call is None or self.region is None:
            return
        args, kwargs, state = self._call
        if getattr(type(self.region), "region", Policy.region) is not Policy.region:
            self._open = self.region.region(None, [], self.handle.store, (out,), {})
            next(self._open)  # a region of its own (op_choices records the suffix's ops)
            return
        # the recompute context (selective checkpointing's cache) starts where the suffix does,
        # at block 0's stand-in: the prefix's ops are none of its business
        forward, recompute = (self.region.context_fn("the suffix")
                              if isinstance(self.region, SelectiveOps)
                              else self.region.context_fn())
        replay = functools.partial(self._replay, args, kwargs, state, recompute)
        self._open = _checkpoint_without_reentrant_generator(
            replay, True, lambda: (forward, contextlib.nullcontext()), "default", False, True,
            out)
        next(self._open)

    def check_closed(self, k: int) -> None:
        """Block ``k`` is called: inside the open suffix (code after the last block calls a
        block again) its recompute would stand in for it and save other tensors, and torch's
        checkpoint would fail in backward with a multi-line error. Refused here, in forward."""
        if self._open is None:
            return
        error = RuntimeError(f"block {k} ran after the last block, inside the checkpointed "
                             f"suffix: a checkpointed suffix needs each block once per forward; "
                             f"drop suffix=")
        self._abandon(error)
        raise error

    def _replay(self, args, kwargs, state, recompute, last_out):
        self._replaying = [last_out, _random_state(tree_leaves((args, kwargs))), recompute,
                           False]
        try:
            with torch.no_grad(), _running_stats_kept([self.model]), \
                    _standing_aside(self.handle.blocks, self.stand_in):
                _set_random_state(state)
                self.raw(*args, **kwargs)
        finally:
            entered, self._replaying = self._replaying[3], None
            if entered:
                recompute.__exit__(None, None, None)

    def _replay_prefix(self, first: _Region, *args, **kwargs):
        """The recompute of the segment at block 0 under ``prefix=full``: the entry call
        again (the checkpoint has put back the random state it began with), its blocks
        running as they do inside the segment; the checkpoint's early stop ends it within
        the segment's last block (a later block's call would be an error)."""

        def inside(k, *a, **kw):
            if k >= len(first.forwards):
                raise RuntimeError("prefix=full: the recompute ran past its segment (is the "
                                   "checkpoint's early stop off?)")
            return first.forwards[k](*a, **kw)

        with _running_stats_kept([self.model]), _standing_aside(self.handle.blocks, inside):
            self.raw(*args, **kwargs)

    def stand_in(self, k: int, *args, **kwargs):
        """Block ``k``'s call during the recompute: block 0 hands over the region's input."""
        if k:
            return args[0]
        last_out, state, recompute, _ = self._replaying
        torch.set_grad_enabled(True)  # the suffix saves, as in forward (no_grad's exit resets)
        _set_random_state(state)
        recompute.__enter__()
        self._replaying[3] = True
        return last_out

    def _abandon(self, error: BaseException | None = None) -> None:
        region, self._open = self._open, None
        if region is not None:
            with contextlib.suppress(BaseException):
                region.throw(error or RuntimeError("forward stopped inside the suffix"))

    def remove(self) -> None:
        if isinstance(entry := vars(self.owner).get(self.name), _Entry) and entry.suffix is self:
            delattr(self.owner, self.name)


@contextlib.contextmanager
def _standing_aside(blocks, stand_in):
    """While a suffix recomputes, each block's call is ``stand_in(k, ...)`` (installed here, so
    a backward after the policy's removal recomputes the same), and the blocks' own forward
    hooks do not run (the blocks do not run: a hook that records a call, as
    ``hf.HFCausalLM``'s keyword-argument recorder does, would keep the recompute's tensors)."""
    kept = [(b, vars(b).get("forward"), b._forward_pre_hooks, b._forward_hooks)
            for b in blocks]
    for k, b in enumerate(blocks):
        b._forward_pre_hooks, b._forward_hooks = type(b._forward_pre_hooks)(), type(
            b._forward_hooks)()
        b.forward = functools.partial(stand_in, k)
    try:
        yield
    finally:
        for b, forward, pre, post in kept:
            b._forward_pre_hooks, b._forward_hooks = pre, post
            del b.forward
            if forward is not None:
                b.forward = forward


class _Entry:
    """The instance ``loss`` (or ``forward``) a checkpointed suffix gives its entry."""

    def __init__(self, suffix: _Trunk):
        self.suffix = suffix

    def __call__(self, *args, **kwargs):
        return self.suffix.enter(args, kwargs)


def _random_state(tensors) -> tuple:
    """The CPU random state and that of the devices of ``tensors`` (CUDA)."""
    from torch.utils.checkpoint import get_device_states

    return torch.get_rng_state(), get_device_states(*[t for t in tensors
                                                      if isinstance(t, torch.Tensor)])


def _set_random_state(state) -> None:
    from torch.utils.checkpoint import set_device_states

    cpu, (devices, states) = state
    torch.set_rng_state(cpu)
    if devices:
        set_device_states(devices, states)


def _suffix_region(option: str) -> Policy | None:
    """The region policy of a menu's suffix option (None: the suffix runs as it is)."""
    if not option:
        return None
    return EveryK(1) if option == "full" else parse_policy(option)


def _installed(block: nn.Module) -> _Forward | None:
    forward = vars(block).get("forward")
    return forward if isinstance(forward, _Forward) else None


class AppliedPolicy:
    """What ``apply_policy`` returns: ``remove()`` undoes it; ``stats`` counts offload traffic."""

    def __init__(self, model: nn.Module, blocks: list[nn.Module], policy: Policy,
                 suffix: Policy | None = None, suffix_entry: nn.Module | None = None):
        self.blocks, self.policy, self.store = blocks, policy, HostStore()
        self.stats = self.store.stats
        # instance forwards there before (costs.py's stand-ins for blocks cut out), put back
        self._before = [vars(block).get("forward") for block in blocks]
        runs = [block.forward for block in blocks]  # outside any segment: the block's own
        self.regions = []
        for s, sub in policy.segment_policies(len(blocks)):
            region = self._region(blocks, s, sub)
            for k, i in enumerate(s):
                runs[i] = functools.partial(_call_region, region, k)
        self.suffix = self.trunk = None
        region = suffix or _suffix_region(getattr(policy, "suffix", ""))
        if region is not None or getattr(policy, "prefix", ""):
            self.trunk = _Trunk(self, model, region, suffix_entry)
            self.suffix = self.trunk if region is not None else None
        if getattr(policy, "prefix", ""):
            self.trunk.first = next(r for r in self.regions if r.blocks[0] is blocks[0])
            self.trunk.first.frees_prefix_output = getattr(model, "frees_prefix_output", False)
        for i, (block, run) in enumerate(zip(blocks, runs, strict=True)):
            block.forward = _Forward(self, run, i, i == len(blocks) - 1)
        # An error between blocks (in the model's own code, or a module hook) never reaches a
        # region: the model's forward closes whatever is left open when it ends.
        self._closer = model.register_forward_hook(self._close_regions, always_call=True)

    def _region(self, blocks, s: range, policy: Policy) -> _Region:
        """The region of segment ``s``; a nested checkpoint's blocks run through its children's
        regions, in its forward and in its recompute alike, so each child checkpoints again."""
        forwards = [b.forward for b in blocks[s.start:s.stop]]
        for a, b, children in getattr(policy, "children", ()):
            inner = self._region(blocks, range(a, b), Nested(children))
            for k in range(a, b):
                forwards[k - s.start] = functools.partial(_call_region, inner, k - a)
        region = _Region(self, blocks[s.start:s.stop], policy, forwards)
        self.regions.append(region)
        return region

    def _close_regions(self, module, args, output) -> None:
        left_open = [r for r in self.regions if r.is_open]
        for region in left_open:
            region._abandon()
        if left_open and sys.exc_info()[0] is None:
            raise RuntimeError(f"{type(module).__name__}'s forward ended inside a checkpointed "
                               f"segment: under {self.policy} the model must call every block "
                               f"of a segment, in order")

    def remove(self) -> None:
        """Give the blocks their own forward back. Safe to call twice."""
        self._closer.remove()
        if self.trunk is not None:
            self.trunk.remove()
        for block, before in zip(self.blocks, self._before, strict=True):
            if (forward := _installed(block)) is not None and forward.handle is self:
                del block.forward
                if before is not None:
                    block.forward = before

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()

    def __repr__(self):
        return f"AppliedPolicy({self.policy}, {len(self.blocks)} blocks)"


def _call_region(region: _Region, k: int, *args, **kwargs):
    return region(k, args, kwargs)


def find_blocks(model: nn.Module, blocks=None) -> list[nn.Module]:
    """The blocks a policy acts on: ``blocks`` if given, else ``model.blocks``."""
    if blocks is None:
        blocks = getattr(model, "blocks", None)
        if not isinstance(blocks, (nn.ModuleList, nn.Sequential)) or len(blocks) == 0:
            raise ValueError(
                f"{type(model).__name__} has no non-empty `blocks`: give the model a `blocks` "
                "nn.ModuleList of layers, or pass blocks= explicitly")
    blocks = list(blocks)
    if not blocks or not all(isinstance(b, nn.Module) for b in blocks):
        raise ValueError("blocks= must be a non-empty sequence of nn.Module layers")
    for k, block in enumerate(blocks):
        if hasattr(block, "_orig_mod") and type(block).__name__ == "OptimizedModule":
            raise ValueError(f"block {k} is a torch.compile'd module, which a policy cannot "
                             f"wrap: give the blocks uncompiled, and compile the model after "
                             f"checkpointing it")
    return blocks


def apply_policy(model: nn.Module, policy, blocks=None,
                 suffix_entry: nn.Module | None = None) -> AppliedPolicy:
    """Apply ``policy`` (a Policy or a string) to the model's blocks; ``.remove()`` undoes it.
    ``suffix_entry``: the module whose forward ends a checkpointed suffix (``_Trunk``)."""
    policy = parse_policy(policy)
    blocks = find_blocks(model, blocks)
    for i, block in enumerate(blocks):
        if (forward := _installed(block)) is not None:
            raise RuntimeError(f"block {i} already runs under policy '{forward.handle.policy}': "
                               "call .remove() on that handle (or leave its `with`) first")
        if "forward" in vars(block):
            raise RuntimeError(f"block {i} already has an instance-level forward (another "
                               "wrapper?): remove it before applying a checkpoint policy")
    return AppliedPolicy(model, blocks, policy, suffix_entry=suffix_entry)


@contextlib.contextmanager
def suffix_applied(model: nn.Module, region: Policy | None, policy: Menu | None = None):
    """Only the suffix (``_Trunk``) run as ``region`` (a policy object: ``EveryK(1)`` is
    ``suffix=full``), or ``policy``, over the forwards the blocks have now: ``costs``
    measures the trunk this way with its blocks cut out, and ``op_choices`` records the
    suffix's ops."""
    handle = AppliedPolicy(model, find_blocks(model), policy or Menu(), suffix=region)
    try:
        yield handle
    finally:
        handle.remove()


@contextlib.contextmanager
def applied(model: nn.Module, policy, blocks=None):
    """``with applied(model, "full") as handle: ...``: the policy holds inside the block only."""
    handle = apply_policy(model, policy, blocks)
    try:
        yield handle
    finally:
        handle.remove()
