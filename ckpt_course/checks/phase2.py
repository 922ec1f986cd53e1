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
from . import CheckFailed, expect, passed, rng

FLOAT32 = 4  # bytes


def _call(fn, *args):
    """The learner's answer for these arguments, with a readable error if it breaks."""
    try:
        return fn(*args)
    except NotImplementedError:
        raise
    except Exception as e:  # noqa: BLE001 - the learner's code may raise anything
        raise CheckFailed(f"your function raised {type(e).__name__}: {e} "
                             f"when called with {args}") from e


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


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ---------------------------------------------------------------- 2.1 the tape
TAPE_SIZES = [(512, 512, 4), (64, 32, 3), (16, 8, 6)]


def check_tape(predict_tape) -> None:
    """2.1: ``predict_tape(batch, width, depth)`` -> ``{"activations": bytes, "parameters":
    bytes, "saved_twice": count}``, compared with ``record_tape`` of ``net(x).sum()``."""
    for batch, width, depth in TAPE_SIZES:
        got = _call(predict_tape, batch, width, depth)
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
EVERY2_SIZES = [(512, 512, 4), (64, 32, 5), (64, 32, 6)]


def check_every2_saved(every2_saved_bytes) -> None:
    """2.2: ``every2_saved_bytes(batch, width, depth)`` -> bytes forward leaves alive under
    every-2, above parameters + x, compared with the meter."""
    for batch, width, depth in EVERY2_SIZES:
        got = _call(every2_saved_bytes, batch, width, depth)
        expect(_is_int(got), "return a whole number of bytes (an int)")
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


def check_recompute(predict_recompute) -> None:
    """2.3: ``predict_recompute(policy, relu_first, batch, width, depth)`` -> ``{"ops": {op
    name: count}, "flops": n}``, compared with ``measure_recompute``."""
    for policy, relu_first, batch, width, depth in _recompute_cases():
        got = _call(predict_recompute, policy, relu_first, batch, width, depth)
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
PEAK_CASES = [("none", False), ("every-2", False), ("none", True), ("every-2", True)]


def check_peak_moment(peak_moment) -> None:
    """2.4: ``peak_moment(policy, free_grads)`` -> ``(phase, layer)`` of the step's peak on the
    4-layer net (the first moment it is reached), compared with ``trace_step``."""
    for policy, free_grads in PEAK_CASES:
        got = _call(peak_moment, policy, free_grads)
        expect(isinstance(got, tuple) and len(got) == 2,
               'return a tuple (phase, layer), e.g. ("forward", 3)')
        phase, layer = got
        t = _trace(policy, 512, 512, 4, free_grads)
        grads = ("gradients freed as they arrive" if free_grads
                 else "gradients kept for the optimizer")
        where = f"under {policy} with {grads}"
        expect(phase == t.peak_phase,
               f"{where}: the phase is wrong. Forward ends holding the saved set: which phase "
               "adds tensors of its own on top of it before freeing any?")
        expect(layer == t.peak_layer,
               f"{where}: the layer is wrong (layers count 1..4, backward visits 4 first). "
               + ("Each layer's backward frees one activation and adds one weight gradient of "
                  "the same size, so the MiB tie: the 2 KiB bias gradients decide. Where have "
                  "the most of them piled up?" if not free_grads else
                  "With gradients dropped at once nothing piles up: when are the most saved "
                  "activations still alive?"))
    passed("the peak is a backward moment: where gradients pile up, or, once they are freed, "
           "at the start of backward where the activations are")


# ---------------------------------------------------------------- 2.5 the full table
TABLE_SIZES = [(512, 4), (64, 6), (32, 5)]
POLICIES = ("none", "full", "every-2")


def check_policy_table(predict_table) -> None:
    """2.5: ``predict_table(width, depth)`` -> ``{policy: {"saved": bytes, "peak": bytes}}`` for
    none, full and every-2, batch = width, above parameters + x, compared with ``trace_step``."""
    for width, depth in TABLE_SIZES:
        got = _call(predict_table, width, depth)
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

