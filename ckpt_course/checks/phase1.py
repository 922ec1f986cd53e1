"""Checks for phase 1, "Why activations eat your memory" (exercises/src/1_why_activations.py).

Each check draws sizes the lesson does not show (``checks.rng``), measures the right answer with
ckpt_course (a real AdamW step, the tape, the meter), calls the learner's function with plain
numbers, and raises ``CheckFailed`` with a hint that says what was missed, never the number.
"""

from __future__ import annotations

import math

import torch

from ..meter import MemoryMeter
from ..models import GPTBlock, GPTConfig, HandTraceNet, TinyGPT
from ..step import make_optimizer
from ..tape import record_tape
from ..train import measure_step
from . import (
    CheckFailed,
    Parts,
    call,
    expect,
    expect_peak_near,
    forbids,
    is_int,
    is_number,
    memory_runs,
    passed,
    rng,
)

# No answer may reach the checks' own helpers (the dial's peak, the metered runs): they give the
# answer. The probes 1.3 hands to the learner stay usable.
CHECK_RULES = ("ckpt_course.checks.phase1", "ckpt_course.checks:peak_of",
               "ckpt_course.checks:measure", "ckpt_course.checks:memory_runs",
               "ckpt_course.checks:_metered_peak", "ckpt_course.checks:_probe")

__all__ = ["CheckFailed", "training_state_bytes", "activation_ratio", "mlp_saved_bytes",
           "hand_checkpoint", "pick_n"]


# ---------------------------------------------------------------- 1.1
def _state_after_one_step(cfg: GPTConfig):
    """Parameters, gradients and AdamW state of a TinyGPT after one step, as the meter sees them;
    and the bytes of AdamW's step counters (one scalar per parameter tensor)."""
    torch.manual_seed(0)
    model = TinyGPT(cfg)
    optimizer = make_optimizer(model)
    model.loss(model.example_batch(2, generator=torch.Generator().manual_seed(0))).backward()
    optimizer.step()  # the state appears here; gradients stay (no zero_grad)
    measured = MemoryMeter().track(model, optimizer).breakdown()
    counters = sum(v.nbytes for s in optimizer.state.values() for k, v in s.items()
                   if k == "step" and isinstance(v, torch.Tensor))
    return sum(p.numel() for p in model.parameters()), measured, counters


def _small_gpt(r, **over) -> GPTConfig:
    heads = r.choice((1, 2, 4))
    return GPTConfig(**{"n_layer": r.randint(1, 3), "d_model": heads * r.choice((8, 12, 16)),
                        "n_head": heads, "seq_len": r.choice((8, 12, 16)),
                        "vocab_size": r.choice((40, 64, 96)), **over})


@forbids(*CHECK_RULES)
def training_state_bytes(fn) -> None:
    """1.1: ``fn(n_params)`` -> {"parameters", "gradients", "optimizer state"} in bytes, for an
    fp32 model trained with AdamW (AdamW's 4-byte step counters left out)."""
    r = rng("1.1-state")
    for _ in range(2):
        n, measured, counters = _state_after_one_step(_small_gpt(r))
        got = call(fn, n, name="training_state_bytes")
        expect(isinstance(got, dict), f"training_state_bytes({n}) returned "
               f"{type(got).__name__}; return a dict with the keys 'parameters', "
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


@forbids(*CHECK_RULES)
def activation_ratio(fn) -> None:
    """1.1: ``fn(batch_factor, seq_factor)`` -> how many times the activation bytes (saved by
    forward) of an SDPA GPT grow when batch and sequence length grow by those factors."""
    r = rng("1.1-scaling")
    torch.manual_seed(0)
    model = TinyGPT(_small_gpt(r, n_layer=2, seq_len=64))
    b, t = 2, 4

    def saved(batch_size, seq_len):
        return measure_step(model, "none", batch_size=batch_size, seq_len=seq_len).saved_bytes

    base = saved(b, t)
    cases = [(r.randint(2, 4), 1), (1, r.randint(2, 4)), (r.randint(2, 3), r.randint(2, 4))]
    for fb, ft in cases:
        measured = saved(b * fb, t * ft) / base
        got = call(fn, fb, ft, name="activation_ratio")
        expect(is_number(got), f"activation_ratio({fb}, {ft}) returned {got!r}: return a number")
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


@forbids(*CHECK_RULES)
def mlp_saved_bytes(fn) -> None:
    """1.2: ``fn(batch, seq, d_model)`` -> bytes the MLP of one GPT block (fp32, no dropout)
    keeps for backward: activations only, parameters excluded."""
    r = rng("1.2-mlp")
    for _ in range(3):
        b, t, d = r.randint(1, 5), r.randint(3, 12), 2 * r.randint(4, 20)
        torch.manual_seed(0)
        block = GPTBlock(GPTConfig(d_model=d, n_head=2, seq_len=t))
        rows = _mlp_rows(record_tape(block, torch.randn(b, t, d)))
        acts = [e for e in rows if not e.is_param]
        measured = sum(e.nbytes for e in acts)
        got = call(fn, b, t, d, name="mlp_saved_bytes")
        expect(is_int(got), f"mlp_saved_bytes({b}, {t}, {d}) returned {got!r}: return bytes as "
               "an int")
        if got == measured:
            continue
        missed = [e for e in acts if got == measured - e.nbytes]
        extra_params = sum(e.nbytes for e in rows if e.is_param)
        if missed:
            e = missed[0]
            hint = (f"you left out one tensor: {e.label} of module {e.module}. Read the tape: "
                    "record_tape(block, x)")
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


# ---------------------------------------------------------------- 1.3 checkpointing by hand
def _small_spec(r) -> dict:
    return {"seed": r.randrange(10**6), "batch": r.randint(5, 40), "width": r.randint(3, 12),
            "hidden": r.randint(6, 24), "blocks": r.randint(2, 4),
            "dropout": r.choice((0.2, 0.35, 0.5))}


def _peak_spec(r) -> dict:
    """The memory run's blocks, drawn from the run's seed (so an answer cannot tell the memory
    run by its size): the blocks' tapes (about 26 MiB a block at batch 2**18, width 16) dwarf
    what a checkpoint keeps (one input a block): the plain run peaks about 240 MB above."""
    return {"seed": r.randrange(10**6), "batch": r.randint(200_000, 300_000),
            "width": r.choice((14, 16, 18)), "hidden": r.choice((14, 16, 18)),
            "blocks": r.randint(5, 7), "dropout": r.choice((0.2, 0.35))}


def _same(got, want) -> bool:
    return (isinstance(got, torch.Tensor) and got.shape == want.shape
            and got.dtype == want.dtype and torch.equal(got, want))


@forbids("torch.utils.checkpoint", *CHECK_RULES)
def hand_checkpoint(run_with_my_checkpoint) -> float | None:
    """1.3: ``run_with_my_checkpoint(spec)`` (the exercise's setup cell runs the learner's
    ``MyCheckpoint`` on the blocks of ``probes.mlp_blocks(spec)``) must give bit-identical
    results to ``torch.utils.checkpoint`` under dropout, leave the random stream as it found
    it, and peak as low as ``torch.utils.checkpoint`` does. Partial credit: 3 parts."""
    from . import references

    r = rng("1.3-by-hand")
    # Memory first, and as a gate: a plain forward (no checkpoint at all) gives the right output,
    # gradients and random stream, so those points count only for an answer that keeps less.
    runs = memory_runs(run_with_my_checkpoint, _peak_spec(r), "torch_checkpoint", "plain")
    expect_peak_near(
        runs,
        "your checkpoint peaks about as high as no checkpointing: forward keeps more than "
        "the block's input (no points for output, gradients or the random stream until it "
        "does). Run the block under torch.no_grad() in forward and save only the input "
        "(ctx.save_for_backward(x)); rebuild the rest in backward")
    parts = Parts()
    parts.passed.append("memory")
    specs = [_small_spec(r) for _ in range(2)]
    results = [(spec, call(run_with_my_checkpoint, spec, name="run_with_my_checkpoint"))
               for spec in specs]
    with parts("gradients"):
        for spec, got in results:
            want = references.torch_checkpoint(spec)
            expect(isinstance(got, dict) and _same(got.get("out"), want["out"]),
                   "the output differs from the block's own forward: forward should just run "
                   "the block (without building a graph) and return its output")
            grads = got.get("grads")
            ok = (_same(got.get("x_grad"), want["x_grad"]) and isinstance(grads, list)
                  and len(grads) == len(want["grads"])
                  and all(_same(g, w) for g, w in zip(grads, want["grads"], strict=True)))
            expect(ok, "the gradients are not bit-identical to torch.utils.checkpoint's under "
                   "dropout. Does backward rerun the block with the random state forward had "
                   "(torch.get_rng_state() saved in forward, set again before the rerun)? Does it "
                   "return the gradient of the input, and accumulate the parameters' gradients?")
    with parts("the random stream"):
        for spec, got in results:
            want = references.torch_checkpoint(spec)
            expect(_same(got.get("rng_after"), want["rng_after"]),
                   "after backward, the random numbers drawn next differ from a plain run's: "
                   "setting the saved RNG state for the rerun moved the global generator. Rerun "
                   "inside torch.random.fork_rng() so the stream is put back afterwards")
    score = parts.score()
    if score is None:
        passed("your checkpoint keeps only the input, reruns forward with the same dropout "
               "masks, and gives torch.utils.checkpoint's gradients to the bit")
    return score


# ---------------------------------------------------------------- 1.4
def _dial_peak(n_layers: int, n: int) -> int:
    """every-N on the chain, in activations: segment inputs kept + one segment rebuilt."""
    return math.ceil(n_layers / n) + n


@forbids(*CHECK_RULES)
def pick_n(fn) -> None:
    """1.4: ``fn(n_layers, activation_bytes, budget)`` -> the largest N for ``every-N`` whose
    peak (segment inputs + one segment rebuilt, in activations) fits ``budget`` bytes, on a
    chain of Linear+ReLU layers; the check runs it and measures the peak."""
    r = rng("1.4-pick-n")
    width = 32
    for _ in range(4):
        n_layers, batch_size = r.randint(7, 20), r.choice((512, 768, 1024))
        act = width * batch_size * 4
        lowest = min(_dial_peak(n_layers, n) for n in range(1, n_layers + 1))
        k = r.choice((lowest, lowest + 1, lowest + r.randint(2, 5)))  # budgets right at a peak
        budget = k * act
        want = max(n for n in range(1, n_layers + 1) if _dial_peak(n_layers, n) <= k)
        got = call(fn, n_layers, act, budget, name="pick_n")
        expect(is_int(got) and 1 <= got <= n_layers,
               f"pick_n({n_layers}, ...) returned {got!r}: return a whole number of layers per "
               f"segment, from 1 to {n_layers}")
        model = HandTraceNet(width=width, depth=n_layers)
        batch = model.example_batch(batch_size, generator=torch.Generator().manual_seed(0))
        step = measure_step(model, f"every-{got}", batch=batch,
                            loss_fn=lambda b, m=model: m(b[0]).sum())
        weight_grads = sum(p.numel() * 4 for p in model.parameters())
        expect(step.peak_above_baseline <= budget + weight_grads,
               f"pick_n({n_layers}, ...) = {got}: every-{got} went over the budget. Forward keeps "
               "about ceil(L/N) segment inputs, and backward rebuilds N layers at once on top "
               "of them")
        expect(got == want,
               f"pick_n({n_layers}, ...) = {got} fits, but a larger N fits too: the question asks "
               "for the largest. Does your answer depend on the budget at all? And a peak equal "
               "to the budget fits (<=, not <)")
    passed("the dial turned as far as each budget allows")
