"""Live memory, measured exactly: bytes of every tensor storage that is alive, by category.

``MemoryMeter`` is a ``TorchDispatchMode``: every aten op that runs inside ``with meter:`` passes
through ``__torch_dispatch__``, so the meter sees each op's output tensors. For each output it
takes the untyped storage (views share their base's storage, so a view adds nothing) and, the
first time it sees that storage, adds ``storage.nbytes()`` to the live count and hangs a weak
reference on it whose callback subtracts the bytes when the storage is freed. That is the whole
trick: live bytes = sum of storages alive, peak = the largest that sum ever got.

It never asks the allocator, so it works alike on CPU, CUDA and fake tensors; counts differ only
where kernels do (on CPU, dropout keeps a float mask and ``mse_loss``'s scalar keeps its
elementwise buffer; on CUDA the mask is bool; under fake tensors the loss is 4 bytes). On CUDA,
``cuda_stats()`` adds the allocator's own figures, which round blocks up to 512 bytes and include
scratch memory that kernels allocate and free inside one op, so they read a little higher.

Each storage is labelled once, when it is first seen, with a category:

- ``track(model, optimizer)`` labels what already exists: parameters (and buffers), existing
  gradients, optimizer state;
- ``with meter.phase("forward")`` labels new tensors "activations"; ``"backward"`` labels them
  "temporaries" (gradients of activations, and activations recomputed by checkpointing);
  ``"optimizer"`` labels them "optimizer state"; outside any phase they are "temporaries";
- a gradient that lands in ``param.grad`` is relabelled "gradients" by a post-accumulate-grad hook.

With ``budget=`` the meter plays a smaller GPU: an allocation that would take live bytes above the
budget is released and ``torch.OutOfMemoryError`` is raised, worded like CUDA's. The traceback
keeps the failed step's frames, and their tensors, alive until the ``except`` block ends (in a
notebook an uncaught error stays in ``sys.last_traceback``); drop them and the live count is back
where it was, and the meter is ready for the next try.

Why hand-written: ``torch.distributed._tools.mem_tracker.MemTracker`` counts the same way and
splits the same categories (``bench/meter_overhead.py`` checks that the two peaks agree to the
byte), but it is private and costs about 3x a training step here (a fresh tracker per step), where
this meter costs about 1.13x, of which 1.06x is what any dispatch mode pays to call Python once
per op: the per-op path here is one storage lookup. To measure a model that was never
allocated, enter ``FakeTensorMode`` first and the meter inside it.
"""

from __future__ import annotations

import math
import numbers
import re
import time
import weakref
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakIdKeyDictionary

from .units import GiB, KiB, MiB, fmt_bytes, shown

CATEGORIES = ("parameters", "gradients", "optimizer state", "activations", "temporaries")
PHASE_CATEGORY = {
    "forward": "activations",
    "backward": "temporaries",  # gradients of activations, recomputed activations
    "optimizer": "optimizer state",
}
# Binary units as the course writes them, any case ("3gib"); decimal ones as their SI meaning
# ("80GB" is 80 * 10**9 bytes, as a card's box says), so no reading is a guess.
_UNITS = {"": 1, "b": 1, "kib": KiB, "mib": MiB, "gib": GiB, "tib": 1024 * GiB,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}


class TimelinePoint(NamedTuple):
    index: int  # counts allocations and frees, in order
    live_bytes: int
    phase: str | None
    seconds: float = 0.0  # time.perf_counter() when it happened: how long each level lasted


def time_average(levels: list, seconds: list) -> float:
    """Mean of ``levels[i]``, each held from ``seconds[i]`` to ``seconds[i + 1]``."""
    if len(levels) < 2 or seconds[-1] <= seconds[0]:
        return float(levels[0]) if levels else 0.0
    held = sum(level * (b - a) for level, a, b in zip(levels, seconds, seconds[1:], strict=False))
    return held / (seconds[-1] - seconds[0])


class _StorageRef(weakref.ref):
    """A weak reference to a storage that remembers what to subtract when the storage dies."""

    __slots__ = ("key", "nbytes", "category")


MAX_BUDGET = 2**63 - 1  # the largest byte count the planner (and a C long) can hold


def parse_budget(budget) -> int:
    """A budget in whole bytes: a positive number (``64 * MiB``) or a string like ``"64MiB"``,
    ``"3gib"``, ``"80GB"`` (decimal: 80 * 10**9), ``"1_000_000"`` or ``"3e5"`` (a fraction of a
    byte is rounded down: ``3.2 * MiB`` is 3,355,443 B); at least one byte and at most
    ``MAX_BUDGET`` (8 EiB). Refused here, where it enters, in one line: under 1 KiB, a fraction
    (1.5 bytes would read as "1 B" in every message; a learner who typed 1.5 meant 1.5GiB) or a
    string without a unit (no step fits in a few hundred bytes)."""
    hint = "a positive number of bytes or a size such as '64MiB', '1.5GiB' or '80GB'"
    given, unit = shown(budget), "B"
    if isinstance(budget, str):
        number = r"\s*([-+]?)((?:\d[\d_]*(?:\.\d*)?|\.\d+)(?:e[-+]?\d+)?)\s*"
        match = re.fullmatch(number + r"([kmgt]i?b|b)?\s*", budget, re.IGNORECASE)
        letter = re.fullmatch(number + r"([kmgt])\s*", budget, re.IGNORECASE)
        if letter and letter[1] != "-":  # "1M": which of the two is meant is theirs to say
            size, prefix = letter[1] + letter[2], letter[3].upper()
            raise ValueError(f"budget {given} has no B: give '{size}{prefix}iB' ({prefix}iB, "
                             f"powers of 1024) or '{size}{prefix}B' (decimal)")
        if letter:  # "-1M": the sign is what is wrong
            raise ValueError(f"budget must be {hint} (or None for no budget); got {given}")
        if not match:
            raise ValueError(f"budget {given} is not understood; give {hint}")
        if len(match[2]) > 30:  # 400 digits would be a float's inf
            raise ValueError(f"budget must be at most 8 EiB (2**63 - 1 bytes), more than any "
                             f"machine has; got a {len(match[2])}-digit number: give a real "
                             f"size such as '64GiB'")
        unit = (match[3] or "").lower()
        budget = float(match[2].replace("_", "")) * _UNITS[unit] * (-1 if match[1] == "-" else 1)
    elif isinstance(budget, bool) or not isinstance(budget, numbers.Real):
        raise TypeError(f"budget must be {hint}; got {type(budget).__name__} {given}")
    elif isinstance(budget, numbers.Integral) and abs(budget) >= 2**64:  # beyond float, repr
        raise ValueError(f"budget must be {hint}; got a {int(budget).bit_length()}-bit number, "
                         f"more bytes than any machine has")
    if not (math.isfinite(budget) and budget > 0):
        raise ValueError(f"budget must be {hint} (or None for no budget); got {given}")
    if budget > MAX_BUDGET:
        raise ValueError(f"budget must be at most 8 EiB (2**63 - 1 bytes), more than any machine "
                         f"has; got {budget:.4g} bytes: give a real size such as '64GiB'")
    if budget < 1:
        raise ValueError(f"budget must be at least 1 byte (a part of a byte holds nothing); got "
                         f"{budget:g} B: give e.g. '1KiB'")
    number = f"{budget:g}"
    if budget < KiB and not float(budget).is_integer():
        raise ValueError(f"budget {given} is not a whole number of bytes: give whole bytes, or "
                         + (f"a unit (did you mean '{number}GiB'?)" if unit == "B" or not unit
                            else f"a real size such as '64MiB' ({given} is {number} B)"))
    if unit == "" and budget < KiB:  # a string without a unit (a number's unit is "B")
        raise ValueError(f"budget {given} has no unit and is under 1 KiB, where no training "
                         f"step fits: give a unit (did you mean '{number}GiB'? '{number}B' "
                         f"for bytes)")
    return int(budget)


class MemoryMeter(TorchDispatchMode):
    """Exact live tensor bytes, peak, categories, optional timeline and budget.

    >>> meter = MemoryMeter(timeline=True).track(model, optimizer)
    >>> with meter:
    ...     with meter.phase("forward"):
    ...         loss = model.loss(batch)
    ...     with meter.phase("backward"):
    ...         loss.backward()
    ...     with meter.phase("optimizer"):
    ...         optimizer.step()
    >>> meter.peak_bytes, meter.peak_breakdown, meter.peak_op, meter.peak_phase

    Only op outputs are seen: a tensor made before ``with meter:`` (an input batch) counts from
    the first op that returns it or a view of it, unless ``track`` registered it. Sparse tensors
    have no storage and are not counted.
    """

    def __init__(self, budget=None, timeline: bool = False):
        super().__init__()
        self.budget = budget
        self.live_bytes = 0
        self.peak_bytes = 0
        self.peak_breakdown = dict.fromkeys(CATEGORIES, 0)  # live bytes per category at the peak
        self.peak_phase: str | None = None
        self._peak_func = None  # the aten op whose output made the peak
        self.timeline: list[TimelinePoint] | None = [] if timeline else None
        self._bytes = dict.fromkeys(CATEGORIES, 0)  # live bytes per category, now
        self._live: dict[int, _StorageRef] = {}  # id(storage) -> its weak reference
        self._phase: str | None = None
        self._category = "temporaries"
        self._hooks = WeakIdKeyDictionary()  # param -> its post-accumulate-grad hook

    @property
    def budget(self) -> float | None:
        """Bytes allowed live at once, or None. Settable: ``meter.budget = "64MiB"``."""
        return None if self._budget == math.inf else self._budget

    @budget.setter
    def budget(self, value) -> None:
        self._budget = math.inf if value is None else parse_budget(value)

    # ------------------------------------------------------------------ the per-op path
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, Tensor):
            new = self._see(out)  # its weak reference if the storage is new, else None
        elif isinstance(out, (tuple, list)):  # split, _foreach_*, sdpa's (output, logsumexp), ...
            new = self._see_all(out, [])
        else:  # None, numbers
            return out
        if new:
            if self.live_bytes > self._budget:
                message = self._refuse(func, new)
                del out  # the traceback keeps this frame: it must not keep the refused tensor
                raise torch.OutOfMemoryError(message)
            if self.live_bytes > self.peak_bytes:
                self._new_peak(func)
            if self.timeline is not None:
                self._mark()
        return out

    def _see(self, t: Tensor) -> _StorageRef | None:
        """Count ``t``'s storage if it is new."""
        try:
            storage = t.untyped_storage()
        except NotImplementedError:  # sparse and other storage-less tensors
            return None
        key = id(storage)  # storage PyObjects are preserved: one id per live storage
        if key in self._live:  # a view, an in-place op, or a tensor seen before
            return None
        return self._add(storage, key, self._category)

    def _see_all(self, outs, new: list) -> list:
        for t in outs:
            if isinstance(t, Tensor):
                ref = self._see(t)
                if ref is not None:
                    new.append(ref)
            elif isinstance(t, (tuple, list)):  # _fused_adamw returns a tuple of lists
                self._see_all(t, new)
        return new

    def _add(self, storage, key: int, category: str) -> _StorageRef:
        ref = self._live[key] = _StorageRef(storage, self._free)
        ref.key, ref.nbytes, ref.category = key, storage.nbytes(), category
        self._bytes[category] += ref.nbytes
        self.live_bytes += ref.nbytes
        return ref

    def _forget(self, ref: _StorageRef) -> bool:
        if self._live.pop(ref.key, None) is not ref:
            return False
        self._bytes[ref.category] -= ref.nbytes
        self.live_bytes -= ref.nbytes
        return True

    def _free(self, ref: _StorageRef) -> None:
        """Weakref callback: the storage is gone."""
        if self._forget(ref) and self.timeline is not None:
            self._mark()

    def _mark(self) -> None:
        self.timeline.append(TimelinePoint(len(self.timeline), self.live_bytes, self._phase,
                                           time.perf_counter()))

    def _new_peak(self, func) -> None:
        self.peak_bytes = self.live_bytes
        self.peak_breakdown = dict(self._bytes)
        self._peak_func = func
        self.peak_phase = self._phase

    # ------------------------------------------------------------------ the budget
    def _refuse(self, func, new) -> str:
        """Forget what this op added (its outputs die with the op's frame); say why."""
        refs = new if isinstance(new, list) else [new]
        for ref in refs:
            self._forget(ref)  # forgotten before the storage dies, so the callback does nothing
        return self._oom_message(sum(ref.nbytes for ref in refs), func)

    def _oom_message(self, tried: int, func) -> str:
        in_use = ", ".join(f"{c} {fmt_bytes(b)}" for c, b in self._bytes.items() if b)
        where = f"{func}" + (f" in {self._phase}" if self._phase else "")
        return (
            f"Simulated out of memory (ckpt_course budget). Tried to allocate {fmt_bytes(tried)} "
            f"({where}). Budget {fmt_bytes(self._budget)}; {fmt_bytes(self.live_bytes)} already "
            f"in use ({in_use or 'nothing'}). Free the memory or fit the budget: try a checkpoint "
            f"policy, a smaller batch, or offload."
        )

    # ------------------------------------------------------------------ labels
    @contextmanager
    def phase(self, name: str):
        """Label tensors allocated inside: forward -> activations, backward -> temporaries,
        optimizer -> optimizer state."""
        if name not in PHASE_CATEGORY:
            raise ValueError(f"phase must be one of {', '.join(PHASE_CATEGORY)}; got {name!r}")
        saved = self._phase, self._category
        self._phase, self._category = name, PHASE_CATEGORY[name]
        try:
            yield self
        finally:
            self._phase, self._category = saved

    def _label(self, t: Tensor, category: str) -> None:
        """Count ``t`` under ``category``, moving it there if it was counted under another."""
        if t.layout != torch.strided:  # sparse: no storage to count
            return
        storage = t.untyped_storage()
        ref = self._live.get(id(storage))
        if ref is None:
            self._add(storage, id(storage), category)
            if self.live_bytes > self.peak_bytes:
                self._new_peak(None)
            if self.timeline is not None:
                self._mark()
        elif ref.category != category:
            self._bytes[ref.category] -= ref.nbytes
            self._bytes[category] += ref.nbytes
            ref.category = category

    def track(self, model: torch.nn.Module | None = None, optimizer=None) -> MemoryMeter:
        """Count tensors that exist already (parameters and buffers, gradients, optimizer state)
        and relabel each new ``param.grad`` as "gradients". ``untrack()`` removes the hooks."""
        if model is not None and not isinstance(model, torch.nn.Module):
            raise TypeError(f"track takes a model (an nn.Module) and its optimizer, got "
                            f"{type(model).__name__} {shown(model)}: e.g. meter.track(model, "
                            f"optimizer)")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"track's optimizer is a torch optimizer, got "
                            f"{type(optimizer).__name__} {shown(optimizer)}: e.g. "
                            f"meter.track(model, make_optimizer(model))")
        if model is not None:
            for p in model.parameters():
                self._label(p, "parameters")
                if p.grad is not None:
                    self._label(p.grad, "gradients")
                if p.requires_grad and p not in self._hooks:
                    self._hooks[p] = p.register_post_accumulate_grad_hook(self._grad_ready)
            for b in model.buffers():  # model state, like parameters (no category of their own)
                self._label(b, "parameters")
        if optimizer is not None:
            for state in optimizer.state.values():
                for value in state.values():
                    if isinstance(value, Tensor):
                        self._label(value, "optimizer state")
        return self

    def count(self, *tensors: Tensor, category: str = "activations") -> MemoryMeter:
        """Count tensors made before the meter started, e.g. a batch of inputs (default
        "activations": the tape keeps a layer's input for the weight gradient)."""
        if category not in CATEGORIES:
            raise ValueError(f"category must be one of {', '.join(CATEGORIES)}; got {category!r}")
        for t in tensors:
            self._label(t, category)
        return self

    def _grad_ready(self, param: Tensor) -> None:
        self._label(param.grad, "gradients")

    def untrack(self) -> None:
        """Remove the gradient hooks that ``track`` put on the model's parameters."""
        for handle in self._hooks.values():
            handle.remove()
        self._hooks.clear()

    # ------------------------------------------------------------------ readings
    @property
    def peak_op(self) -> str | None:
        """Name of the aten op whose output made the peak, e.g. 'aten.addmm.default'."""
        return None if self._peak_func is None else str(self._peak_func)

    def breakdown(self) -> dict[str, int]:
        """Live bytes per category, now."""
        return dict(self._bytes)

    def reset_peak(self) -> None:
        """Start a new peak from what is live now (and on CUDA, the allocator's peak too)."""
        self.peak_bytes = self.live_bytes
        self.peak_breakdown = dict(self._bytes)
        self._peak_func, self.peak_phase = None, self._phase
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def timeline_peak(self) -> int:
        """Highest live bytes in the timeline (0 if empty)."""
        return max((p.live_bytes for p in self._points()), default=0)

    def timeline_average(self) -> float:
        """Mean live bytes over the timeline's points: one point per allocation or free."""
        points = self._points()
        return sum(p.live_bytes for p in points) / len(points) if points else 0.0

    def timeline_time_average(self) -> float:
        """Mean live bytes over time: each level weighted by how long it lasted (to the next
        point). This is what the memory holds per second, where the event average gives a
        burst of tiny allocations as much weight as a long matmul."""
        return time_average([p.live_bytes for p in self._points()],
                            [p.seconds for p in self._points()])

    def _points(self) -> list[TimelinePoint]:
        if self.timeline is None:
            raise ValueError("no timeline kept: create the meter with MemoryMeter(timeline=True)")
        return self.timeline

    def cuda_stats(self) -> dict[str, int] | None:
        """The CUDA allocator's view since the meter was entered (None without CUDA)."""
        if not torch.cuda.is_available():
            return None
        return {
            "allocated": torch.cuda.memory_allocated(),
            "max_allocated": torch.cuda.max_memory_allocated(),
            "reserved": torch.cuda.memory_reserved(),
        }

    def __enter__(self):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        return super().__enter__()

    def __repr__(self) -> str:
        return (f"MemoryMeter(live {fmt_bytes(self.live_bytes)}, peak {fmt_bytes(self.peak_bytes)}"
                + (f", budget {fmt_bytes(self._budget)})" if self._budget < math.inf else ")"))
