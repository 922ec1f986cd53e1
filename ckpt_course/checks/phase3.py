"""Checks for phase 3, "Choosing the right policy" (exercises/src/3_choosing_a_policy.py).

Each check measures the right answer here and now with ckpt_course (recompute FLOPs counted while
backward runs, tapes and meters on real or fake tensors), calls the learner's function on the same
sizes, and raises ``CheckFailed`` with a hint that says what was expected in words and which op
was missed, never the number. No check reads a clock.
"""

from __future__ import annotations

import functools

import torch

from ..compare import rank_ops
from ..estimate import layer_activation_bytes, model_memory
from ..models import GPTConfig, TinyGPT, llama_config
from ..recompute import measure_recompute
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
    learner_policy,
    memory_runs,
    passed,
    rng,
)

# No answer may reach the checks' own helpers (the metered runs, the per-block tape): they give
# the answer. The probes 3.2 hands to the learner stay usable.
CHECK_RULES = ("ckpt_course.checks.phase3", "ckpt_course.checks:peak_of",
               "ckpt_course.checks:measure", "ckpt_course.checks:memory_runs",
               "ckpt_course.checks:_metered_peak", "ckpt_course.checks:_probe")

__all__ = ["CheckFailed", "offload", "per_gpu", "attention_extra", "ops_to_save",
           "policy_for_budget", "BUDGET_CANDIDATES"]


# ---------------------------------------------------------------- 3.2 offload by hand
def _peak_spec(r) -> dict:
    """The memory run's chain, drawn from the run's seed (an answer cannot tell it by its size):
    its saved activations (16 MiB each at batch 2**18, width 16, about 17 of them) dwarf what an
    offloading run keeps in memory at once: about 250 MB between the two peaks."""
    return {"seed": r.randrange(10**6), "batch": r.randint(200_000, 300_000),
            "width": r.choice((14, 16, 18)), "blocks": r.randint(14, 18)}


def _same(got, want) -> bool:
    return (isinstance(got, torch.Tensor) and got.shape == want.shape
            and got.dtype == want.dtype and torch.equal(got, want))


@forbids("torch.autograd.graph:save_on_cpu", "ckpt_course.policies:HostStore.hooks",
         "ckpt_course.policies:HostStore.pack", "ckpt_course.policies:HostStore.unpack",
         "ckpt_course.policies:Offload.region", *CHECK_RULES)
def offload(run_with_my_offload) -> float | None:
    """3.2: ``run_with_my_offload(spec)`` (the setup cell runs the learner's pack/unpack hooks on
    ``probes.relu_chain(spec)`` with a ``probes.Host``) must give bit-identical gradients, move
    the bytes the reference moves (parameters stay, a tensor saved twice goes once: counted by
    the grader, never read from the run's own counters), and peak as low as the reference, with
    the reference's gradients in that memory run too. Partial credit: 3 parts."""
    from . import probes

    r = rng("3.2-offload")
    parts = Parts()
    specs = [{"seed": r.randrange(10**6), "batch": r.randint(4, 40), "width": r.randint(3, 12),
              "blocks": r.randint(2, 5)} for _ in range(2)]
    results = [(spec, call(run_with_my_offload, spec, name="run_with_my_offload"))
               for spec in specs]
    expect(all(isinstance(got, dict) for _, got in results),
           "run_with_my_offload should return the setup cell's dict: run it unchanged")
    with parts("gradients"):
        for spec, got in results:
            want = probes.no_offload(spec)
            grads = got.get("grads")
            ok = (isinstance(grads, list) and len(grads) == len(want["grads"])
                  and all(_same(g, w) for g, w in zip(grads, want["grads"], strict=True)))
            expect(ok, "the gradients differ from a run without hooks: unpack must give back "
                   "exactly the tensor pack was given (same values, shape and dtype)")
    try:  # the memory run: its peak, its result, and the bytes the grader saw leave
        runs = memory_runs(run_with_my_offload, _peak_spec(r), "offload", "no_offload",
                           keys=("loss", "grads"))
    except CheckFailed as e:
        runs, why = None, str(e)
    with parts("memory"):
        expect(runs is not None, why if runs is None else "")
        expect_peak_near(
            runs, "the peak is as high as without offloading: "
            "something still holds each saved tensor (pack returning or storing it, a cache "
            "keyed by the tensor itself...). Keep only the handle")
    with parts("bytes moved"):
        expect(runs is not None, why if runs is None else "")
        moved, want = runs["mine"]["host_bytes"], runs["reference"]["host_bytes"]
        expect(is_int(moved) and moved > 0, "nothing went to the host: pack should put() "
               "each saved activation in the host store and return the handle")
        expect(moved <= want,
               "too many bytes went to the host. Parameters (and views of them, such as "
               "the weight.t() a Linear saves) are in device memory anyway: leave them. "
               "And ReLU's output is saved twice (by the ReLU and by the next Linear): "
               "send its storage once")
        expect(moved == want, "too few bytes went to the host: every saved "
               "activation should go, the input of the first Linear too")
    score = parts.score()
    if score is None:
        passed("your hooks move each saved activation out once, bring it back on demand, and "
               "the gradients are bit-identical")
    return score


# ---------------------------------------------------------------- 3.2
@functools.cache
def _llama_70b():
    return model_memory(llama_config("70b"), 1, 4096)


@forbids("ckpt_course.sharding:per_gpu_bytes", "ckpt_course.sharding:min_gpus", *CHECK_RULES)
def per_gpu(fn) -> None:
    """3.2: ``fn(n_params, n_gpus, activation_bytes)`` -> bytes per GPU of a bf16 model trained
    with AdamW (fp32 moments), its state fully sharded (FSDP / ZeRO-3) over ``n_gpus``."""
    est = _llama_70b()
    per_param = (est.param_bytes + est.grad_bytes + est.optimizer_bytes) / est.n_params
    r = rng("3.2-per-gpu")
    cases = [(1, "none"), (r.choice((2, 4, 8)), "full"), (r.choice((3, 6, 12, 24)), "none"),
             (r.choice((16, 32, 48, 64)), r.choice(("none", "full")))]
    for n_gpus, policy in cases:
        acts = est.activations[policy]
        expected = (est.param_bytes + est.grad_bytes + est.optimizer_bytes) / n_gpus + acts
        got = call(fn, est.n_params, n_gpus, acts, name="per_gpu_bytes")
        expect(is_number(got), f"per_gpu_bytes(...) returned {got!r}: return a number of bytes")
        if abs(got - expected) <= 1e-6 * expected:
            continue
        if abs(got - (expected - acts) - acts / n_gpus) <= 1e-6 * expected and n_gpus > 1:
            hint = ("you divided the activations by the number of GPUs too: each GPU runs the "
                    "whole model on its own micro-batch, so it keeps all of its activations")
        elif abs(got - acts - est.n_params * per_param) <= 1e-6 * expected and n_gpus > 1:
            hint = "sharding divides parameters, gradients and optimizer state among the GPUs"
        else:
            hint = ("per parameter: a bf16 weight, a bf16 gradient and AdamW's two fp32 moments; "
                    "all three are divided among the GPUs, the activations are not")
        raise CheckFailed(hint)
    passed("sharding divides the model's state; only checkpointing shrinks the activations")


# ---------------------------------------------------------------- 3.3 naive vs SDPA attention
@functools.cache
def _block_saved(attention: str, dropout: float, batch: int, heads: int, seq: int,
                 head_dim: int) -> int:
    cfg = GPTConfig(n_layer=1, d_model=heads * head_dim, n_head=heads, seq_len=seq,
                    dropout=dropout, attention=attention)
    return layer_activation_bytes(cfg, batch, seq, torch.float32).saved_bytes


@forbids("ckpt_course.estimate:layer_activation_bytes", "ckpt_course.estimate:model_memory",
         "ckpt_course.estimate:_measure_block", "ckpt_course.tape:record_tape", *CHECK_RULES)
def attention_extra(fn) -> float | None:
    """3.3: ``fn(batch, heads, seq, dropout)`` -> the bytes one float32 GPT block in training
    saves with naive attention beyond the same block with SDPA, measured by the tape (on fake
    CPU tensors), at sizes the lesson did not use. Partial credit: without and with dropout."""
    r = rng("3.3-attention")
    # batch and heads >= 2: with dropout and a batch of 1 the two tapes also differ by a few
    # batch x seq x d_model copies (measured), which is not what this exercise is about
    sizes = [(r.randint(2, 4), r.randint(2, 4), r.randrange(8, 72, 4), r.choice((4, 8)))
             for _ in range(3)]
    parts = Parts()
    for dropout, part in ((0.0, "without dropout"), (r.choice((0.1, 0.2, 0.5)), "with dropout")):
        with parts(part):
            for batch, heads, seq, head_dim in sizes:
                want = (_block_saved("naive", dropout, batch, heads, seq, head_dim)
                        - _block_saved("sdpa", dropout, batch, heads, seq, head_dim))
                got = call(fn, batch, heads, seq, dropout, name="naive_extra_bytes")
                expect(is_int(got), f"naive_extra_bytes(...) returned {got!r}: return bytes "
                       "as an int")
                where = f"batch {batch}, {heads} heads, T = {seq}, dropout {dropout}"
                if got == want:
                    continue
                if dropout == 0:
                    hint = (f"{where}: naive attention saves its softmax output (one float per "
                            "batch, head, query and key) and the causal mask (one bool per "
                            "query and key, shared by the batch and the heads); SDPA saves one "
                            "logsumexp per batch, head and query instead")
                else:
                    hint = (f"{where}: with dropout, look at which backward nodes the SDPA "
                            "block's tape holds (record_tape on one GPTBlock in training mode): "
                            "does SDPA still run its flash kernel? What does each path save "
                            "that the other does not?")
                raise CheckFailed(hint)
    score = parts.score()
    if score is None:
        passed("naive attention's extra T x T bytes, with and without dropout: the tape shows "
               "which kernel SDPA ran, and what it kept")
    return score


# ---------------------------------------------------------------- 3.4
@forbids(*CHECK_RULES)
def ops_to_save(fn) -> None:
    """3.4: ``fn()`` -> the op names (as in ``selective:save=OPS``) a selective policy should
    save on the default TinyGPT: those whose recompute costs FLOPs; recompute all the rest."""
    ranking = rank_ops(TinyGPT(GPTConfig()), batch_size=8)
    expected = {c.op for c in ranking if c.flops > 0 and c.nameable}
    got = fn()
    expect(isinstance(got, (set, list, tuple, frozenset)) and all(isinstance(o, str) for o in got),
           f"ops_to_save() returned {got!r}: return a set of op names such as {{'relu'}}")
    got = {o.strip().lower() for o in got}
    costs = {c.op: c for c in ranking}
    unknown = sorted(got - set(costs))
    expect(not unknown, f"{unknown} is not an op of the block that holds saved bytes; the ranking "
           "lists the ops: rank_ops(model)")
    free = sorted(o for o in got if costs[o].flops == 0)
    expect(not free, f"{', '.join(free)} cost no FLOPs to recompute (elementwise or a "
           "normalisation) yet hold saved bytes: recompute them, do not save them")
    missed = sorted(expected - got)
    expect(not missed, f"recomputing {', '.join(missed)} costs FLOPs (it has matmuls): of the "
           "ops with FLOPs, none frees more bytes per FLOP than the free ones; save it")
    passed(f"save {','.join(sorted(expected))}: the rest recomputes at no FLOP cost")


BUDGET_CANDIDATES = ("none", "full", "every-2", "selective:save=mm", "selective:save=mm,sdpa")
BUDGET_CONFIG = GPTConfig(n_layer=4, d_model=64, n_head=4, seq_len=64)
BUDGET_BATCH = 8


def _candidates():
    """(peak bytes, recompute FLOPs, name) of each candidate: one forward + backward each."""
    torch.manual_seed(0)
    model = TinyGPT(BUDGET_CONFIG)
    batch = model.example_batch(BUDGET_BATCH, generator=torch.Generator().manual_seed(0))
    rows = []
    for name in BUDGET_CANDIDATES:
        peak = measure_step(model, name, batch=batch).peak_bytes
        rows.append((peak, measure_recompute(model, batch, name).flops, name))
    return rows


@forbids(*CHECK_RULES)
def policy_for_budget(fn) -> None:
    """3.4: ``fn(budget)`` -> the candidate (of ``BUDGET_CANDIDATES``) whose forward + backward
    peak (``measure_step``) fits ``budget`` bytes with the fewest recompute FLOPs, on
    ``TinyGPT(BUDGET_CONFIG)`` with batch ``BUDGET_BATCH``."""
    rows = _candidates()
    peaks = sorted({peak for peak, _, _ in rows})
    # every measured peak exactly (a peak equal to the budget fits), and one byte below each
    budgets = peaks + [p - 1 for p in peaks[1:]]
    rng("3.4-budget").shuffle(budgets)
    for budget in budgets:
        fitting = sorted((flops, peak, name) for peak, flops, name in rows if peak <= budget)
        got = fn(budget)
        try:
            got = str(learner_policy(got, largest=64))
        except (TypeError, ValueError):
            raise CheckFailed(f"choose_policy({budget}) returned {got!r}: return one of "
                              f"{BUDGET_CANDIDATES}") from None
        expect(got in BUDGET_CANDIDATES, f"choose_policy({budget}) returned {got!r}, which is not "
               f"a candidate: choose among {BUDGET_CANDIDATES}")
        peak, flops = next((p, f) for p, f, n in rows if n == got)
        expect(peak <= budget, f"with a budget of {budget:,} bytes you chose {got}, whose "
               "measured peak is over it: measure_step(model, policy, batch=batch).peak_bytes")
        best_flops = fitting[0][0]
        expect(flops == best_flops, f"with a budget of {budget:,} bytes, {got} fits but another "
               "candidate fits too and recomputes fewer FLOPs: compare measure_recompute(model, "
               "batch, policy).flops of those that fit")
    passed("the cheapest policy that fits: the least memory is not always the best choice")
