"""Step-time ratios of checkpoint policies to none: predicted from FLOPs, from measured op times,
and measured.

The prediction (``ckpt_course.timing``) prices what each policy adds to a plain step: the ops
backward recomputes, each at its measured forward time (a profile of one plain step, op by op,
elementwise ops and views included) plus forward's measured per-op overhead, and offload's bytes
at the measured copy time per byte. The measurement is ``compare``: unmetered steps interleaved
across policies (none full every-2 ... none full ...) after a warm-up round, medians. ``full`` is
measured twice (as ``full`` and as ``segments:0..3``, the same regions) to show the noise floor.
Next to them, the FLOP model the textbook uses: ``1 + recompute FLOPs / forward FLOPs x forward's
measured share of a step`` (textbook: full costs +33%, one whole forward when backward = 2x
forward), which prices elementwise ops, copies and bookkeeping at zero.

Run: .venv/bin/python bench/time_model.py [--rounds 15] [--threads 1] [--device cpu]
The last line printed is one JSON object; ``max_abs_error`` is the largest
|predicted - measured| / measured over the policies (target: within 0.05).
"""

from __future__ import annotations

import argparse
import json

import torch

from ckpt_course.compare import compare, make_model
from ckpt_course.models import GPTConfig
from ckpt_course.recompute import count_step
from ckpt_course.step import make_batch
from ckpt_course.timing import predict, profile_step, recomputed
from ckpt_course.units import fmt_bytes

POLICIES = ("none", "full", "every-2", "selective:save=mm,sdpa", "offload", "segments:0..3")
SAME_AS = {"segments:0..3": "full"}  # the same regions as full: measured twice


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15, help="interleaved timed rounds")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a 2-core machine shared with other "
                             "processes, more make step times jump)")
    parser.add_argument("--device", default="cpu")
    opts = parser.parse_args()
    torch.set_num_threads(opts.threads)

    cfg = GPTConfig()
    model = make_model(cfg, device=opts.device)
    batch = make_batch(model, opts.batch, generator=torch.Generator().manual_seed(0),
                       device=opts.device)
    profile = profile_step(model, batch, rounds=opts.rounds)
    predicted = {p: predict(profile, recomputed(model, batch, p)) for p in POLICIES}
    measured = compare(cfg, POLICIES, steps=opts.rounds, batch_size=opts.batch,
                       device=opts.device, live=False)
    forward_share = profile.forward_s / profile.step_s
    forward_flops = count_step(model, batch).forward.flops
    by_flops = {p: 1 + measured[p].recompute_flops / forward_flops * forward_share
                for p in POLICIES}

    print(f"TinyGPT(GPTConfig()) batch {opts.batch} on {opts.device}, {opts.threads} thread(s), "
          f"{opts.rounds} interleaved rounds, medians")
    print(f"plain step {profile.step_s * 1e3:.1f} ms: forward {profile.forward_s * 1e3:.1f}, "
          f"backward {profile.backward_s * 1e3:.1f} ({profile.backward_over_forward:.2f}x "
          f"forward), optimizer {profile.optimizer_s * 1e3:.1f}; per-op overhead "
          f"{profile.overhead_per_op_s * 1e6:.1f} us; copy "
          f"{1 / profile.copy_s_per_byte / 1e9:.1f} GB/s")
    print(f"{'policy':<24}{'peak':>10}{'recompute':>10}{'by FLOPs':>9}{'predicted':>10}"
          f"{'measured':>10}{'error':>8}  biggest predicted costs")
    errors = {}
    for p in POLICIES:
        pred, meas = predicted[p], measured[p].time_ratio
        errors[p] = abs(pred.ratio - meas) / meas
        top = ", ".join(f"{op.removeprefix('aten.')} {s * 1e3:.1f}"
                        for op, s in list(pred.op_seconds.items())[:3])
        copies = f"copies {pred.copy_s * 1e3:.1f}" if pred.copy_s else ""
        print(f"{p:<24}{fmt_bytes(measured[p].peak_bytes):>10}{measured[p].recompute_share:>10.1%}"
              f"{by_flops[p]:>8.3f}x{pred.ratio:>9.3f}x{meas:>9.3f}x{errors[p]:>8.1%}  "
              f"{', '.join(filter(None, [top, copies])) or '-'} (ms)")
    for twin, same in SAME_AS.items():
        a, b = measured[same].time_ratio, measured[twin].time_ratio
        print(f"{same} measured twice ({same}, {twin}): {a:.3f}x and {b:.3f}x, "
              f"{abs(a - b) / a:.1%} apart")
    print(json.dumps({
        "bench": "time_model", "device": opts.device, "threads": opts.threads,
        "rounds": opts.rounds, "plain_step_ms": round(profile.step_s * 1e3, 2),
        "backward_over_forward": round(profile.backward_over_forward, 3),
        "forward_share": round(forward_share, 3),
        "flop_predicted_ratio": {p: round(v, 3) for p, v in by_flops.items()},
        "predicted_ratio": {p: round(v.ratio, 3) for p, v in predicted.items()},
        "measured_ratio": {p: round(measured[p].time_ratio, 3) for p in POLICIES},
        "recompute_share": {p: round(measured[p].recompute_share, 4) for p in POLICIES},
        "peak_bytes": {p: measured[p].peak_bytes for p in POLICIES},
        "twice_apart": {t: round(abs(measured[s].time_ratio - measured[t].time_ratio)
                                 / measured[s].time_ratio, 4) for t, s in SAME_AS.items()},
        "max_abs_error": round(max(errors.values()), 4),
    }))


if __name__ == "__main__":
    main()
