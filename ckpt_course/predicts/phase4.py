"""Lesson 4's Predicts (notebooks/4_diagnose_a_real_oom.ipynb): forms, tolerances, and the wrong
answers learners give, each with its reason.

The ``answer`` functions rebuild the lesson's model (seed 0, the same `sized` choice on a GPU)
and ask the planner, as the lesson does: a second or two, cached.
"""

from __future__ import annotations

import functools
import math

from . import Predict, Wrong

BUDGET_IS = "that is the budget: the plan's peak sits at or below it, where the planner put it"


@functools.cache
def _lesson() -> dict:
    import torch

    from ..models import GPTConfig, TinyGPT, sized
    from ..plan import make_plan, measure_costs, predict
    from ..tape import record_tape

    torch.manual_seed(0)
    cfg = sized(cpu=GPTConfig(n_layer=6, d_model=64, n_head=4, seq_len=64),
                gpu=GPTConfig(n_layer=12, d_model=256, n_head=8, seq_len=256))
    batch = sized(cpu=8, gpu=16)
    model = TinyGPT(cfg)
    params = list(model.parameters())
    costs = measure_costs(model, batch)
    full, sqrt = predict(costs, "full"), predict(costs, "sqrt")
    tight = sqrt.peak_bytes - (sqrt.peak_bytes - full.peak_bytes) // 4
    plan = make_plan(costs, tight)
    x = torch.randn(batch, cfg.seq_len, cfg.d_model, requires_grad=True)
    recompute = sum(sum(c.forward_flops for c in costs.layers[start:stop - 1])
                    + costs.layers[stop - 1].recompute_flops
                    for start, stop, checkpointed in plan.best.placement if checkpointed)
    return {"n_elements": sum(p.numel() for p in params), "n_tensors": len(params),
            "state": 2 * 4 * sum(p.numel() for p in params) + 4 * len(params),
            "x": x, "failed_at": 3,  # for the tests: the lesson passes the block that failed
            "costs": costs, "plan": plan, "full": full, "budget": tight,
            "none_peak": predict(costs, "none").peak_bytes,
            "block_bytes": record_tape(model.blocks[0], x).activation_bytes,
            "plan_recompute": recompute,
            "model": model, "batch": batch, "tight": tight}


@functools.cache
def _menu_peak() -> int:
    from ..costs import MENU
    from ..plan import make_plan, measure_costs

    model, batch, tight = _lesson()["model"], _lesson()["batch"], _lesson()["tight"]
    return make_plan(measure_costs(model, batch, menu=MENU), tight, "flops").best.peak_bytes


def _segments(g: dict, inner: str, last: str) -> int:
    """The checkpointed segments' FLOPs, their blocks priced by ``inner`` and each segment's last
    block by ``last`` (the plan's recompute is forward_flops, then recompute_flops)."""
    layers = g["costs"].layers
    return sum(sum(getattr(c, inner) for c in layers[start:stop - 1])
               + getattr(layers[stop - 1], last)
               for start, stop, checkpointed in g["plan"].best.placement if checkpointed)


def griewank_forwards(n: int, slots: int) -> int:
    """Griewank & Walther: the fewest forwards to reverse n steps with ``slots`` checkpoints."""
    r = next(r for r in range(n + 1) if math.comb(slots + r, slots) >= n)
    return r * n - math.comb(slots + r, slots + 1)


PREDICTS: dict[str, Predict] = {
    "4.1/adamw-state": Predict(
        what="step 2 - step 1", form="number", unit="B", example="8 * 1000 + 4 * 3",
        answer=lambda: _lesson()["state"], given=_lesson,
        wrong=(
            Wrong(lambda d, g: 8 * g["n_elements"],
                  "two moments, right, but AdamW also keeps a `step` counter per parameter "
                  "tensor: 4 bytes x the number of tensors"),
            Wrong(lambda d, g: 4 * g["n_elements"] + 4 * g["n_tensors"],
                  "AdamW keeps two moments per element (exp_avg and exp_avg_sq), not one"),
            Wrong(lambda d, g: 4 * g["n_elements"],
                  "AdamW keeps two moments per element (exp_avg and exp_avg_sq), and a counter "
                  "per tensor"),
            Wrong(lambda d, g: 12 * g["n_elements"] + 4 * g["n_tensors"],
                  "that includes the parameters: they were there in step 1 too; step 2 adds the "
                  "moments and counters"),
            Wrong(lambda d, g: 16 * g["n_elements"] + 4 * g["n_tensors"],
                  "that is parameters + gradients + state: step 1 had the parameters and the "
                  "gradients; step 2 adds the state"),
            Wrong(lambda d, g: 2 * g["n_elements"] + g["n_tensors"],
                  "you counted elements: each float32 moment entry and counter is 4 bytes"),
        ),
    ),
    "4.2/block-bytes": Predict(
        what="a finished block", form="number", unit="B", example="3 * 4 * B * T * C",
        answer=lambda: _lesson()["block_bytes"], given=_lesson,
        wrong=(
            Wrong(lambda d, g: d - g["x"].nbytes,
                  "add the block's output: the next block saves it as its input, and the doctor "
                  "labels it with the block that made it"),
            Wrong(lambda d, g: d + g["x"].nbytes,
                  "you counted the output twice: it is the next block's input, held once"),
            Wrong(lambda d, g: d + sum(p.nbytes for p in g["model"].blocks[0].parameters()),
                  "the block's parameters are counted apart (parameters), not in its tape"),
            Wrong(lambda d, g: g["failed_at"] * d,
                  "that is all the finished blocks: the question is one of them"),
        ),
    ),
    "4.3/plan-recompute": Predict(
        what="the plan recomputes", form="number", unit="FLOPs", example="2 * 1000 + 500",
        answer=lambda: _lesson()["plan_recompute"], given=_lesson,
        wrong=(
            Wrong(lambda d, g: _segments(g, "forward_flops", "forward_flops"),
                  "each segment's last block stops early (3.1's early stop): count its "
                  "recompute_flops, not its forward_flops"),
            Wrong(lambda d, g: sum(c.forward_flops for c in g["costs"].layers),
                  "that re-runs every block whole: the plan checkpoints only the segments it "
                  "lists, and each segment's last block stops early"),
            Wrong(lambda d, g: g["full"].recompute_flops,
                  "that is full's recompute: the plan checkpoints only the segments it lists"),
        ),
    ),
    "4.3/menu-peak": Predict(
        what="the menu plan's peak", form="number", unit="B", example="5 * 2**20",
        answer=_menu_peak, given=_lesson,
        wrong=(
            Wrong(lambda d, g: g["budget"], BUDGET_IS),
            Wrong(lambda d, g: g["plan"].best.peak_bytes,
                  "that is the plain-or-checkpointed plan's peak: the menu's plan is another "
                  "placement, read its per-block table"),
            Wrong(lambda d, g: d - g["state"],
                  "that is step 1's peak: step 2 carries AdamW's state too"),
        ),
    ),
    "4.3/nested-forwards": Predict(
        what="forwards re-run at 2 stored inputs", form="count", example="100",
        answer=lambda: griewank_forwards(32, 1) + 1 - 32,
        wrong=(
            Wrong(sum(range(32)), "the last block is never re-run: its backward runs first, on "
                                  "the tape the forward left"),
            Wrong(32 * 32, "block i is reached by re-running from x_0: 0 + 1 + ... forwards, not "
                           "32 for each"),
            Wrong(31, "with only x_0 and one more input stored, each block is reached by "
                      "re-running from x_0: a count that grows with the square of the length"),
            Wrong(32, "one sweep is the step's own forward, and it cannot keep the inputs: each "
                      "block's backward needs a re-run from x_0"),
        ),
    ),
    "4.4/prescribed-peak": Predict(
        what="prescribed peak", form="number", unit="B", example="5 * 2**20",
        answer=lambda: _lesson()["plan"].best.peak_bytes, given=_lesson,
        wrong=(
            Wrong(lambda d, g: g["budget"], BUDGET_IS),
            Wrong(lambda d, g: g["none_peak"],
                  "that is the plain run's step-2 peak, the one that ran out of memory: the "
                  "prescription checkpoints"),
            Wrong(lambda d, g: g["full"].peak_bytes,
                  "that is full's peak: the plan checkpoints only what the budget needs"),
        ),
    ),
}
