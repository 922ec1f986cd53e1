"""One training step's memory timeline as an interactive HTML page in PyTorch's memory_viz format.

    html = step_timeline_html(model, "full", batch_size=8)   # or: ckpt-course trace --html out.html

The page is PyTorch's own viewer (``torch.cuda._memory_viz.profile_plot``, the one
https://pytorch.org/memory_viz draws), fed by a ``torch.profiler`` run with ``profile_memory``:
it works for a CPU run as well as a CUDA one, each allocation stacked over time with the op and
the Python line that made it. Written by hand: nothing but the wiring (one metered step under a
policy, inside the profiler). The page loads its viewer script from PyTorch's repository (via
jsdelivr) when opened, so viewing it needs a network connection; making it needs none.

The profiler's bytes are the allocator's (CPU or CUDA), so they may round up and include blocks a
``MemoryMeter`` does not count; the meter's exact peak is returned beside the page.
"""

from __future__ import annotations

import warnings

import torch

from .policies import applied, parse_policy
from .step import check_run, make_batch, make_optimizer, run_step


def step_timeline_html(model, policy="none", batch_size: int = 8, seq_len: int | None = None,
                       seed: int = 0) -> tuple[str, int]:
    """(memory_viz HTML of one AdamW step of ``model`` under ``policy``, the meter's exact peak
    of a second, identical step). Two steps run: the first creates AdamW's state, as in a real
    run; the profiled one is the second."""
    from torch.cuda._memory_viz import profile_plot

    from .meter import MemoryMeter

    device = check_run(model, batch_size=batch_size, seq_len=seq_len)
    policy = parse_policy(policy)
    batch = make_batch(model, batch_size, seq_len, torch.Generator().manual_seed(seed), device)
    optimizer = make_optimizer(model)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with applied(model, policy):
        run_step(model, optimizer, batch)  # step 1: AdamW's state appears
        with torch.profiler.profile(activities=activities, profile_memory=True,
                                    record_shapes=True, with_stack=True) as profile:
            run_step(model, optimizer, batch)
        meter = MemoryMeter()
        with meter:
            meter.track(model, optimizer)
            peak = run_step(model, optimizer, batch, meter).peak_bytes
        meter.untrack()
    with warnings.catch_warnings():  # "device argument is deprecated": every device is plotted
        warnings.simplefilter("ignore", FutureWarning)
        html = profile_plot(profile, device=device)
    model.zero_grad(set_to_none=True)
    return html, peak
