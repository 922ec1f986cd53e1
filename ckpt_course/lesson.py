"""One import for the lesson notebooks: ``from ckpt_course.lesson import *``.

Why: a lesson's first cell listed twenty names from ten modules, minutes of a learner's reading
before any idea. Each name below lives in the module named next to it; open that module to read
it. Only names phases 1-3 use; the helpers a lesson cell calls stay in their own modules.
"""

import math
from dataclasses import replace

import matplotlib.pyplot as plt
import torch

from . import plots, sweeps
from .compare import (
    batch_sweep,
    best_fit,
    compare,
    format_ranking,
    layer_memory,
    rank_ops,
    selective_from_ranking,
)
from .estimate import layer_activation_bytes, model_memory
from .models import GPTConfig, HandTraceNet, TinyGPT, course_device, llama_config, sized
from .policies import applied
from .recompute import count_step, counting, measure_recompute
from .reveal import reveal
from .sharding import min_gpus, per_gpu_bytes, run_fsdp
from .tape import record_tape
from .timing import format_predictions, predict, profile_step, recomputed
from .trace import (
    compare_variants,
    hand_input,
    hand_trace_net,
    layer_table,
    plot_timelines,
    plot_walk,
    recompute_by_op,
    recompute_table,
    sum_loss,
    trace_policies,
    trace_step,
    trace_table,
    variant_table,
)
from .train import check_gradients, measure_step
from .units import GiB, MiB, fmt_bytes, fmt_flops

DEVICE = course_device()  # CUDA if there is one; every byte count is the same on CPU


def on_device(batch):
    """The batch's tensors on ``DEVICE``."""
    return tuple(t.to(DEVICE) for t in batch)


def seeded(seed: int = 0) -> torch.Generator:
    """A fixed generator for example batches (``model.example_batch(B, generator=seeded())``)."""
    return torch.Generator().manual_seed(seed)


__all__ = [
    "math", "replace", "plt", "torch", "plots", "sweeps", "batch_sweep", "best_fit", "compare",
    "format_ranking", "layer_memory", "rank_ops", "selective_from_ranking",
    "layer_activation_bytes", "model_memory", "GPTConfig", "HandTraceNet", "TinyGPT",
    "course_device", "llama_config", "sized", "applied", "count_step", "counting",
    "measure_recompute", "reveal", "min_gpus", "per_gpu_bytes", "run_fsdp", "record_tape",
    "format_predictions", "predict", "profile_step", "recomputed", "compare_variants",
    "hand_input", "hand_trace_net", "layer_table", "plot_timelines", "plot_walk",
    "recompute_by_op", "recompute_table", "sum_loss", "trace_policies", "trace_step",
    "trace_table", "variant_table", "check_gradients", "measure_step", "GiB", "MiB",
    "fmt_bytes", "fmt_flops", "DEVICE", "on_device", "seeded",
]
