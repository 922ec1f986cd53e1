"""Step-time ratios of checkpoint policies to none, next to what the FLOP counter predicts.

TinyGPT(GPTConfig()), batch 8, fwd + bwd + AdamW, every policy on a copy of the same model and
batch. Memory comes from a metered run; time from unmetered steps interleaved across policies
(none full every-2 ... none full every-2 ...) after a warm-up round, medians (``compare``).

Next to each ratio: the share of a plain step's FLOPs the policy recomputes, and the time the
FLOPs predict, ``recompute FLOPs / forward FLOPs x forward's measured share of a step``. The
textbook says full costs +33% (backward = 2 x forward, one whole forward re-run).

Run: .venv/bin/python bench/policy_ratios.py [--rounds 15] [--threads 1] [--device cpu]
The last line printed is one JSON object with the headline figures.
"""

from __future__ import annotations

import argparse
import json

import torch

from ckpt_course.compare import DEFAULT_POLICIES, compare, measure_split
from ckpt_course.models import GPTConfig, TinyGPT
from ckpt_course.recompute import count_step
from ckpt_course.units import fmt_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15, help="interleaved timed rounds")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: with two on a 2-core machine, any other "
                             "process makes step times jump)")
    parser.add_argument("--device", default="cpu")
    opts = parser.parse_args()

    torch.set_num_threads(opts.threads)
    cfg = GPTConfig()
    result = compare(cfg, DEFAULT_POLICIES, steps=opts.rounds, batch_size=opts.batch,
                     device=opts.device, live=False)
    split = measure_split(cfg, batch_size=opts.batch, rounds=opts.rounds, device=opts.device)
    model = TinyGPT(cfg)
    forward_flops = count_step(model, model.example_batch(opts.batch)).forward.flops

    print(f"TinyGPT(GPTConfig()) batch {opts.batch} on {opts.device}, {opts.threads} threads, "
          f"{opts.rounds} interleaved rounds, medians")
    print(split)
    print(f"{'policy':<24}{'peak':>11}{'recompute':>11}{'predicted':>11}{'measured':>10}")
    predicted = {}
    for r in result.results:
        predicted[r.policy] = 1 + r.recompute_flops / forward_flops * split.forward_share
        print(f"{r.policy:<24}{fmt_bytes(r.peak_bytes):>11}{r.recompute_share:>10.1%} "
              f"{predicted[r.policy]:>10.2f}x{r.time_ratio:>9.2f}x")
    print("predicted = 1 + recompute FLOPs / forward FLOPs x forward's share of the step time; "
          "offload and selective pay in copies and elementwise recompute, which FLOPs miss")
    print(json.dumps({
        "bench": "policy_ratios",
        "device": opts.device,
        "threads": opts.threads,
        "rounds": opts.rounds,
        "none_step_ms": round(result["none"].step_time_s * 1e3, 2),
        "backward_over_forward": round(split.backward_over_forward, 3),
        "forward_share": round(split.forward_share, 3),
        "time_ratio": {r.policy: round(r.time_ratio, 3) for r in result.results},
        "predicted_ratio": {p: round(v, 3) for p, v in predicted.items()},
        "recompute_share": {r.policy: round(r.recompute_share, 4) for r in result.results},
        "peak_bytes": {r.policy: r.peak_bytes for r in result.results},
    }))


if __name__ == "__main__":
    main()
