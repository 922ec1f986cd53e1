"""Checks for phase 1, "Why activations eat your memory" (exercises/src/1_why_activations.py).

Each check measures the right answer here and now with ckpt_course (a real AdamW step, the tape,
a meter), calls the learner's function on the same sizes, and raises ``CheckFailed`` with a hint
that says what was expected in words and which tape entry was missed, never the number.
Sizes are tiny: every check runs in well under a second on a laptop CPU.
"""

from __future__ import annotations

import torch

from ..meter import MemoryMeter
from ..models import GPTBlock, GPTConfig, HandTraceNet, TinyGPT
from ..sweeps import CheckpointBlocks
from ..tape import record_tape
from ..train import measure_step
from . import CheckFailed, expect, passed

__all__ = ["CheckFailed", "training_state_bytes", "activation_ratio", "mlp_saved_bytes",
           "checkpoint_saving", "pick_n"]

SMALL = dict(d_model=32, n_head=2, seq_len=32, vocab_size=64)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# ---------------------------------------------------------------- 1.1
def _state_after_one_step(cfg: GPTConfig):
    """Parameters, gradients and AdamW state of a TinyGPT after one step, as the meter sees them;
    and the bytes of AdamW's step counters (one scalar per parameter tensor)."""
    torch.manual_seed(0)
    model = TinyGPT(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.loss(model.example_batch(2, generator=torch.Generator().manual_seed(0))).backward()
    optimizer.step()  # the state appears here; gradients stay (no zero_grad)
    measured = MemoryMeter().track(model, optimizer).breakdown()
    counters = sum(v.nbytes for s in optimizer.state.values() for k, v in s.items()
                   if k == "step" and isinstance(v, torch.Tensor))
    return sum(p.numel() for p in model.parameters()), measured, counters


def training_state_bytes(fn) -> None:
    """1.1: ``fn(n_params)`` -> {"parameters", "gradients", "optimizer state"} in bytes, for an
    fp32 model trained with AdamW (AdamW's 4-byte step counters left out)."""
    for cfg in (GPTConfig(n_layer=1, **SMALL), GPTConfig(n_layer=3, **SMALL)):
        n, measured, counters = _state_after_one_step(cfg)
        got = fn(n)
        expect(isinstance(got, dict), f"training_state_bytes({n}) returned "
               f"{type(got).__name__} {got!r}; return a dict with the keys 'parameters', "
               "'gradients' and 'optimizer state'")
        missing = [k for k in ("parameters", "gradients", "optimizer state") if k not in got]
        expect(not missing, f"the dict lacks {missing}")
        expect(got["parameters"] == measured["parameters"],
               f"parameters of a {n:,}-parameter fp32 model: count the bytes of one float32, "
               "and do not mix up bytes and elements")
        expect(got["gradients"] == measured["gradients"],
               "gradients: backward leaves one gradient per parameter in param.grad, the same "
               "shape and dtype as the parameter itself")
        expect(got["optimizer state"] == measured["optimizer state"] - counters,
               "optimizer state: AdamW keeps two running averages per parameter (exp_avg and "
               "exp_avg_sq in optimizer.state), each as large as the parameter; the 4-byte step "
               "counters it also keeps, one per tensor, are left out here")
    passed("weights are the smallest of the three: gradients match them, AdamW doubles them")


def activation_ratio(fn) -> None:
    """1.1: ``fn(batch_factor, seq_factor)`` -> how many times the activation bytes (saved by
    forward) of an SDPA GPT grow when batch and sequence length grow by those factors."""
    torch.manual_seed(0)
    model = TinyGPT(GPTConfig(n_layer=2, **SMALL))
    b, t = 2, 8

    def saved(batch_size, seq_len):
        return measure_step(model, "none", batch_size=batch_size, seq_len=seq_len).saved_bytes

    base = saved(b, t)
    for fb, ft in ((2, 1), (1, 2), (2, 4), (3, 2)):
        measured = saved(b * fb, t * ft) / base
        got = fn(fb, ft)
        expect(isinstance(got, (int, float)) and not isinstance(got, bool),
               f"activation_ratio({fb}, {ft}) returned {got!r}: return a number")
        which = "batch" if ft == 1 else "sequence" if fb == 1 else "batch and sequence"
        expect(abs(got - measured) <= 0.02 * measured,
               f"activation_ratio({fb}, {ft}): growing the {which} changed the measured "
               "activations differently. Every tensor on the tape has a batch dimension and a "
               "sequence dimension; is there one with two sequence dimensions? (scaled_dot_"
               "product_attention keeps q, k, v, its output and a logsumexp, no T x T matrix)")
    passed("activations grow with batch x sequence, weights do not")


# ---------------------------------------------------------------- 1.2
def _mlp_rows(tape):
    return [e for e in tape.entries if e.module.split(".")[0] == "mlp"]


def mlp_saved_bytes(fn) -> None:
    """1.2: ``fn(batch, seq, d_model)`` -> bytes the MLP of one GPT block (fp32, no dropout)
    keeps for backward: activations only, parameters excluded."""
    for b, t, d in ((2, 8, 16), (3, 5, 32)):
        torch.manual_seed(0)
        block = GPTBlock(GPTConfig(d_model=d, n_head=2, seq_len=t))
        rows = _mlp_rows(record_tape(block, torch.randn(b, t, d)))
        acts = [e for e in rows if not e.is_param]
        measured = sum(e.nbytes for e in acts)
        got = fn(b, t, d)
        expect(_is_int(got), f"mlp_saved_bytes({b}, {t}, {d}) returned {got!r}: return bytes as "
               "an int")
        if got == measured:
            continue
        missed = [e for e in acts if got == measured - e.nbytes]
        extra_params = sum(e.nbytes for e in rows if e.is_param)
        if missed:
            e = missed[0]
            hint = (f"you left out one tensor: {e.label} of module {e.module} (shape "
                    f"{'x'.join(map(str, e.shape))}). Read the tape: record_tape(block, x)")
        elif got == measured + extra_params:
            hint = ("you counted the weights (AddmmBackward0.mat2 rows): they are parameters, "
                    "which exist anyway; the question is about activations only")
        elif got * 4 == measured:
            hint = "that is a count of elements; a float32 element is 4 bytes"
        else:
            hint = ("the MLP is Linear(d, 4d) -> GELU -> Linear(4d, d): each Linear keeps its "
                    "input, GELU keeps its input. Read the rows of mlp.0, mlp.1 and mlp.2 in "
                    "record_tape(block, x)")
        raise CheckFailed(f"mlp_saved_bytes({b}, {t}, {d}): {hint}")
    passed("the MLP's tape, read off by hand")


# ---------------------------------------------------------------- 1.3
def checkpoint_saving(fn) -> None:
    """1.3: ``fn(tape, block, input_bytes)`` -> how many fewer bytes forward leaves for backward
    when only ``block`` (e.g. "blocks.1") runs under ``torch.utils.checkpoint``."""
    torch.manual_seed(0)
    model = TinyGPT(GPTConfig(n_layer=3, dropout=0.1, **SMALL))
    b, t = 2, 16
    batch = model.example_batch(b, t, generator=torch.Generator().manual_seed(0))
    tape = record_tape(model.loss, batch, model=model)
    plain = measure_step(model, "none", batch=batch).saved_bytes
    input_bytes = b * t * SMALL["d_model"] * 4
    for i in (1, 0, 2):
        block = f"blocks.{i}"
        measured = plain - measure_step(model, CheckpointBlocks((i,)), batch=batch).saved_bytes
        got = fn(tape, block, input_bytes)
        expect(_is_int(got), f"checkpoint_saving(tape, {block!r}, ...) returned {got!r}: "
               "return bytes as an int")
        if got == measured:
            continue
        if got == tape.by_module()[block]:
            hint = ("the checkpoint cannot forget everything: it keeps the block's input, "
                    "to run the block again in backward")
        elif got == tape.activation_bytes - input_bytes:
            hint = "only the checkpointed block forgets its rows; the other blocks keep theirs"
        else:
            hint = ("what the block's rows of the tape hold (tape.by_module() sums them per "
                    "block), less what the checkpoint keeps to run the block again")
        raise CheckFailed(f"checkpoint_saving(tape, {block!r}, input_bytes): {hint}")
    passed("checkpointing one block forgets exactly its tape, less its input")


# ---------------------------------------------------------------- 1.4
PICK_N_CASES = ((9, 6.5), (16, 8.5), (12, 7.5))  # (layers, budget in activations)


def pick_n(fn) -> None:
    """1.4: ``fn(n_layers, activation_bytes, budget)`` -> a segment size N for ``every-N`` whose
    peak above parameters and batch fits ``budget`` bytes, on a chain of Linear+ReLU layers."""
    width, batch_size = 32, 2048
    act = width * batch_size * 4
    for n_layers, budget_acts in PICK_N_CASES:
        budget = int(budget_acts * act)
        model = HandTraceNet(width=width, depth=n_layers)
        batch = model.example_batch(batch_size, generator=torch.Generator().manual_seed(0))
        n = fn(n_layers, act, budget)
        expect(_is_int(n) and 1 <= n <= n_layers,
               f"pick_n({n_layers}, ...) returned {n!r}: return a whole number of layers per "
               f"segment, from 1 to {n_layers}")
        step = measure_step(model, f"every-{n}", batch=batch,
                            loss_fn=lambda b, m=model: m(b[0]).sum())
        expect(step.peak_above_baseline <= budget,
               f"pick_n({n_layers}, ...) = {n}: every-{n} went over the budget. Forward keeps "
               f"about ceil(L/N) segment inputs, and backward rebuilds N layers at once on top "
               "of them: the peak is lowest where the two balance")
    passed("the dial turned to the bottom of the U for each depth")

