"""What does measuring memory cost? One training step of TinyGPT(GPTConfig()), batch 8, three ways.

  A  unmetered: forward + backward + AdamW step
  B  the same step inside a TorchDispatchMode that only calls each op: the floor any
     dispatch-mode tracker pays (Python runs once per aten op, about 1000 per step)
  C  the same step inside ckpt_course's MemoryMeter (phases labelled)
  C' the same, with a budget: the step runner then copies parameters and AdamW's state before the
     optimizer step, so an out-of-memory error there can be undone (ckpt_course.step)
  D  the same step inside torch.distributed._tools.mem_tracker.MemTracker (private torch API)

Every variant runs ckpt_course.step.run_step.
Steps are interleaved (A B C D A B C D ...) after a warmup so that drift on a shared machine hits
all alike; we report medians and ratios. Timings are wall clock: on a busy machine run it again.

Each metered step gets a fresh tracker that first registers what exists (parameters, optimizer
state), so both peaks count the same things: the peak of live tensor storage bytes within the
step. On CPU they must agree to the byte; on CUDA MemTracker rounds every storage up to 512 bytes
(the caching allocator's block size) and ours counts exact bytes, so there MemTracker reads a
little higher.

Run: .venv/bin/python bench/meter_overhead.py [--rounds 30] [--device cpu]
The last line printed is one JSON object with the headline figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch.distributed._tools.mem_tracker import MemTracker
from torch.utils._python_dispatch import TorchDispatchMode

from ckpt_course.meter import MemoryMeter
from ckpt_course.models import GPTConfig, TinyGPT
from ckpt_course.step import make_batch, make_optimizer, run_step
from ckpt_course.units import fmt_bytes


def plain_step(model, optimizer, batch) -> None:
    run_step(model, optimizer, batch)


class CallOnly(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def call_only_step(model, optimizer, batch) -> None:
    with CallOnly():
        plain_step(model, optimizer, batch)


def metered(model, optimizer, batch, budget=None) -> MemoryMeter:
    """``run_step`` under a fresh meter. With a budget the step also copies parameters and
    AdamW's state before the optimizer step, to undo it on an out-of-memory error."""
    model.zero_grad(set_to_none=True)
    meter = MemoryMeter(budget=budget).track(model, optimizer)
    with meter:
        run_step(model, optimizer, batch, meter)
    meter.untrack()
    return meter


def tracked(model, optimizer, batch) -> MemTracker:
    model.zero_grad(set_to_none=True)  # as run_step does before its peak starts
    tracker = MemTracker()  # one per step: it refuses a second forward of the same root module
    tracker.track_external(model, optimizer)
    with tracker:
        plain_step(model, optimizer, batch)
    return tracker


def memtracker_peak(tracker: MemTracker) -> dict[str, int]:
    """The peak snapshot maps device -> {category: bytes, ..., "Total": bytes}; one device here."""
    (snapshot,) = tracker.get_tracker_snapshot("peak").values()
    return {getattr(k, "value", k): v for k, v in snapshot.items()}


def meter_step(model, optimizer, batch) -> int:
    return metered(model, optimizer, batch).peak_bytes


def guarded_step(model, optimizer, batch) -> int:
    return metered(model, optimizer, batch, budget=2**50).peak_bytes  # never reached


def memtracker_step(model, optimizer, batch) -> int:
    return memtracker_peak(tracked(model, optimizer, batch))["Total"]


# MemTracker's category names -> ours (we count buffers with parameters: model state).
THEIR_CATEGORY = {"Parameter": "parameters", "Buffer": "parameters", "Gradient": "gradients",
                  "Optstate": "optimizer state", "Activation": "activations", "Temp": "temporaries"}


def show_peaks(model, optimizer, batch) -> dict[str, int]:
    """One more step with each tracker: what each peak is made of, and where the parts differ."""
    meter = metered(model, optimizer, batch)
    theirs = memtracker_peak(tracked(model, optimizer, batch))
    mapped = dict.fromkeys(meter.peak_breakdown, 0)
    for name, size in theirs.items():
        if name in THEIR_CATEGORY:
            mapped[THEIR_CATEGORY[name]] += size
    print(f"MemoryMeter peak, in {meter.peak_phase} at {meter.peak_op}: "
          + ", ".join(f"{k} {fmt_bytes(v)}" for k, v in meter.peak_breakdown.items() if v))
    print("MemTracker peak: "
          + ", ".join(f"{k} {fmt_bytes(v)}" for k, v in theirs.items() if v and k != "Total"))
    ours = meter.peak_breakdown
    diff = {k: ours[k] - mapped[k] for k in mapped if ours[k] != mapped[k]}
    if not diff:
        print("Per category at the peak they agree to the byte too.")
    elif set(diff) <= {"activations", "temporaries"} and sum(diff.values()) == 0:
        print(f"Per category at the peak, ours minus MemTracker's: {diff}: the same bytes, "
              "labelled across the forward/backward line. MemTracker's backward starts at "
              "the first module's backward hook, so the seed gradient ones_like(loss) (4 B) "
              "is an activation there; we label by phase, and it is made inside backward().")
    else:
        print(f"Per category at the peak, ours minus MemTracker's: {diff} (unexpected).")
    return diff


VARIANTS = {
    "unmetered": plain_step,
    "call-only mode": call_only_step,
    "MemoryMeter": meter_step,
    "meter + budget": guarded_step,
    "MemTracker": memtracker_step,
}


def timed(step, *args) -> tuple[float, int | None]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    peak = step(*args)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=60, help="A B C D rounds after warmup")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    opts = parser.parse_args()

    torch.manual_seed(0)
    model = TinyGPT(GPTConfig()).to(opts.device)
    optimizer = make_optimizer(model)
    batch = make_batch(model, 8, device=opts.device)
    args = (model, optimizer, batch)

    for _ in range(opts.warmup):
        for step in VARIANTS.values():
            step(*args)
    times = {name: [] for name in VARIANTS}
    peaks = {name: [] for name in VARIANTS}
    for _ in range(opts.rounds):
        for name, step in VARIANTS.items():
            seconds, peak = timed(step, *args)
            times[name].append(seconds)
            peaks[name].append(peak)

    median = {name: statistics.median(t) for name, t in times.items()}
    base = median["unmetered"]
    print(f"TinyGPT(GPTConfig()) batch 8, fwd + bwd + AdamW on {opts.device}, "
          f"{torch.get_num_threads()} threads, {opts.rounds} interleaved rounds, medians")
    print(f"{'variant':<16}{'step ms':>10}{'ratio':>8}{'peak (live tensor bytes)':>34}")
    for name in VARIANTS:
        peak = peaks[name][-1]
        shown = "-" if peak is None else f"{peak:,} B = {fmt_bytes(peak)}"
        print(f"{name:<16}{median[name] * 1e3:>10.1f}{median[name] / base:>7.2f}x{shown:>34}")

    ours, theirs = peaks["MemoryMeter"], peaks["MemTracker"]
    agree = ours == theirs
    diff = max(abs(a - b) for a, b in zip(ours, theirs, strict=True))
    if agree:
        print(f"Peaks agree to the byte in all {len(ours)} steps: both count parameters, "
              "optimizer state, gradients and every storage an op creates, views once.")
    else:
        print(f"Peaks differ by up to {diff:,} B. On CUDA MemTracker rounds each storage up to "
              "512 B like the caching allocator; MemoryMeter counts exact storage bytes.")
    category_diff = show_peaks(*args)
    print(json.dumps({
        "bench": "meter_overhead",
        "device": opts.device,
        "threads": torch.get_num_threads(),
        "rounds": opts.rounds,
        "unmetered_ms": round(base * 1e3, 2),
        "meter_ms": round(median["MemoryMeter"] * 1e3, 2),
        "memtracker_ms": round(median["MemTracker"] * 1e3, 2),
        "call_only_ratio": round(median["call-only mode"] / base, 3),
        "meter_ratio": round(median["MemoryMeter"] / base, 3),
        "meter_budget_ratio": round(median["meter + budget"] / base, 3),
        "memtracker_ratio": round(median["MemTracker"] / base, 3),
        "meter_peak_bytes": ours[-1],
        "memtracker_peak_bytes": theirs[-1],
        "peaks_agree": agree,
        "peak_category_diff_bytes": category_diff,
        "max_peak_diff_bytes": diff,
    }))


if __name__ == "__main__":
    main()
