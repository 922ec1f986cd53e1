"""The planner with op-level choices against torch.compile's activation_memory_budget.

torch.compile's min-cut partitioner, given ``torch._functorch.config.activation_memory_budget``
(a fraction), solves a knapsack over which forward values to save for backward and recomputes
the rest. The planner (``plan.optimal``, FLOPs objective) picks per block one point of the
block's exact Pareto set over which op outputs to keep (``op_choices``; ``measure_costs(...,
op_points=N)``), full checkpoints of several blocks, or the four-option menu. Both are compared
by (saved bytes, recompute FLOPs), on the tiny GPT (4 blocks) and a small Hugging Face Llama
built from the shipped Llama 3.2 1B config (4 layers; never downloads).

torch.compile side: ``exact_backend``, which is ``aot_eager_decomp_partition`` (AOTAutograd
with inductor's decompositions and the min-cut partitioner that reads the budget, without
inductor's code generation: a few seconds per compile on a CPU) with one change: random ops may
not be recomputed. The stock partitioner re-runs ``aten.rand`` in the backward (inductor's
decomposition of dropout; its random-op list names only ``native_dropout``, ``rand_like`` and
``randn_like``), which draws new numbers: on the held-out attention model the gradients at
every budget under 1.0 differ from budget 1.0's by 1e-2 (``--stock-partitioner`` shows it in
column "grads off"; the inductor backend itself does the same on CPU, torch 2.13: loss equal,
gradients not). Those points are not a training step, so they are not compared with. With the
ban every budget's gradients equal budget 1.0's to 1e-10 (float reordering; 0 on the held-out
models). Saved bytes: the storages its compiled forward packs for backward (saved-tensor
hooks), parameters, buffers and the batch left out. Recompute FLOPs: FlopCounterMode over its
backward minus over eager's plain backward (at budget 1.0 the two are equal).

Counted alike: both sides' bytes are storages alive for backward, parameters, buffers and the
batch left out, the block inputs and outputs and the trunk's tensors included on both (the
planner's "saved" is eager's packed storages with no checkpointing plus what the placement
keeps beyond or below that; on the held-out models a meter reading of the live bytes after the
forward gives the same numbers to the byte for ``none``, ``full``, ``prefix=full`` and
op-level placements); both sides' FLOPs are FlopCounterMode's (matmuls, attention), so
elementwise ops cost 0 on both: keeping a norm's statistics instead of its output is a bytes
choice only.

Planner side: compile's constraint is saved bytes, the DP's is the peak (which, on these
models, stops falling once the trunk's moments dominate, while saved bytes still fall). So the
planner's choices are taken over the same placements the DP searches (plain, checkpointed runs
of blocks, the menu and the op-level options per block) under each way the trunk can run (the
suffix, final norm, head and loss, as it is, fully checkpointed or at the op-level points of
its own Pareto set; the prefix, the embeddings, as it is or inside block 0's checkpoint or
block 0's op-level option where measured exact: ``measure_costs(..., suffix=True)``,
``plan._trunk_variants``, ``plan._options_with_prefix``) by the same FLOPs objective, with the
memory model's exact kept bytes as the constraint: a Pareto sweep over the chain
(``kept_frontier``). For each compile budget, two rows: the placement without offload with the
least recompute among those saving no more than compile does; and, where that recomputes more
than compile, the one that offloads the fewest bytes to recompute no more (a copy to host is
not a FLOP: every row could be won by offloading everything, so the bench says how much offload
it takes). Each plan's peak is predicted and metered twice, on copies of the model (the script
stops if they differ). Compile's variant at each budget runs twice (the first step compiles,
the second reuses it): bytes and FLOPs are counts, so the two agree (column "again").

Held-out models (``--models attn,swiglu,res,mixed``, ``held_out.py``: finding P15's 3-block
models; batch 4). What compile keeps that the planner could not, read from its partitioned
forward and backward graphs (a recording backend) at the budgets where it won:

  model   budget  compile keeps / recomputes               the planner before
  res     0.5     recomputes the embedding (65,536 FLOP)   no point between 99,328 and 132,096 B:
                  and keeps every block's fc1 output:      x_0 could go only with block 0 fully
                  125,440 B                                checkpointed (prefix=full)
  mixed   0.6     the same: embedding recomputed, block    x_0 kept: 117,504 B at 0 or
                  outputs kept: 113,472 B, 49,152 FLOP     99,072 B at 294,912 FLOP
  attn    0.6     embedding recomputed, qkv outputs and    0.37 MFLOP at 75,264 B
                  block 0's scaled scores kept: 0.23 MFLOP
  swiglu  0.2     embedding recomputed, block 0's gate     1.77 MFLOP at 25,344 B
                  output kept: 1.52 MFLOP at 38,208 B
  attn    0.5     one region over blocks 1-2 and the head: 0.45 MFLOP at 62,976 B
                  keeps their qkv outputs and the masks,
                  not x_2 nor x_3 (re-runs attention and
                  the out-projection): 0.43 MFLOP, 66,384 B
  attn    0.4     the same, block 2's qkv recomputed too:  0.70 MFLOP at 50,688 B
                  0.64 MFLOP at 53,376 B
  res     0.1     recomputes the head (its 1,024 B output  2.16 MFLOP at 17,408 B (25,600 B
                  not kept), keeps the first norm's stats  at 1.64 MFLOP: 512 B over)
  mixed   0.1     one region over blocks 1-2 keeping only  1.82 MFLOP at 19,200 B: a
                  block 2's masks (bool) and x_3, block 0  multi-block segment re-runs all
                  keeping its last matmul's output (x_1 =  but its last block in full
                  x_0 + it): 1.72 MFLOP at 21,312 B
  attn, mixed  all  dropout: the stock partitioner re-runs  (compared with the exact backend
                  rand (wrong gradients, see above)        only)

So most of the gap was one choice across a block boundary, which eager torch makes exactly:
the prefix (embeddings) inside block 0's *selective* region, keeping block 0's op outputs and
recomputing only the prefix (``menu:0=selective:ops=...,prefix=full``: the region opens at
the model's entry, so block 0's op positions count from the prefix's first op,
``op_choices.prefix_ops``; predicted by ``plan._options_with_prefix``, metered equal,
gradients bit-identical,
``tests/test_op_prefix.py``). It needed one more fix: a Linear embedding of a 3-D batch
reshapes the batch, the meter counts that view, and ``costs._prefix_facts`` took it for
something the prefix keeps outside block 0's checkpoint, so prefix=full was refused on attn,
swiglu and mixed (``TrunkCost.prefix_batch_views``). What eager torch cannot do generically:
recompute the suffix (head, loss) without replaying the model's forward from its start (a
suffix checkpoint re-runs the entry, the prefix's FLOPs again, and for a learner's model the
loss is outside the entry, so the head's output stays kept: ``menu:...,suffix=full`` keeps the
same 25,600 B on res and recomputes 65,536 FLOP more); and keep a norm's statistics instead of
its output (SAC keeps whole op outputs; worth bytes only, never FLOPs here). Not done, though
eager torch can: one selective region over several blocks (a multi-block segment keeping some
op outputs, e.g. block 0's last matmul, so its tail is not re-run; the planner's op-level
options are one block each); extending such a region over the head (attn) meets the suffix's
limit above. Those are the remaining rows.

  model    budget  compile B   MFLOP  planner B   MFLOP  ratio   (after; metered = predicted)
  attn      0.05      8,208    1.36      6,912    1.35   0.99
            0.10     14,736    1.27     13,056    1.25   0.99
            0.20     27,360    1.06     26,112    1.04   0.99
            0.30     40,752    0.85     39,936    0.82   0.97
            0.40     53,376    0.64     50,688    0.70   1.10    (a multi-block selective region
            0.50     66,384    0.43     62,976    0.45   1.06     over blocks 1-2 and the head)
            0.60     79,392    0.23     79,104    0.20   0.84    (was 1.58)
            0.80    103,152    0.04     99,840    0.04   1.00
  swiglu    0.05-0.80: ratio 1.00 at all 8 (was 1.14 and 1.16 at 0.1 and 0.2)
  res       0.10     25,088    1.65     17,408    2.16   1.31    (suffix: the head)
            0.50    125,440    0.07    123,904    0.07   1.00    (was 8.00)
            the other 6: 1.00
  mixed     0.10     21,312    1.72     19,200    1.82   1.06    (a multi-block selective region)
            0.60    113,472    0.05    111,360    0.05   1.00    (was 6.00)
            the other 6: 1.00 (was 1.16, 1.20, 1.08, 1.14 at 0.05, 0.1, 0.4, 0.5)

Planner recompute <= compile at 6/8 (attn), 8/8 (swiglu), 7/8 (res), 7/8 (mixed) budgets,
before this change 1/7, 5/7, 6/8, 3/8 (the same exact backend); with offload at 8/8 everywhere.

The course's models (the default ``--models gpt,llama``, batch 2, 6 op-level points per block,
exact backend; it agrees with the stock one here: no op draws):

  tiny GPT (4 blocks)                     HF Llama 3.2 1B, small (4 layers)
  budget  compile      planner      ratio  compile      planner     ratio
          saved B/MFLOP  saved B/MFLOP     saved B/MFLOP  saved B/MFLOP
  0.05    393,216/385.88   393,216/385.88 1.00  139,264/56.36    139,264/56.36   1.00
  0.10    917,504/327.16   794,624/318.77 0.97  278,528/51.90    276,480/49.02   0.94
  0.20  1,835,008/268.44 1,720,320/243.27 0.91  557,056/42.99    557,056/39.06   0.91
  0.30  2,752,512/209.72 2,637,824/184.55 0.88  835,584/34.08    835,584/30.15   0.88
  0.40  3,670,016/150.99 3,555,328/125.83 0.83 1,114,112/25.17  1,105,920/21.50  0.85
  0.50  4,587,520/92.27  4,472,832/67.11  0.73 1,400,832/15.99  1,400,832/12.06  0.75
  0.60  5,001,220/67.11  4,997,120/33.55  0.50 1,644,164/8.39   1,613,824/5.24   0.62
  0.80  5,738,500/0.00   5,521,408/0.00   1.00 1,817,092/0.00   1,777,664/0.00   1.00

Every planner row's peak metered = predicted, twice. The planner recomputes no more than
compile at every budget on both models, strictly less at 6 of 8 on each (block 0 at an op-level
point with the prefix inside is in every plan from 0.2 to 0.8 on the GPT, and in every Llama
plan: it took 8.39 MFLOP off each of the GPT's rows 0.2 to 0.6 against the planner without it).
On the Llama the prefix could not go inside block 0's region before: its forward holds
``inputs_embeds`` (x_0) in a local to the end of the decoder, so x_0 outlived block 0 and the
planner kept the prefix as it is (0.05: 60.56 MFLOP, 1.07x compile's; 0.1-0.6: ratios 0.96,
0.93, 0.92, 0.89, 0.82, 0.81). Under ``prefix=full`` the region now frees x_0's storage when
block 0 returns (``policies._release_prefix_output``), which ``costs._prefix_facts`` allows only
where no op after block 0 reads x_0 and nothing holds it past the forward; the position ids
the prefix makes, which the wrapper keeps for its blocks' calls all step, are measured as kept
outside the region (``TrunkCost.prefix_kept_outside``; anything else left outside, as GPT-2's
token and position embeddings in locals of its forward, keeps the prefix as it is). At 0.8
compile recomputes only FLOP-free ops; the planner's zero-FLOP points keep less than compile
there.

Run: .venv/bin/python bench/planner_compile.py [--models gpt,llama] [--batch 2] [--points 6]
[--fractions 0.05,0.8] [--stock-partitioner]; the held-out models: --models attn,swiglu,res,mixed
--batch 4 (about 3 minutes).
Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import held_out
import torch

from ckpt_course import hf
from ckpt_course.costs import MENU, measure_costs
from ckpt_course.models import GPTConfig, TinyGPT
from ckpt_course.plan import (
    _left_holds,
    _segment_reach,
    _trunk_variants,
    measure_peaks,
    predict,
    segment_flops,
    segment_kept,
    segment_recompute_flops,
    with_trunk,
)
from ckpt_course.policies import _draws_random
from ckpt_course.recompute import EXTRA_FLOP_FORMULAS

FRACTIONS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8)
SWEEP = 60


def tiny_gpt():
    torch.manual_seed(0)
    return TinyGPT(GPTConfig()), None


def small_llama():
    torch.manual_seed(0)
    return hf.build(hf.small_config(hf.load_config("llama-3.2-1b"), n_layer=4, seq_len=64)), 64


MODELS = {"gpt": ("tiny GPT (4 blocks)", tiny_gpt),
          "llama": ("HF Llama 3.2 1B, small (4 layers)", small_llama),
          **{name: (f"held-out {name} (3 blocks)", make) for name, make in held_out.MODELS.items()}}
DEFAULT_MODELS = ("gpt", "llama")


def exact_backend(gm, example_inputs):
    """``aot_eager_decomp_partition`` whose partitioner may not recompute random ops.

    Inductor's decompositions turn ``native_dropout`` into ``aten.rand`` and a compare, and the
    partitioner's list of random ops (``native_dropout``, ``rand_like``, ``randn_like``) does
    not hold ``aten.rand``: so at a budget under 1.0 it re-runs ``rand`` in the backward, which
    draws new numbers, and the gradients are not the forward's (torch 2.13, CPU: 1e-2 off the
    budget-1.0 gradients on the held-out attention model; the inductor backend itself too).
    Marking every op that draws random numbers MUST_SAVE (the partitioner's own ban; attention
    with ``dropout_p`` 0 draws none and stays free) keeps the mask's source, and the gradients
    equal budget 1.0's (``grads_off`` per budget)."""
    from importlib import import_module

    import torch._functorch.config as functorch_config
    from functorch.compile import min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd
    from torch.utils.checkpoint import CheckpointPolicy

    def partition(joint, *args, **kwargs):
        for node in joint.graph.nodes:  # (attention with dropout_p 0 draws nothing: free)
            if isinstance(node.target, torch._ops.OpOverload) and _draws_random(
                    node.target, node.args, node.kwargs):
                node.meta["recompute"] = CheckpointPolicy.MUST_SAVE
        return min_cut_rematerialization_partition(joint, *args, compiler="inductor", **kwargs)

    nop = import_module("torch._dynamo.backends.debugging").get_nop_func()
    with functorch_config.patch({"unlift_effect_tokens": True}):
        return aot_autograd(
            fw_compiler=nop, bw_compiler=nop, partition_fn=partition,
            decompositions=lambda: import_module(
                "torch._inductor.compile_fx").select_decomp_table())(gm, example_inputs)


def gradients(model, batch, loss_fn) -> list:
    """The parameters' gradients of one step from a fixed random state (dropout's masks)."""
    torch.manual_seed(1234)
    loss_fn(batch).backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    return grads


def saved_and_backward_flops(model, batch, loss_fn) -> tuple[int, int]:
    """(bytes of the storages the forward packs for backward, FLOPs of the backward)."""
    skip = {id(t.untyped_storage()) for t in [*model.parameters(), *model.buffers(), *batch]}
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        if id(s) not in skip:
            storages[id(s)] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn(batch)
    counter = torch.utils.flop_counter.FlopCounterMode(display=False,
                                                       custom_mapping=EXTRA_FLOP_FORMULAS)
    with counter:
        loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(storages.values()), counter.get_total_flops()


def compiled(model, batch, fraction: float, eager_backward: int, backend,
             reference=None) -> tuple[dict, dict]:
    """Compile ``model.loss`` at ``activation_memory_budget=fraction`` and measure it twice: the
    first step compiles, the second runs the same compiled variant again. With ``reference``
    (budget 1.0's gradients), also whether this budget's gradients equal them bit for bit."""
    import torch._dynamo
    import torch._functorch.config as functorch_config

    torch._dynamo.reset()
    functorch_config.activation_memory_budget = fraction
    runs = []
    try:
        loss_fn = torch.compile(model.loss, backend=backend)
        for _ in range(2):
            start = time.perf_counter()
            saved, backward = saved_and_backward_flops(model, batch, loss_fn)
            runs.append(dict(saved=saved, recompute=backward - eager_backward,
                             seconds=round(time.perf_counter() - start, 1)))
        if reference is not None:
            runs[0]["grads_off"] = max((a - b).abs().max().item() for a, b in zip(
                reference, gradients(model, batch, loss_fn), strict=True))
    finally:
        functorch_config.activation_memory_budget = 1.0
    return runs[0], runs[1]


def _reference_gradients(model, batch, backend) -> list:
    """The gradients compile gives at budget 1.0 (it recomputes nothing): the ones every
    budget's must equal. Compiled, not eager: its dropout draws its numbers differently."""
    import torch._dynamo

    torch._dynamo.reset()
    loss_fn = torch.compile(model.loss, backend=backend)
    gradients(model, batch, loss_fn)  # the compiling call draws random numbers of its own
    return gradients(model, batch, loss_fn)


def kept_frontier(costs):
    """Every (kept bytes, recompute FLOPs, host bytes) the planner's placements reach,
    Pareto-pruned in all three: the chain DP's segments (plain, checkpointed runs of blocks,
    each menu and op-level option, offload) under each way the trunk runs (the suffix as it
    is, full or at its op-level points; the prefix as it is or inside block 0's checkpoint:
    ``plan._trunk_variants``), with the memory model's exact numbers, constrained by saved
    bytes instead of peak. Kept bytes count the trunk's too (``trunk_kept``). Returns (kept
    bytes, Prediction) pairs."""
    points = []
    for trunk, variant, _ in _trunk_variants(costs, segment_flops):
        for held, front in _placement_frontier(variant).items():
            points += [(kept + variant.trunk.prefix_kept + trunk.suffix_kept(held), flops, host,
                        (placement, variant)) for kept, flops, host, placement in front]
    return [(p[0], predict(p[-1][1], p[-1][0])) for p in _pruned(points)]


def trunk_kept(costs, prediction) -> int:
    """What the prefix and the suffix keep for backward under ``prediction`` (the measured
    ``prefix_kept`` and ``suffix_kept`` of its trunk; whether the last block keeps x_L decides
    which suffix_kept)."""
    trunk = with_trunk(costs, prediction.suffix, prediction.prefix).trunk
    return trunk.prefix_kept + trunk.suffix_kept(
        _left_holds(costs, prediction.placement[-1], costs.n))


def _placement_frontier(costs) -> dict:
    """Per final state (does the last block keep x_L?), the placements' Pareto points of
    (kept bytes, recompute FLOPs, host bytes), the blocks' alone (plus the recompute of a
    checkpointed suffix); under ``prefix=full`` the first segment is a checkpointed one."""
    fronts = {(0, _left_holds(costs, None, 0)): [(0, costs.trunk.recompute_flops, 0, ())]}
    reach = _segment_reach(costs)  # the segments the model can run (not across a loop's add)
    for i in range(costs.n):
        for held in (False, True):
            for kept, flops, host, placement in fronts.get((i, held), []):
                segments = [(i, i + 1, False), *((i, j, True) for j in range(i + 1, reach[i] + 1)),
                            *((i, i + 1, o) for o in costs.menu[i])]
                if i == 0 and costs.trunk.prefix:  # a checkpoint or an op-level option
                    segments = [seg for seg in segments if seg[2] is not False]
                for seg in segments:
                    state = (seg[1], _left_holds(costs, seg, seg[1]))
                    extra = costs.menu[i][seg[2]].host_bytes if isinstance(seg[2], str) else 0
                    fronts.setdefault(state, []).append(
                        (kept + segment_kept(costs, seg, held),
                         flops + segment_recompute_flops(costs, seg), host + extra,
                         (*placement, seg)))
        for key in [k for k in fronts if k[0] == i + 1]:
            fronts[key] = _pruned(fronts[key])
    return {held: front for (j, held), front in fronts.items() if j == costs.n}


def _pruned(points):
    """The points no other point matches or beats in all of kept, recompute and host bytes."""
    out = []
    for p in sorted(points, key=lambda p: p[:3]):
        if not any(q[0] <= p[0] and q[1] <= p[1] and q[2] <= p[2] for q in out):
            out.append(p)
    return out


def bench(name, make, batch_size, points, fractions=FRACTIONS,
          backend=exact_backend) -> dict:
    model, seq = make()
    batch = model.example_batch(batch_size, seq_len=seq,
                                generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    costs = measure_costs(model, batch_size, seq, menu=MENU, op_points=points, suffix=True)
    measure_s = time.perf_counter() - start
    eager_saved, eager_backward = saved_and_backward_flops(model, batch, model.loss)
    none = predict(costs, "none")
    none_kept = none.kept_bytes + trunk_kept(costs, none)
    plans = kept_frontier(costs)
    reference = _reference_gradients(model, batch, backend)
    print(f"\n{name}: batch {batch_size}, {costs.n} blocks; measure_costs with {points} op-level "
          f"points per block: {measure_s:.1f} s; eager saves {eager_saved:,} B, backward "
          f"{eager_backward / 1e6:.2f} MFLOP")
    print(f"  {'budget':>6} {'compile saved B':>16} {'compile MFLOP':>14} {'again':>6} "
          f"{'grads off':>9} "
          f"{'planner saved B':>16} {'planner MFLOP':>14} {'meter = pred':>12} {'again':>6}  "
          f"plan; then: the fewest bytes offloaded for recompute <= compile's")
    rows = []
    saved_by = {id(p): eager_saved - none_kept + kept for kept, p in plans}
    plans = [p for _, p in plans]
    for fraction in fractions:
        first, second = compiled(model, batch, fraction, eager_backward, backend, reference)
        row = dict(fraction=fraction, compile=first, compile_again=second)
        fits = [p for p in plans if saved_by[id(p)] <= first["saved"]]
        best = min((p for p in fits if not p.host_bytes),
                   key=lambda p: (p.recompute_flops, saved_by[id(p)]), default=None)
        offloading = min((p for p in fits if p.recompute_flops <= first["recompute"]),
                         key=lambda p: (p.host_bytes, p.recompute_flops), default=None)
        again = all(second[k] == first[k] for k in ("saved", "recompute"))
        line = (f"  {fraction:>6.2f} {first['saved']:>16,} {first['recompute'] / 1e6:>14.2f} "
                f"{again!s:>6} {first['grads_off']:>9.0e}")
        for label, plan in (("recompute only", best), ("with offload", offloading)):
            if plan is None:
                print(f"{line} {label}: nothing saves as little")
            elif label == "with offload" and plan is best:
                print(f"{line} {label}: none needed")
            else:
                saved = saved_by[id(plan)]
                meters = [measure_peaks(copy.deepcopy(model), plan.policy, batch_size, seq)[-1]
                          for _ in range(2)]  # on copies: the steps move the parameters
                assert meters == [plan.peak_bytes] * 2, (str(plan.policy), meters, plan.peak_bytes)
                print(f"{line} {saved:>16,} {plan.recompute_flops / 1e6:>14.2f} "
                      f"{meters[0] == plan.peak_bytes!s:>12} {meters[1] == meters[0]!s:>6}  "
                      f"{plan.policy}" + (f"; offloads {plan.host_bytes:,} B" if plan.host_bytes
                                          else ""))
                row[label] = dict(saved=saved, recompute=plan.recompute_flops,
                                  host_bytes=plan.host_bytes, policy=str(plan.policy),
                                  peak=plan.peak_bytes, metered=meters)
            line = " " * len(line)
        rows.append(row)
    compared = [r for r in rows if "recompute only" in r]
    return dict(rows=rows, measure_costs_s=round(measure_s, 1), compared=len(compared),
                at_most=sum(r["recompute only"]["recompute"] <= r["compile"]["recompute"]
                            for r in compared),
                strictly_less=sum(r["recompute only"]["recompute"] < r["compile"]["recompute"]
                                  for r in compared),
                matched_with_offload=sum("with offload" in r or r.get("recompute only", {}).get(
                    "recompute", float("inf")) <= r["compile"]["recompute"] for r in rows))


def table(name: str, result: dict) -> str:
    """One model's comparison: per budget, compile's and the planner's (recompute only) saved
    bytes and MFLOP, and the ratio of the planner's recompute to compile's."""
    lines = [f"{name}", f"  {'budget':>6} {'compile B':>10} {'MFLOP':>7} {'planner B':>10} "
             f"{'MFLOP':>7} {'ratio':>6}"]
    for row in result["rows"]:
        c, p = row["compile"], row.get("recompute only")
        ratio = ("-" if p is None else "1.00" if p["recompute"] == c["recompute"] else
                 "inf" if not c["recompute"] else f"{p['recompute'] / c['recompute']:.2f}")
        planner = (f"{'none':>10} {'-':>7}" if p is None else
                   f"{p['saved']:>10,} {p['recompute'] / 1e6:>7.2f}")
        lines.append(f"  {row['fraction']:>6.2f} {c['saved']:>10,} {c['recompute'] / 1e6:>7.2f} "
                     f"{planner} {ratio:>6}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS),
                        help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--stock-partitioner", action="store_true",
                        help="compile with torch's own aot_eager_decomp_partition, which may "
                             "recompute random ops (gradients then differ: column grads)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--points", type=int, default=6, help="op-level points per block")
    parser.add_argument("--fractions", default=",".join(map(str, FRACTIONS)),
                        help="compile's activation_memory_budget values, comma-separated")
    args = parser.parse_args()
    try:
        fractions = tuple(float(f) for f in args.fractions.split(","))
    except ValueError:
        parser.error(f"--fractions takes numbers such as 0.05,0.8; got {args.fractions!r}")
    models = [m.strip() for m in args.models.split(",")]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"--models: unknown {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    backend = "aot_eager_decomp_partition" if args.stock_partitioner else exact_backend
    results = {MODELS[m][0]: bench(MODELS[m][0], MODELS[m][1], args.batch, args.points,
                                   fractions, backend) for m in models}
    for name, r in results.items():
        print(table(name, r))
    for name, r in results.items():
        print(f"{name}: planner recompute <= compile at {r['at_most']} of {r['compared']} "
              f"budgets it reaches by recompute, strictly less at {r['strictly_less']}; "
              f"recompute <= compile with offload at {r['matched_with_offload']} of "
              f"{len(r['rows'])}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
