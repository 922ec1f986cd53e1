"""What users trip over with checkpointing, each reproduced small enough to run in a lesson.

Lesson 3b (``notebooks/3b_pitfalls.ipynb``) and its exercise use these; each function runs one
experiment and returns plain data, so a check can measure a learner's fix the same way:

- ``rss_reading``: the instrument people read (the process's peak RSS; the CUDA allocator's
  reserved bytes), against the meter's live tensor bytes.
- ``FrozenFront`` / ``block_gradients``: a frozen embedding feeding a checkpointed block, the
  classic frozen-embeddings / LoRA case: under reentrant checkpoint the block gets no gradient.
- ``BatchNormNet`` / ``bn_experiment``: BatchNorm inside a checkpoint updates its running
  statistics in forward *and* in the recompute; ``buffers_restored`` is the fix.
- ``TokenDrop``: a block whose recompute has another shape when the RNG is not replayed, what
  ``determinism_check="default"`` catches (it compares shapes, dtypes and devices, not values).
- ``compiled_saved_bytes`` / ``plan_at_saved_bytes``: ``torch.compile``'s
  ``activation_memory_budget`` against the course planner at the same saved bytes.
- ``ddp_cases``: DDP over 2 gloo processes, checkpointed, under the settings that do and do not
  raise "Expected to mark a variable ready only once".
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .models import HandTraceNet
from .plan import Prediction, all_placements, predict
from .units import fmt_bytes

# ---------------------------------------------------------------- 1. the wrong instrument


def peak_rss_bytes() -> int:
    """The process's peak resident set size (``ru_maxrss``, KiB on Linux): what `top`, a job
    scheduler or `/usr/bin/time -v` report. A high-water mark: it never goes down."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class Reading:
    """One policy's step, read with the instruments people use and with the meter."""

    policy: str
    peak_rss_bytes: int  # the process's high-water mark after the step
    meter_saved_bytes: int  # live tensor bytes forward left for backward (exact)
    meter_peak_bytes: int  # the step's highest live tensor bytes (exact)
    cuda_reserved_bytes: int | None = None  # the caching allocator's reserved bytes, on CUDA
    cuda_peak_allocated_bytes: int | None = None  # the allocator's own peak of live blocks

    def __str__(self) -> str:
        """One line per instrument, as lesson 3b.1 prints them side by side."""
        line = (f"{self.policy:>5}: peak RSS {fmt_bytes(self.peak_rss_bytes):>11} | meter: kept "
                f"for backward {fmt_bytes(self.meter_saved_bytes):>10}, peak "
                f"{fmt_bytes(self.meter_peak_bytes)}")
        if self.cuda_reserved_bytes is not None:
            line += (f"\n       CUDA reserved {fmt_bytes(self.cuda_reserved_bytes)}, allocated "
                     f"peak {fmt_bytes(self.cuda_peak_allocated_bytes)}")
        return line


def compile_section_on() -> bool:
    """Lesson 3b.4 compiles (seconds on a CPU); ``CKPT_COURSE_COMPILE=0`` skips it."""
    return os.environ.get("CKPT_COURSE_COMPILE", "1") != "0"


def rss_reading(model, policies, batch_size: int) -> list[Reading]:
    """Run one forward and backward per policy, in order, in this process; read each step with
    peak RSS (and on CUDA the allocator's reserved bytes) and with the meter."""
    from .train import measure_step

    out = []
    device = next(model.parameters()).device
    for policy in policies:
        record = measure_step(model, policy, batch_size=batch_size)
        reading = Reading(str(policy), peak_rss_bytes(), record.saved_bytes, record.peak_bytes)
        if device.type == "cuda":
            reading.cuda_reserved_bytes = torch.cuda.memory_reserved(device)
            reading.cuda_peak_allocated_bytes = record.cuda_peak_bytes
        out.append(reading)
    return out


# ---------------------------------------------------------------- 2. reentrant, frozen input
class FrozenFront(nn.Module):
    """A frozen embedding (``requires_grad=False``), one trainable block under checkpoint, and
    a trainable head: the shape of fine-tuning with frozen embeddings (LoRA, adapters)."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.embed = nn.Linear(width, width).requires_grad_(False)
        self.block = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, width))
        self.head = nn.Linear(width, 1)

    def forward(self, x, checkpoint_kwargs=None, input_requires_grad=False):
        h = self.embed(x)
        if input_requires_grad:  # what HF's enable_input_require_grads() does, from a hook
            h.requires_grad_(True)
        if checkpoint_kwargs is None:
            h = self.block(h)
        else:
            h = checkpoint(self.block, h, **checkpoint_kwargs)
        return self.head(h).square().mean()


CHECKPOINT_KWARGS = ("use_reentrant", "preserve_rng_state", "determinism_check", "debug")


def block_gradients(checkpoint_kwargs=None, input_requires_grad=False, width: int = 16,
                    batch: int = 8, seed: int = 0) -> dict[str, torch.Tensor | None]:
    """One backward of ``FrozenFront``: each block parameter's gradient (None: it got none).
    ``checkpoint_kwargs=None`` runs the block plainly (the reference)."""
    if checkpoint_kwargs is not None:
        unknown = set(checkpoint_kwargs) - set(CHECKPOINT_KWARGS)
        if unknown:
            raise ValueError(f"unknown checkpoint arguments {sorted(unknown)}: use "
                             f"{', '.join(CHECKPOINT_KWARGS)}")
    torch.manual_seed(seed)
    model = FrozenFront(width)
    x = torch.randn(batch, width)
    model(x, checkpoint_kwargs, input_requires_grad).backward()
    return {name: None if p.grad is None else p.grad.clone()
            for name, p in model.block.named_parameters()}


# ---------------------------------------------------------------- 7. BatchNorm recomputed
class BatchNormNet(nn.Module):
    """``depth`` blocks of Linear -> BatchNorm1d -> ReLU, each checkpointed or not."""

    def __init__(self, width: int = 32, depth: int = 2):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU())
            for _ in range(depth))

    def forward(self, x, checkpointed: bool = False, context_fn=None):
        for block in self.blocks:
            if not checkpointed:
                x = block(x)
            elif context_fn is None:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = checkpoint(block, x, use_reentrant=False, context_fn=context_fn(block))
        return x.square().mean()


@contextlib.contextmanager
def _buffers_put_back(module: nn.Module):
    saved = [(b, b.clone()) for b in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, value in saved:
                b.copy_(value)


def buffers_restored(module: nn.Module):
    """A ``context_fn`` for ``checkpoint``: forward runs as usual; the recompute runs inside a
    context that copies the module's buffers on entry and puts them back on exit, so running
    statistics are updated once per step, by forward. Hand-written because torch has none:
    ``determinism_check`` compares shapes, not side effects."""
    return lambda: (contextlib.nullcontext(), _buffers_put_back(module))


BN_FIXES = ("none", "restore-buffers", "use_reentrant=True", "eval-mode", "no-checkpoint")


def bn_experiment(fix: str = "none", width: int = 32, depth: int = 2, batch: int = 64,
                  seed: int = 0) -> dict:
    """One checkpointed training step of ``BatchNormNet`` with ``fix`` applied, against the
    same step plainly. Returns data: the running statistics of each run, whether the gradients
    are equal, and the bytes forward left for backward (live, from the meter) in each."""
    from .meter import MemoryMeter

    if fix not in BN_FIXES:
        raise ValueError(f"fix must be one of {', '.join(BN_FIXES)}; got {fix!r}")

    def run(how):
        torch.manual_seed(seed)
        model = BatchNormNet(width, depth)
        x = torch.randn(batch, width)
        if how == "eval-mode":
            model.eval()
        with MemoryMeter() as meter:
            meter.track(model)
            start = meter.live_bytes
            if how in ("plain", "no-checkpoint"):
                loss = model(x)
            elif how == "use_reentrant=True":
                loss = x
                for block in model.blocks:
                    loss = checkpoint(block, loss.requires_grad_(), use_reentrant=True)
                loss = loss.square().mean()
            else:
                loss = model(x, True, buffers_restored if how == "restore-buffers" else None)
            saved = meter.live_bytes - start
            loss.backward()
        meter.untrack()
        bn = [b[1] for b in model.blocks]
        return {"running_mean": [m.running_mean.clone() for m in bn],
                "running_var": [m.running_var.clone() for m in bn],
                "num_batches_tracked": [int(m.num_batches_tracked) for m in bn],
                "grads": [p.grad.clone() for p in model.parameters()],
                "saved_bytes": saved}

    plain, fixed = run("plain"), run(fix)
    same_stats = all(torch.equal(a, b) for k in ("running_mean", "running_var")
                     for a, b in zip(plain[k], fixed[k], strict=True))
    return {"plain_tracked": plain["num_batches_tracked"],
            "tracked": fixed["num_batches_tracked"],
            "same_running_stats": same_stats and plain["num_batches_tracked"]
            == fixed["num_batches_tracked"],
            "same_grads": all(torch.equal(a, b) for a, b in zip(plain["grads"], fixed["grads"],
                                                                 strict=True)),
            "plain_saved_bytes": plain["saved_bytes"], "saved_bytes": fixed["saved_bytes"],
            "plain_running_mean": plain["running_mean"][0],
            "running_mean": fixed["running_mean"][0]}


class TokenDrop(nn.Module):
    """Drops a random share of the rows (tokens), then a Linear: the recompute makes another
    shape unless the RNG is replayed (``preserve_rng_state=True``)."""

    def __init__(self, width: int = 8, p: float = 0.5):
        super().__init__()
        self.linear, self.p = nn.Linear(width, width), p

    def forward(self, x):
        return self.linear(x[torch.rand(x.shape[0], device=x.device) >= self.p])


# ---------------------------------------------------------------- 8. checkpoint_sequential
class MLPChain(HandTraceNet):
    """The hand-trace net with blocks Linear -> GELU -> Linear: unlike Linear -> ReLU, a block
    keeps more than its input (GELU's input and output), so checkpointing it saves memory."""

    def __init__(self, width: int = 64, depth: int = 4):
        super().__init__(width, depth)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
            for _ in range(depth))


def sequential_loss(model: HandTraceNet, segments: int):
    """A ``loss_fn`` for ``measure_step``: the model's loss with its blocks run by torch's
    ``checkpoint_sequential(blocks, segments, x)`` (non-reentrant)."""
    from torch.utils.checkpoint import checkpoint_sequential

    def loss(batch):
        x, y = batch
        out = checkpoint_sequential(model.blocks, segments, x, use_reentrant=False)
        return nn.functional.mse_loss(out, y)

    return loss


# ---------------------------------------------------------------- 4. torch.compile's budget
def saved_for_backward(model: nn.Module, x: torch.Tensor, run=None) -> int:
    """Bytes autograd saves for backward while ``run(x)`` (default ``model(x)``) runs, one count
    per storage; the model's parameters and ``x`` left out, as the planner leaves them out.
    Read with ``saved_tensors_hooks``, which also see what a compiled graph saves (its forward
    is one autograd node), where a dispatch-mode meter cannot go: a compiled graph runs its
    kernels below the dispatcher."""
    skip = {t.untyped_storage().data_ptr() for t in (*model.parameters(), x)}
    storages: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = (run or model)(x)
    out.sum().backward()
    return sum(storages.values())


def compiled_saved_bytes(model: nn.Module, x: torch.Tensor, budgets) -> dict[float, int]:
    """For each ``activation_memory_budget`` (0: recompute all it can, 1: the default
    partitioner's choice), compile ``model`` afresh and count what its forward saves."""
    import torch._dynamo
    import torch._functorch.config as functorch_config

    out = {}
    for budget in budgets:
        torch._dynamo.reset()  # the budget is read when the graph is partitioned: recompile
        with functorch_config.patch(activation_memory_budget=budget):
            out[budget] = saved_for_backward(model, x, torch.compile(model))
    torch._dynamo.reset()
    return out


def plan_at_saved_bytes(costs, saved_bytes: int) -> Prediction | None:
    """The course planner's cheapest whole-block placement (fewest recomputed FLOPs) whose
    forward keeps at most ``saved_bytes``: what the planner would do with compile's budget.
    Exhaustive over the 2^(L-1)·... placements, so for small chains only."""
    fits = [p for p in map(lambda pl: predict(costs, pl), all_placements(costs.n))
            if p.kept_bytes <= saved_bytes]
    return min(fits, key=lambda p: (p.recompute_flops, p.kept_bytes), default=None)


# ---------------------------------------------------------------- 5. DDP, 2 gloo processes
# (reentrant, checkpoint the shared module twice, find_unused_parameters, static_graph)
DDP_CASES = {
    "non-reentrant": (False, False, False, False),
    "reentrant": (True, False, False, False),
    "reentrant + find_unused_parameters": (True, False, True, False),
    "reentrant + find_unused_parameters + static_graph": (True, False, True, True),
    "reentrant, module checkpointed twice": (True, True, False, False),
    "reentrant, module checkpointed twice + static_graph": (True, True, False, True),
    "non-reentrant, module checkpointed twice": (False, True, False, False),
    "non-reentrant, twice + find_unused_parameters": (False, True, True, False),
}


class TwiceNet(nn.Module):
    """``a`` then ``b`` under checkpoint; with ``twice``, ``b`` runs (checkpointed) again: a
    shared (tied) module, each of whose parameters DDP sees become ready twice."""

    def __init__(self, reentrant: bool, twice: bool, width: int = 8):
        super().__init__()
        self.a, self.b = nn.Linear(width, width), nn.Linear(width, width)
        self.reentrant, self.twice = reentrant, twice

    def forward(self, x):
        x = checkpoint(self.b, self.a(x), use_reentrant=self.reentrant)
        if self.twice:
            x = checkpoint(self.b, x, use_reentrant=self.reentrant)
        return x


def _run_case(reentrant, twice, find_unused, static, ddp: bool, steps: int = 2) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)  # the same weights and batches on every rank and in the reference
    model = TwiceNet(reentrant, twice)
    wrapped = (DistributedDataParallel(model, find_unused_parameters=find_unused,
                                       static_graph=static) if ddp else model)
    try:
        for _ in range(steps):
            model.zero_grad(set_to_none=True)
            wrapped(torch.randn(4, 8)).sum().backward()
    except RuntimeError as error:
        return {"error": str(error).splitlines()[0], "grads": None}
    return {"error": None, "grads": [p.grad.tolist() for p in model.parameters()]}


def _ddp_worker(rank: int, world_size: int, port: int, outdir: str, spec: dict) -> None:
    import torch.distributed as dist

    from .sharding import leave_rank

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size)
    result = {name: _run_case(*DDP_CASES[name], ddp=True) for name in spec["cases"]}
    Path(outdir, f"rank{rank}.json").write_text(json.dumps(result))
    leave_rank()  # a case that raised mid-backward leaves DDP's reducer with a bucket in flight


def ddp_cases(cases=tuple(DDP_CASES), timeout_s: float = 120) -> dict[str, dict]:
    """Each case on 2 gloo processes (rank 0's outcome) next to the same steps in one process
    without DDP: ``{case: {"error": first line or None, "grads_match": bool or None}}``. Every
    rank sees the same batch, so DDP's averaged gradients equal the single-process ones."""
    from .sharding import launch_ranks

    unknown = set(cases) - set(DDP_CASES)
    if unknown:
        raise ValueError(f"unknown DDP cases {sorted(unknown)}: pick from {list(DDP_CASES)}")
    ranks = launch_ranks("ckpt_course.pitfalls", 2, {"cases": list(cases)}, timeout_s, "DDP")
    out = {}
    for name in cases:
        got = ranks[0][name]
        reference = _run_case(*DDP_CASES[name], ddp=False)
        match = None if got["grads"] is None else got["grads"] == reference["grads"]
        out[name] = {"error": got["error"], "grads_match": match}
    return out


if __name__ == "__main__":  # one DDP rank, started by ddp_cases: RANK WORLD_SIZE PORT OUTDIR SPEC
    _rank, _world, _port, _outdir, _spec = sys.argv[1:6]
    _ddp_worker(int(_rank), int(_world), int(_port), _outdir, json.loads(_spec))
