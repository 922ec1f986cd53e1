"""The planner with op-level choices against torch.compile's activation_memory_budget.

torch.compile's min-cut partitioner, given ``torch._functorch.config.activation_memory_budget``
(a fraction), solves a knapsack over which forward values to save for backward and recomputes
the rest. The planner (``plan.optimal``, FLOPs objective) picks per block one point of the
block's exact Pareto set over which op outputs to keep (``op_choices``; ``measure_costs(...,
op_points=N)``), full checkpoints of several blocks, or the four-option menu. Both are compared
by (saved bytes, recompute FLOPs), on the tiny GPT (4 blocks) and a small Hugging Face Llama
built from the shipped Llama 3.2 1B config (4 layers; never downloads).

torch.compile side: backend ``aot_eager_decomp_partition`` (AOTAutograd with inductor's
decompositions and the min-cut partitioner that reads the budget, without inductor's code
generation: a few seconds per compile on a CPU). Saved bytes: the storages its compiled
forward packs for backward (saved-tensor hooks), parameters, buffers and the batch left out.
Recompute FLOPs: FlopCounterMode over its backward minus over eager's plain backward (at
budget 1.0 the two are equal: it recomputes nothing that costs FLOPs).

Planner side: its plans at 60 budgets from the lowest peak it reaches to no checkpointing's,
each peak predicted (the meter's, to the byte, for the plans compared: checked here). Saved
bytes in compile's terms: eager's saved storages with no checkpointing (the same hooks) plus
what the plan keeps less than no checkpointing (the memory model's ``kept_bytes``, exact). For
each compile budget: the plan with the least recompute among those saving no more than compile
does. ``offload`` is left out of the planner's menu here (it would win every row at zero
FLOPs); ``--offload`` puts it back. Every row is measured twice (compile twice, with a reset
in between; the planner's peak metered twice): bytes and FLOPs are counts, so the two agree.

Run: .venv/bin/python bench/planner_compile.py [--batch 2] [--points 6] [--offload]
Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from ckpt_course import hf
from ckpt_course.costs import MENU, measure_costs
from ckpt_course.models import GPTConfig, TinyGPT
from ckpt_course.plan import measure_peaks, optimal, predict, segment_flops
from ckpt_course.recompute import EXTRA_FLOP_FORMULAS

FRACTIONS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8)
SWEEP = 60


def tiny_gpt():
    torch.manual_seed(0)
    return TinyGPT(GPTConfig()), None


def small_llama():
    torch.manual_seed(0)
    return hf.build(hf.small_config(hf.load_config("llama-3.2-1b"), n_layer=4, seq_len=64)), 64


MODELS = {"tiny GPT (4 blocks)": tiny_gpt, "HF Llama 3.2 1B, small (4 layers)": small_llama}


def saved_and_backward_flops(model, batch, loss_fn) -> tuple[int, int]:
    """(bytes of the storages the forward packs for backward, FLOPs of the backward)."""
    skip = {id(t.untyped_storage()) for t in [*model.parameters(), *model.buffers(), *batch]}
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        if id(s) not in skip:
            storages[id(s)] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn(batch)
    counter = torch.utils.flop_counter.FlopCounterMode(display=False,
                                                       custom_mapping=EXTRA_FLOP_FORMULAS)
    with counter:
        loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(storages.values()), counter.get_total_flops()


def compiled(model, batch, fraction: float, eager_backward: int) -> dict:
    import torch._dynamo
    import torch._functorch.config as functorch_config

    torch._dynamo.reset()
    functorch_config.activation_memory_budget = fraction
    try:
        loss_fn = torch.compile(model.loss, backend="aot_eager_decomp_partition")
        start = time.perf_counter()
        saved, backward = saved_and_backward_flops(model, batch, loss_fn)
        seconds = time.perf_counter() - start
    finally:
        functorch_config.activation_memory_budget = 1.0
    return dict(saved=saved, recompute=backward - eager_backward, compile_s=round(seconds, 1))


def planner_points(costs, with_offload: bool):
    """The planner's plans at SWEEP budgets, lowest peak to none's: (kept, recompute, plan)."""
    def allowed(cost):
        return lambda c, seg: None if seg[2] == "offload" and not with_offload else cost(c, seg)

    none = predict(costs, "none").peak_bytes
    low = optimal(costs, none, allowed(lambda c, seg: 0)).peak_bytes
    plans = {}
    for k in range(SWEEP + 1):
        plan = optimal(costs, low + (none - low) * k // SWEEP, allowed(segment_flops))
        if plan is not None:
            plans[plan.placement] = plan
    return list(plans.values())


def bench(name, make, batch_size, points, with_offload) -> dict:
    model, seq = make()
    batch = model.example_batch(batch_size, seq_len=seq,
                                generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    costs = measure_costs(model, batch_size, seq, menu=MENU, op_points=points)
    measure_s = time.perf_counter() - start
    eager_saved, eager_backward = saved_and_backward_flops(model, batch, model.loss)
    none_kept = predict(costs, "none").kept_bytes
    plans = planner_points(costs, with_offload)
    print(f"\n{name}: batch {batch_size}, {costs.n} blocks; measure_costs with {points} op-level "
          f"points per block: {measure_s:.1f} s; eager saves {eager_saved:,} B, backward "
          f"{eager_backward / 1e6:.2f} MFLOP")
    print(f"  {'budget':>6} {'compile saved B':>16} {'compile MFLOP':>14} {'again':>6} "
          f"{'planner saved B':>16} {'planner MFLOP':>14} {'meter = pred':>12} {'again':>6}  plan")
    rows = []
    for fraction in FRACTIONS:
        first = compiled(model, batch, fraction, eager_backward)
        second = compiled(model, batch, fraction, eager_backward)
        fits = [p for p in plans if eager_saved - none_kept + p.kept_bytes <= first["saved"]]
        best = min(fits, key=lambda p: (p.recompute_flops, p.kept_bytes), default=None)
        row = dict(fraction=fraction, compile=first, compile_again=second)
        if best is None:
            print(f"  {fraction:>6.2f} {first['saved']:>16,} {first['recompute'] / 1e6:>14.2f} "
                  f"{second == first!s:>6} nothing saves as little")
        else:
            saved = eager_saved - none_kept + best.kept_bytes
            meters = [measure_peaks(model, best.policy, batch_size, seq)[-1] for _ in range(2)]
            print(f"  {fraction:>6.2f} {first['saved']:>16,} {first['recompute'] / 1e6:>14.2f} "
                  f"{second == first or second['saved'] == first['saved']!s:>6} {saved:>16,} "
                  f"{best.recompute_flops / 1e6:>14.2f} {meters[0] == best.peak_bytes!s:>12} "
                  f"{meters[1] == meters[0]!s:>6}  {best.policy}")
            row.update(planner=dict(saved=saved, recompute=best.recompute_flops,
                                    policy=str(best.policy), peak=best.peak_bytes,
                                    metered=meters))
        rows.append(row)
    compared = [r for r in rows if "planner" in r]
    return dict(rows=rows, measure_costs_s=round(measure_s, 1), compared=len(compared),
                at_most=sum(r["planner"]["recompute"] <= r["compile"]["recompute"]
                            for r in compared),
                strictly_less=sum(r["planner"]["recompute"] < r["compile"]["recompute"]
                                  for r in compared))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--points", type=int, default=6, help="op-level points per block")
    parser.add_argument("--offload", action="store_true", help="let the planner offload")
    args = parser.parse_args()
    results = {name: bench(name, make, args.batch, args.points, args.offload)
               for name, make in MODELS.items()}
    for name, r in results.items():
        print(f"{name}: planner recompute <= compile at {r['at_most']} of {r['compared']} "
              f"budgets, strictly less at {r['strictly_less']}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
