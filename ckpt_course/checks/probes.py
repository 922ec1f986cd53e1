"""Trusted reference experiments for the checks, and the pieces the exercises' locked setup cells
share with them (so the learner's run and the reference build the same blocks from one spec).

A *spec* is a dict of plain numbers (data, so it crosses to a grader's worker): ``seed``,
``batch``, ``width``, ``blocks`` and, for checkpointing, ``hidden`` and ``dropout``. Every probe
takes specs only and returns data, so ``checks.peak_of("ckpt_course.checks.probes:<name>", spec,
like=fn)`` can run it in a fresh worker as well as here.

The reference implementations of what the learner builds (torch's checkpoint on the blocks, the
right offload hooks) live in ``references``, which no answer may import (grading.py): the names
below that lead there are looked up only when used, so a worker never loads them with probes.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import replace

import torch
from torch import nn
from torch.utils._python_dispatch import _disable_current_modes

from ..costs import ChainCosts, LayerCost, OptionCost, TrunkCost


# ---------------------------------------------------------------- hand-written checkpoint
def mlp_blocks(spec: dict) -> tuple[list[nn.Module], torch.Tensor]:
    """``spec["blocks"]`` x (Linear(width, hidden) -> GELU -> Dropout -> Linear(hidden, width)),
    and an input that needs a gradient, both from ``spec["seed"]``."""
    torch.manual_seed(spec["seed"])
    w, h, p = spec["width"], spec["hidden"], spec["dropout"]
    blocks = [nn.Sequential(nn.Linear(w, h), nn.GELU(), nn.Dropout(p), nn.Linear(h, w))
              for _ in range(spec["blocks"])]
    x = torch.randn(spec["batch"], w, requires_grad=True)
    return blocks, x


def run_blocks(spec: dict, wrap) -> dict:
    """Forward through the blocks with ``wrap(block, h)``, backward of the sum, and the results
    as data: output, input gradient, parameter gradients, and the next random numbers (a
    checkpoint must leave the random stream where a plain run leaves it)."""
    blocks, x = mlp_blocks(spec)
    torch.manual_seed(spec["seed"] + 1)  # the dropout masks
    h = x
    for block in blocks:
        h = wrap(block, h)
    h.sum().backward()
    return {"out": h.detach(), "x_grad": x.grad,
            "grads": [p.grad for b in blocks for p in b.parameters()],
            "rng_after": torch.rand(3)}


def plain(spec: dict) -> dict:
    """No checkpointing: every block keeps its tape."""
    return run_blocks(spec, lambda block, h: block(h))


# ---------------------------------------------------------------- offload
def relu_chain(spec: dict) -> tuple[nn.Module, torch.Tensor]:
    """``spec["blocks"]`` x (Linear(width, width) -> ReLU) and an input (no gradient needed)."""
    torch.manual_seed(spec["seed"])
    w = spec["width"]
    net = nn.Sequential(*(m for _ in range(spec["blocks"]) for m in (nn.Linear(w, w), nn.ReLU())))
    return net, torch.randn(spec["batch"], w)


# In a grader's worker, the trusted reaper counts what the host store receives through this pipe
# (grade_worker.HOST_FD_ENV): the check reads that count, not the store's own counters.
_HOST_FD = int(os.environ.get("CKPT_COURSE_HOST_FD", "-1") or -1)


def _copy_out(raw) -> None:
    if _HOST_FD < 0:
        return
    view = memoryview(raw).cast("B")
    while view:
        view = view[os.write(_HOST_FD, view):]


class Host:
    """Host memory for the offload exercise: ``put(t)`` copies a tensor out of this process's
    memory (into a temporary file) and returns a handle; ``get(handle)`` brings a new copy back.

    Why a file: on a CPU-only machine there is no device/host split, and a copy kept in a Python
    list would still be in the process's memory (and in its peak RSS, which the grader
    measures). The copy out is made with every dispatch mode disabled, so a ``MemoryMeter`` sees
    the bytes leave; the copy back is a fresh tensor the meter does see, as on a GPU.
    """

    def __init__(self):
        self._file = tempfile.TemporaryFile()
        self._where: dict[int, tuple[int, int, tuple[int, ...], torch.dtype]] = {}
        self.bytes_to_host = self.bytes_back = self.tensors_to_host = 0

    def put(self, t: torch.Tensor) -> int:
        with _disable_current_modes(), torch.no_grad():
            raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
            offset = self._file.seek(0, 2)
            raw.tofile(self._file)
            _copy_out(raw)
        handle = len(self._where)
        self._where[handle] = (offset, raw.size, tuple(t.shape), t.dtype)
        self.bytes_to_host += raw.size
        self.tensors_to_host += 1
        return handle

    def get(self, handle: int) -> torch.Tensor:
        if handle not in self._where:
            raise KeyError(f"no tensor was put under handle {handle!r}; put() returns the handle")
        offset, nbytes, shape, dtype = self._where[handle]
        with _disable_current_modes():
            self._file.seek(offset)
            raw = torch.frombuffer(bytearray(self._file.read(nbytes)), dtype=torch.uint8)
            host = raw.view(dtype).reshape(shape)
        self.bytes_back += nbytes
        return host.clone()  # the copy back to the "device": a new tensor, seen by meters


def run_offloaded(spec: dict, hooks) -> dict:
    """The chain's forward under ``hooks(host, params) -> (pack, unpack)``, backward, results."""
    net, x = relu_chain(spec)
    host = Host()
    pack, unpack = hooks(host, list(net.parameters()))
    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        loss = net(x).sum()
    loss.backward()
    return {"loss": loss.detach(), "grads": [p.grad for p in net.parameters()],
            "bytes_to_host": host.bytes_to_host, "bytes_back": host.bytes_back,
            "tensors_to_host": host.tensors_to_host}


def no_offload(spec: dict) -> dict:
    """The same run keeping every saved tensor in memory."""
    return run_offloaded(spec, lambda host, params: (lambda t: t, lambda t: t))


# ---------------------------------------------------------------- the planner's chain
def chain_costs(chain: dict, options: bool = True) -> ChainCosts:
    """``{"input": a, "blocks": [{"tape": t, "flops": f, "recompute_flops": r}, ...]}`` (plain
    numbers, the planner exercise's format) as the package planner's ``ChainCosts``.

    Each block keeps its input (``a`` bytes) and ``tape - a`` more; its backward frees them and
    leaves the gradient of its input; nothing else is live (no trunk, no parameters). A block's
    ``"options"`` (``{"selective:save=sdpa": {"tape": t, "recompute_flops": r}, ...}``) become
    its menu: run plain with that tape, recomputing r FLOPs; ``options=False`` leaves them out.
    """
    a = chain["input"]

    def layer(b, tape):
        return replace(LayerCost.simple(a, tape - a, b["flops"]),
                       recompute_flops=b["recompute_flops"])

    blocks = chain["blocks"]
    menu = ()
    if options and any(b.get("options") for b in blocks):
        menu = tuple({name: OptionCost(layer(b, o["tape"]), o["recompute_flops"])
                      for name, o in b.get("options", {}).items()} for b in blocks)
    return ChainCosts(tuple(layer(b, b["tape"]) for b in blocks), TrunkCost(
        prefix_keeps_input=False), name="chain", menu=menu)


_REFERENCES = ("torch_checkpoint", "reference_offload_hooks", "offload")


def __getattr__(name: str):
    """``probes.torch_checkpoint`` and the other references, from ``references`` on first use."""
    if name in _REFERENCES:
        from . import references

        return getattr(references, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
