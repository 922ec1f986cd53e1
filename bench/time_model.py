"""Step-time ratios of checkpoint policies to none: predicted from FLOPs, from measured op times,
and measured.

The prediction (``ckpt_course.timing``) prices what each policy adds to a plain step: the ops
backward recomputes, each at its measured time in a profile of one plain step (op by op,
elementwise ops and views included), and the policy's mechanism (a checkpoint's hooks and slower
re-runs, selective checkpointing's bookkeeping, offload's copies) at what one block tried under it
took beyond its own recomputed ops (``block_trial``, at the step's own input, twice the rounds;
one trial per mechanism: full, every-2 and segments share the checkpoint's).
The measurement: unmetered steps (``run_step``) on copies of the model, one per policy,
interleaved (none full every-2 ... none full ...) after a warm-up round; a policy's ratio is the
median over rounds of its step time over none's in the same round. Two policies
are measured twice, under two names: ``none`` (as ``none`` and ``none-again``, the denominator)
and ``full`` (as ``full`` and ``segments:0..3``, the same regions). Their disagreement is the
run's noise floor: an error below it is noise, and a policy is "within 5%" only if its error and
the noise floor are both under 5%. The columns +- are standard errors (of a median, from the
interquartile range, ``timing.median_error``), relative: the prediction's, from its block
trial's rounds, scaled to the step; the measurement's, from its rounds' ratios. Next to them,
the FLOP model the textbook uses: ``1 + recompute FLOPs / forward FLOPs x forward's measured
share of a step`` (textbook: full costs +33%), which prices elementwise ops, copies and
bookkeeping at zero.

On a machine shared with other jobs, ``--clock cpu`` times everything (profile, mechanisms and
the measured steps) in this process's CPU time, which leaves out the time the step waited for a
core; ``uptime``'s load is printed with the figures.

Measured on a quiet machine (2026-12-05 evening, load 0.6-1.0, 15 rounds, TinyGPT batch 8,
1 thread): --clock cpu, largest error 2.8% (every-2; full 0.9%, selective 1.1%, offload 1.9%,
segments 1.9%), noise floor 0.9%; --clock wall, largest error 2.0% (every-2; full 1.2%,
selective 1.4%, offload 1.8%), noise floor 2.3%: every policy within 5% in both runs.
Earlier, loaded (2026-12-05, 2 cores shared with 4 other jobs, load 6-12, --clock cpu, 15 rounds):
with one block trial per mechanism, five runs, largest error per run 5.0% (selective), 2.8%,
8.0% (every-2 measured below full, which re-runs less: that run's measurement was off, not only
the model), 2.7%, 5.8% (offload: the load rose from 7.7 to 12 between its trial and the measured
steps); the twins' noise floor 0.1-1.2%, the predictions' own standard error 0.7-1.8%. Before
sharing trials: 2.5% and 8.7%. With --clock wall at load 8: largest error 5.8% (selective), the
others 1.0-4.1%; at load 14-16 the twins disagreed by 6.8% (cannot tell; errors 1.2-8.6%).
The model before this one (a hot 1 MiB copy benchmark per byte, selective
bookkeeping from a one-token block, forward's per-op overhead for every re-run op), run once here
with --clock wall at load 0.5-3.5, under-predicted full by 8.1%, every-2 by 13.1%, selective by
16.8% and offload by 20.9% (the issue's quieter runs: selective 10.7%, offload 11.2%).

Run: nice .venv/bin/python bench/time_model.py [--rounds 15] [--threads 1] [--clock cpu]
The last line printed is one JSON object; ``max_abs_error`` is the largest
|predicted - measured| / measured over the policies (target: within 0.05).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch

from ckpt_course.compare import compare, make_model
from ckpt_course.models import GPTConfig
from ckpt_course.policies import applied
from ckpt_course.recompute import count_step
from ckpt_course.step import make_batch, make_optimizer, run_step
from ckpt_course.timing import (
    CLOCKS,
    _synced,
    block_trial,
    mechanism,
    median_error,
    predict,
    profile_step,
    recomputed,
)
from ckpt_course.units import fmt_bytes

POLICIES = ("none", "full", "every-2", "selective:save=mm,sdpa", "offload", "segments:0..3")
SAME_AS = {"segments:0..3": "full", "none-again": "none"}  # measured twice, under two names


def measure(model, batch, names, rounds: int, clock: str) -> dict[str, list[float]]:
    """Seconds of ``rounds`` unmetered steps per name (a policy, or a ``SAME_AS`` twin), one
    model copy each, interleaved after one warm-up round."""
    now = _synced(next(model.parameters()).device, clock)
    runs = []
    for name in names:
        copy = make_model(model)
        handle = applied(copy, SAME_AS.get(name, name) if name.endswith("-again") else name)
        handle.__enter__()
        runs.append((name, copy, make_optimizer(copy), handle))
    times: dict[str, list[float]] = {name: [] for name in names}
    try:
        for r in range(rounds + 1):
            for name, copy, optimizer, _ in runs:
                start = now()
                run_step(copy, optimizer, batch, guard=False)
                if r:
                    times[name].append(now() - start)
    finally:
        for *_, handle in runs:
            handle.__exit__(None, None, None)
    return times


def load() -> str:
    return "load " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15, help="interleaved timed rounds")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a 2-core machine shared with other "
                             "processes, more make step times jump)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                        help="wall (what a learner waits) or cpu (this process's CPU time: on a "
                             "shared machine, without the time spent waiting for a core)")
    opts = parser.parse_args()
    torch.set_num_threads(opts.threads)

    cfg = GPTConfig()
    model = make_model(cfg, device=opts.device)
    batch = make_batch(model, opts.batch, generator=torch.Generator().manual_seed(0),
                       device=opts.device)
    load_before = load()
    profile = profile_step(model, batch, rounds=opts.rounds, clock=opts.clock)
    trials = {m: block_trial(model, batch, m, repeats=2 * opts.rounds, clock=opts.clock)
              for m in {mechanism(p) for p in POLICIES if p != "none"}}
    predicted = {p: predict(profile, recomputed(model, batch, p, clock=opts.clock,
                                                trial=trials.get(mechanism(p))))
                 for p in POLICIES}
    names = [*POLICIES, *(t for t in SAME_AS if t not in POLICIES)]
    times = measure(model, batch, names, opts.rounds, opts.clock)
    load_after = load()
    memory = compare(cfg, POLICIES, steps=1, batch_size=opts.batch, device=opts.device,
                     live=False)
    ratios = {n: [a / b for a, b in zip(t, times["none"], strict=True)]
              for n, t in times.items()}  # each round's ratio: its steps saw the same load
    measured = {n: statistics.median(r) for n, r in ratios.items()}
    measured_noise = {n: median_error(r) / measured[n] for n, r in ratios.items()}
    forward_share = profile.forward_s / profile.step_s
    forward_flops = count_step(model, batch).forward.flops
    by_flops = {p: 1 + memory[p].recompute_flops / forward_flops * forward_share
                for p in POLICIES}
    apart = {t: abs(measured[s] - measured[t]) / measured[s] for t, s in SAME_AS.items()}
    noise = max(apart.values())

    print(f"TinyGPT(GPTConfig()) batch {opts.batch} on {opts.device}, {opts.threads} thread(s), "
          f"{opts.clock} clock, {opts.rounds} interleaved rounds, medians; {load_before} "
          f"before, {load_after} after")
    print(f"plain step {profile.step_s * 1e3:.1f} ms: forward {profile.forward_s * 1e3:.1f}, "
          f"backward {profile.backward_s * 1e3:.1f} ({profile.backward_over_forward:.2f}x "
          f"forward), optimizer {profile.optimizer_s * 1e3:.1f}; per-op overhead "
          f"{profile.overhead_per_op_s * 1e6:.1f} us")
    print(f"{'policy':<24}{'peak':>10}{'recompute':>10}{'by FLOPs':>9}{'predicted':>10}"
          f"{'+-':>6}{'measured':>10}{'+-':>6}{'error':>8}  biggest predicted costs")
    errors, trial_noise = {}, {}
    for p in POLICIES:
        pred, meas = predicted[p], measured[p]
        errors[p] = abs(pred.ratio - meas) / meas
        trial_noise[p] = pred.error_s / pred.plain_s / meas
        top = ", ".join(f"{op.removeprefix('aten.')} {s * 1e3:.1f}"
                        for op, s in list(pred.op_seconds.items())[:3])
        copies = f"copies {pred.copy_s * 1e3:.1f}" if pred.copy_s else ""
        print(f"{p:<24}{fmt_bytes(memory[p].peak_bytes):>10}{memory[p].recompute_share:>10.1%}"
              f"{by_flops[p]:>8.3f}x{pred.ratio:>9.3f}x{trial_noise[p]:>6.1%}{meas:>9.3f}x"
              f"{measured_noise[p]:>6.1%}{errors[p]:>8.1%}  "
              f"{', '.join(filter(None, [top, copies])) or '-'} (ms)")
    for twin, same in SAME_AS.items():
        print(f"{same} measured twice ({same}, {twin}): {measured[same]:.3f}x and "
              f"{measured[twin]:.3f}x, {apart[twin]:.1%} apart")
    verdict = ("cannot tell: the noise floor is 5% or more" if noise >= 0.05 else
               "all within 5%" if max(errors.values()) < 0.05 else
               "not within 5%: " + ", ".join(p for p, e in errors.items() if e >= 0.05))
    print(f"noise floor {noise:.1%}; {verdict}")
    print(json.dumps({
        "bench": "time_model", "device": opts.device, "threads": opts.threads,
        "clock": opts.clock, "load_before": load_before, "load_after": load_after,
        "rounds": opts.rounds, "plain_step_ms": round(profile.step_s * 1e3, 2),
        "backward_over_forward": round(profile.backward_over_forward, 3),
        "forward_share": round(forward_share, 3),
        "flop_predicted_ratio": {p: round(v, 3) for p, v in by_flops.items()},
        "predicted_ratio": {p: round(v.ratio, 3) for p, v in predicted.items()},
        "measured_ratio": {n: round(v, 3) for n, v in measured.items()},
        "error": {p: round(e, 4) for p, e in errors.items()},
        "prediction_standard_error": {p: round(e, 4) for p, e in trial_noise.items()},
        "measured_standard_error": {p: round(e, 4) for p, e in measured_noise.items()},
        "recompute_share": {p: round(memory[p].recompute_share, 4) for p in POLICIES},
        "peak_bytes": {p: memory[p].peak_bytes for p in POLICIES},
        "twice_apart": {t: round(a, 4) for t, a in apart.items()},
        "noise_floor": round(noise, 4),
        "max_abs_error": round(max(errors.values()), 4),
    }))


if __name__ == "__main__":
    main()
