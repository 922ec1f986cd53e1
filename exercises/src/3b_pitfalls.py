# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Phase 3b exercises: name the pitfall, write the fix
#
# Companion to `notebooks/3b_pitfalls.ipynb`. Each exercise shows a symptom and a measurement.
# Your function returns a dict: `"pitfall"`, one of the names printed below, and the fix as data.
# The check applies your fix to a fresh run at other sizes and measures it (gradients, losses,
# running statistics, bytes kept for backward; never a clock).
#
# Grade the whole notebook with `ckpt-course grade exercises/3b_pitfalls.ipynb`.

# %%
import torch

from ckpt_course import pitfalls
from ckpt_course.checks import phase3b as checks
from ckpt_course.train import train

torch.manual_seed(0)
torch.set_num_threads(1)
print("pitfalls:", checks.PITFALLS)

# %% [markdown]
# ## Exercise 1 (section 3b.2): the adapter never learns
#
# A fine-tuning run with a frozen embedding and a checkpointed adapter block: after 1000 steps
# the block's weights are exactly where they started. Measured on one step:

# %%
print({name: g is not None for name, g in pitfalls.block_gradients({"use_reentrant": True}).items()})
print({name: g is not None for name, g in pitfalls.block_gradients({}).items()})

# %% [markdown]
# Return the pitfall and the fix: `"checkpoint_kwargs"` (a dict of arguments for
# `torch.utils.checkpoint.checkpoint`) and, optionally, `"input_requires_grad"` (True makes the
# block's input require grad first).

# %% tags=["answer:3b-frozen"]
def frozen_fix():
    """The pitfall and the checkpoint arguments that give the block its gradients back."""
    ### BEGIN SOLUTION
    return {"pitfall": "reentrant frozen input", "checkpoint_kwargs": {"use_reentrant": False}}
    ### END SOLUTION

# %% tags=["check:3b-frozen"]
checks.frozen_fix(frozen_fix)

# %% [markdown]
# ## Exercise 2 (section 3b.3): the loss curve that drifts
#
# A home-made policy checkpoints a dropout GPT. Nothing raises, but the losses drift away from
# the unchecked run from step 2 on:

# %%
from ckpt_course.models import GPTConfig, TinyGPT  # noqa: E402

cfg = GPTConfig(n_layer=2, d_model=32, n_head=2, seq_len=16, dropout=0.2)
for policy in ("none", "segments:0-1;preserve_rng_state=False"):
    torch.manual_seed(0)
    print(f"{policy:>40}:", [round(r.loss, 4) for r in train(TinyGPT(cfg), policy, steps=4,
                                                             batch_size=2, progress=False)])

# %% [markdown]
# Return the pitfall and `"policy"`: a policy string that still checkpoints and trains exactly
# as no policy does.

# %% tags=["answer:3b-rng"]
def rng_fix():
    """The pitfall and a policy that checkpoints with the forward's dropout masks."""
    ### BEGIN SOLUTION
    return {"pitfall": "rng not preserved", "policy": "segments:0-1"}
    ### END SOLUTION

# %% tags=["check:3b-rng"]
checks.rng_fix(rng_fix)

# %% [markdown]
# ## Exercise 3 (section 3b.7): the running statistics that moved twice
#
# A checkpointed BatchNorm net evaluates worse than the same net trained without checkpointing,
# although every gradient is identical. One step, measured:

# %%
e = pitfalls.bn_experiment("none")
print("num_batches_tracked, plain vs checkpointed:", e["plain_tracked"], e["tracked"])
print("same gradients:", e["same_grads"], "| same running statistics:", e["same_running_stats"])
print("fixes to choose from:", pitfalls.BN_FIXES)

# %% tags=["answer:3b-bn"]
def bn_fix():
    """The pitfall and the fix (one of pitfalls.BN_FIXES)."""
    ### BEGIN SOLUTION
    return {"pitfall": "recompute differs from forward", "fix": "restore-buffers"}
    ### END SOLUTION

# %% tags=["check:3b-bn"]
checks.bn_fix(bn_fix)
