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
# ## Exercise 4 (section 1.3): predict what checkpointing one block saves
#
# Wrap one block (say `"blocks.1"`) of a GPT in `torch.utils.checkpoint`: forward runs it without
# keeping its tape, and backward runs it again. From the tape recorded **without** checkpointing
# and the size of the block's input, predict how many fewer bytes forward leaves behind.
#
# `tape.by_module()` sums the tape's activation bytes per block: `{"blocks.0": ..., ...}`.

# %%
model = TinyGPT(GPTConfig(n_layer=3, d_model=32, n_head=2, seq_len=16, dropout=0.1))
tape = record_tape(model.loss, model.example_batch(2), model=model)
{name: b for name, b in tape.by_module().items() if name.startswith("blocks")}

# %% tags=["answer:1.3-one-block"]
def checkpoint_saving(tape, block, input_bytes):
    """Bytes forward no longer keeps when only `block` is checkpointed."""
    ### BEGIN SOLUTION
    return tape.by_module()[block] - input_bytes  # the checkpoint keeps the input to rerun it
    ### END SOLUTION

# %% tags=["check:1.3-one-block"]
checks.checkpoint_saving(checkpoint_saving)

# %% [markdown]
# ## Exercise 5 (section 1.4): turn the dial to fit a budget
#
# A chain of `n_layers` Linear+ReLU layers (`HandTraceNet`): each layer's activation is
# `activation_bytes`, and each layer keeps about one activation for backward. Under `every-N`,
# the memory above the parameters and the batch must stay within `budget` bytes. Return an N
# that fits. (The check runs your N and measures the peak; the budgets are tight.)

# %% tags=["answer:1.4-pick-n"]
def pick_n(n_layers, activation_bytes, budget):
    """A segment size N whose peak fits the budget."""
    ### BEGIN SOLUTION
    def peak(n):  # segment inputs kept through forward + one segment rebuilt in backward
        return (math.ceil(n_layers / n) + n) * activation_bytes

    return min(range(1, n_layers + 1), key=peak)
    ### END SOLUTION

# %% tags=["check:1.4-pick-n"]
checks.pick_n(pick_n)

# %% [markdown]
# Want to see the U you just reasoned about? Section 1.4 of the lesson draws it:
# `ckpt_course.sweeps.dial` measures every N once and `ckpt_course.plots.dial_figure` plots it.
