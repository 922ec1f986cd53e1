"""Checks for lesson 4b, "Your model" (exercises/src/4b_your_model.py).

The learner's data function predicts one decoder layer's saved bytes from config fields; the
check builds Llama-family layers of sizes drawn from ``rng`` and measures their tape on fake
tensors (``hf.layer_tape``): the model's own code, never a formula of ours.
"""

from __future__ import annotations

import torch

from . import CheckFailed, call, expect, forbids, is_int, passed, rng

# Predict from the config: an answer may not measure a layer (the check's own helper,
# hf.layer_tape, hf.hf_config_costs, record_tape, the per-block costs and the forward they
# record, the estimates on fake tensors, the meter) nor read the formula's terms.
MEASURE_RULES = ("ckpt_course.checks", "ckpt_course.tape", "ckpt_course.hf:layer_tape",
                 "ckpt_course.hf:formula_terms", "ckpt_course.hf:hf_config_costs",
                 "ckpt_course.costs", "ckpt_course.recording", "ckpt_course.estimate",
                 "ckpt_course.meter", "ckpt_course.pitfalls:saved_for_backward",
                 "ckpt_course.ranking")

__all__ = ["CheckFailed", "layer_bytes"]


def _sizes(r) -> dict:
    heads = r.choice((4, 8))
    head_dim = r.choice((8, 16))
    return {"hidden": heads * head_dim, "heads": heads,
            "kv_heads": r.choice([k for k in (1, 2, 4) if heads % k == 0 and k < heads]),
            "intermediate": 8 * r.randint(9, 40), "seq": r.randint(12, 48),
            "batch": r.randint(1, 3), "dtype_bytes": r.choice((2, 4))}


def measured_layer_bytes(sizes: dict) -> int:
    """One Llama decoder layer of ``sizes``, its tape's activation bytes on fake tensors."""
    from transformers import LlamaConfig

    from .. import hf

    config = LlamaConfig(hidden_size=sizes["hidden"], num_attention_heads=sizes["heads"],
                         num_key_value_heads=sizes["kv_heads"],
                         intermediate_size=sizes["intermediate"], num_hidden_layers=1,
                         vocab_size=64, max_position_embeddings=sizes["seq"])
    dtype = {2: torch.bfloat16, 4: torch.float32}[sizes["dtype_bytes"]]
    return hf.layer_tape(config, sizes["batch"], sizes["seq"], dtype, fake=True).activation_bytes


@forbids(*MEASURE_RULES)
def layer_bytes(fn) -> None:
    """``fn(hidden, heads, kv_heads, intermediate, seq, batch, dtype_bytes)`` -> bytes one
    Llama-family decoder layer (its input included) saves for backward, checked against the
    measured tape at three random sizes, in bf16 and float32."""
    r = rng("4b-layer")
    sizes = [_sizes(r) for _ in range(3)]
    sizes[0]["dtype_bytes"], sizes[1]["dtype_bytes"] = 2, 4  # both dtypes, always
    for s in sizes:
        got = call(fn, *s.values())
        expect(is_int(got), f"return a whole number of bytes, got {got!r}")
        want = measured_layer_bytes(s)
        if got != want:
            raise CheckFailed(_hint(got, want, s))
    passed("one decoder layer's bytes, from the config fields, at three sizes and two dtypes")


def _hint(got: int, want: int, s: dict) -> str:
    where = ", ".join(f"{k}={v}" for k, v in s.items())
    sb, d = s["seq"] * s["batch"], s["hidden"] // s["heads"]
    gqa = 2 * s["dtype_bytes"] * sb * (s["heads"] - s["kv_heads"]) * d
    if got - want == gqa:
        return f"at {where}: too much for attention: how many heads do the key and value have?"
    if s["dtype_bytes"] == 2 and want - got in (4 * sb * s["hidden"], 8 * sb * s["hidden"]):
        return (f"at {where}: too little for the norms: RMSNorm computes in float32; what does "
                f"it keep, and in which dtype?")
    side = "more" if got > want else "less"
    return (f"at {where}: {side} than the tape holds; compare your terms with "
            f"hf.formula_terms(hf.layer_tape(...), ...) row by row")
