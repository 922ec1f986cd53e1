"""Lesson 4b's Predicts (notebooks/4b_your_model.ipynb): forms, tolerances, and the wrong answers
learners give, each with its reason.

The ``answer`` functions recompute the lesson's derivations from the shipped configs (no tape,
no run): the GPT-2 layer's count and Llama-3.1-8B's Q, K, V; 4b.4's peak asks the planner.
"""

from __future__ import annotations

import functools

from . import Predict, Wrong

B, S = 2, 32  # 4b.1's GPT-2 layer
SL, BL = 4096, 1  # 4b.2's Llama layer
SMALL_B, SMALL_T = 4, 64  # 4b.4's small Llama


@functools.cache
def _gpt2() -> dict:
    from .. import hf

    small = hf.small_config(hf.load_config("gpt2"), n_layer=1, seq_len=S)
    h, a = small.n_embd, small.n_head
    sbh = S * B * h
    parts = {"matching": 4 * (2 + 1 + 3 + 1 + 1 + 4) * sbh, "gelu_new": 4 * 4 * (4 * sbh),
             "logsumexp": 4 * a * S * B, "norm_stats": 2 * 2 * 4 * S * B}
    return {**parts, "total": sum(parts.values()), "paper": sbh * (34 + 5 * a * S // h)}


@functools.cache
def _llama() -> dict:
    from .. import hf

    c = hf.load_config("llama-3.1-8b")
    kv = c.num_key_value_heads * c.head_dim
    return {"hidden": c.hidden_size, "kv": kv, "qkv": 2 * SL * BL * (c.hidden_size + 2 * kv)}


@functools.cache
def _small() -> dict:
    from .. import hf
    from ..costs import measure_costs
    from ..plan import make_plan, predict

    model = hf.build(hf.small_config(hf.load_config("llama-3.1-8b"), n_layer=4, seq_len=SMALL_T))
    costs = measure_costs(model, SMALL_B, SMALL_T)
    none, full = predict(costs, "none").peak_bytes, predict(costs, "full").peak_bytes
    plan = make_plan(costs, full + (none - full) // 2)
    call = hf.handback(plan.best.placement, costs.n, costs=costs)
    return {"peak": predict(costs, call.expressed).peak_bytes, "budget": full + (none - full) // 2,
            "none": none, "full": full}


PREDICTS: dict[str, Predict] = {
    "4b.1/gpt2-layer": Predict(
        what="GPT-2 layer", form="number", unit="B", example="4 * 34 * 2 * 32 * 64",
        answer=lambda: _gpt2()["total"],
        wrong=(
            Wrong(lambda d, g: _gpt2()["paper"],
                  "that is the paper's count: 2-byte activations, dropout masks and explicit "
                  "attention scores; here float32, no dropout, and SDPA keeps no s x s matrix"),
            Wrong(lambda d, g: 2 * _gpt2()["paper"],
                  "the paper's count in float32: but SDPA keeps no s x s scores, dropout is off "
                  "(no masks), and gelu_new saves four 4h-wide tensors"),
            Wrong(lambda d, g: d - 3 * _gpt2()["gelu_new"] // 4,
                  "gelu_new saves four 4h-wide tensors (x for the cube, tanh's result, the two "
                  "multiplies' operands), not one"),
            Wrong(lambda d, g: d - _gpt2()["logsumexp"] - _gpt2()["norm_stats"],
                  "add the small terms: SDPA's logsumexp (a float per head and token) and "
                  "LayerNorm's mean and 1/std (a float per token each, two norms)"),
        ),
    ),
    "4b.2/llama-qkv": Predict(
        what="Q, K, V", form="number", unit="B", example="2 * 4096 * 4096",
        answer=lambda: _llama()["qkv"],
        wrong=(
            Wrong(lambda d, g: 6 * SL * BL * _llama()["hidden"],
                  "GQA: K and V have 8 heads of 128, not 32: a quarter of Q each"),
            Wrong(lambda d, g: 2 * SL * BL * _llama()["hidden"],
                  "that is the query alone: add K and V, 8 heads of 128 each"),
            Wrong(lambda d, g: d // 2, "you counted elements: bf16 stores 2 bytes per element"),
            Wrong(lambda d, g: 2 * SL * BL * (_llama()["hidden"] + _llama()["kv"]),
                  "SDPA keeps both K and V: add the second grouped tensor"),
        ),
    ),
    "4b.4/small-peak": Predict(
        what="small Llama, the call applied", form="number", unit="B", example="5 * 2**20",
        answer=lambda: _small()["peak"], given=_small,
        wrong=(
            Wrong(lambda d, g: g["budget"], "that is the budget: the call's peak sits at or "
                                            "below it, where the planner put it"),
            Wrong(lambda d, g: g["none"], "that is the peak without checkpointing: the call "
                                          "checkpoints some layers"),
            Wrong(lambda d, g: g["full"], "that is full's peak: the call checkpoints only the "
                                          "layers the budget needs"),
        ),
    ),
}
