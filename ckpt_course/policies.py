"""Checkpoint policies: which activations a model keeps for backward, and which it recomputes.

A policy acts on ``model.blocks``, the model's sequence of layers (one tensor in, one out)::

    with applied(model, "every-2"):         # or: handle = apply_policy(model, "every-2")
        model.loss(batch).backward()         #     ...; handle.remove()

The policies, each also written as a short string (``parse_policy``):

- ``none``: every block keeps everything autograd saves.
- ``full`` (= ``every-1``): each block runs under ``torch.utils.checkpoint.checkpoint``. Forward
  keeps only each block's input; backward re-runs the block's forward to rebuild the rest.
- ``every-K``: segments of K consecutive blocks, one checkpoint call per segment, which keeps only
  the segment's input. Fewer stored inputs, but backward rebuilds a whole segment at once.
  Unlike ``torch.utils.checkpoint.checkpoint_sequential``, the last segment is checkpointed too
  (``checkpoint_sequential`` always runs its last segment plainly, so ``segments=1`` saves nothing).
- ``sqrt``: segments of K = ceil(sqrt(L)) blocks (Chen et al. 2016, "Training deep nets with
  sublinear memory cost"): ceil(L / K) <= K segment inputs stay stored and backward rebuilds one
  segment of K blocks at a time, so memory grows like sqrt(L), not L.
- ``selective:save=OPS``: each block checkpointed, but the outputs of the named ops are kept
  (torch's selective activation checkpointing, ``CheckpointPolicy.MUST_SAVE``) and only the rest
  is recomputed. ``save=mm`` keeps the matmuls: backward re-runs only cheap elementwise ops.
- ``selective:recompute=OPS``: the inverse; recompute only the named ops, keep all other outputs.
  ``recompute=attn-core`` (alias ``attn-core``) is Megatron's "recompute only the attention core".
- ``offload``: nothing is recomputed; each block's saved tensors are copied to host memory in
  forward and copied back in backward (``torch.autograd.graph.saved_tensors_hooks``).

How a policy is applied: the first block of a segment gets an instance ``forward`` that runs the
whole segment under the policy; the segment's other blocks get a pass-through ``forward``. The
model's own loop (``for block in self.blocks: x = block(x)``) is unchanged, and ``remove()``
deletes the instance attributes again: parameters, state_dict and module tree are never touched.
This assumes the model calls its blocks in order, once each, feeding each output to the next.

All checkpointing uses ``use_reentrant=False`` and the default ``preserve_rng_state=True``: the
recompute replays the same dropout masks, so gradients are bit-identical to no policy.
"""

from __future__ import annotations

import contextlib
import functools
import math
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

from .units import fmt_bytes

ACCEPTED = ("none, full, every-K (K >= 1), sqrt, selective:save=OPS, selective:recompute=OPS, "
            "attn-core, offload")

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
    """Base class. A policy cuts the blocks into segments and says how a segment runs."""

    def segments(self, n_blocks: int) -> list[range]:
        """Blocks grouped as the policy runs them; the first block of each range is a boundary."""
        return [range(i, i + 1) for i in range(n_blocks)]

    def run(self, segment, x: torch.Tensor, store: HostStore) -> torch.Tensor:
        """Run one segment (a function of one tensor) under the policy."""
        raise NotImplementedError

    def describe(self, n_blocks: int) -> str:
        """Which blocks start a checkpointed segment, in words, e.g. for a lesson's table."""
        groups = " ".join("[" + " ".join(str(i) for i in s) + "]" for s in self.segments(n_blocks))
        starts = ", ".join(str(s.start) for s in self.segments(n_blocks))
        return (f"{self} on {n_blocks} blocks: segments {groups}, boundaries at blocks {starts}; "
                f"{self._what(n_blocks)}")

    def _what(self, n_blocks: int) -> str:
        return ""


@dataclass(frozen=True)
class NoCheckpoint(Policy):
    def segments(self, n_blocks: int) -> list[range]:
        return []

    def describe(self, n_blocks: int) -> str:
        return f"none on {n_blocks} blocks: nothing checkpointed, every block keeps its activations"

    def __str__(self):
        return "none"


class _Segmented(Policy):
    """Segments of ``segment_size(L)`` consecutive blocks, each run as one ``checkpoint`` call."""

    def segment_size(self, n_blocks: int) -> int:
        raise NotImplementedError

    def segments(self, n_blocks: int) -> list[range]:
        k = self.segment_size(n_blocks)
        return [range(i, min(i + k, n_blocks)) for i in range(0, n_blocks, k)]

    def run(self, segment, x, store):
        return checkpoint(segment, x, use_reentrant=False)

    def _what(self, n_blocks):
        return "backward recomputes each segment's forward once"


@dataclass(frozen=True)
class EveryK(_Segmented):
    """Segments of ``k`` blocks. ``EveryK(1)`` is ``full``."""

    k: int = 1

    def __post_init__(self):
        if not isinstance(self.k, int) or self.k < 1:
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

    def run(self, segment, x, store):
        named = _packets(tuple(n for op in self.ops for n in OP_NAMES[op]))
        # A fresh policy function per call: its bookkeeping covers one region's forward.
        context_fn = functools.partial(create_selective_checkpoint_contexts,
                                       _sac_policy(named, self.mode),
                                       allow_cache_entry_mutation=True)
        return checkpoint(segment, x, use_reentrant=False, context_fn=context_fn)

    def _what(self, n_blocks):
        verb = "keeps the outputs of" if self.mode == "save" else "recomputes only"
        return f"each block {verb} {', '.join(self.ops)}"

    def __str__(self):
        return f"selective:{self.mode}={','.join(self.ops)}"


def _sac_policy(named: frozenset, mode: str):
    """The policy function SAC calls on every op of a region's forward (never during recompute).

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

    def by_name(op):
        hit = op.overloadpacket in named
        keep = hit if mode == "save" else not hit
        return CheckpointPolicy.MUST_SAVE if keep else CheckpointPolicy.PREFER_RECOMPUTE

    def maker_policy(tensor):
        entry = made.get(id(tensor.untyped_storage()))
        return entry[1] if entry and entry[0]() is tensor.untyped_storage() else None

    def policy_fn(ctx, op, *args, **kwargs):
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
    backward is a fresh tensor the meter does see. Parameters (and views of them, such as the
    ``weight.t()`` Linear saves) stay put: they are in device memory anyway. A tensor saved twice
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

    def run(self, segment, x, store):
        with store.hooks(segment.parameters()):
            return segment(x)

    def _what(self, n_blocks):
        return "each block's saved tensors go to host memory, nothing is recomputed"

    def __str__(self):
        return "offload"


# ---------------------------------------------------------------- parsing
def parse_policy(spec) -> Policy:
    """A ``Policy`` from a string such as ``"every-2"`` or ``"selective:save=mm,sdpa"``.

    Policy objects pass through unchanged.
    """
    if isinstance(spec, Policy):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"a policy is a Policy or a string ({ACCEPTED}), not {type(spec).__name__}")
    s = spec.strip().lower()
    simple = {"none": NoCheckpoint(), "full": EveryK(1), "sqrt": Sqrt(), "offload": Offload(),
              "attn-core": Selective(("attn-core",), "recompute")}
    if s in simple:
        return simple[s]
    if s.startswith("every-"):
        k = s.removeprefix("every-")
        if not k.isdigit() or int(k) < 1:
            raise ValueError(f"bad policy {spec!r}: K in every-K must be an integer >= 1; "
                             f"accepted: {ACCEPTED}")
        return EveryK(int(k))
    if s.startswith("selective:"):
        mode, eq, ops = s.removeprefix("selective:").partition("=")
        if not eq or mode not in ("save", "recompute"):
            raise ValueError(f"bad policy {spec!r}: OPS are comma-separated names from "
                             f"{', '.join(OP_NAMES)}; accepted: {ACCEPTED}")
        return Selective(tuple(o.strip() for o in ops.split(",") if o.strip()), mode)
    raise ValueError(f"unknown policy {spec!r}; accepted: {ACCEPTED}")


# ---------------------------------------------------------------- applying and removing
class _Segment:
    """Consecutive blocks run as one function, with the blocks' own (class) forwards."""

    def __init__(self, blocks):
        self.blocks = list(blocks)
        self.forwards = [b.forward for b in self.blocks]  # bound before any override

    def __call__(self, x):
        for forward in self.forwards:
            x = forward(x)
        return x

    def parameters(self):
        return (p for b in self.blocks for p in b.parameters())


class _Forward:
    """The instance ``forward`` a policy gives a block; it knows which handle installed it."""

    def __init__(self, handle: AppliedPolicy, run):
        self.handle, self.run = handle, run

    def __call__(self, x):
        return self.run(x)


def _pass_through(x):
    return x


def _installed(block: nn.Module) -> _Forward | None:
    forward = vars(block).get("forward")
    return forward if isinstance(forward, _Forward) else None


class AppliedPolicy:
    """What ``apply_policy`` returns: ``remove()`` undoes it; ``stats`` counts offload traffic."""

    def __init__(self, blocks: list[nn.Module], policy: Policy):
        self.blocks, self.policy, self.store = blocks, policy, HostStore()
        self.stats = self.store.stats
        runs = [block.forward for block in blocks]  # outside any segment: the block's own
        for s in policy.segments(len(blocks)):
            segment = _Segment(blocks[i] for i in s)
            runs[s.start] = functools.partial(policy.run, segment, store=self.store)
            for i in s[1:]:
                runs[i] = _pass_through  # the segment's first block already ran this one
        for block, run in zip(blocks, runs, strict=True):
            block.forward = _Forward(self, run)

    def remove(self) -> None:
        """Give the blocks their own forward back. Safe to call twice."""
        for block in self.blocks:
            if (forward := _installed(block)) is not None and forward.handle is self:
                del block.forward

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()

    def __repr__(self):
        return f"AppliedPolicy({self.policy}, {len(self.blocks)} blocks)"


def find_blocks(model: nn.Module, blocks=None) -> list[nn.Module]:
    """The blocks a policy acts on: ``blocks`` if given, else ``model.blocks``."""
    if blocks is None:
        blocks = getattr(model, "blocks", None)
        if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
            raise ValueError(
                f"{type(model).__name__} has no non-empty `blocks`: give the model a `blocks` "
                "nn.ModuleList of layers (one tensor in, one out), or pass blocks= explicitly")
    blocks = list(blocks)
    if not blocks or not all(isinstance(b, nn.Module) for b in blocks):
        raise ValueError("blocks= must be a non-empty sequence of nn.Module layers "
                         "(one tensor in, one out)")
    return blocks


def apply_policy(model: nn.Module, policy, blocks=None) -> AppliedPolicy:
    """Apply ``policy`` (a Policy or a string) to the model's blocks; ``.remove()`` undoes it."""
    policy = parse_policy(policy)
    blocks = find_blocks(model, blocks)
    for i, block in enumerate(blocks):
        if (forward := _installed(block)) is not None:
            raise RuntimeError(f"block {i} already runs under policy '{forward.handle.policy}': "
                               "call .remove() on that handle (or leave its `with`) first")
        if "forward" in vars(block):
            raise RuntimeError(f"block {i} already has an instance-level forward (another "
                               "wrapper?): remove it before applying a checkpoint policy")
    return AppliedPolicy(blocks, policy)


@contextlib.contextmanager
def applied(model: nn.Module, policy, blocks=None):
    """``with applied(model, "full") as handle: ...``: the policy holds inside the block only."""
    handle = apply_policy(model, policy, blocks)
    try:
        yield handle
    finally:
        handle.remove()
