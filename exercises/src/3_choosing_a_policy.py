# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Phase 3 exercises: choosing the right policy
#
# Companion to `notebooks/3_choosing_a_policy.ipynb`; each exercise names its section. Fill in
# the body of each function (replace the `raise NotImplementedError(...)` line), then run its
# check cell. A check measures the right answer on your machine (FLOPs counted while backward
# runs, tapes and meters on real or fake tensors; never a clock) and tells you what you missed
# without giving the number away.
#
# Grade the whole notebook with `ckpt-course grade exercises/3_choosing_a_policy.ipynb`.

# %%
import torch

from ckpt_course.checks import phase3 as checks
from ckpt_course.compare import format_ranking, rank_ops
from ckpt_course.models import GPTConfig, TinyGPT
from ckpt_course.recompute import measure_recompute
from ckpt_course.train import measure_step
from ckpt_course.units import fmt_bytes, fmt_flops

torch.manual_seed(0)
torch.set_num_threads(1)  # steadier on a busy 2-core CPU; the checks count bytes and FLOPs

# %% [markdown]
# ## Exercise 1 (section 3.1): the FLOPs full checkpointing re-runs
#
# A `TinyGPT` block is `x + attn(ln1(x))`, then `+ mlp(ln2(.))`: attention projects to q, k, v
# with one Linear(C, 3C), runs `scaled_dot_product_attention` (causal), and projects back with a
# Linear(C, C); the MLP is Linear(C, 4C) -> GELU -> Linear(4C, C). Under `full`, what does backward
# recompute, in FLOPs, for a batch of `batch` sequences of `seq` tokens, width `d_model`, and
# `n_layer` blocks? A (m x k) @ (k x n) matmul costs 2mkn FLOPs; the FLOP counter counts
# attention's two matmuls in full, causal or not. Not everything in a block is re-run.

# %% tags=["answer:3.1-recompute"]
def full_recompute_flops(batch, seq, d_model, n_layer):
    """FLOPs that backward re-runs under the `full` policy."""
    ### BEGIN SOLUTION
    B, T, C = batch, seq, d_model
    qkv = 2 * B * T * C * 3 * C
    attention = 4 * B * T * T * C  # Q K^T and P V
    proj = 2 * B * T * C * C
    fc1 = 2 * B * T * C * 4 * C
    # fc2 is never re-run: backward needs its input (GELU's output), never its output, and
    # torch's non-reentrant checkpoint stops once every saved tensor is rebuilt
    return n_layer * (qkv + attention + proj + fc1)
    ### END SOLUTION

# %% tags=["check:3.1-recompute"]
checks.full_recompute(full_recompute_flops)

# %% [markdown]
# ## Exercise 2 (section 3.2): bytes per GPU with the model state sharded
#
# A bf16 model of `n_params` parameters is trained with AdamW (two fp32 moments per parameter)
# on `n_gpus` GPUs with FSDP (ZeRO-3): every weight, gradient and moment is sharded evenly. Each GPU
# runs its own micro-batch, whose activations take `activation_bytes`. How many bytes does one GPU
# hold at the peak? (The notebook's `run_fsdp` cell shows which parts halve on 2 processes.)

# %% tags=["answer:3.2-per-gpu"]
def per_gpu_bytes(n_params, n_gpus, activation_bytes):
    """Bytes on one GPU: its share of the model state plus its own activations."""
    ### BEGIN SOLUTION
    state = n_params * (2 + 2 + 8)  # bf16 weight, bf16 gradient, two fp32 moments
    return state / n_gpus + activation_bytes  # activations are not sharded
    ### END SOLUTION

# %% tags=["check:3.2-per-gpu"]
checks.per_gpu(per_gpu_bytes)

# %% [markdown]
# ## Exercise 3 (section 3.3): what flash attention does not keep
#
# One block of a float32 `TinyGPT`, `attention="naive"` against `attention="sdpa"`, with `batch`
# sequences of `seq` tokens and `heads` heads (no dropout). How many bytes more does the naive
# block keep for backward? Look at both tapes first: the cell below prints the attention rows.

# %%
from ckpt_course.tape import record_tape  # noqa: E402

for attention in ("naive", "sdpa"):
    block = TinyGPT(GPTConfig(n_layer=1, d_model=16, n_head=2, seq_len=8,
                              attention=attention)).blocks[0]
    tape = record_tape(block, torch.randn(1, 8, 16, requires_grad=True))
    print(attention, [(e.label, e.shape, str(e.dtype)) for e in tape.entries
                      if e.module.startswith("attn") and not e.is_param])

# %% tags=["answer:3.3-attention"]
def attention_extra_bytes(batch, heads, seq):
    """Bytes a naive-attention block saves beyond an SDPA block (float32)."""
    ### BEGIN SOLUTION
    softmax_output = 4 * batch * heads * seq * seq  # P, float32, shared with the P @ V matmul
    causal_mask = seq * seq  # a T x T bool, one byte each, broadcast over the batch
    logsumexp = 4 * batch * heads * seq  # kept by SDPA only: one float per query row
    return softmax_output + causal_mask - logsumexp
    ### END SOLUTION

# %% tags=["check:3.3-attention"]
checks.attention_bytes(attention_extra_bytes)

# %% [markdown]
# ## Exercise 4 (section 3.4): which ops should a selective policy save?
#
# `rank_ops` credits every tensor a block saves to the op that made it, with that op's forward
# FLOPs. A selective policy `selective:save=OPS` keeps the outputs of the named ops and
# recomputes everything else. On the default `TinyGPT(GPTConfig())` at batch 8, which op names
# should it save so that its recompute costs **no FLOPs at all**, while keeping as little as
# possible? Return a set of names as they appear in the ranking.

# %%
print(format_ranking(rank_ops(TinyGPT(GPTConfig()), batch_size=8)))

# %% tags=["answer:3.4-save"]
def ops_to_save():
    """Names for selective:save=... ."""
    ### BEGIN SOLUTION
    return {"mm", "sdpa"}  # the only ops with FLOPs; gelu, layernorm, add are free to recompute
    ### END SOLUTION

# %% tags=["check:3.4-save"]
checks.ops_to_save(ops_to_save)

# %% [markdown]
# ## Exercise 5 (section 3.4): the cheapest policy that fits
#
# The cell below measures five candidate policies on a small GPT: the peak of one forward and
# backward (`measure_step`) and the FLOPs backward recomputes. Write `choose_policy(budget)`: the
# candidate whose peak fits `budget` bytes with the fewest recompute FLOPs. Look at the table
# first: is the policy with the lowest peak always the one to pick? Is `every-2` ever worth it
# here?

# %%
model = TinyGPT(checks.BUDGET_CONFIG)
batch = model.example_batch(checks.BUDGET_BATCH, generator=torch.Generator().manual_seed(0))
measured = {}
for name in checks.BUDGET_CANDIDATES:
    peak = measure_step(model, name, batch=batch).peak_bytes
    measured[name] = (peak, measure_recompute(model, batch, name).flops)
    print(f"{name:>24}: peak {fmt_bytes(peak):>10}, recompute {fmt_flops(measured[name][1])}")

# %% tags=["answer:3.4-budget"]
def choose_policy(budget):
    """The candidate that fits `budget` bytes and recomputes the fewest FLOPs."""
    ### BEGIN SOLUTION
    fitting = [(flops, peak, name) for name, (peak, flops) in measured.items() if peak <= budget]
    return min(fitting)[2]  # fewest FLOPs; on a tie, the smaller peak
    ### END SOLUTION

# %% tags=["check:3.4-budget"]
checks.policy_for_budget(choose_policy)
