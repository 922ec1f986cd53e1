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
from ckpt_course.models import GPTBlock, GPTConfig, TinyGPT  # noqa: F401 - GPTBlock for 3.3
from ckpt_course.recompute import measure_recompute
from ckpt_course.tape import record_tape  # noqa: F401 - to look at a tape in 3.3
from ckpt_course.train import measure_step
from ckpt_course.units import fmt_bytes, fmt_flops

torch.manual_seed(0)
torch.set_num_threads(1)  # steadier on a busy 2-core CPU; the checks count bytes and FLOPs

# %% [markdown]
# ## Exercise 1 (section 3.2): offload the tape by hand
#
# Offloading keeps every activation but not in device memory: `saved_tensors_hooks(pack,
# unpack)` hands each tensor autograd saves to `pack`, keeps whatever `pack` returns, and gives
# that to `unpack` when backward needs the tensor. Write `offload_hooks(host, params)` returning
# `(pack, unpack)`: `pack` sends a saved tensor to `host` (`host.put(t)` returns a handle) and
# returns the handle; `unpack` brings it back (`host.get(handle)`). Two things to get right:
# - parameters (and views of them: a Linear saves `weight.t()`) are in device memory anyway:
#   return them as they are (compare storages: `t.untyped_storage().data_ptr()`);
# - ReLU's output is saved twice (by the ReLU and by the next Linear): send it once. A freed
#   storage's address can be reused, so also check it is still the same storage object (a
#   `weakref.ref` to `t.untyped_storage()`).
#
# The check runs the setup cell's `run_with_my_offload` on chains you have not seen: bytes moved,
# gradients (to the bit) and peak memory, against a reference.

# %% tags=["answer:3.2-offload"]
import weakref  # noqa: E402


def offload_hooks(host, params):
    """(pack, unpack) hooks that move saved activations to `host` and back."""
    ### BEGIN SOLUTION
    param_storages = {p.untyped_storage().data_ptr() for p in params}
    sent = {}  # storage address -> (weak reference to the storage, handle)

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() in param_storages:
            return t  # a parameter or a view of one: it stays in device memory
        key = (storage.data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in sent and sent[key][0]() is storage:
            return sent[key][1]  # saved twice: one copy on the host is enough
        handle = host.put(t)
        sent[key] = (weakref.ref(storage), handle)
        return handle

    def unpack(handle):
        return handle if isinstance(handle, torch.Tensor) else host.get(handle)

    return pack, unpack
    ### END SOLUTION

# %%
from ckpt_course.checks import probes  # noqa: E402


def run_with_my_offload(spec):
    """The chain of `spec` under your hooks, with a fresh host store; results as plain data."""
    return probes.run_offloaded(spec, offload_hooks)

# %% tags=["check:3.2-offload", "points:3"]
checks.offload(run_with_my_offload)

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
# ## Exercise 3 (section 3.3): what naive attention saves that SDPA does not
#
# One float32 `GPTBlock` in training mode (`GPTConfig(attention="naive")` against the default
# `"sdpa"`, the same `dropout`), on a `batch x seq x d_model` input with `heads` heads. Write
# `naive_extra_bytes(batch, heads, seq, dropout)`: how many more bytes the naive block's tape
# holds than the SDPA block's (batch and heads are 2 or more). The check tries sizes the lesson
# did not, each without dropout and with it. With dropout, both paths must keep what they need
# to replay the same dropout mask in backward: think about what each one saves for that, and
# whether SDPA still runs the same kernel. You can look: `record_tape` (lesson 2.1) on one `GPTBlock` lists every tensor each
# backward node saved.

# %% tags=["answer:3.3-attention"]
def naive_extra_bytes(batch, heads, seq, dropout):
    """Bytes the naive-attention block saves beyond the SDPA block (float32)."""
    ### BEGIN SOLUTION
    mask = seq * seq  # the causal mask: one bool per query and key, shared by batch and heads
    if dropout:
        # on this CPU, SDPA with dropout runs its math path: it saves the softmax output, the
        # dropout mask and the dropped probabilities as naive attention does, but builds no mask
        return mask
    probabilities = 4 * batch * heads * seq * seq  # the softmax output naive attention keeps
    logsumexp = 4 * batch * heads * seq  # what flash attention keeps instead
    return probabilities + mask - logsumexp
    ### END SOLUTION

# %% tags=["check:3.3-attention", "points:2"]
checks.attention_extra(naive_extra_bytes)

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
