"""Which ops to recompute: one block's ops ranked by the saved bytes they make per unit of cost.

``rank_ops(model)`` takes one block's tape (every tensor autograd saves, deduplicated, parameters
left out) and credits each saved storage to the aten op that made it; recomputing that op frees
those bytes for its forward FLOPs, and for its forward *time*, measured op by op
(``timing.OpTimer``). FLOPs score every elementwise op, norm and view at zero, so a FLOP ranking
always says "recompute them all"; the measured time does not. ``rank_ops(..., by="time")`` ranks
by bytes per second. ``selective_from_ranking`` turns a ranking into a selective policy: recompute
from the top while the FLOPs (or seconds) stay under a cap, save the rest.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .policies import OP_NAMES, EveryK, Policy, Selective
from .recompute import counting
from .step import _positive_int, check_run
from .timing import OpTimer, block_input  # noqa: F401 (block_input re-exported)
from .units import fmt_bytes, fmt_flops

SHORT_NAMES = {aten: short for short, atens in OP_NAMES.items() if short != "attn-core"
               for aten in atens}  # "addmm" -> "mm", "native_layer_norm" -> "layernorm", ...
BLOCK_INPUT = "input"  # the block's input: made before the block, kept by every policy


@dataclass(frozen=True)
class OpCost:
    """One kind of op in a block: the saved bytes it produced and what recomputing it costs."""

    op: str  # short policy name ("mm", "sdpa", "gelu", "layernorm"), else the aten name ("add")
    saved_bytes: int  # bytes of saved storages this op made (what saving its outputs keeps)
    flops: int  # its forward FLOPs in the block (what recomputing it costs; 0 = elementwise)
    calls: int
    seconds: float = 0.0  # its measured forward time in the block (median of a few forwards)

    @property
    def nameable(self) -> bool:
        """Can a selective policy name it (``selective:save=<op>``)?"""
        return self.op in OP_NAMES

    @property
    def bytes_per_flop(self) -> float:
        """Bytes freed per FLOP of recompute: infinite for ops that cost no FLOPs."""
        if self.flops == 0:
            return math.inf if self.saved_bytes else 0.0
        return self.saved_bytes / self.flops

    @property
    def bytes_per_second(self) -> float:
        """Bytes freed per second of measured recompute time."""
        if self.seconds == 0:
            return math.inf if self.saved_bytes else 0.0
        return self.saved_bytes / self.seconds


class _Producers(TorchDispatchMode):
    """Remembers which aten op made each storage (views and in-place ops keep the first)."""

    def __init__(self):
        super().__init__()
        self.made: dict[int, tuple[object, str]] = {}  # id(storage) -> (storage, op name)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                self.made.setdefault(id(storage), (storage, func.overloadpacket.__name__))
        return out


def rank_ops(model, batch_size: int = 8, seq_len: int | None = None, block: int = 0,
             seed: int = 0, by: str = "flops", rounds: int = 5,
             op_seconds: dict[str, float] | None = None) -> list[OpCost]:
    """Every kind of op of one block, ranked by saved bytes per recompute FLOP (``by="flops"``)
    or per second of measured forward time (``by="time"``), best first.

    Saved bytes: the block's tape (every storage autograd saves, deduplicated, parameters left
    out), each storage credited to the op that made it, which is what keeping that op's output
    keeps. FLOPs: the op's forward FLOPs, counted by ``recompute.counting``. Seconds: the op's
    forward time, median of ``rounds`` forwards of the block timed op by op, or the times given in
    ``op_seconds`` (short op name -> seconds; what tests and replays use instead of a clock).
    """
    if by not in RANK_BY:
        raise ValueError(f"by must be one of {', '.join(RANK_BY)}, not {by!r}")
    device = check_run(model, batch_size=batch_size, seq_len=seq_len)  # a step that cannot fit
    _check_block_index(model, block)
    if op_seconds is None:
        _positive_int("rounds", rounds, 5)
    batch = model.example_batch(batch_size, seq_len, generator=torch.Generator().manual_seed(seed))
    x = block_input(model, tuple(t.to(device) for t in batch), block)
    module = model.blocks[block]
    params = {id(p.untyped_storage()) for p in [*module.parameters(), *module.buffers()]}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if id(storage) not in params:
            saved[id(storage)] = storage
        return t

    producers = _Producers()
    producers.made[id(x.untyped_storage())] = (x.untyped_storage(), BLOCK_INPUT)
    with counting() as counts, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with producers:
            module(x)
    by_op: dict[str, list[int]] = {}  # op -> [saved bytes, flops, calls]
    for key, storage in saved.items():
        op = producers.made[key][1]
        by_op.setdefault(SHORT_NAMES.get(op, op), [0, 0, 0])[0] += storage.nbytes()
    for name, n in counts.ops.items():
        op = name.removeprefix("aten.")
        entry = by_op.setdefault(SHORT_NAMES.get(op, op), [0, 0, 0])
        entry[1] += counts.flops_by_op.get(name, 0)
        entry[2] += n
    seconds = _forward_seconds(module, x, rounds) if op_seconds is None else op_seconds
    costs = [OpCost(op, b, f, c, seconds.get(op, 0.0)) for op, (b, f, c) in by_op.items()
             if b or f]
    return sorted(costs, key=RANK_BY[by])


def _check_block_index(model, block) -> None:
    n = len(model.blocks)
    if isinstance(block, bool) or not isinstance(block, int) or not 0 <= block < n:
        raise ValueError(f"block must be a block number from 0 to {n - 1} ({type(model).__name__} "
                         f"has {n} blocks), got {block!r}")


RANK_BY = {"flops": lambda c: (-c.bytes_per_flop, -c.saved_bytes, c.op),
           "time": lambda c: (-c.bytes_per_second, -c.saved_bytes, c.op)}


def _forward_seconds(module, x, rounds: int) -> dict[str, float]:
    """Median forward seconds per op kind (short names) over ``rounds`` forwards, after one."""
    runs = []
    for _ in range(rounds + 1):
        with OpTimer(x.device) as timer:
            module(x)
        per_kind: dict[str, float] = {}
        for (name, _), s in timer.seconds.items():
            op = name.removeprefix("aten.")
            per_kind[SHORT_NAMES.get(op, op)] = per_kind.get(SHORT_NAMES.get(op, op), 0.0) + s
        runs.append(per_kind)
    return {op: statistics.median(r.get(op, 0.0) for r in runs[1:]) for op in runs[0]}


def selective_from_ranking(ranking: list[OpCost], max_recompute_flops: int = 0,
                           max_recompute_s: float | None = None) -> Policy:
    """A selective policy from a ranking: walk the ops by the cap's own measure (saved bytes per
    FLOP for ``max_recompute_flops``, per second for ``max_recompute_s``) and recompute the
    longest prefix whose FLOPs (or measured seconds) add up to at most the cap; save the rest.
    An op that costs nothing is recomputed wherever it ranks.

    A prefix, not a knapsack that skips an op that does not fit and takes a cheaper one further
    down: the prefix is monotone (a larger cap never saves more ops), so the dial a lesson turns
    moves one way. Only nameable ops can be saved; the others are recomputed anyway (save-mode
    recomputes all it is not told to keep). When nothing is left to save the policy is ``full``.
    """
    by = "flops" if max_recompute_s is None else "time"
    cap = max_recompute_flops if max_recompute_s is None else max_recompute_s
    spent, save, within_cap = 0, [], True
    for cost in sorted(ranking, key=RANK_BY[by]):
        if cost.op == BLOCK_INPUT:
            continue
        price = cost.flops if by == "flops" else cost.seconds
        within_cap = within_cap and spent + price <= cap
        if within_cap or price == 0:
            spent += price
        elif cost.nameable:
            save.append(cost.op)
    save.sort(key=list(OP_NAMES).index)  # a canonical order: "mm,sdpa" however they ranked
    return Selective(tuple(save), "save") if save else EveryK(1)


def format_ranking(ranking: list[OpCost]) -> str:
    lines = [f"{'op':<16} {'saved':>11} {'FLOPs':>12} {'bytes/FLOP':>11} {'time':>9} "
             f"{'MB/ms':>7}  calls"]
    for c in ranking:
        ratio = "inf" if c.bytes_per_flop == math.inf else f"{c.bytes_per_flop:.4f}"
        rate = "inf" if c.bytes_per_second == math.inf else f"{c.bytes_per_second / 1e9:.1f}"
        lines.append(f"{c.op:<16} {fmt_bytes(c.saved_bytes):>11} {fmt_flops(c.flops):>12} "
                     f"{ratio:>11} {c.seconds * 1e3:>7.2f}ms {rate:>7}  {c.calls}")
    return "\n".join(lines)
