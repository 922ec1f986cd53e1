"""How fast the planner plans long chains, exactly: three targets of 5 seconds each.

1. 200 heterogeneous blocks with the full menu (plain, checkpointed segments, three selective
   variants and offload per block): every block's numbers drawn at random (seeded), so no two
   blocks are alike, with measured-like times; planned under the FLOPs and the time objective
   at budgets 10%, 50% and 90% of the way from full checkpointing's peak to none's.
2. 1,000 uniform blocks: the tiny GPT's block (fake tensors, batch 8 x 128) 1,000 times,
   plain or checkpointed segments, the same three budgets; then the same with the full menu
   (three selective variants and offload per block, measured on the same fake block).
3. Nested recomputation at 256 blocks (one input size, heterogeneous FLOPs) at 2, 8, 64 and
   255 stored inputs (the plan at 2 nests 254 levels: planned and predicted, though no policy
   may nest that deep); then planned for a peak budget, nested or not
   (``optimal_with_nesting``: every tree that nests priced by its predicted peak, against the
   single-level optimum), at full checkpointing's peak less 10% and the same three budgets.

Times are CPU seconds of this process (``time.process_time``: on a shared machine the wall
clock also counts other processes), each the fastest of --repeats runs. The answers are exact:
the tests hold the same code to brute force and to Griewank's optimum. Ends with one JSON
line. Run: .venv/bin/python bench/planner_scale.py [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import random
import time
import warnings
from dataclasses import replace

from ckpt_course.costs import MENU, Backward, ChainCosts, LayerCost, OptionCost, TrunkCost
from ckpt_course.plan import nested_optimal, optimal, optimal_with_nesting, predict

TARGET_S = 5.0
FRACTIONS = (0.1, 0.5, 0.9)


def random_layer(rng: random.Random) -> LayerCost:
    """A block with arbitrary, self-consistent-looking numbers (bytes in KiB-ish units)."""
    def r(hi, lo=0):
        return rng.randint(lo, hi)

    def back():
        return Backward(r(600), r(600), r(200, -600), r(200, -600))

    x = r(200, 100)
    return LayerCost(x, x, r(500, 50), rng.random() < 0.7, rng.random() < 0.4, r(3000, 100),
                     r(3000, 100), r(6000), r(100), True, r(800), r(400), r(600), r(500),
                     back(), back())


def heterogeneous(n: int, seed: int = 0) -> ChainCosts:
    rng = random.Random(seed)
    layers = tuple(random_layer(rng) for _ in range(n))
    menu = tuple({option: OptionCost(random_layer(rng), rng.randint(0, 300),
                                     rng.randint(50, 500) * (option == "offload"))
                  for option in MENU} for _ in range(n))
    times = tuple({"none": 1e-3, "full": 1e-3 * (1.2 + rng.random()),
                   **{o: 1e-3 * (1 + rng.random()) for o in MENU}} for _ in range(n))
    trunk = TrunkCost(base_bytes=5000, prefix_peak=300, prefix_kept=200,
                      suffix_forward_peak_held=400, suffix_forward_peak_free=400,
                      suffix_backward_peak_held=500, suffix_backward_peak_free=500,
                      suffix_left=100, backward_left=200, optimizer_peak=1000)
    return ChainCosts(layers, trunk, menu=menu, times=times)


def uniform(n: int, menu=()) -> ChainCosts:
    from ckpt_course.costs import config_costs

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        one = config_costs("gpt", 8, 128, menu=menu)
    return replace(one, layers=one.layers[:1] * n, menu=one.menu[:1] * n if menu else ())


def cpu_seconds(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.process_time()
        out = fn()
        best = min(best, time.process_time() - start)
    return best, out


def budgets(costs: ChainCosts) -> list[int]:
    none, full = predict(costs, "none").peak_bytes, predict(costs, "full").peak_bytes
    low = min(none, full)
    return [int(low + (none - low) * f) for f in FRACTIONS]


def single_level(name: str, costs: ChainCosts, objectives, repeats: int) -> list[dict]:
    rows = []
    for budget, fraction in zip(budgets(costs), FRACTIONS, strict=True):
        for objective in objectives:
            s, best = cpu_seconds(lambda b=budget, o=objective: optimal(costs, b, o), repeats)
            rows.append(dict(chain=name, blocks=costs.n, budget_fraction=fraction,
                             objective=objective, cpu_s=round(s, 3), fits=best is not None,
                             within_target=s <= TARGET_S))
    return rows


def nested(n: int, repeats: int) -> list[dict]:
    rng = random.Random(1)
    costs = ChainCosts(tuple(replace(LayerCost.simple(4, 0, rng.randint(1, 9)),
                                     recompute_flops=rng.randint(0, 5)) for _ in range(n)))
    rows = []
    for stored in (2, 8, 64, n - 1):
        s, best = cpu_seconds(lambda k=stored: nested_optimal(costs, 4 * k), repeats)
        rows.append(dict(chain="nested, one input size", blocks=n, stored_inputs=stored,
                         cpu_s=round(s, 3), recompute=best.recompute_flops,
                         within_target=s <= TARGET_S))
    below = int(0.9 * predict(costs, "full").peak_bytes)
    for budget, name in zip([below, *budgets(costs)],
                            ["90% of full's peak", *(f"budget {f:.0%}" for f in FRACTIONS)],
                            strict=True):
        s, best = cpu_seconds(lambda b=budget: optimal_with_nesting(costs, b), repeats)
        rows.append(dict(chain="nested or single, peak", blocks=n, budget=name,
                         cpu_s=round(s, 3), nests=type(best).__name__ == "NestedPrediction",
                         within_target=s <= TARGET_S))
    return rows


def described(row: dict) -> str:
    """A row's budget or stored inputs, in words."""
    if "objective" in row:
        return f"budget {row['budget_fraction']:.0%} {row['objective']}"
    return row.get("budget") or f"{row['stored_inputs']} stored inputs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    rows = single_level("heterogeneous, full menu", heterogeneous(200), ("flops", "time"),
                        args.repeats)
    rows += single_level("uniform (tiny GPT block)", uniform(1000), ("flops",), args.repeats)
    rows += single_level("uniform, full menu", uniform(1000, MENU), ("flops",), args.repeats)
    rows += nested(256, args.repeats)
    for r in rows:
        verdict = "ok" if r["within_target"] else f"OVER {TARGET_S} s"
        print(f"{r['chain']:<28} {r['blocks']:>5} blocks  {described(r):<22} "
              f"{r['cpu_s']:>7.2f} s CPU  {verdict}")
    print(json.dumps(dict(target_s=TARGET_S, rows=rows,
                          all_within=all(r["within_target"] for r in rows))))


if __name__ == "__main__":
    main()
