"""What sharding adds to checkpointing: real FSDP2 on 2 CPU processes, measured per rank.

Checkpointing shrinks activations; it does nothing for the model's state. Per GPU, training keeps
parameters, gradients and optimizer state (AdamW: two moments per parameter) for the whole model,
plus the activations of its own micro-batch. Fully sharded data parallelism (FSDP, ZeRO-3) splits
the model's state across N ranks: each rank keeps 1/N of every parameter, gradient and moment, and
all-gathers a block's parameters just for the moment the block runs. Activations do not shrink:
each rank still runs the whole model on its own micro-batch. Per GPU, roughly::

    (parameter + gradient + optimizer bytes) / N  +  activations of one micro-batch

``run_fsdp(world_size=2)`` shows it for real: it starts 2 processes that talk over gloo on
localhost (a free port on 127.0.0.1, no other network), wraps every block and the
model with ``torch.distributed.fsdp.fully_shard`` (FSDP2) under full checkpointing, trains a few
AdamW steps, and measures on each rank:

- parameter, gradient and optimizer bytes of the local shards (``DTensor.to_local()``);
- activation bytes: the storages autograd saved in the last forward (deduplicated, parameters
  left out), which under full checkpointing are the blocks' inputs plus what the head keeps.

``measure_single`` measures the same model, policy and batch in this process, without FSDP.

The model for N devices: ``shard(costs, n)`` turns a chain's measured costs into per-device ones
(ZeRO-3 / FSDP, an estimate), so the planner can place checkpoints on each device and
``min_devices`` find how many devices a budget needs. ``per_gpu_bytes`` / ``min_gpus`` are its
closed form, state / N + activations, for arithmetic by hand (tests hold them together).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
from torch import nn

from .costs import Backward, ChainCosts
from .meter import parse_budget
from .models import GPTConfig, TinyGPT
from .plan import Prediction, _optimal
from .policies import apply_policy
from .step import make_optimizer
from .units import fmt_bytes

SMALL = GPTConfig(n_layer=2, d_model=64, n_head=4, seq_len=32)


@dataclass
class RankMemory:
    """One process's share of a training step, in bytes (exact, device-independent)."""

    rank: int
    world_size: int
    param_bytes: int  # local parameter shards
    grad_bytes: int  # local gradient shards (after the last backward)
    optimizer_bytes: int  # AdamW moments exp_avg and exp_avg_sq: sharded like the parameters
    step_counter_bytes: int  # AdamW's scalar 'step' per parameter: 4 bytes each, on every rank
    activation_bytes: int  # saved for backward by the last forward
    loss: float

    @property
    def state_bytes(self) -> int:
        """Parameters, gradients and optimizer state: what sharding divides."""
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes + self.step_counter_bytes


@dataclass
class ShardingResult:
    single: RankMemory  # one process, no FSDP
    ranks: list[RankMemory]  # FSDP, one per rank
    seconds: float  # wall clock of the distributed run, spawn included

    def __str__(self) -> str:
        cols = ["param_bytes", "grad_bytes", "optimizer_bytes", "activation_bytes"]
        head = f"{'':<16}" + "".join(f"{c.removesuffix('_bytes'):>14}" for c in cols)
        rows = [("1 process", self.single)] + [
            (f"rank {r.rank} of {r.world_size}", r) for r in self.ranks]
        lines = [head] + [f"{name:<16}" + "".join(f"{fmt_bytes(getattr(r, c)):>14}" for c in cols)
                          for name, r in rows]
        return "\n".join(lines)


# ---------------------------------------------------------------- measuring one process
def _local_bytes(t: torch.Tensor) -> int:
    """Bytes this process holds for ``t``: its local shard when ``t`` is a DTensor."""
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.numel() * local.element_size()


class _SavedBytes:
    """saved_tensors_hooks that add up what autograd saves, once per storage, parameters left
    out (under FSDP the parameters are all-gathered copies: still not activations)."""

    def __init__(self):
        self.storages = {}

    def pack(self, t):
        base = t._base if t._base is not None else t
        if not isinstance(base, nn.Parameter):
            storage = t.untyped_storage()
            self.storages[id(storage)] = storage
        return t

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.storages.values())


def _train_and_measure(model, optimizer, batches, rank: int, world_size: int) -> RankMemory:
    saved = _SavedBytes()
    for batch in batches:
        saved.storages.clear()
        optimizer.zero_grad(set_to_none=True)
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
            loss = model.loss(batch)
        activations = saved.nbytes
        saved.storages.clear()
        loss.backward()
        optimizer.step()
    moments = [v for s in optimizer.state.values() for k, v in s.items() if k != "step"]
    counters = [s["step"] for s in optimizer.state.values() if torch.is_tensor(s.get("step"))]
    return RankMemory(
        rank=rank, world_size=world_size,
        param_bytes=sum(_local_bytes(p) for p in model.parameters()),
        grad_bytes=sum(_local_bytes(p.grad) for p in model.parameters() if p.grad is not None),
        optimizer_bytes=sum(_local_bytes(v) for v in moments),
        step_counter_bytes=sum(_local_bytes(v) for v in counters),
        activation_bytes=activations, loss=loss.item())


def _setup(config: GPTConfig, policy: str, batch_size: int, steps: int, seed: int, rank: int):
    torch.manual_seed(seed)  # the same initial weights in every process
    model = TinyGPT(config)
    apply_policy(model, policy)
    generator = torch.Generator().manual_seed(seed + rank)  # each rank its own micro-batches
    batches = [model.example_batch(batch_size, generator=generator) for _ in range(steps)]
    return model, batches


def measure_single(config: GPTConfig = SMALL, policy: str = "full", batch_size: int = 4,
                   steps: int = 2, seed: int = 0) -> RankMemory:
    """The same model, policy and micro-batch in this process, without FSDP."""
    model, batches = _setup(config, policy, batch_size, steps, seed, 0)
    optimizer = make_optimizer(model)
    return _train_and_measure(model, optimizer, batches, 0, 1)


# ---------------------------------------------------------------- the distributed run
def _worker(rank: int, world_size: int, port: int, outdir: str, spec: dict) -> None:
    """One rank (its own process): FSDP2 over gloo, then write its RankMemory as JSON."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)  # N processes share the machine's cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size)
    try:
        config = GPTConfig(**spec["config"])
        model, batches = _setup(config, spec["policy"], spec["batch_size"], spec["steps"],
                                spec["seed"], rank)
        for block in model.blocks:
            fully_shard(block)  # each block's parameters all-gathered only while it runs
        fully_shard(model)  # the rest (embeddings, final norm, head)
        optimizer = make_optimizer(model)
        result = _train_and_measure(model, optimizer, batches, rank, world_size)
        Path(outdir, f"rank{rank}.json").write_text(json.dumps(asdict(result)))
        dist.barrier()  # both ranks are done with every collective
    except BaseException:
        dist.destroy_process_group()
        raise
    leave_rank()


def leave_rank() -> None:
    """End a rank whose results are written, without C++ teardown: destroying a gloo process
    group at exit sometimes aborts the process on this machine ("terminate called without an
    active exception", exit -6; seen under load with FSDP and DDP), though every step succeeded."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _loopback_interface() -> str | None:
    names = [name for _, name in socket.if_nameindex()] if hasattr(socket, "if_nameindex") else []
    return next((n for n in ("lo", "lo0") if n in names), None)


def launch_ranks(module: str, world_size: int, spec: dict, timeout_s: float = 120,
                 what: str = "FSDP") -> list:
    """Start ``world_size`` fresh ``python -m <module> RANK WORLD_SIZE PORT OUTDIR SPEC``
    processes (like torchrun's workers, so none re-runs the caller's script or notebook) that
    meet over gloo on 127.0.0.1; return what each rank wrote to ``OUTDIR/rank<r>.json``."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    interface = _loopback_interface()
    if interface:
        env.setdefault("GLOO_SOCKET_IFNAME", interface)  # gloo's own links over localhost too
    with tempfile.TemporaryDirectory() as outdir:
        port = _free_port()
        procs = [subprocess.Popen(
            [sys.executable, "-m", module, str(rank), str(world_size), str(port), outdir,
             json.dumps(spec)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for rank in range(world_size)]
        deadline = time.monotonic() + timeout_s
        try:
            outputs = [p.communicate(timeout=max(0.1, deadline - time.monotonic()))[0]
                       for p in procs]
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"the {world_size} {what} processes did not finish in "
                               f"{timeout_s:.0f} s; is the machine busy? try timeout_s=300"
                               ) from None
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        for rank, (p, out) in enumerate(zip(procs, outputs, strict=True)):
            if p.returncode != 0:
                raise RuntimeError(f"{what} rank {rank} failed (exit {p.returncode}):\n"
                                   f"{out[-3000:]}")
        return [json.loads(Path(outdir, f"rank{r}.json").read_text())
                for r in range(world_size)]


def run_fsdp(world_size: int = 2, config: GPTConfig = SMALL, policy: str = "full",
             batch_size: int = 4, steps: int = 2, seed: int = 0,
             timeout_s: float = 120) -> ShardingResult:
    """Start ``world_size`` CPU processes running FSDP2 over gloo (``launch_ranks``); return
    what each measured, with the same run in one process without FSDP for comparison."""
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size is a number of processes >= 1, got {world_size!r}")
    spec = {"config": {f.name: getattr(config, f.name) for f in fields(config)},
            "policy": str(policy), "batch_size": batch_size, "steps": steps, "seed": seed}
    start = time.perf_counter()
    ranks = [RankMemory(**r) for r in launch_ranks("ckpt_course.sharding", world_size, spec,
                                                    timeout_s)]
    seconds = time.perf_counter() - start
    single = measure_single(config, policy, batch_size, steps, seed)
    return ShardingResult(single, ranks, seconds)


# ---------------------------------------------------------------- the model for N devices
def shard(costs: ChainCosts, devices: int) -> ChainCosts:
    """Per-device costs when parameters, gradients and optimizer state are split over
    ``devices`` (ZeRO-3 / FSDP ``fully_shard``), an estimate: each device keeps 1/N of them,
    plus the parameters of the block that runs (gathered for its forward and backward) and that
    block's full gradient until it is reduce-scattered. Activations are not split."""
    check = f"devices is a whole number >= 1, got {devices!r}"
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        raise ValueError(check)
    if devices == 1:
        return costs
    n = devices
    block = max((c.grad_bytes for c in costs.layers), default=0)
    persistent = costs.param_bytes + costs.optimizer_bytes
    trunk_grads = max(costs.param_bytes - costs.gradient_bytes, 0)
    t = costs.trunk
    trunk = replace(
        t, base_bytes=t.base_bytes - persistent + persistent // n + block,
        suffix_left=t.suffix_left - trunk_grads + trunk_grads // n,
        backward_left=t.backward_left - trunk_grads + trunk_grads // n)

    def split(back: Backward, g: int) -> Backward:
        kept = g - g // n  # what reduce-scatter gives back after the block's backward
        return replace(back, change_held=back.change_held - kept,
                       change_free=back.change_free - kept)

    layers = tuple(replace(c, grad_bytes=c.grad_bytes // n,
                           backward=split(c.backward, c.grad_bytes),
                           checkpointed_backward=split(c.checkpointed_backward, c.grad_bytes))
                   for c in costs.layers)
    return replace(costs, layers=layers, trunk=trunk, name=f"{costs.name} on {n} devices",
                   param_bytes=costs.param_bytes // n, optimizer_bytes=costs.optimizer_bytes // n,
                   notes=(*costs.notes, f"sharded over {n} devices (ZeRO-3/FSDP estimate)"))


def min_devices(costs: ChainCosts, budget, most: int = 4096) -> tuple[int, Prediction] | None:
    """The fewest devices over which sharding (``shard``) lets some placement fit ``budget``,
    and that placement (the planner's optimum on each device); None if not even ``most`` do.
    More devices never need more bytes each, so: double until it fits, then bisect."""
    return _min_devices(costs, parse_budget(budget), most)


def _min_devices(costs: ChainCosts, budget: float, most: int = 4096):
    """``min_devices`` with the budget already parsed (bytes)."""
    fits = {}

    def fit(n):
        if n not in fits:
            fits[n] = _optimal(shard(costs, n), budget)
        return fits[n]

    high = 1
    while fit(high) is None:
        if high >= most:
            return None
        high = min(2 * high, most)
    low = high // 2  # does not fit (or 0)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if fit(mid) is not None else (mid, high)
    return high, fits[high]


def per_gpu_bytes(n_params: int, n_gpus: int, activation_bytes: int,
                  bytes_per_param: float = 2 + 2 + 8) -> float:
    """The closed form of ``shard``'s split: bytes per GPU with the model state fully sharded
    over ``n_gpus``, ``n_params * bytes_per_param / n_gpus + activation_bytes``. The default 12
    bytes per parameter: bf16 parameter (2) + bf16 gradient (2) + two fp32 AdamW moments (8).
    It adds the activations to the whole state as if both were alive at once, and leaves out
    what ``shard`` knows (the running block's gathered parameters and full gradient, when each
    is alive, the optimizer's temporaries): arithmetic by hand; the planner uses ``shard``."""
    if isinstance(n_gpus, bool) or not isinstance(n_gpus, int) or n_gpus < 1:
        raise ValueError(f"n_gpus is a whole number >= 1, got {n_gpus!r}")
    return n_params * bytes_per_param / n_gpus + activation_bytes


def min_gpus(n_params: int, activation_bytes: int, gpu_bytes: float,
             bytes_per_param: float = 2 + 2 + 8) -> int | None:
    """The fewest GPUs whose share (``per_gpu_bytes``) fits ``gpu_bytes``; None if activations
    alone do not fit (sharding the model state cannot help then: checkpoint, or shard the
    activations too)."""
    room = gpu_bytes - activation_bytes
    if room <= 0:
        return None
    n = max(1, int(-(-n_params * bytes_per_param // room)))  # ceil
    while per_gpu_bytes(n_params, n, activation_bytes, bytes_per_param) > gpu_bytes:
        n += 1
    return n


if __name__ == "__main__":  # one rank, started by run_fsdp: RANK WORLD_SIZE PORT OUTDIR SPEC
    _rank, _world, _port, _outdir, _spec = sys.argv[1:6]
    _worker(int(_rank), int(_world), int(_port), _outdir, json.loads(_spec))
