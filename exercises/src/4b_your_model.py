# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Phase 4b exercise: one decoder layer's bytes, from its config
#
# Companion to `notebooks/4b_your_model.ipynb`, on a config the lesson does not show:
# Qwen2.5-7B (grouped-query attention with 4 key/value heads for 28 query heads, SwiGLU with
# an intermediate of 18944, RMSNorm, no dropout, SDPA). Its layer is a Llama layer with biases
# on the query, key and value projections (biases save nothing extra).
#
# Grade the notebook with `ckpt-course grade exercises/4b_your_model.ipynb`.

# %%
import torch

from ckpt_course import hf
from ckpt_course.checks import phase4b as checks

qwen = hf.load_config("qwen2.5-7b")
print({k: getattr(qwen, k) for k in ("hidden_size", "num_attention_heads", "num_key_value_heads",
                                     "intermediate_size", "hidden_act")})

# %% [markdown]
# ## Exercise: predict the tape of one layer
#
# Write `layer_bytes(hidden, heads, kv_heads, intermediate, seq, batch, dtype_bytes)`: the bytes
# one Llama-family decoder layer saves for backward (its input included, parameters excluded)
# on `batch` sequences of `seq` tokens, activations of `dtype_bytes` bytes (2: bf16, 4: float32).
# The check measures layers of random sizes on fake tensors, in both dtypes.
#
# Once it passes, `layer_bytes(3584, 28, 4, 18944, 4096, 1, 2)` is Qwen2.5-7B's layer at 4096
# tokens in bf16; times 28 layers, its activations before any checkpointing.
#
# Test yourself on the small real instance first (read the rows; lesson 4b, section 4b.2):

# %%
small = hf.small_config(qwen, n_layer=1, seq_len=32)
tape = hf.layer_tape(small, 2, 32)
for term in hf.formula_terms(tape, small, 2, 32):
    print(f"{term.name:44} {term.measured:>8,}  {', '.join(term.rows)}")
print("total", tape.activation_bytes, "for", {k: getattr(small, k) for k in (
    "hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size")})

# %% tags=["answer:4b-layer"]
def layer_bytes(hidden, heads, kv_heads, intermediate, seq, batch, dtype_bytes):
    """Bytes one decoder layer saves for backward (its input included)."""
    ### BEGIN SOLUTION
    sb, p, head_dim = seq * batch, dtype_bytes, hidden // heads
    norms = 2 * ((4 + p) * sb * hidden + 4 * sb)  # fp32 input copy, normalised input, 1/rms
    attention = p * sb * hidden * 3 + 2 * p * sb * kv_heads * head_dim + 4 * heads * sb
    # ^ QKV input, query and output; grouped key and value; SDPA's fp32 logsumexp
    mlp = p * sb * hidden + 4 * p * sb * intermediate  # input; gate, up, silu(gate), product
    return norms + attention + mlp
    ### END SOLUTION

# %% tags=["check:4b-layer", "points:2"]
checks.layer_bytes(layer_bytes)
