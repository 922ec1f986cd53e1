"""Checks for phase 4, "Diagnose a real OOM and prescribe a policy" (exercises/4_*.ipynb).

Each check measures the right answer on the learner's machine (bytes with the meter, FLOPs with
``FlopCounterMode``), never timings, and explains a wrong answer without giving the number.
"""

from __future__ import annotations

import torch

from ..doctor import run_steps
from ..models import GPTConfig, HandTraceNet, TinyGPT
from ..plan import (
    Segments,
    as_policy,
    checkpointed,
    measure_costs,
    optimal,
    placement_from_checkpointed,
)
from ..recompute import measure_recompute
from ..units import fmt_bytes
from . import expect, passed

_SMALL = GPTConfig(n_layer=3, d_model=32, n_head=2, seq_len=16)


def _measured_adamw_state(model: torch.nn.Module) -> int:
    """Bytes of AdamW's state after one step, as the meter counts them."""
    from ..meter import MemoryMeter

    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    meter = MemoryMeter().track(model, optimizer)
    meter.untrack()
    model.zero_grad(set_to_none=True)
    return meter.breakdown()["optimizer state"]


def adamw_state(adamw_state_bytes) -> None:
    """Exercise 4.1: ``adamw_state_bytes(model)`` is what AdamW keeps from step 2 on."""
    torch.manual_seed(0)
    for model in (TinyGPT(_SMALL), HandTraceNet(width=48, depth=3)):
        got, want = adamw_state_bytes(model), _measured_adamw_state(model)
        name = type(model).__name__
        expect(got == want, (
            f"adamw_state_bytes({name}) gives {'too many' if got > want else 'too few'} bytes. "
            "After one step, look at optimizer.state[p] for one parameter p: which tensors does "
            "AdamW keep, of what shape and dtype? Some grow with the parameter's elements, one "
            "does not."))
    passed("AdamW's state, the memory step 2 carries that step 1 did not")


def recompute_flops(recompute_of) -> None:
    """Exercise 4.2: ``recompute_of(placement, layers)`` predicts what backward recomputes."""
    torch.manual_seed(0)
    model = TinyGPT(_SMALL)
    costs = measure_costs(model, 4)
    batch = model.example_batch(4, generator=torch.Generator().manual_seed(0))
    for ranges in (((0, 1),), ((0, 3),), ((0, 1), (1, 3)), ((1, 2),), ()):
        placement = placement_from_checkpointed(costs.n, ranges)
        want = measure_recompute(model, batch, Segments(ranges)).flops
        got = recompute_of(placement, costs.layers)
        words = str(Segments(ranges))
        if got != want and ranges:
            plain_forward = sum(costs.layers[k].forward_flops for a, b in ranges
                                for k in range(a, b))
            tail = ("You counted the whole forward of every checkpointed block: torch's "
                    "non-reentrant checkpoint stops as soon as the last saved tensor is rebuilt, "
                    "so a segment's last block skips what it computes after that "
                    "(recompute_flops, not forward_flops)."
                    if got == plain_forward else
                    "A checkpointed segment re-runs the forward of each of its blocks once; "
                    "plain blocks recompute nothing.")
            side = "too high" if got > want else "too low"
            expect(False, f"recompute_of for {words} is {side}. " + tail)
        expect(got == want, f"recompute_of for {words} should be 0: nothing is checkpointed.")
    passed("recompute = the forward of each checkpointed segment, up to its last save")


def capstone(my_policy, model, budget, batch_size: int, seq_len: int | None = None) -> None:
    """Exercise 4.3: the learner's policy fits ``budget`` when run, and recomputes at most 10%
    more FLOPs than the planner's optimum."""
    policy = as_policy(my_policy())
    run = run_steps(model, budget, policy, batch_size, seq_len, steps=2)
    if not run.fits:
        oom = run.oom
        expect(False, (
            f"{policy} ran out of memory in step {oom.step}, {oom.phase}, in "
            f"{oom.module or oom.op} ({fmt_bytes(oom.live_bytes + oom.tried_bytes)} needed, budget "
            f"{fmt_bytes(budget)}). Which blocks' tapes are alive at that moment? A checkpointed "
            "block keeps only its input, but a segment of several blocks rebuilds all their "
            "tapes at once when its backward starts. Try your candidates with "
            "predict(costs, policy) before running them."))
    costs = measure_costs(model, batch_size, seq_len)
    best = optimal(costs, budget)
    batch = model.example_batch(batch_size, seq_len, generator=torch.Generator().manual_seed(0))
    flops = measure_recompute(model, batch, policy).flops
    step = costs.step_flops
    expect(flops <= 1.1 * best.recompute_flops, (
        f"{policy} fits, but recomputes {flops / step:.1%} of a plain step's FLOPs: more than 10% "
        "above the cheapest placement that fits. Checkpointing a block only helps if its tape "
        "would be alive at the peak: which block's tape is freed first in backward? And do "
        "you need segments longer than one block?"))
    n = len(model.blocks)
    same = checkpointed(best.placement) == tuple((r.start, r.stop) for r in policy.segments(n))
    passed(f"{policy} fits {fmt_bytes(budget)} (peak {fmt_bytes(run.peak_bytes)}) and recomputes "
           f"{flops / step:.1%} of a step; the planner's optimum: {best.policy}, "
           f"{best.recompute_flops / step:.1%}{' (yours)' if same else ''}")
