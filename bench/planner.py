"""The planner (a menu per block, time objective) against the usual policies, at 10 budgets.

For each model (the tiny GPT, 4 blocks, and a 24-block GPT of small width) we take 10 budgets
evenly from the lowest peak any placement reaches (the planner's, with the menu) to none's
peak. At each budget the planner plans with the time objective (``measure_costs(...,
menu=MENU, times=True)``: each option of each distinct block timed alone); the alternatives are
every-K (every K from 1 = full to L), sqrt, each selective variant everywhere and offload
everywhere, each measured once. For every policy: the predicted peak and the meter's (they must
agree: the script stops if not), the predicted step time (none's measured time + the time
model's extra) and the measured one. Step times: no meter, one thread (--threads), all policies
interleaved round by round, medians over --rounds after a warm-up round; ``full`` is measured
twice under two names, and their agreement says how far to trust a ratio. At each budget: the
planner's measured time against the fastest alternative that fits.

With --compile, also torch.compile with torch._functorch.config.activation_memory_budget at the
fraction the planner keeps at the middle budget (cold compile about 40 s per model on 2 cores).
The comparison with compile by saved bytes and recompute FLOPs at 8 budgets, op-level choices
included, is ``bench/planner_compile.py``.

Writes bench/out/planner_frontier.png (measured step time against peak, every policy) and ends
with one JSON line. Run: .venv/bin/python bench/planner.py [--rounds 9] [--threads 1] [--compile]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from ckpt_course.costs import MENU
from ckpt_course.models import GPTConfig, TinyGPT
from ckpt_course.plan import make_plan, measure_costs, measure_peaks, optimal, predict
from ckpt_course.policies import applied, parse_policy
from ckpt_course.step import make_optimizer, run_step
from ckpt_course.units import MiB, fmt_bytes

MODELS = {
    "tiny GPT (4 blocks)": (GPTConfig(), 8),
    "GPT, 24 blocks": (GPTConfig(n_layer=24, d_model=64, seq_len=64), 8),
}
BUDGETS = 10
OUT = Path(__file__).resolve().parent / "out"


def step_times(model, batch, policies: dict, rounds: int) -> dict[str, float]:
    """Median step time per policy, interleaved, after one warm-up round."""
    optimizer = make_optimizer(model)
    times = {name: [] for name in policies}
    for r in range(rounds + 1):
        for name, policy in policies.items():
            with applied(model, policy):
                t = run_step(model, optimizer, batch).time_s
            if r:
                times[name].append(t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def lowest_peak(costs) -> int:
    """The lowest peak any placement reaches: at a constant cost, ``optimal`` walks down to it."""
    return optimal(costs, predict(costs, "none").peak_bytes, lambda c, seg: 0).peak_bytes


def compile_row(model, batch, fraction: float, rounds: int) -> dict:
    """torch.compile at ``activation_memory_budget=fraction``: bytes it saves, time vs eager."""
    import torch._dynamo
    import torch._functorch.config as functorch_config

    torch._dynamo.reset()
    functorch_config.activation_memory_budget = fraction
    compiled_loss = torch.compile(model.loss)
    params = {id(p.untyped_storage()) for p in model.parameters()}
    storages = {}

    def pack(t):
        storages[id(t.untyped_storage())] = t.untyped_storage().nbytes()
        return t

    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        compiled_loss(batch).backward()
    compile_s = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    optimizer = make_optimizer(model)
    eager, compiled = [], []
    for r in range(rounds + 1):
        te = run_step(model, optimizer, batch).time_s
        tc = run_step(model, optimizer, batch, loss_fn=compiled_loss).time_s
        if r:
            eager.append(te)
            compiled.append(tc)
    functorch_config.activation_memory_budget = 1.0
    return dict(saved_bytes=sum(b for k, b in storages.items() if k not in params),
                compile_s=round(compile_s, 1),
                time_ratio=round(statistics.median(compiled) / statistics.median(eager), 3))


def bench(name, cfg, batch_size, rounds, with_compile, ax) -> dict:
    torch.manual_seed(0)
    model = TinyGPT(cfg)
    costs = measure_costs(model, batch_size, menu=MENU, times=True, rounds=rounds)
    none_peak = predict(costs, "none").peak_bytes
    low = lowest_peak(costs)
    budgets = [low + (none_peak - low) * k // (BUDGETS - 1) for k in range(BUDGETS)]
    alternatives = {"none": "none", **{("full" if k == 1 else f"every-{k}"): f"every-{k}"
                                       for k in range(1, costs.n + 1)}, "sqrt": "sqrt",
                    **{o: o for o in MENU}}
    plans = [make_plan(costs, b, "time") for b in budgets]
    policies = {n: parse_policy(p) for n, p in alternatives.items()}
    policies["full (again)"] = parse_policy("full")
    named = {predict(costs, p).placement: n for n, p in policies.items()}
    planned = []  # the planner's policy at each budget, by the name of the same placement
    for p in plans:  # (a plan equal to an alternative is that alternative, measured once)
        planned.append(named.setdefault(p.best.placement, str(p.policy)))
        policies.setdefault(planned[-1], p.policy)
    predicted = {n: predict(costs, p) for n, p in policies.items()}
    for n, p in policies.items():  # the memory model is exact: check it on every policy run
        measured = measure_peaks(model, p, batch_size)[1]
        assert measured == predicted[n].peak_bytes, (n, measured, predicted[n].peak_bytes)
    batch = model.example_batch(batch_size, generator=torch.Generator().manual_seed(0))
    times = step_times(model, batch, policies, rounds)
    base = times["none"]
    again = times["full (again)"] / times["full"]
    print(f"\n{name}: {costs.n} blocks, d_model {cfg.d_model}, seq {cfg.seq_len}, batch "
          f"{batch_size}; none {base * 1e3:.1f} ms a step; full measured twice: {again:.3f}x")
    if abs(again - 1) > 0.03:  # the same policy disagrees with itself: ratios are noise
        print(f"  WARNING: full measured twice differs by {again - 1:+.1%}: the machine is "
              "busy; rerun when it is idle, or with more --rounds")
    print(f"  {'policy':<34} {'peak':>10} {'pred ms':>8} {'meas ms':>8}")
    for n in policies:
        if n in alternatives or n == "full (again)":
            print(f"  {n[:34]:<34} {fmt_bytes(predicted[n].peak_bytes):>10} "
                  f"{(base + predicted[n].extra_time_s) * 1e3:>8.2f} {times[n] * 1e3:>8.2f}")
    print(f"\n  {'budget':>10}  {'planner':<34} {'pred ms':>8} {'meas ms':>8}  "
          f"{'best alternative that fits':<22} {'meas ms':>8} {'ratio':>6}")
    rows = []
    for b, plan, key in zip(budgets, plans, planned, strict=True):
        fits = [n for n in alternatives if predicted[n].peak_bytes <= b]
        best = min(fits, key=times.get, default=None)
        ratio = times[key] / times[best] if best else None
        print(f"  {fmt_bytes(b):>10}  {key[:34]:<34} "
              f"{(base + plan.best.extra_time_s) * 1e3:>8.2f} {times[key] * 1e3:>8.2f}  "
              f"{best or 'nothing fits':<22} "
              + (f"{times[best] * 1e3:>8.2f} {ratio:>6.3f}" if best else ""))
        rows.append(dict(budget_bytes=b, planner=key, planner_s=round(times[key], 5),
                         predicted_s=round(base + plan.best.extra_time_s, 5),
                         best_alternative=best, best_alternative_s=best and round(times[best], 5),
                         ratio=ratio and round(ratio, 3)))
    for n in policies:
        style = (dict(marker="*", color="tab:green", ms=10) if n in planned
                 else dict(marker="o", color="tab:gray", ms=4))
        ax.plot(predicted[n].peak_bytes / MiB, times[n] * 1e3, ls="", **style)
        if n in alternatives:
            ax.annotate(n.removeprefix("selective:"), (predicted[n].peak_bytes / MiB,
                        times[n] * 1e3), fontsize=6, textcoords="offset points", xytext=(3, 2))
    ax.set_title(f"{name} (green stars: the planner at 10 budgets)", fontsize=9)
    ax.set_xlabel("peak (MiB, predicted = measured)")
    ax.set_ylabel("measured step time (ms)")
    ratios = [r["ratio"] for r in rows if r["ratio"] is not None]
    out = dict(budgets=rows, same_policy_twice=round(again, 3), noisy=abs(again - 1) > 0.03,
               none_s=round(base, 5),
               planner_at_most_best=sum(r <= 1 for r in ratios),
               planner_strictly_less=sum(r < 1 for r in ratios), compared=len(ratios))
    if with_compile:
        middle = plans[BUDGETS // 2].best
        fraction = middle.kept_bytes / predict(costs, "none").kept_bytes
        c = compile_row(model, batch, fraction, rounds)
        print(f"  torch.compile, activation_memory_budget={fraction:.2f}: saves "
              f"{fmt_bytes(c['saved_bytes'])} (planner keeps {fmt_bytes(middle.kept_bytes)}); "
              f"step {c['time_ratio']:.2f}x eager none; cold compile {c['compile_s']:.0f} s")
        out["compile"] = dict(fraction=round(fraction, 3), **c)
    return out


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--compile", action="store_true", help="also torch.compile (slow)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    fig, axes = plt.subplots(1, len(MODELS), figsize=(6 * len(MODELS), 4))
    results = {name: bench(name, cfg, b, args.rounds, args.compile, ax)
               for (name, (cfg, b)), ax in zip(MODELS.items(), axes, strict=True)}
    OUT.mkdir(exist_ok=True)
    fig.tight_layout()
    fig.savefig(OUT / "planner_frontier.png", dpi=120)
    print(f"\nfrontier plot: {OUT / 'planner_frontier.png'}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
