"""Lesson 3b's Predicts (notebooks/3b_pitfalls.ipynb): forms, tolerances, and the wrong answers
learners give, each with its reason.

Most answers here are facts of torch's behaviour (a count, a step, a set of cases), so the
``answer`` functions return them; 3b.6's derivation is the FLOP model the section refutes,
recomputed by counting FLOPs, and its reveal is judged against the clock. Where the lesson's
numbers come from a process's memory or a compile (3b.1, 3b.4) or a clock (3b.6), ``given`` holds
values typical of a 2-core CPU for the tests; a lesson passes its own.
"""

from __future__ import annotations

import functools

from . import Predict, Wrong

# 3b.5's case names (pitfalls.DDP_CASES; a test keeps them equal)
DDP_CASES = ("non-reentrant", "reentrant", "reentrant + find_unused_parameters",
             "reentrant + find_unused_parameters + static_graph",
             "reentrant, module checkpointed twice",
             "reentrant, module checkpointed twice + static_graph",
             "non-reentrant, module checkpointed twice",
             "non-reentrant, twice + find_unused_parameters")
RAISING = frozenset({"reentrant + find_unused_parameters", "reentrant, module checkpointed twice"})
HIGH_WATER = ("peak RSS is the most the process ever held: after none's step it cannot go down, "
              "whatever full saves")


@functools.cache
def _tiny_flop_model() -> float:
    """3b.6's derivation: 1 + recompute FLOPs / step FLOPs of full on 32 tiny blocks."""
    from ..models import HandTraceNet
    from ..recompute import measure_recompute

    model = HandTraceNet(width=8, depth=32)
    r = measure_recompute(model, model.example_batch(2), "full")
    return round(1 + r.flops / r.step_flops, 3)


@functools.cache
def _rss_readings() -> dict:
    """3b.1's two readings, as the lesson takes them (the meter's bytes are exact; RSS is this
    process's)."""
    from ..models import GPTConfig, TinyGPT
    from ..pitfalls import rss_reading

    none, full = rss_reading(TinyGPT(GPTConfig()), ["none", "full"], batch_size=8)
    return {"none": none, "full": full}


@functools.cache
def _chain() -> dict:
    """3b.4's chain, as the lesson measures it eagerly (compile is not run here: seconds)."""
    import torch

    from ..pitfalls import MLPChain, saved_for_backward

    chain = MLPChain(width=64, depth=4)
    xs = chain.example_batch(64)[0]
    eager = saved_for_backward(torch.nn.Sequential(*chain.blocks), xs)
    return {"eager": eager, "input": xs.nbytes}


@functools.cache
def _hand_runs() -> dict:
    """3b.1's genuine case: one step of the hand-trace net under none and every-2, metered."""
    from ..models import HandTraceNet
    from ..train import measure_step

    return {"runs": {p: measure_step(HandTraceNet(), p) for p in ("none", "every-2")}}


PREDICTS: dict[str, Predict] = {
    "3b.1/rss-drop": Predict(
        what="peak RSS drop", form="number", unit="B", example="2 * 1024 * 1024",
        answer=lambda: 0, given=_rss_readings,
        wrong=(
            Wrong(lambda d, g: g["none"].meter_saved_bytes - g["full"].meter_saved_bytes,
                  f"that is what the meter's live bytes drop by: {HIGH_WATER}"),
            Wrong(lambda d, g: g["none"].meter_peak_bytes - g["full"].meter_peak_bytes,
                  f"that is the drop of the meter's peak, live tensor bytes: {HIGH_WATER}"),
            Wrong(lambda d, g: g["none"].peak_rss_bytes,
                  f"that is none's whole peak RSS: {HIGH_WATER}"),
        ),
        over=HIGH_WATER,
    ),
    "3b.1/every2-peak-ratio": Predict(
        what="every-2 / none peak", form="number", example="0.5",
        answer=lambda: 1.0, given=_hand_runs,
        wrong=(
            Wrong(0.5, "every-2 drops half the saved activations, not half the peak: the peak is "
                       "in layer 2's backward, made of weight gradients"),
            Wrong(lambda d, g: g["runs"]["every-2"].saved_bytes / g["runs"]["none"].saved_bytes,
                  "that is the ratio of the bytes kept for backward: the peak comes later, in "
                  "backward, where gradients fill memory under every policy"),
            Wrong(0.75, "that assumes activations make the peak: here the weight gradients do"),
            Wrong(4 / 3, "every-2 re-runs forward, but the re-run's tensors are freed before the "
                         "peak: it holds no more"),
        ),
        under="lower than none's: but the peak is made of gradients, which no policy removes",
        over="higher than none's: the re-run's tensors are freed before the peak",
    ),
    "3b.2/block-grads": Predict(
        what="block parameters with a gradient", form="count", example="3",
        answer=lambda: 0,
        wrong=(
            Wrong(4, "reentrant checkpoint is an autograd.Function: if none of its inputs "
                     "requires grad, its output does not, and autograd never enters the block"),
            Wrong(2, "all or nothing: autograd either enters the block or not, and with no "
                     "input requiring grad it does not"),
            Wrong(3, "all or nothing: the block's output does not require grad, so none of its "
                     "parameters gets one"),
        ),
        over="the block is cut off from the graph: no input requires grad, so neither does its "
             "output",
    ),
    "3b.3/first-diff-step": Predict(
        what="first step that differs", form="count", example="5",
        answer=lambda: 2,
        wrong=(
            Wrong(1, "step 1's forward runs before any recompute, so its loss is the same; its "
                     "backward's gradients differ, so step 2's loss is the first to differ"),
            Wrong(0, "steps count from 1, and step 1's loss is the same"),
            Wrong(3, "the weights already differ after step 1's optimizer step: step 2's forward "
                     "sees them"),
            Wrong(12, "it differs early: the recompute's new dropout masks corrupt step 1's "
                      "gradients, so step 2 already runs on other weights"),
        ),
        over="earlier: step 1's backward already used the wrong masks",
    ),
    "3b.4/compile-saved-at-zero": Predict(
        what="compile keeps at budget 0", form="number", unit="B", example="4 * 1024",
        answer=lambda: 0, given=_chain,
        wrong=(
            Wrong(lambda d, g: g["eager"],
                  "that is what eager keeps (and compile's default, budget 1): at budget 0 "
                  "compile keeps nothing, every activation is rebuilt from the input and the "
                  "parameters"),
            Wrong(lambda d, g: g["input"],
                  "the input is not counted (nor the parameters): they are kept anyway, and from "
                  "them compile rebuilds everything"),
            Wrong(lambda d, g: g["eager"] // 4,
                  "that is one block's activations: at budget 0 compile keeps no block's"),
        ),
        over="at budget 0 compile keeps nothing: every activation can be rebuilt from the input "
             "and the parameters",
    ),
    "3b.5/ddp-raises": Predict(
        what="cases that raise", form="set", example='{"reentrant"}',
        choices=DDP_CASES, answer=lambda: set(RAISING),
        wrong=(
            Wrong({"reentrant + find_unused_parameters"},
                  "a module checkpointed twice under reentrant raises too: two inner backward "
                  "passes mark b's parameters ready twice"),
            Wrong({"reentrant, module checkpointed twice"},
                  "find_unused_parameters walks the graph after forward; reentrant checkpoint "
                  "hides b's parameters inside its node, so DDP marks them ready as unused, then "
                  "the inner backward marks them again"),
            Wrong({c for c in DDP_CASES if c.startswith("reentrant")},
                  "static_graph=True learns the first iteration's order of ready gradients and "
                  "expects it again, and plain reentrant with no shared module is fine"),
            Wrong(set(), "two cases raise: reentrant with find_unused_parameters, and a module "
                         "checkpointed twice under reentrant"),
        ),
        other="reentrant checkpoint runs a separate backward inside the outer one: DDP raises "
              "when that marks a parameter ready a second time",
    ),
    "3b.6/tiny-ratio": Predict(
        what="tiny net, full / none", form="number", example="0.8", judge="measured",
        tolerance=0.3,  # a median of 7 interleaved rounds of microsecond ops: see its spread
        answer=_tiny_flop_model, given=lambda: {"measured": 3.6},
        wrong=(
            Wrong(lambda d, g: d,
                  "that is the FLOP model: checkpoint's bookkeeping per region (saving inputs "
                  "and RNG state, hooks, the recompute's setup) counts no FLOPs and dominates "
                  "microsecond ops"),
            Wrong(4 / 3, "the textbook's one more forward: true for FLOPs, not for time when "
                         "each of 32 regions pays a fixed cost"),
            Wrong(1.0, "full does more work than none: it re-runs forward, and pays per region"),
        ),
        under="more: each of the 32 regions pays checkpoint's fixed cost, which no FLOP counts",
        over="less than that: the bookkeeping is large, but not that large here",
    ),
    "3b.7/bn-tracked": Predict(
        what="num_batches_tracked", form="count", example="3",
        answer=lambda: 2,
        wrong=(
            Wrong(1, "the recompute is a forward too: in training mode BatchNorm updates its "
                     "running statistics (and this counter) again"),
            Wrong(0, "forward counts one batch, and the recompute another"),
            Wrong(3, "once in forward, once in the recompute: backward itself updates nothing"),
            Wrong(4, "two blocks, but each BatchNorm counts its own: the first one runs once in "
                     "forward and once in the recompute"),
        ),
        over="one step runs the first BatchNorm twice: once in forward, once in the recompute",
        under="the recompute is a forward too: it counts a batch as forward does",
    ),
    "3b.8/sequential-share": Predict(
        what="segments=1 / none", form="number", example="0.25",
        answer=lambda: 1.0,
        wrong=(
            Wrong(0.25, "segments=1 is one segment, the last, and checkpoint_sequential runs the "
                        "last segment plainly: nothing is checkpointed"),
            Wrong(0.0, "checkpoint_sequential never checkpoints its last segment, and with one "
                       "segment that is all of it"),
            Wrong(0.5, "with segments=1 there is only the last segment, run plainly: it keeps "
                       "what no checkpointing keeps"),
            Wrong(0.75, "the last segment runs plainly, and with segments=1 it is every block"),
        ),
        under="the only segment is the last, which runs plainly: it keeps everything",
        over="a share above 1: a checkpointed run never keeps more than a plain one",
    ),
}
