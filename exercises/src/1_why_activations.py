# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Phase 1 exercises: why activations eat your memory
#
# Companion to `notebooks/1_why_activations_eat_memory.ipynb`; each exercise names its section.
# Fill in the body of each function (replace the `raise NotImplementedError(...)` line), then run
# its check cell. A check measures the right answer on your machine, with a real AdamW step, the
# tape or the meter, and tells you what you missed without giving the number away.
#
# Grade the whole notebook with `ckpt-course grade exercises/1_why_activations.ipynb`.

# %%
import math

import torch

from ckpt_course.checks import phase1 as checks
from ckpt_course.models import GPTBlock, GPTConfig, TinyGPT
from ckpt_course.tape import record_tape

_ = torch.manual_seed(0)  # fixed seed: the same numbers on every run

# %% [markdown]
# ## Exercise 1 (section 1.1): the memory that does not depend on the batch
#
# An fp32 model with `n_params` parameters is trained with `torch.optim.AdamW`. After the first
# step, three kinds of tensors stay alive whatever the batch: the parameters, their gradients and
# AdamW's state. Write how many bytes each takes. (AdamW also keeps a 4-byte `step` counter per
# parameter *tensor*; leave it out.)
#
# A tool if you want one: `sum(p.numel() for p in TinyGPT().parameters())` counts parameters,
# and `torch.optim.AdamW(...).state` shows what the optimizer keeps once it has stepped.

# %% tags=["answer:1.1-state"]
def training_state_bytes(n_params):
    """Bytes of parameters, gradients and AdamW state for an fp32 model."""
    ### BEGIN SOLUTION
    return {
        "parameters": 4 * n_params,  # one float32 each
        "gradients": 4 * n_params,  # param.grad: same shape and dtype as the parameter
        "optimizer state": 2 * 4 * n_params,  # exp_avg and exp_avg_sq
    }
    ### END SOLUTION

# %% tags=["check:1.1-state"]
checks.training_state_bytes(training_state_bytes)

# %% [markdown]
# ## Exercise 2 (section 1.1): how activations scale
#
# The tiny GPT uses `scaled_dot_product_attention`, which on CPU stores no T x T attention
# matrix. Forward leaves its activations for backward. If the batch grows `batch_factor` times and
# the sequence `seq_factor` times, by what factor do those activation bytes grow? (Within 2 %:
# a few small tensors, like the position indices, do not follow the rule exactly.)

# %% tags=["answer:1.1-scaling"]
def activation_ratio(batch_factor, seq_factor):
    """How many times larger the saved activations get."""
    ### BEGIN SOLUTION
    return batch_factor * seq_factor  # every saved tensor is (batch, seq, ...): one token each
    ### END SOLUTION

# %% tags=["check:1.1-scaling"]
checks.activation_ratio(activation_ratio)

# %% [markdown]
# ## Exercise 3 (section 1.2): read the tape of a block's MLP
#
# A GPT block's MLP is `Linear(d, 4d) -> GELU -> Linear(4d, d)` (and a dropout, which with
# `dropout=0` keeps nothing). How many bytes of **activations** does it keep for backward on a
# `(batch, seq, d_model)` float32 input? Parameters do not count: they exist anyway.
#
# Look before you write: the cell below prints the tape of one block; the rows of `mlp.0`,
# `mlp.1` and `mlp.2` are the MLP's.

# %%
block = GPTBlock(GPTConfig(d_model=16, n_head=2, seq_len=8))
print(record_tape(block, torch.randn(2, 8, 16)))

# %% tags=["answer:1.2-mlp"]
def mlp_saved_bytes(batch, seq, d_model):
    """Bytes of activations the MLP of one GPT block saves for backward."""
    ### BEGIN SOLUTION
    tokens = batch * seq
    first_linear_input = tokens * d_model  # ln2's output, kept by mlp.0 for its weight gradient
    gelu_input = tokens * 4 * d_model  # kept by GELU to compute its derivative
    second_linear_input = tokens * 4 * d_model  # GELU's output, kept by mlp.2
    return 4 * (first_linear_input + gelu_input + second_linear_input)
    ### END SOLUTION

# %% tags=["check:1.2-mlp"]
checks.mlp_saved_bytes(mlp_saved_bytes)

# %% [markdown]
# ## Exercise 4 (section 1.3): write checkpointing yourself
#
# The lesson wraps a block in `torch.utils.checkpoint`. Now build it: a `torch.autograd.Function`
# whose `forward(ctx, block, x)` runs `block(x)` **without keeping its tape** (only `x` is saved)
# and whose `backward(ctx, grad_out)` runs the block again with gradients on, backpropagates
# `grad_out` through that rerun and returns the gradient of `x` (and `None` for `block`).
#
# The blocks have dropout. The rerun must draw the same dropout masks as forward did, so save the
# random state in forward (`torch.get_rng_state()`) and set it again for the rerun; and leave
# the random stream of the rest of training as it was (`torch.random.fork_rng()`).
#
# The check runs the setup cell's `run_with_my_checkpoint` on blocks and sizes you have not seen
# and compares with `torch.utils.checkpoint`: output, gradients (to the bit), the random numbers
# drawn afterwards, and the peak memory (it must keep only each block's input).

# %% tags=["answer:1.3-by-hand"]
class MyCheckpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, block, x):
        ### BEGIN SOLUTION
        ctx.block = block
        ctx.rng_state = torch.get_rng_state()  # dropout must draw the same masks in the rerun
        ctx.save_for_backward(x)  # the only tensor kept: forward runs without a graph
        return block(x)
        ### END SOLUTION

    @staticmethod
    def backward(ctx, grad_out):
        ### BEGIN SOLUTION
        (x,) = ctx.saved_tensors
        x = x.detach().requires_grad_(x.requires_grad)
        with torch.random.fork_rng(), torch.enable_grad():  # fork: the stream goes on unchanged
            torch.set_rng_state(ctx.rng_state)
            out = ctx.block(x)
        torch.autograd.backward(out, grad_out)  # parameters' .grad accumulate here
        return None, x.grad
        ### END SOLUTION

# %%
from ckpt_course.checks import probes  # noqa: E402


def run_with_my_checkpoint(spec):
    """Blocks and input from `spec`, each block through MyCheckpoint; results as plain data."""
    return probes.run_blocks(spec, MyCheckpoint.apply)

# %% tags=["check:1.3-by-hand", "points:3"]
checks.hand_checkpoint(run_with_my_checkpoint)

# %% [markdown]
# ## Exercise 5 (section 1.4): turn the dial as far as the budget allows
#
# A chain of `n_layers` Linear+ReLU layers (`HandTraceNet`): each layer's activation is
# `activation_bytes`. Under `every-N`, forward keeps `ceil(n_layers / N)` segment inputs and
# backward rebuilds one segment of `N` activations on top of them: count the peak as
# `ceil(n_layers / N) + N` activations (the weight gradients, a few KiB, are on the house).
# Longer segments mean fewer checkpoint calls, so return the **largest** N whose peak fits
# `budget` bytes (a peak equal to the budget fits). The check runs your N and measures it.

# %% tags=["answer:1.4-pick-n"]
def pick_n(n_layers, activation_bytes, budget):
    """The largest segment size N whose peak fits the budget."""
    ### BEGIN SOLUTION
    def peak(n):  # segment inputs kept through forward + one segment rebuilt in backward
        return (math.ceil(n_layers / n) + n) * activation_bytes

    return max(n for n in range(1, n_layers + 1) if peak(n) <= budget)
    ### END SOLUTION

# %% tags=["check:1.4-pick-n", "points:2"]
checks.pick_n(pick_n)

# %% [markdown]
# Want to see the U you just reasoned about? Section 1.4 of the lesson draws it:
# `ckpt_course.sweeps.dial` measures every N once and `ckpt_course.plots.dial_figure` plots it.
