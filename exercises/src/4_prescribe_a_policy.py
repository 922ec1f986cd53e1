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
# Lesson: `notebooks/4_diagnose_a_real_oom.ipynb`. There the package's planner (`make_plan`,
# `doctor`) found the placement; here you build one. A model is a chain of blocks given as plain
# numbers, the way the planner sees it:
#
#     chain = {"input": a,                       # bytes of a block's input (all blocks alike)
#              "blocks": [{"tape": t,            # bytes a plain block keeps, its input included
#                          "flops": f,           # its forward FLOPs
#                          "recompute_flops": r} # its forward up to its last saved tensor
#                         , ...]}
#
# A *placement* is a list of segments `[start, stop, checkpointed]` covering the blocks in order,
# e.g. `[[0, 2, True], [2, 3, False]]` (a plain segment is one block). Nothing else is live
# (no parameters, no trunk): only what the blocks keep and the gradients flowing through them.
#
# - **4.1** The peak of a placement.
# - **4.2** The planner: the placement with the least recompute that fits a budget.
# - **4.3** The capstone: prescribe a policy for the lesson's OOM, and for chains you have not seen.

# %%
from ckpt_course.checks import phase4

example = {"input": 16, "blocks": [{"tape": 64, "flops": 10, "recompute_flops": 6},
                                   {"tape": 48, "flops": 8, "recompute_flops": 8},
                                   {"tape": 80, "flops": 12, "recompute_flops": 9}]}

# The lesson's model as a chain, and its budget, for 4.3 (measured here, before any answer:
# answers may not use the package's planner or the checks, see 4.3)
LESSON_CHAIN, LESSON_BUDGET = phase4.lesson_chain(), phase4.lesson_budget()
print(len(LESSON_CHAIN["blocks"]), "blocks like", LESSON_CHAIN["blocks"][0],
      "input", LESSON_CHAIN["input"])
print("budget", LESSON_BUDGET, "bytes")

# %% [markdown]
# ## 4.1 The peak of a placement
#
# Forward runs the segments in order: a plain block keeps its tape, a checkpointed segment keeps
# only its input. Backward runs them in reverse; a segment's backward starts with the gradient of
# its output alive, a checkpointed segment first rebuilds the tapes of all its blocks, and each
# block's backward makes the gradient of its input (one `input` of bytes) before it frees its tape.
# Write the peak live bytes of a step.

# %% tags=["answer:4.1-peak"]
def chain_peak(chain, placement):
    ### BEGIN SOLUTION
    a, blocks = chain["input"], chain["blocks"]
    kept = peak = 0  # kept: what the segments before this one keep
    for start, stop, checkpointed in placement:
        tapes = sum(b["tape"] for b in blocks[start:stop])  # all alive in this segment's backward
        peak = max(peak, kept + tapes + 2 * a)  # + gradient of the output + gradient of the input
        kept += a if checkpointed else tapes
    return peak
    ### END SOLUTION


# %% tags=["check:4.1-peak", "points:2"]
phase4.chain_peak(chain_peak)

# %% [markdown]
# ## 4.2 The planner
#
# Write `plan_placement(chain, budget)`: the placement whose peak fits `budget` (a peak equal to
# the budget fits) with the fewest recomputed FLOPs, or `None` if none fits. A checkpointed
# segment recomputes the forward of each of its blocks, except that the last one stops at its
# last saved tensor (`recompute_flops`); a plain block recomputes nothing. Any of several equally
# cheap placements is right. Chains in the check have up to 8 blocks: trying every placement is
# fine, a dynamic program is better.

# %% tags=["answer:4.2-planner"]
def plan_placement(chain, budget):
    ### BEGIN SOLUTION
    blocks = chain["blocks"]

    def placements(i):  # every way to cover blocks i.. with segments
        if i == len(blocks):
            yield []
            return
        for rest in placements(i + 1):
            yield [[i, i + 1, False], *rest]
        for j in range(i + 1, len(blocks) + 1):
            for rest in placements(j):
                yield [[i, j, True], *rest]

    def recompute(placement):
        return sum(sum(b["flops"] for b in blocks[i:j - 1]) + blocks[j - 1]["recompute_flops"]
                   for i, j, checkpointed in placement if checkpointed)

    fits = [p for p in placements(0) if chain_peak(chain, p) <= budget]
    return min(fits, key=recompute, default=None)
    ### END SOLUTION


# %% tags=["check:4.2-planner", "points:3"]
phase4.planner(plan_placement)

# %% [markdown]
# ## 4.3 Capstone: the lesson's OOM, prescribed
#
# The lesson's model, measured by the planner, is `phase4.lesson_chain()` (six equal GPT blocks
# on a CPU, twelve on a GPU: the lesson sizes this machine uses); its budget sits between what
# checkpointing every block needs and what every-2 needs: `LESSON_CHAIN` and `LESSON_BUDGET`,
# printed at the top of this notebook.

# %% [markdown]
# Write `my_policy(chain, budget)`: a policy string the course runs (`"full"`, `"every-2"`, or
# `"segments:0-2,5"`: `a-b` is one segment of blocks a to b, `a..b` checkpoints each of blocks a
# to b alone) that fits with at most 10% more recompute than the cheapest placement. A measured
# model's blocks also list their selective options (`block["options"]`: each one's tape and
# recomputed FLOPs, run as a plain block); you may mix them in, as the lesson's menu does
# (`"menu:0-1=full,2=selective:save=sdpa"`), and a mix is held to the cheapest mix. The check
# asks it for the lesson's chain and budget and for chains and budgets you have not seen, then
# runs your policies for real (two AdamW steps, metered) on the lesson's model and on a smaller
# model you have not seen, under the real bytes that stand for the chain's budget.

# %% tags=["answer:4.3-capstone"]
def my_policy(chain, budget):
    ### BEGIN SOLUTION
    placement = plan_placement(chain, budget)
    parts = [f"{i}-{j - 1}" for i, j, checkpointed in placement if checkpointed]
    return "segments:" + (",".join(parts) or "none")
    ### END SOLUTION


# %% tags=["check:4.3-capstone", "points:3"]
phase4.capstone(my_policy)
