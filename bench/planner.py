"""The planner against the usual policies, at the same memory budget.

For each model (the tiny GPT, 4 blocks, and a 24-block GPT of the same width) the budget is what
sqrt(L) checkpointing needs (so sqrt fits by construction). At that budget we compare:

  full       every block checkpointed (what Hugging Face's gradient_checkpointing_enable does)
  sqrt       segments of ceil(sqrt(L)) blocks (Chen et al. 2016)
  every-K    the every-K that fits with the least recompute
  planner    ckpt_course.plan's optimal placement (exact dynamic program over the chain)

For each: the predicted peak and the peak the meter measures on a real step (they must agree),
the FLOPs backward recomputes (FlopCounterMode, exact), and the step time relative to no
checkpointing (no meter, policies interleaved A B C ..., medians over --rounds). Times use one
thread by default (--threads): on a 2-core machine shared with other work, two OpenMP threads
wait for each other and step times swing by several x; one thread gives stable ratios.

With --compile, also torch.compile with torch._functorch.config.activation_memory_budget set to
the fraction of activation memory the planner keeps (its saved bytes / no policy's): the bytes
the compiled step saves for backward (saved-tensor hooks) and its step time. A cold compile
takes about 40 s per model on 2 cores, so it is off by default.

Run: .venv/bin/python bench/planner.py [--rounds 7] [--threads 1] [--compile]
The last line printed is one JSON object with the headline figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from ckpt_course.models import GPTConfig, TinyGPT
from ckpt_course.plan import make_plan, measure_costs, measure_peaks, predict
from ckpt_course.policies import applied, parse_policy
from ckpt_course.recompute import measure_recompute
from ckpt_course.step import make_optimizer, run_step
from ckpt_course.units import fmt_bytes, fmt_flops

MODELS = {
    "tiny GPT (4 blocks)": (GPTConfig(), 8),
    "GPT, 24 blocks": (GPTConfig(n_layer=24), 8),
}


def step(model, optimizer, batch) -> float:
    return run_step(model, optimizer, batch).time_s


def step_times(model, batch, policies: dict, rounds: int) -> dict[str, float]:
    """Median step time per policy, interleaved, after one warm-up round."""
    optimizer = make_optimizer(model)
    times = {name: [] for name in policies}
    for r in range(rounds + 1):
        for name, policy in policies.items():
            with applied(model, policy):
                t = step(model, optimizer, batch)
            if r:
                times[name].append(t)
    return {name: statistics.median(ts) for name, ts in times.items()}


class _Compiled(torch.nn.Module):
    """model.loss through torch.compile (loss is not forward, so compile the function)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.fn = torch.compile(model.loss)

    def loss(self, batch):
        return self.fn(batch)


def compile_row(model, batch, fraction: float, rounds: int) -> dict:
    import torch._dynamo
    import torch._functorch.config as functorch_config

    torch._dynamo.reset()
    functorch_config.activation_memory_budget = fraction
    wrapped = _Compiled(model)
    params = {id(p.untyped_storage()) for p in model.parameters()}
    storages = {}

    def pack(t):
        storages[id(t.untyped_storage())] = t.untyped_storage().nbytes()
        return t

    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = wrapped.loss(batch)
    loss.backward()
    compile_s = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    saved = sum(b for k, b in storages.items() if k not in params)
    optimizer = make_optimizer(model)
    eager, compiled = [], []
    for r in range(rounds + 1):
        te = step(model, optimizer, batch)
        tc = step(wrapped, optimizer, batch)
        if r:
            eager.append(te)
            compiled.append(tc)
    functorch_config.activation_memory_budget = 1.0
    return dict(saved_bytes=saved, compile_s=compile_s,
                time_ratio=statistics.median(compiled) / statistics.median(eager))


def bench(name, cfg, batch_size, rounds, with_compile) -> dict:
    torch.manual_seed(0)
    model = TinyGPT(cfg)
    costs = measure_costs(model, batch_size)
    budget = predict(costs, "sqrt").peak_bytes
    plan = make_plan(costs, budget)
    every_name, every = plan.best_every_k()
    rows = {"none": predict(costs, "none"), "full": plan.alternatives["full"],
            "sqrt": plan.alternatives["sqrt"], "best every-K": every, "planner": plan.best}
    policies = {name: parse_policy(name) for name in ("none", "full", "sqrt")}
    policies.update({"best every-K": parse_policy(every_name), "planner": plan.policy})
    batch = model.example_batch(batch_size, generator=torch.Generator().manual_seed(0))
    times = step_times(model, batch, policies, rounds)
    print(f"\n{name}: {costs.n} blocks, d_model {cfg.d_model}, seq {cfg.seq_len}, batch "
          f"{batch_size}; budget {fmt_bytes(budget)} (what sqrt needs)")
    print(f"  {'policy':<22} {'predicted':>11} {'measured':>11} {'fits':<4} {'recompute':>12} "
          f"{'FLOPs':>7} {'time':>6}")
    out = {"budget_bytes": budget, "policies": {}}
    for n, p in rows.items():
        measured_peak = measure_peaks(model, policies[n], batch_size)[1]
        flops = measure_recompute(model, batch, policies[n]).flops
        assert measured_peak == p.peak_bytes and flops == p.recompute_flops, n
        label = {"planner": f"planner {plan.policy}",
                 "best every-K": f"best every-K: {every_name}"}.get(n, n)
        ratio = times[n] / times["none"]
        print(f"  {label[:22]:<22} {fmt_bytes(p.peak_bytes):>11} {fmt_bytes(measured_peak):>11} "
              f"{'yes' if p.peak_bytes <= budget else 'no':<4} {fmt_flops(flops):>12} "
              f"{p.overhead:>+7.1%} {ratio:>5.2f}x")
        out["policies"][n] = dict(peak_bytes=p.peak_bytes, recompute_flops=flops,
                                  flop_overhead=round(p.overhead, 4), time_ratio=round(ratio, 3))
    out["planner_policy"], out["best_every_k"] = str(plan.policy), every_name
    out["planner_vs_full_recompute"] = round(plan.best.recompute_flops
                                             / rows["full"].recompute_flops, 3)
    if with_compile:
        fraction = plan.best.kept_bytes / predict(costs, "none").kept_bytes
        c = compile_row(model, batch, fraction, rounds)
        print(f"  torch.compile, activation_memory_budget={fraction:.2f}: saves "
              f"{fmt_bytes(c['saved_bytes'])} (planner keeps {fmt_bytes(plan.best.kept_bytes)}); "
              f"step {c['time_ratio']:.2f}x eager none; cold compile {c['compile_s']:.0f} s")
        out["compile"] = dict(fraction=round(fraction, 3), **c)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--compile", action="store_true", help="also torch.compile (slow)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {name: bench(name, cfg, b, args.rounds, args.compile)
               for name, (cfg, b) in MODELS.items()}
    print(json.dumps(results))


if __name__ == "__main__":
    main()
