# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 2. Hand-trace a checkpointed net: exercises
#
# Companion of `notebooks/2_hand_trace_a_checkpointed_net.ipynb`, one exercise per lesson
# section. The net is `HandTraceNet`: `depth` x (Linear(width, width) -> ReLU), float32, input
# `x` of shape `batch x width`, loss `net(x).sum()`. Layers count from 1 (layer k is
# `net.blocks[k - 1]`).
#
# Write each function so that it *computes* the answer from its arguments: every check calls it
# on sizes it draws at random (batch and width differ, unlike the lesson's 512 x 512) and
# compares with what the tape, the meter or the recompute counter measures, to the byte. Run the
# check cell under each answer; a failed check says what you missed.

# %%
from ckpt_course.checks import phase2

FLOAT32 = 4  # bytes per element

# %% [markdown]
# ## Exercise 2.1: the tape, before any tricks (lesson section 2.1)
#
# `record_tape` lists every storage autograd keeps for backward during `net(x).sum()`.
# Predict, for any `batch`, `width`, `depth`:
# - `"activations"`: bytes of the storages that are not parameters,
# - `"parameters"`: bytes of the parameter storages on the tape (weights kept as `weight.t()`),
# - `"saved_twice"`: how many storages two autograd nodes saved.

# %% tags=["answer:2.1-tape"]
def predict_tape(batch, width, depth):
    ### BEGIN SOLUTION
    activation = batch * width * FLOAT32
    weight = width * width * FLOAT32
    return {
        "activations": (depth + 1) * activation,  # x (layer 1's addmm input) + every ReLU output
        "parameters": (depth - 1) * weight,  # layer 1's input x needs no grad: W1 is not kept
        "saved_twice": depth - 1,  # ReLU output = next addmm's input; the last has no next
    }
    ### END SOLUTION

# %% tags=["check:2.1-tape"]
phase2.check_tape(predict_tape)

# %% [markdown]
# ## Exercise 2.2: the every-2 saved set (lesson section 2.2)
#
# Under `every-2`, layers run in checkpointed segments of two. How many bytes does forward leave
# alive for backward, above the baseline (parameters and `x`)? Count everything forward made and
# did not free. Depth can be odd.

# %% tags=["answer:2.2-every2"]
def every2_saved_bytes(batch, width, depth):
    ### BEGIN SOLUTION
    segments = -(-depth // 2)  # ceil(depth / 2)
    loss = FLOAT32  # the scalar net(x).sum()
    return (segments - 1) * batch * width * FLOAT32 + loss  # segment inputs, x excluded
    ### END SOLUTION

# %% tags=["check:2.2-every2"]
phase2.check_every2_saved(every2_saved_bytes)

# %% [markdown]
# ## Exercise 2.3: recompute by op, not by layer count (lesson section 2.3)
#
# For a net of `depth` layers, predict what backward re-runs under `policy` (`"full"` or `"every-2"`):
# the aten ops by name with their counts (`"aten.addmm"`, ...) and their FLOPs, for any `batch`
# and `width`. With `relu_first=True` every block is ReLU -> Linear instead of Linear -> ReLU:
# remember where torch stops a re-run.

# %% tags=["answer:2.3-recompute"]
def predict_recompute(policy, relu_first, batch, width, depth):
    ### BEGIN SOLUTION
    addmm_flops = 2 * batch * width * width  # batch x width x width multiply-adds
    layers, segment = depth, 1 if policy == "full" else 2
    if relu_first:
        # a region's trailing addmm feeds nothing saved inside it: only the inner ones re-run
        addmms = layers - -(-layers // segment)  # blocks minus regions (ceil(depth / segment))
    else:
        addmms = layers  # every ReLU output is saved, so every op before it re-runs
    ops = {"aten.relu": layers, "aten.t": layers}
    if addmms:
        ops["aten.addmm"] = addmms
    return {"ops": ops, "flops": addmms * addmm_flops}
    ### END SOLUTION

# %% tags=["check:2.3-recompute"]
phase2.check_recompute(predict_recompute)

# %% [markdown]
# ## Exercise 2.4: when the peak happens, and how high (lesson section 2.4)
#
# The lesson's net had batch = width, so an activation `A` (batch x width) and a weight
# gradient `W` (width x width) were the same size and every layer's backward tied at 6A. Here
# they differ. Under `none`, predict the layer whose backward *first* reaches the step's peak
# and the peak itself in bytes above parameters + `x`, with gradients kept for the optimizer
# (`free_grads=False`) or dropped as soon as each is complete (`free_grads=True`).
#
# Write each backward moment down: at layer k's ReLU backward and at its addmm backward, which
# activations are still needed, which gradients are alive? The check tries nets where `W` is more
# than twice `A`, between `A` and `2A`, and smaller than `A`.

# %% tags=["answer:2.4-peak"]
def predict_peak(free_grads, batch, width, depth):
    ### BEGIN SOLUTION
    a, w, bias = batch * width * FLOAT32, width * width * FLOAT32, width * FLOAT32
    crumbs = 2 * FLOAT32  # the loss and its seed gradient

    def made(n):  # weight + bias gradients of n layers above, unless freed
        return 0 if free_grads else n * (w + bias)

    moments = [(depth, (depth + 1) * a + w + bias)]  # layer L's addmm: h1..h(L-1), gz, gh, gW
    for k in range(depth - 1, 0, -1):  # backward visits L, L-1, ..., 1
        moments.append((k, (k + 2) * a + made(depth - k)))  # ReLU: h1..hk, gh in, gz out
        if k > 1:  # addmm: h1..h(k-1), gz in, gh(k-1) out, gW
            moments.append((k, (k + 1) * a + w + bias + made(depth - k)))
        else:  # x needs no gradient: no gh0
            moments.append((k, a + w + bias + made(depth - 1)))
    top = max(b for _, b in moments)
    layer = next(k for k, b in moments if b == top)  # the first moment at the peak
    return {"layer": layer, "bytes": top + crumbs}
    ### END SOLUTION

# %% tags=["check:2.4-peak", "points:2"]
phase2.check_peak_moment(predict_peak)

# %% [markdown]
# ## Exercise 2.5: the full table (lesson section 2.5)
#
# With batch = width (so an activation and a weight gradient have the same size), give for
# `none`, `full` (every layer checkpointed) and `every-2` the bytes saved after forward and the
# peak of forward + backward, both above parameters + `x`, to the byte.

# %% tags=["answer:2.5-table"]
def predict_table(width, depth):
    ### BEGIN SOLUTION
    a = width * width * FLOAT32  # one activation = one weight gradient
    bias, loss, seed = width * FLOAT32, FLOAT32, FLOAT32
    # the peak: layer 2's weight-gradient moment holds h1, grad in, grad out, dW2 and the
    # depth - 2 weight gradients made before, plus depth - 1 bias gradients; no policy drops any
    peak = (depth + 2) * a + (depth - 1) * bias + loss + seed
    segments = -(-depth // 2)
    return {
        "none": {"saved": depth * a + loss, "peak": peak},
        "full": {"saved": (depth - 1) * a + loss, "peak": peak},
        "every-2": {"saved": (segments - 1) * a + loss, "peak": peak},
    }
    ### END SOLUTION

# %% tags=["check:2.5-table"]
phase2.check_policy_table(predict_table)
