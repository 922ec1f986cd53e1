# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 4. Prescribe a checkpoint policy (capstone)
#
# Lesson: `notebooks/4_diagnose_a_real_oom.ipynb`. Fill in each function between the lines the
# stub marks, run the notebook, and let the check below each answer measure it. Grade with
# `ckpt-course grade exercises/4_prescribe_a_policy.ipynb`.
#
# - **4.1** (lesson 4.1) The bytes step 2 carries that step 1 did not.
# - **4.2** (lesson 4.3) What backward recomputes for a placement, from per-block numbers.
# - **4.3** (lessons 4.2-4.4) The capstone: a real OOM; write the policy that fits with the
#   least recompute. The check runs it.

# %%
import torch

from ckpt_course.checks import phase4
from ckpt_course.doctor import explain, run_steps
from ckpt_course.models import GPTConfig, TinyGPT, sized
from ckpt_course.plan import Segments, measure_costs, predict
from ckpt_course.units import fmt_bytes, fmt_flops

torch.manual_seed(0)
CFG = sized(cpu=GPTConfig(n_layer=6, d_model=64, n_head=4, seq_len=64),
            gpu=GPTConfig(n_layer=12, d_model=256, n_head=8, seq_len=256))
BATCH = sized(cpu=8, gpu=16)
model = TinyGPT(CFG)

# %% [markdown]
# ## 4.1 What step 2 carries
#
# AdamW creates its state in the first `optimizer.step()`. Write the bytes of that state for any
# model (float32 parameters): what does `optimizer.state[p]` hold for a parameter `p`?

# %% tags=["answer:4.1-adamw-state"]
def adamw_state_bytes(model):
    ### BEGIN SOLUTION
    params = list(model.parameters())
    return sum(2 * 4 * p.numel() for p in params) + 4 * len(params)
    ### END SOLUTION


# %% tags=["check:4.1-adamw-state"]
phase4.adamw_state(adamw_state_bytes)

# %% [markdown]
# ## 4.2 What a placement recomputes
#
# A placement is a tuple of segments `(start, stop, checkpointed)` covering the blocks in order,
# e.g. `((0, 2, True), (2, 3, False))`. The planner measured, for each block, `forward_flops`
# (its whole forward) and `recompute_flops` (its forward up to the last tensor it saves for
# backward). Write the FLOPs backward recomputes. Remember how torch's non-reentrant
# checkpoint ends a recompute.

# %% tags=["answer:4.2-recompute"]
def recompute_of(placement, layers):
    ### BEGIN SOLUTION
    total = 0
    for start, stop, checkpointed in placement:
        if checkpointed:
            total += sum(c.forward_flops for c in layers[start:stop - 1])
            total += layers[stop - 1].recompute_flops
    return total
    ### END SOLUTION


# %% tags=["check:4.2-recompute"]
phase4.recompute_flops(recompute_of)

# %% [markdown]
# ## 4.3 Capstone: a real OOM; write the policy
#
# The budget below sits between what checkpointing every block needs and what every-2 needs.
# First, what happens without a policy, and what the doctor sees:

# %%
costs = measure_costs(model, BATCH)
full, every2 = predict(costs, "full"), predict(costs, "every-2")
BUDGET = full.peak_bytes + (every2.peak_bytes - full.peak_bytes) // 2
run = run_steps(model, BUDGET, "none", BATCH, steps=2)
print(f"budget {fmt_bytes(BUDGET)}")
print(explain(run.oom, run.steps))

# %% [markdown]
# Your tools: `predict(costs, policy)` gives the planner's peak and recompute for any policy
# (`"full"`, `"every-2"`, `"segments:0-2,4"`: `a-b` is one segment of blocks a to b, `a..b`
# checkpoints each of blocks a to b alone), without running it:

# %%
for policy in ("none", "full", "every-2", "sqrt", "segments:0-1,3"):
    p = predict(costs, policy)
    print(f"{policy:<16} peak {fmt_bytes(p.peak_bytes):>11}  recompute "
          f"{fmt_flops(p.recompute_flops):>13} ({p.overhead:+.1%})  peak at {p.where}")

# %% [markdown]
# Write the policy that fits the budget when run, with at most 10% more recompute than the
# cheapest placement that fits. (`full` fits, but is not cheap enough.) Return a policy string
# or a `Segments`. Think about which tapes are alive at the peak, and which block's tape
# backward frees first.

# %% tags=["answer:4.3-capstone"]
def my_policy():
    ### BEGIN SOLUTION
    # blocks 0-4 checkpointed one by one; block 5's tape dies first in backward: keep it plain
    return Segments.parse("segments:0..4")
    ### END SOLUTION


# %% tags=["check:4.3-capstone"]
phase4.capstone(my_policy, model, BUDGET, BATCH)
