"""Checks for phase 2, hand-trace a checkpointed net (``exercises/src/2_hand_trace.py``).

Each check calls the learner's function on a few net sizes (so a number typed in for one size
does not pass), measures the same thing with the tape, the meter or the recompute counter, and
compares exactly. The net is ``HandTraceNet``: ``depth`` x (Linear(width) -> ReLU), fp32, input
``batch x width``; the loss is ``net(x).sum()`` (``ckpt_course.trace`` says why).
"""

from __future__ import annotations

import functools

from ..tape import record_tape
from ..trace import hand_input, hand_trace_net, recompute_by_op, sum_loss, trace_step
from . import Parts, call, expect, forbids, is_int, passed, rng

# Predict by reasoning: an answer may not measure. Forbidden: every module of the package that
# measures saved or peak bytes, or computes an answer (the tape, the step trace, the meter, the
# recompute counter, the pitfalls' saved_for_backward, the op ranking, the sharding's saved-bytes
# hook, the estimates on fake tensors, the per-block costs and the forward they record, the HF
# tools, the sweeps, the step runner and the checks' own helpers). What an answer may use is
# plain Python, torch and the models it builds.
PREDICT_RULES = ("ckpt_course.tape", "ckpt_course.trace", "ckpt_course.meter",
                 "ckpt_course.recompute", "ckpt_course.checks", "ckpt_course.pitfalls",
                 "ckpt_course.ranking", "ckpt_course.compare", "ckpt_course.sharding",
                 "ckpt_course.estimate", "ckpt_course.costs", "ckpt_course.recording",
                 "ckpt_course.hf", "ckpt_course.sweeps", "ckpt_course.train",
                 "ckpt_course.step", "ckpt_course.timing", "ckpt_course.plan",
                 "ckpt_course.auto", "ckpt_course.doctor", "ckpt_course.memviz")

FLOAT32 = 4  # bytes



# Measurements are exact and deterministic, so each is taken once per session and reused.
@functools.cache
def _tape(batch: int, width: int, depth: int):
    net = hand_trace_net(depth=depth, width=width)
    return record_tape(sum_loss(net), (hand_input(net, batch),), model=net)


@functools.cache
def _trace(policy: str, batch: int, width: int, depth: int, free_grads: bool = False):
    return trace_step(hand_trace_net(depth=depth, width=width), policy, batch_size=batch,
                      free_grads=free_grads)


@functools.cache
def _recompute(policy: str, relu_first: bool, batch: int, width: int, depth: int):
    net = hand_trace_net(depth=depth, width=width, relu_first=relu_first)
    return recompute_by_op(net, policy, batch)



# ---------------------------------------------------------------- 2.1 the tape
def _sizes(salt: str, n: int = 3) -> list[tuple[int, int, int]]:
    """``n`` random (batch, width, depth), batch != width (so an activation and a weight differ
    in size, unlike the lesson's 512 x 512 x 4), one depth odd and one even at least."""
    r = rng(salt)
    out = []
    for k in range(n):
        width = r.randrange(8, 72, 8)
        batch = r.choice([b for b in range(4, 96, 4) if b != width])
        out.append((batch, width, r.choice((3, 5, 7) if k % 2 else (2, 4, 6))))
    return out


@forbids(*PREDICT_RULES)
def check_tape(predict_tape) -> None:
    """2.1: ``predict_tape(batch, width, depth)`` -> ``{"activations": bytes, "parameters":
    bytes, "saved_twice": count}``, compared with ``record_tape`` of ``net(x).sum()``."""
    for batch, width, depth in _sizes("2.1-tape"):
        got = call(predict_tape, batch, width, depth, name="predict_tape")
        where = f"for batch={batch}, width={width}, depth={depth}"
        expect(isinstance(got, dict) and set(got) == {"activations", "parameters", "saved_twice"},
               'return a dict with the keys "activations", "parameters" and "saved_twice"')
        tape = _tape(batch, width, depth)
        twice = sum(e.times_saved == 2 for e in tape.entries)
        expect(got["activations"] == tape.activation_bytes,
               f"activations {where}: count the storages that are not parameters. Each layer's "
               "addmm keeps its input (the weight gradient needs it), each ReLU keeps its output; "
               "a tensor kept by two nodes is one storage. Is the input x on the tape, though it "
               "needs no gradient? Every tensor is batch x width float32.")
        expect(got["parameters"] == tape.param_bytes,
               f"parameters {where}: an addmm keeps weight.t() only to compute the gradient of "
               "its input. Which layer's input needs no gradient? (Biases are not kept at all.)")
        expect(got["saved_twice"] == twice,
               f"saved_twice {where}: a ReLU output is saved by its ReluBackward0 (as result) "
               "and by the next layer's addmm (as mat1). Does the last ReLU have a next addmm?")
    passed("the tape: inputs and ReLU outputs as activations, the weights that backward needs "
           "for an input gradient, and the ReLU outputs that two nodes share")


# ---------------------------------------------------------------- 2.2 every-2 saved set

@forbids(*PREDICT_RULES)
def check_every2_saved(every2_saved_bytes) -> None:
    """2.2: ``every2_saved_bytes(batch, width, depth)`` -> bytes forward leaves alive under
    every-2, above parameters + x, compared with the meter."""
    for batch, width, depth in _sizes("2.2-every2", 4):
        got = call(every2_saved_bytes, batch, width, depth, name="every2_saved_bytes")
        expect(is_int(got), "return a whole number of bytes (an int)")
        measured = _trace("every-2", batch, width, depth).saved_bytes
        activation = batch * width * FLOAT32
        where = f"for batch={batch}, width={width}, depth={depth}"
        if got != measured and (measured - got) % activation == 0:
            hint = (f"{where} you are off by whole activations. Every-2 cuts the layers into "
                    "segments of 2 and keeps only each segment's input; the first segment's input "
                    "is x, which is in the baseline. How many segments does an odd depth make?")
        elif got != measured and abs(measured - got) < activation:
            hint = (f"{where} you are a few bytes off: what else did forward leave alive? "
                    "Think of what the forward returned.")
        else:
            hint = (f"{where}: count the tensors every-2 keeps (one input per segment, x "
                    "excluded) times batch x width x 4 bytes, plus the loss scalar.")
        expect(got == measured, hint)
    passed("every-2 keeps one input per segment of two layers, and the 4-byte loss")


# ---------------------------------------------------------------- 2.3 recompute by op
def _recompute_cases():
    """Both policies and block orders, at depths 3 to 7 (odd ones end in a short segment)."""
    r = rng("2.3-recompute")
    return [(policy, relu_first, r.choice((16, 32, 48)), r.choice((8, 24, 40)), r.randint(3, 7))
            for policy in ("full", "every-2") for relu_first in (False, True)
            for _ in range(2)]


@forbids(*PREDICT_RULES)
def check_recompute(predict_recompute) -> None:
    """2.3: ``predict_recompute(policy, relu_first, batch, width, depth)`` -> ``{"ops": {op
    name: count}, "flops": n}``, compared with ``measure_recompute``."""
    for policy, relu_first, batch, width, depth in _recompute_cases():
        got = call(predict_recompute, policy, relu_first, batch, width, depth,
                   name="predict_recompute")
        expect(isinstance(got, dict) and set(got) == {"ops", "flops"},
               'return a dict with the keys "ops" (op name -> count) and "flops"')
        measured = _recompute(policy, relu_first, batch, width, depth)
        block = "ReLU -> Linear" if relu_first else "Linear -> ReLU"
        where = f"under {policy} with {depth} {block} blocks, batch={batch}, width={width}"
        ops = {op: n for op, n in dict(got["ops"]).items() if n}
        missing = sorted(set(measured["ops"]) - set(ops))
        extra = sorted(set(ops) - set(measured["ops"]))
        expect(not missing, f"{where}: backward also re-runs {', '.join(missing)}. A Linear is "
               "two aten ops: which view does it take of its weight?")
        expect(not extra, f"{where}: backward does not re-run {', '.join(extra)}. Torch stops "
               "the re-run once every tensor backward needs from the region is rebuilt: "
               "which op's output does nothing in the region save?")
        wrong = sorted(op for op in ops if ops[op] != measured["ops"][op])
        expect(not wrong, f"{where}: the count of {', '.join(wrong)} is off. Walk each "
               "checkpointed region: which of its ops' outputs (or the ops they depend on) does "
               "backward need?")
        expect(got["flops"] == measured["flops"],
               f"{where}: the ops are right but the FLOPs are not. Each re-run addmm of a "
               "batch x width input with a width x width weight costs 2 x batch x width x width; "
               "relu and t count 0.")
    passed("recompute counted by op: full re-runs one whole forward of Linear -> ReLU blocks, "
           "but no matmul at all of ReLU -> Linear blocks, where every-2 re-runs two")


# ---------------------------------------------------------------- 2.4 the peak's moment
def _peak_cases():
    """(free_grads, batch, width, depth) in the three regimes of an activation A = batch x width
    against a weight gradient W = width x width: batch < width / 2 (W > 2A), width / 2 < batch <
    width, batch > width; each with gradients kept and freed."""
    r = rng("2.4-peak")
    cases = []
    for free_grads in (False, True):
        for regime in ("W > 2A", "A < W < 2A", "A > W"):
            width = r.randrange(16, 80, 8)
            batch = {"W > 2A": r.randint(2, width // 2 - 1),
                     "A < W < 2A": r.randint(width // 2 + 1, width - 1),
                     "A > W": r.randint(width + 1, 2 * width)}[regime]
            cases.append((free_grads, batch, width, r.randint(3, 7)))
    return cases


@forbids(*PREDICT_RULES)
def check_peak_moment(predict_peak) -> float | None:
    """2.4: ``predict_peak(free_grads, batch, width, depth)`` -> ``{"layer": k, "bytes": n}``:
    the layer whose backward first reaches the step's peak under ``none``, and the peak (above
    parameters + x), compared with ``trace_step``. Partial credit: the layer, the bytes."""
    parts = Parts()
    results = []
    for free_grads, batch, width, depth in _peak_cases():
        got = call(predict_peak, free_grads, batch, width, depth, name="predict_peak")
        expect(isinstance(got, dict) and set(got) == {"layer", "bytes"},
               'return a dict {"layer": k, "bytes": n}')
        results.append((got, _trace("none", batch, width, depth, free_grads), free_grads,
                        batch * width * FLOAT32,
                        f"batch={batch}, width={width}, depth={depth}, gradients "
                        + ("freed as they arrive" if free_grads else "kept")))
    with parts("the layer"):
        for got, t, _, _, where in results:
            expect(got["layer"] == t.peak_layer,
                   f"{where}: the layer is wrong. Write each backward moment as activations "
                   "(batch x width) plus weight gradients (width x width): at layer k's ReLU "
                   "backward and at its addmm backward, what is alive? Which moment is highest "
                   "depends on which of the two sizes is larger; on a tie the first one counts "
                   "(backward visits the last layer first), and layer 1's addmm makes no "
                   "gradient for x.")
    with parts("the bytes"):
        for got, t, free_grads, activation, where in results:
            off = got["bytes"] - t.peak_bytes if is_int(got["bytes"]) else None
            expect(off == 0,
                   f"{where}: the peak's bytes are off"
                   + (": return an int" if off is None else
                      ", by less than one activation: the crumbs. The loss and its seed gradient "
                      "(4 bytes each), and each weight gradient's bias gradient (width x 4)"
                      if abs(off) < activation else
                      ". Count the tensors alive at the peak's moment: the activations still "
                      "needed, the gradient in, the gradients out, and the weight gradients "
                      + ("of this layer only (the others are freed)" if free_grads else
                         "of every layer above, kept for the optimizer")))
    score = parts.score()
    if score is None:
        passed("the peak's moment and height: where the gradients pile up when weights are "
               "large, at the start of backward when activations are, or when gradients are "
               "freed")
    return score


# ---------------------------------------------------------------- 2.5 the full table
POLICIES = ("none", "full", "every-2")


@forbids(*PREDICT_RULES)
def check_policy_table(predict_table) -> None:
    """2.5: ``predict_table(width, depth)`` -> ``{policy: {"saved": bytes, "peak": bytes}}`` for
    none, full and every-2, batch = width, above parameters + x, compared with ``trace_step``."""
    r = rng("2.5-table")
    for depth in (r.choice((3, 5, 7)), r.choice((2, 4, 6, 8))):
        width = r.randrange(8, 72, 8)
        got = call(predict_table, width, depth, name="predict_table")
        expect(isinstance(got, dict) and set(got) == set(POLICIES),
               f"return a dict with one entry per policy: {', '.join(POLICIES)}")
        for policy in POLICIES:
            entry = got[policy]
            expect(isinstance(entry, dict) and set(entry) == {"saved", "peak"},
                   f'{policy}: give a dict {{"saved": bytes, "peak": bytes}}')
            t = _trace(policy, width, width, depth)
            where = f"{policy} with width = batch = {width}, depth {depth}"
            activation = width * width * FLOAT32
            expect(entry["saved"] == t.saved_bytes,
                   f"saved after forward, {where}: "
                   + ("a few bytes off: the loss scalar is alive too."
                      if abs(entry["saved"] - t.saved_bytes) < activation else
                      "each checkpointed segment keeps only its input (x is in the baseline); "
                      "no policy keeps a layer's output twice."))
            off = entry["peak"] - t.peak_bytes
            expect(off == 0,
                   f"peak, {where}: "
                   + ("right in whole activations; the crumbs are off: the loss scalar and the "
                      "gradient backward starts from (4 bytes each), and the bias gradients "
                      "(width x 4 bytes each) alive at the peak."
                      if abs(off) < activation else
                      "walk backward layer by layer: live = activations still needed + gradient "
                      "in + gradient out + this weight's gradient + the weight gradients "
                      "already made. Which layer's moment is highest?"))
    passed("saved set and peak, to the byte, for three policies: checkpointing shrinks the saved "
           "set, while the peak sits where the gradients pile up")

