# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 0. A toy exercise (used by the tests of authoring and grading)
#
# Plain asserts stand in for `ckpt_course.checks`, so the tests need no torch.

# %%
BATCH, WIDTH, LAYERS = 8, 32, 3

# %% [markdown]
# ## 0.1 Bytes of one activation
# A float32 activation of shape (batch, width): how many bytes?

# %% tags=["answer:0.1-bytes"]
def predicted_bytes(batch, width):
    ### BEGIN SOLUTION
    return 4 * batch * width
    ### END SOLUTION

# %% tags=["check:0.1-bytes"]
got = predicted_bytes(BATCH, WIDTH)
assert got == 4 * BATCH * WIDTH, (
    f"predicted_bytes({BATCH}, {WIDTH}) returned {got}. "
    "Count the elements (batch x width), then the bytes of one float32."
)

# %% [markdown]
# ## 0.2 Tensors on the tape
# Each of the `layers` Linear+ReLU pairs saves its input and its ReLU output.

# %% tags=["answer:0.2-tape"]
def saved_tensor_count(layers):
    ### BEGIN SOLUTION
    return 2 * layers
    ### END SOLUTION

# %% tags=["check:0.2-tape"]
got = saved_tensor_count(LAYERS)
assert got == 2 * LAYERS, (
    f"saved_tensor_count({LAYERS}) returned {got}. "
    "Each layer keeps two tensors for backward: which ones?"
)

# %% tags=["check:0.2-tape-scales"]
assert saved_tensor_count(10) == 5 * saved_tensor_count(2), (
    "The tape grows linearly with depth: 10 layers keep 5x what 2 layers keep."
)
