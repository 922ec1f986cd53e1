"""What does the live plot cost a training run? TinyGPT(GPTConfig()), batch 8, metered steps.

  A  train(model, "full", steps=N)                       no plot
  B  the same with on_step=LivePlot(mode="live")         redraws throttled (the default)
  C  the same with an unthrottled LivePlot               a redraw after every step

"live" mode renders every redraw to PNG, as a notebook would receive it, even without a
frontend, so the cost measured here is the notebook's. Runs of N steps are interleaved
(A B C A B C ...) after a warm-up round; we report medians of the run times and their ratios to A.
The target: B costs at most 5% (ratio <= 1.05).

Run: .venv/bin/python bench/live_overhead.py [--rounds 7] [--steps 20] [--threads 1]
The last line printed is one JSON object with the headline figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from ckpt_course.live import LivePlot
from ckpt_course.models import GPTConfig, TinyGPT
from ckpt_course.train import train

TARGET = 1.05


def run(model, steps: int, plot: LivePlot | None) -> float:
    start = time.perf_counter()
    train(model, "full", steps=steps, batch_size=8, count_recompute=False, progress=False,
          on_step=plot)
    if plot is not None:
        plot.close()
    return time.perf_counter() - start


VARIANTS = {
    "no plot": lambda steps: None,
    "live plot": lambda steps: LivePlot(["full"], steps=steps, mode="live"),
    "unthrottled": lambda steps: LivePlot(["full"], steps=steps, mode="live", min_interval_s=0,
                                          max_share=0.999),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds after warm-up")
    parser.add_argument("--steps", type=int, default=20, help="training steps per run")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: with two on a 2-core machine, any other "
                             "process makes step times jump)")
    opts = parser.parse_args()

    torch.set_num_threads(opts.threads)
    torch.manual_seed(0)
    model = TinyGPT(GPTConfig())
    times = {name: [] for name in VARIANTS}
    redraws = {name: [] for name in VARIANTS}
    for r in range(opts.rounds + 1):
        for name, make in VARIANTS.items():
            plot = make(opts.steps)
            seconds = run(model, opts.steps, plot)
            if r:  # round 0 warms up
                times[name].append(seconds)
                redraws[name].append(plot.redraws if plot is not None else 0)

    median = {name: statistics.median(t) for name, t in times.items()}
    base = median["no plot"]
    print(f"TinyGPT(GPTConfig()) batch 8, policy full, {opts.steps} metered steps per run, "
          f"{torch.get_num_threads()} threads, {opts.rounds} interleaved rounds, medians")
    print(f"{'variant':<14}{'run s':>8}{'per step ms':>13}{'ratio':>8}{'redraws':>9}")
    for name in VARIANTS:
        per_step = median[name] / opts.steps * 1e3
        print(f"{name:<14}{median[name]:>8.2f}{per_step:>13.1f}{median[name] / base:>7.2f}x"
              f"{statistics.median(redraws[name]):>9.0f}")
    ratio = median["live plot"] / base
    verdict = "within" if ratio <= TARGET else "OVER"
    print(f"live plot: {ratio:.3f}x, {verdict} the {TARGET:.2f}x target")
    print(json.dumps({
        "bench": "live_overhead",
        "threads": torch.get_num_threads(),
        "rounds": opts.rounds,
        "steps": opts.steps,
        "no_plot_step_ms": round(base / opts.steps * 1e3, 2),
        "live_ratio": round(ratio, 3),
        "unthrottled_ratio": round(median["unthrottled"] / base, 3),
        "live_redraws": statistics.median(redraws["live plot"]),
        "target_ratio": TARGET,
        "within_target": ratio <= TARGET,
    }))


if __name__ == "__main__":
    main()
