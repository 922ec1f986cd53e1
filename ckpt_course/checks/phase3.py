"""Checks for phase 3, "Choosing the right policy" (exercises/src/3_choosing_a_policy.py).

Each check measures the right answer here and now with ckpt_course (recompute FLOPs counted while
backward runs, tapes and meters on real or fake tensors), calls the learner's function on the same
sizes, and raises ``CheckFailed`` with a hint that says what was expected in words and which op
was missed, never the number. No check reads a clock.
"""

from __future__ import annotations

import functools
from dataclasses import replace

import torch

from ..compare import rank_ops
from ..estimate import layer_activation_bytes, model_memory
from ..models import GPTConfig, TinyGPT, llama_config
from ..policies import parse_policy
from ..recompute import measure_recompute
from ..train import measure_step
from . import CheckFailed, expect, passed

__all__ = ["CheckFailed", "full_recompute", "per_gpu", "attention_bytes", "ops_to_save",
           "policy_for_budget", "BUDGET_CANDIDATES"]


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


# ---------------------------------------------------------------- 3.1
def _block_flops(B, T, C) -> dict[str, int]:
    """Forward FLOPs of each matmul-like op of one GPT block: 2 x m x n x k per matmul."""
    return {"qkv": 2 * B * T * C * 3 * C, "attention": 4 * B * T * T * C,
            "proj": 2 * B * T * C * C, "fc1": 2 * B * T * C * 4 * C, "fc2": 2 * B * T * 4 * C * C}


def full_recompute(fn) -> None:
    """3.1: ``fn(batch, seq, d_model, n_layer)`` -> the FLOPs backward recomputes under ``full``
    on a TinyGPT (sdpa attention), as ``measure_recompute`` counts them."""
    for B, T, C, L in ((2, 16, 32, 2), (3, 32, 64, 3)):
        torch.manual_seed(0)
        model = TinyGPT(GPTConfig(n_layer=L, d_model=C, n_head=4, seq_len=T))
        batch = model.example_batch(B, generator=torch.Generator().manual_seed(0))
        recompute = measure_recompute(model, batch, "full")
        got = fn(B, T, C, L)
        expect(_number(got), f"full_recompute_flops({B}, {T}, {C}, {L}) returned {got!r}: "
               "return a number of FLOPs")
        if got == recompute.flops:
            continue
        parts = _block_flops(B, T, C)
        whole = L * sum(parts.values())
        if got == whole:
            hint = ("you counted every matmul of every block, one too many: torch's "
                    "non-reentrant checkpoint stops re-running a block as soon as every tensor "
                    "backward needs is rebuilt. Which matmul's output does backward never read?")
        elif got == recompute.forward_flops:
            hint = ("you counted the whole forward, head included: only the blocks are "
                    "checkpointed; the embedding, final norm, head and loss are not re-run")
        elif got in (whole - L * parts["attention"], recompute.flops - L * parts["attention"]):
            hint = ("attention has two matmuls of its own, Q K^T and P V: 2 x B x T x T x C FLOPs "
                    "each, per block; flash attention counts them too")
        elif got in (2 * recompute.flops, 3 * recompute.flops):
            hint = ("recompute re-runs forward once, not backward: count the forward FLOPs of "
                    "what is re-run (2 x m x n x k per matmul)")
        else:
            hint = ("count 2 x m x n x k FLOPs per matmul of a block (qkv, attention's two, proj, "
                    "the MLP's), drop the one torch never re-runs, and multiply by the layers")
        raise CheckFailed(hint)
    passed("full recomputes a bit less than one forward of the blocks, and nothing else")


# ---------------------------------------------------------------- 3.2
@functools.cache
def _llama_70b():
    return model_memory(llama_config("70b"), 1, 4096)


def per_gpu(fn) -> None:
    """3.2: ``fn(n_params, n_gpus, activation_bytes)`` -> bytes per GPU of a bf16 model trained
    with AdamW (fp32 moments), its state fully sharded (FSDP / ZeRO-3) over ``n_gpus``."""
    est = _llama_70b()
    per_param = (est.param_bytes + est.grad_bytes + est.optimizer_bytes) / est.n_params
    for n_gpus, policy in ((1, "none"), (8, "full"), (16, "full"), (64, "none")):
        acts = est.activations[policy]
        expected = (est.param_bytes + est.grad_bytes + est.optimizer_bytes) / n_gpus + acts
        got = fn(est.n_params, n_gpus, acts)
        expect(_number(got), f"per_gpu_bytes(...) returned {got!r}: return a number of bytes")
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


# ---------------------------------------------------------------- 3.3
def attention_bytes(fn) -> None:
    """3.3: ``fn(batch, heads, seq)`` -> bytes one block of a float32 TinyGPT with naive attention
    saves beyond the same block with ``scaled_dot_product_attention``."""
    for B, H, T in ((1, 2, 16), (2, 4, 64), (3, 2, 40)):
        cfg = GPTConfig(d_model=8 * H, n_head=H, seq_len=T)
        naive = layer_activation_bytes(replace(cfg, attention="naive"), B, T,
                                       torch.float32).saved_bytes
        sdpa = layer_activation_bytes(cfg, B, T, torch.float32).saved_bytes
        measured = naive - sdpa
        got = fn(B, H, T)
        expect(_number(got), f"attention_extra_bytes({B}, {H}, {T}) returned {got!r}: "
               "return a number of bytes")
        if got == measured:
            continue
        if got == measured - T * T:
            hint = ("masked_fill saves its causal mask too: a T x T bool tensor (1 byte each), "
                    "made once and shared by the whole batch")
        elif got in (measured + 4 * B * H * T, measured + 4 * B * H * T + T * T):
            hint = ("sdpa does keep a small extra tensor per row: the logsumexp, one float32 per "
                    "(batch, head, query); it is on the sdpa side, so subtract it")
        elif got == measured + 4 * B * H * T * T:
            hint = ("the softmax output is saved once: the softmax backward and the P @ V matmul "
                    "share that storage (the tape shows it saved twice, stored once)")
        else:
            hint = ("naive attention keeps a T x T float32 matrix per batch and head (the "
                    "softmax output) and a T x T bool mask; flash attention keeps neither, only a "
                    "logsumexp per query row. Read both tapes: record_tape(block, x)")
        raise CheckFailed(hint)
    passed("naive attention grows with T^2; flash attention's extra memory grows with T")


# ---------------------------------------------------------------- 3.4
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


def policy_for_budget(fn) -> None:
    """3.4: ``fn(budget)`` -> the candidate (of ``BUDGET_CANDIDATES``) whose forward + backward
    peak (``measure_step``) fits ``budget`` bytes with the fewest recompute FLOPs, on
    ``TinyGPT(BUDGET_CONFIG)`` with batch ``BUDGET_BATCH``."""
    rows = _candidates()
    peaks = sorted({peak for peak, _, _ in rows})
    budgets = [(a + b) // 2 for a, b in zip(peaks, peaks[1:], strict=False)] + [peaks[-1]]
    for budget in budgets[::2] + budgets[1::2]:
        fitting = sorted((flops, peak, name) for peak, flops, name in rows if peak <= budget)
        got = fn(budget)
        try:
            got = str(parse_policy(got))
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
