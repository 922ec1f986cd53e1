"""Checks for lesson 3b, "Pitfalls" (exercises/src/3b_pitfalls.py).

Each exercise shows a symptom and a measurement; the learner's data function names the pitfall
(one of ``PITFALLS``) and returns the fix as data (checkpoint arguments, a policy, a fix's name).
The check applies the fix to a fresh experiment of ``ckpt_course.pitfalls`` at sizes drawn from
``rng`` and measures it: gradients against the run without checkpointing, losses against no
policy, running statistics and kept bytes. No clock is read.
"""

from __future__ import annotations

import torch

from ..models import GPTConfig, TinyGPT
from ..pitfalls import BN_FIXES, CHECKPOINT_KWARGS, block_gradients, bn_experiment
from ..train import train
from . import CheckFailed, expect, learner_policy, passed, rng

__all__ = ["CheckFailed", "PITFALLS", "frozen_fix", "rng_fix", "bn_fix"]

PITFALLS = ("wrong instrument", "peak made of gradients", "reentrant frozen input",
            "rng not preserved", "recompute differs from forward", "tiny regions",
            "last segment not checkpointed", "ddp marks ready twice")


def _answer(fn, keys: tuple[str, ...]) -> dict:
    got = fn()
    expect(isinstance(got, dict) and set(keys) <= set(got),
           f"return a dict with the keys {', '.join(map(repr, keys))}; got {got!r}")
    expect(got["pitfall"] in PITFALLS, f"name the pitfall with one of {PITFALLS}")
    return got


def _named(got, pitfall: str, hint: str) -> None:
    expect(got["pitfall"] == pitfall, f"that is not this symptom's pitfall: {hint}")


# ---------------------------------------------------------------- frozen input
def frozen_fix(fn) -> None:
    """``fn()`` -> ``{"pitfall": ..., "checkpoint_kwargs": {...}, "input_requires_grad": bool}``:
    the block of a ``FrozenFront`` must get the gradients it gets without checkpointing."""
    got = _answer(fn, ("pitfall", "checkpoint_kwargs"))
    _named(got, "reentrant frozen input", "the block's parameters get no gradient at all")
    kwargs, lift = got["checkpoint_kwargs"], got.get("input_requires_grad", False)
    expect(isinstance(kwargs, dict) and set(kwargs) <= set(CHECKPOINT_KWARGS),
           f"checkpoint_kwargs is a dict of checkpoint's arguments: {', '.join(CHECKPOINT_KWARGS)}")
    expect(isinstance(lift, bool), "input_requires_grad is True or False")
    r = rng("3b-frozen")
    for _ in range(2):
        width, batch, seed = r.choice((8, 12, 24)), r.randint(3, 9), r.randrange(1000)
        reference = block_gradients(None, False, width, batch, seed)
        fixed = block_gradients(kwargs, lift, width, batch, seed)
        if any(g is None for g in fixed.values()):
            raise CheckFailed("the block still gets no gradient: under reentrant checkpoint "
                              "autograd enters the block only if one of its inputs requires "
                              "grad; what does torch 2.13 do when use_reentrant is left out?")
        expect(all(torch.equal(fixed[k], reference[k]) for k in reference),
               "the block gets gradients, but not the plain run's: which argument changes "
               "what the recompute computes?")
    passed("the frozen front's block learns again, with the gradients of a plain run")


# ---------------------------------------------------------------- dropout and the RNG
def rng_fix(fn) -> None:
    """``fn()`` -> ``{"pitfall": ..., "policy": "..."}``: a policy that checkpoints and whose
    losses, with dropout, are those of no policy at all."""
    got = _answer(fn, ("pitfall", "policy"))
    _named(got, "rng not preserved", "nothing raises; the losses drift from step 2")
    try:
        policy = learner_policy(got["policy"], largest=64)
    except (TypeError, ValueError) as error:
        raise CheckFailed(f"the policy is not understood: {error}") from None
    r = rng("3b-rng")
    cfg = GPTConfig(n_layer=r.choice((2, 3)), d_model=32, n_head=2, seq_len=16,
                    dropout=r.choice((0.1, 0.3)))
    steps, seed = 4, r.randrange(1000)

    def losses(p):
        torch.manual_seed(seed)
        return train(TinyGPT(cfg), p, steps=steps, batch_size=2, seed=seed, progress=False)

    reference, records = losses("none"), losses(policy)
    expect(records[0].recompute_flops > 0, "that policy checkpoints nothing: the memory is "
           "back; keep checkpointing and fix what the recompute draws")
    expect([x.loss for x in records] == [x.loss for x in reference],
           "the losses still drift from no policy's: the recompute must draw the same dropout "
           "masks as forward")
    passed("checkpointed, and the losses are bit-identical to no checkpointing")


# ---------------------------------------------------------------- BatchNorm
def bn_fix(fn) -> None:
    """``fn()`` -> ``{"pitfall": ..., "fix": one of BN_FIXES}``: one running-statistics update
    per step, the plain run's gradients, and less kept for backward than the plain run."""
    got = _answer(fn, ("pitfall", "fix"))
    _named(got, "recompute differs from forward", "the gradients are right; a buffer moved "
           "twice")
    expect(got["fix"] in BN_FIXES, f"fix is one of {BN_FIXES}")
    r = rng("3b-bn")
    width, depth, batch = r.choice((16, 24, 48)), r.choice((2, 3)), r.choice((32, 40, 96))
    e = bn_experiment(got["fix"], width, depth, batch, r.randrange(1000))
    expect(e["saved_bytes"] < e["plain_saved_bytes"], "that keeps as much for backward as no "
           "checkpointing: the memory saving is gone")
    expect(e["same_grads"], "the gradients changed: BatchNorm in training mode normalises with "
           "the batch's statistics; the fix must not change what forward computes")
    expect(e["same_running_stats"], "the running statistics still differ from a plain step's: "
           "count how many times BatchNorm's forward runs in one step under that fix")
    passed("one running-statistics update per step, gradients unchanged, still checkpointed")
