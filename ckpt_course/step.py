"""The step runner: one training step, measured, that every tool of the course runs.

``train``, ``measure_step``, the doctor, ``compare``, the sweeps, the hand trace and the
benchmarks all run their steps through ``run_step``, so they agree on what a step is:

- the optimizer is AdamW, made by ``make_optimizer`` (nowhere else);
- a batch is made by ``make_batch``, outside any meter, before the step's peak starts. The meter
  never sees it being made; ``run_step(count_batch=True)`` counts it in the step's baseline (as
  "activations": the first layer keeps it for its weight gradient), ``False`` leaves it out, as
  ``predict`` and ``plan.measure_peaks`` do;
- a step clears the gradients, starts a fresh peak, runs forward and backward over one batch or
  a list of micro-batches (gradients accumulated, then averaged in place), then the optimizer
  step; each phase labels what it allocates and is timed;
- it returns one ``StepRecord``.

An out-of-memory error in any phase leaves the model as it was before the step, so a learner can
change the policy and retry: the gradients the model held before the step are put back,
optimizer state that the step created (AdamW makes its state in the first ``optimizer.step()``)
is removed, the global RNG state is put back, and the parameters and the optimizer state are
copied before the optimizer step and copied back. torch's AdamW updates them in place one
tensor after another, so an error half-way (the meter's budget, or the allocator's own
out-of-memory error, the real case on a GPU) would leave some updated and some not: there is no
cheaper undo. The copies are the runner's, not the model's: outside the meter, and their time
is left out of the step's time. ``guard=False`` skips them (and the undo of the optimizer step).
"""

from __future__ import annotations

import contextlib
import copy
import math
import numbers
import os
import random
import sys
import time
from dataclasses import dataclass, field, fields

import torch
from torch import nn
from torch.utils._python_dispatch import _disable_current_modes

from .meter import MemoryMeter
from .models import longest_sequence
from .units import fmt_bytes, shown

PHASES = ("forward", "backward", "optimizer")
CPU_OUT_OF_MEMORY = "can't allocate memory"  # what torch's CPU allocator says when malloc fails


# ---------------------------------------------------------------- what a step is made of
def make_optimizer(model_or_params, lr: float = 1e-3) -> torch.optim.AdamW:
    """The course's optimizer: AdamW (torch's defaults otherwise)."""
    check_learning_rate(lr)
    if isinstance(model_or_params, nn.Module):
        params = list(model_or_params.parameters())
    elif isinstance(model_or_params, (list, tuple)) or hasattr(model_or_params, "__next__"):
        params = list(model_or_params)
    else:
        raise TypeError(f"make_optimizer takes a model or its parameters, got "
                        f"{type(model_or_params).__name__}: pass e.g. make_optimizer(model)")
    return torch.optim.AdamW(params, lr=lr)


MAX_STEPS = 10_000  # more steps only take longer: a run of days, not a lesson


def _positive_int(name: str, value, example: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive whole number, e.g. {name}={example}; "
                         f"got {shown(value)}")


def check_steps(steps: int) -> int:
    """At most ``MAX_STEPS``: ``steps=10**9`` would run for days, not fail."""
    if steps > MAX_STEPS:
        raise ValueError(f"steps must be at most {MAX_STEPS:,} (more steps only take longer), "
                         f"got {shown(steps)}: use e.g. steps=100")
    return steps


def check_learning_rate(lr) -> float:
    """AdamW's learning rate: a finite number >= 0 (inf or nan would make every weight nan)."""
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real):
        raise TypeError(f"lr must be a number such as 1e-3, got {type(lr).__name__} {shown(lr)}")
    if not (math.isfinite(lr) and lr >= 0):
        raise ValueError(f"lr must be a finite number >= 0, got {shown(lr)}: use e.g. lr=1e-3")
    return lr


def check_seed(seed) -> int:
    """A seed for torch.manual_seed: a whole number in 0 .. 2**63 - 1."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be a whole number such as 0, got {type(seed).__name__} "
                        f"{seed!r}")
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in 0 .. 2**63 - 1, got {shown(seed)}: use e.g. seed=0")
    return seed


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not on this system: no bound
        return 2**63


def available_memory() -> int | None:
    """Bytes this machine can still give (Linux's MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as meminfo:
            lines = meminfo.read().splitlines()
        for line in lines:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def guess_step_bytes(n_params: int, width: int, n_layer: int, tokens: int, vocab: int) -> int:
    """A generous guess of one fp32 AdamW step's memory: 16 B per parameter (weights, gradients,
    two moments) plus what the step saves, about 32 floats per token per layer and width and the
    logits four times over. A guard against sizes far beyond the machine, not a prediction (the
    lessons measure those)."""
    return 16 * n_params + 4 * tokens * (32 * width * n_layer + 4 * vocab)


def model_step_bytes(model, tokens: int) -> int:
    """``guess_step_bytes`` for a course model (its config's width and vocabulary where it has
    them, else its widest parameter) and a batch of ``tokens`` tokens."""
    cfg = getattr(model, "cfg", None)
    width = getattr(cfg, "d_model", None) or max(
        (p.shape[-1] for p in model.parameters() if p.dim()), default=1)
    return guess_step_bytes(sum(p.numel() for p in model.parameters()), width, len(model.blocks),
                            tokens, getattr(cfg, "vocab_size", 0) or 0)


def check_step_fits(need: int, what: str, options: str) -> None:
    """Before any work: refuse a step whose guessed bytes ``need`` exceed this machine's free
    memory (it would fail in the allocator, swap for hours or be killed, not fail cleanly)."""
    free = available_memory()
    if free is not None and need > free:
        raise ValueError(f"{what} needs about {fmt_bytes(need)} for one training step, more than "
                         f"the {fmt_bytes(free)} this machine has free: use a smaller {options}")


def _check_batch_fits(model, batch_size: int, seq_len) -> None:
    """A batch larger than this machine's memory is refused before it is made (making it
    would fail in the allocator, or swap): one sample's bytes times ``batch_size``; then the
    step it would run, guessed from the model's size (``check_step_fits``)."""
    with torch.random.fork_rng(devices=[]):  # the caller's random numbers stay as they were
        sample = make_batch(model, 1, seq_len, torch.Generator().manual_seed(0))
    need = batch_size * sum(t.nbytes for t in sample if isinstance(t, torch.Tensor))
    if need > _physical_memory():
        raise ValueError(f"batch_size {batch_size} needs {fmt_bytes(need)} for the batch alone, "
                         f"more than this machine's memory ({fmt_bytes(_physical_memory())}): "
                         f"use a smaller batch_size")
    check_step_fits(model_step_bytes(model, batch_size * batch_tokens(sample)),
                    f"{type(model).__name__} at batch_size {batch_size}",
                    "batch_size" + ("" if longest_sequence(model) is None else " or seq_len"))


def check_run(model, batch_size=None, steps=None, seq_len=None, micro_batches: int = 1,
              device=None) -> torch.device:
    """Check a run's arguments before any work; return the device to run on (``device``, else
    the model's). Each error is one line that names the fix."""
    missing = [name for name in ("blocks", "example_batch", "loss") if not hasattr(model, name)]
    if missing:
        raise ValueError(f"{type(model).__name__} lacks {', '.join(missing)}: training needs a "
                         "course model with `.blocks` (an nn.ModuleList), `.example_batch("
                         "batch_size, seq_len, generator)` and `.loss(batch)`; see "
                         "ckpt_course.models")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"every parameter of {type(model).__name__} is frozen (requires_grad="
                         "False), so there is nothing to train or checkpoint: unfreeze some, "
                         "e.g. model.requires_grad_(True)")
    if batch_size is not None:
        _positive_int("batch_size", batch_size, 8)
    if steps is not None:
        _positive_int("steps", steps, 3)
        check_steps(steps)
    _positive_int("micro_batches", micro_batches, 2)
    if batch_size is not None and batch_size % micro_batches:
        raise ValueError(f"batch_size {batch_size} must be a multiple of micro_batches "
                         f"{micro_batches}")
    if seq_len is not None:
        _positive_int("seq_len", seq_len, 64)
        longest = longest_sequence(model)
        if longest is None:
            raise ValueError(f"{type(model).__name__} has no sequence dimension: leave seq_len "
                             "unset")
        if seq_len > longest:
            raise ValueError(f"seq_len {seq_len} is longer than the model supports ("
                             f"{type(model.cfg).__name__}.seq_len={longest}): use seq_len <= "
                             f"{longest}, or build the model with a larger seq_len")
    if batch_size is not None:
        _check_batch_fits(model, batch_size, seq_len)
    if device is None:
        return next(model.parameters()).device
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not understood: use 'cpu' or 'cuda'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} is not available: torch sees no CUDA device; "
                         "use device='cpu'")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {str(device)!r} is not supported: use 'cpu' or 'cuda'")
    if device.type == "cpu" and device.index not in (None, 0):
        raise ValueError(f"device {str(device)!r} does not exist: torch has one CPU device; "
                         "use 'cpu'")
    return device


def make_batch(model, batch_size: int | None = None, seq_len: int | None = None,
               generator: torch.Generator | None = None, device=None) -> tuple:
    """``model.example_batch(...)`` on ``device``, made outside any active meter: a meter never
    counts a batch being made, only what ``run_step(count_batch=True)`` tells it."""
    size = {} if batch_size is None else {"batch_size": batch_size}
    with _disable_current_modes():
        batch = model.example_batch(seq_len=seq_len, generator=generator, **size)
        return tuple(t.to(device) for t in batch) if device is not None else tuple(batch)


def _seq_len(batch) -> int | None:
    x = batch[0]
    return x.shape[1] if x.dim() > 1 and not x.is_floating_point() else None


def batch_tokens(batch) -> int:
    """Tokens in a batch (or a list of micro-batches): samples x sequence length for token ids,
    samples for other inputs."""
    if isinstance(batch, list):
        return sum(batch_tokens(b) for b in batch)
    return len(batch[0]) * (_seq_len(batch) or 1)


@contextlib.contextmanager
def seeded(seed: int, device=None):
    """Run with the global random streams seeded (torch's: dropout masks; Python's ``random``
    and numpy's, which a model's own augmentation or LayerDrop may draw from), leaving the
    caller's states alone."""
    cuda = device is not None and torch.device(device).type == "cuda"
    with kept_python_streams(), \
            torch.random.fork_rng(devices=[torch.device(device)] if cuda else []):
        torch.manual_seed(seed)
        random.seed(seed)
        if (np := sys.modules.get("numpy")) is not None:
            np.random.seed(seed % 2**32)  # numpy takes 32 bits; torch takes 64
        yield


@contextlib.contextmanager
def kept_python_streams():
    """Python's ``random`` and numpy's global streams put back as they were after the block."""
    np = sys.modules.get("numpy")
    saved = random.getstate(), np.random.get_state() if np is not None else None
    try:
        yield
    finally:
        random.setstate(saved[0])
        if np is not None:
            np.random.set_state(saved[1])


# ---------------------------------------------------------------- one measured step
@dataclass
class StepRecord:
    """One measured step. Byte counts are exact live tensor bytes (device-independent); they are
    None when the step ran without a meter."""

    step: int = 1  # counts from 1: step 1 is the one in which AdamW creates its state
    policy: str = ""
    loss: float = math.nan  # mean over the micro-batches
    time_s: float = 0.0  # the whole step, wall clock (its phases are in ``phase_s``)
    peak_bytes: int | None = None  # highest live bytes in the step, baseline included
    saved_bytes: int | None = None  # live bytes forward added: what backward will read
    recompute_flops: int | None = None  # FLOPs backward spends re-running forward
    tokens: int = 0
    cuda_peak_bytes: int | None = None  # the CUDA allocator's own peak, on CUDA
    baseline_bytes: int | None = None  # live when the step began (gradients cleared)
    peak_breakdown: dict = field(default_factory=dict)  # category -> live bytes at the peak
    peak_phase: str | None = None
    peak_op: str | None = None  # the aten op whose output made the peak
    peak_module: str = ""  # the module running at the peak (the doctor's meter knows it)
    optimizer_state_bytes: int = 0  # live when the step began
    phase_s: dict = field(default_factory=dict)  # seconds in forward, backward, optimizer
    batch_size: int = 0
    seq_len: int | None = None
    step_flops: int | None = None  # FLOPs of a plain forward + backward, when counted
    meter: MemoryMeter | None = field(default=None, repr=False, compare=False)

    @property
    def peak_above_baseline(self) -> int:
        return self.peak_bytes - self.baseline_bytes

    @property
    def categories(self) -> dict:
        """The peak split by category (``peak_breakdown``)."""
        return self.peak_breakdown

    @property
    def overhead(self) -> float:
        """Recompute FLOPs / a plain step's FLOPs."""
        return self.recompute_flops / self.step_flops

    @property
    def timeline(self) -> list:
        """Live bytes after every allocation and free (a meter made with ``timeline=True``)."""
        return self.meter.timeline

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.time_s if self.time_s else math.nan

    @property
    def label(self) -> str:
        return f"B={self.batch_size}" + (f" T={self.seq_len}" if self.seq_len else "")

    def as_dict(self) -> dict:
        """The fields as plain values, the meter left out."""
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self)
                if f.name != "meter"}

    def __str__(self) -> str:
        if self.peak_bytes is None:
            return f"step {self.step} {self.policy}: loss {self.loss:.4f}, {self.time_s:.3f} s"
        parts = ", ".join(f"{c} {fmt_bytes(b)}" for c, b in self.peak_breakdown.items() if b)
        return (f"{self.label}, step {self.step}: peak {fmt_bytes(self.peak_bytes)} in "
                f"{self.peak_phase} ({parts})")


class _Undo:
    """What a step changes, kept so that an out-of-memory error can put it back. With
    ``guard``, the gradients held before the step are copied (the step clears them), and
    ``copy_values`` copies parameters and optimizer state; ``seconds`` is the copies' time."""

    def __init__(self, model, optimizer, device, guard: bool):
        self.model, self.optimizer = model, optimizer
        self.rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self.had_state = set(optimizer.state) if optimizer is not None else set()
        self.copies: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.seconds = self.optimizer_seconds = 0.0
        self.grads = {}
        if guard:
            start = time.perf_counter()
            with _disable_current_modes(), torch.no_grad():
                self.grads = {p: p.grad.to("cpu", copy=True) for p in model.parameters()
                              if p.grad is not None}
            self.seconds += time.perf_counter() - start

    def copy_values(self) -> None:
        """Copy what the optimizer step updates in place: parameters and optimizer state."""
        start = time.perf_counter()
        tensors = [p for group in self.optimizer.param_groups for p in group["params"]]
        tensors += [v for s in self.optimizer.state.values() for v in s.values()
                    if isinstance(v, torch.Tensor)]
        with _disable_current_modes(), torch.no_grad():
            self.copies = [(t, t.to("cpu", copy=True)) for t in tensors]
        self.optimizer_seconds = time.perf_counter() - start  # inside the optimizer phase
        self.seconds += self.optimizer_seconds

    def restore(self) -> None:
        self.model.zero_grad(set_to_none=True)
        with _disable_current_modes(), torch.no_grad():  # the gradients as they were
            for p, grad in self.grads.items():
                p.grad = grad.to(p.device)
        self.grads = {}
        if self.optimizer is not None:
            for p in [p for p in self.optimizer.state if p not in self.had_state]:
                del self.optimizer.state[p]  # half-made state: AdamW would skip making it again
        with _disable_current_modes(), torch.no_grad():
            for t, saved in self.copies:
                t.copy_(saved)
        self.copies = []
        torch.set_rng_state(self.rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state(self.cuda_rng)


def check_batch(batch) -> list:
    """The micro-batches of ``batch`` as a new list (a tuple of tensors is one), each a
    non-empty tuple whose first tensor holds at least one sample; else a one-line error."""
    hint = "give a tuple (inputs, targets) such as make_batch(model, 8), or a list of them"
    if isinstance(batch, list):
        if not batch:
            raise ValueError(f"batch is an empty list of micro-batches: {hint}")
        parts = list(batch)
    elif isinstance(batch, tuple):
        parts = [batch]
    else:
        raise TypeError(f"batch must be a tuple of tensors, got {type(batch).__name__}: {hint}")
    for part in parts:
        if not isinstance(part, (tuple, list)) or not part:
            raise ValueError(f"batch holds {part!r}, not a tuple of tensors: {hint}")
        first = part[0]
        if not isinstance(first, torch.Tensor) or first.dim() == 0 or len(first) == 0:
            raise ValueError(f"a batch's first tensor must hold at least one sample, got "
                             f"{type(first).__name__} of shape "
                             f"{tuple(getattr(first, 'shape', ()))}: {hint}")
    return parts


def _spare(batch: list, undo) -> list:
    """Copies of the micro-batches, made outside any meter (the runner's, timed as undo's)."""
    start = time.perf_counter()
    with _disable_current_modes():
        spare = [tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in part)
                 for part in batch]
    undo.seconds += time.perf_counter() - start
    return spare


def _check_step_options(loss_fn, count_batch, guard, step) -> None:
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn is a function of the batch, or None for model.loss; got "
                        f"{shown(loss_fn)}")
    for name, value in (("count_batch", count_batch), ("guard", guard)):
        if not isinstance(value, bool) and not (name == "guard" and value is None):
            raise TypeError(f"{name} is True or False, got {shown(value)}")
    _positive_int("step", step, 1)


def _check_entered(meter) -> None:
    """A meter measures only while entered: outside ``with meter:`` it would see nothing (peak
    0 B) and enforce no budget."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    if not any(mode is meter for mode in _get_current_dispatch_mode_stack()):
        raise ValueError("the meter is not entered, so it would measure nothing and enforce no "
                         "budget: run the step inside `with meter:` (after meter.track(model, "
                         "optimizer)), or pass meter=None")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _phase(meter, name):
    return meter.phase(name) if meter is not None else contextlib.nullcontext()


def run_step(model, optimizer, batch, meter: MemoryMeter | None = None, *, loss_fn=None,
             count_batch: bool = False, guard: bool | None = None, step: int = 1,
             policy: str = "") -> StepRecord:
    """One step: forward and backward of ``loss_fn(batch)`` (default ``model.loss``), then
    ``optimizer.step()`` (skipped when ``optimizer`` is None). ``batch`` is a tuple of tensors,
    or a list of them: micro-batches whose gradients add up before one optimizer step. The
    list is emptied as it runs, each micro-batch dropped after its backward, so that its memory
    goes (an op that returns a view of a batch tensor makes the meter count it), and refilled
    at the end with copies made outside the meter: the caller's list holds the same samples
    after the step, so a retry after an out-of-memory error gets every one.

    Under a ``meter`` (entered and tracking the model by the caller) each phase labels what it
    allocates, the step starts a fresh peak, and ``count_batch`` says whether the batch is in
    the baseline. ``guard`` (default True) copies the gradients held before the step, and the
    parameters and optimizer state before the optimizer step, so that an out-of-memory error
    anywhere can undo the step (module doc). Raises ``torch.OutOfMemoryError`` with ``.phase``
    and ``.micro_batch`` (1, 2, ...; 0 in the optimizer step) set, the model as it was before
    the step; the CPU allocator's own failure (a ``RuntimeError``) is raised as one too."""
    parts = check_batch(batch)
    if isinstance(optimizer, nn.Module):
        raise TypeError(f"optimizer is the model {type(optimizer).__name__}, not its optimizer: "
                        "pass make_optimizer(model), or None for no optimizer step")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch optimizer such as make_optimizer(model), or "
                        f"None for no optimizer step; got {type(optimizer).__name__} "
                        f"{shown(optimizer)}")
    if meter is not None:
        _check_entered(meter)
    _check_step_options(loss_fn, count_batch, guard, step)
    device = next(model.parameters()).device
    guard = True if guard is None else guard
    _sync(device)
    start = time.perf_counter()
    undo = _Undo(model, optimizer, device, guard)
    if isinstance(batch, list):  # consumed below; the spare refills it
        spare, parts = _spare(batch, undo), batch
    model.zero_grad(set_to_none=True)
    record = StepRecord(step=step, policy=str(policy), tokens=batch_tokens(parts),
                        batch_size=sum(len(p[0]) for p in parts))
    record.seq_len = _seq_len(parts[0])
    if meter is not None:
        if count_batch:
            meter.count(*(t for part in parts for t in part))
        meter.reset_peak()
        record.baseline_bytes = meter.live_bytes
        record.optimizer_state_bytes = meter.breakdown()["optimizer state"]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    where = {"phase": None, "micro_batch": 0}
    message = None
    try:
        _run_phases(model, optimizer, parts, meter, loss_fn or model.loss, undo if guard else None,
                    record, where)
    except torch.OutOfMemoryError as error:
        message = str(error)
    except RuntimeError as error:  # the CPU allocator's out-of-memory is a RuntimeError
        if CPU_OUT_OF_MEMORY not in str(error):
            raise
        message = str(error).strip().splitlines()[0]
    if isinstance(batch, list):
        batch[:] = spare
    if message is not None:  # raised outside the except block: no traceback keeps the tensors
        undo.restore()
        del undo
        error = torch.OutOfMemoryError(message)
        error.phase, error.micro_batch = where["phase"], where["micro_batch"]
        raise error
    # the phases are synchronized: all done; the undo's copies are the runner's, not the step's
    record.time_s = time.perf_counter() - start - undo.seconds
    if "optimizer" in record.phase_s:
        record.phase_s["optimizer"] -= undo.optimizer_seconds
    if meter is not None:
        record.peak_bytes, record.peak_breakdown = meter.peak_bytes, dict(meter.peak_breakdown)
        record.peak_phase, record.peak_op, record.meter = meter.peak_phase, meter.peak_op, meter
    if device.type == "cuda":
        record.cuda_peak_bytes = torch.cuda.max_memory_allocated(device)
    return record


def _run_phases(model, optimizer, parts, meter, loss_fn, undo, record, where) -> None:
    """The phases of ``run_step``, in a frame of their own: when one fails, this frame and its
    tensors die with the traceback the caller drops."""
    seconds = dict.fromkeys(PHASES if optimizer is not None else PHASES[:2], 0.0)
    device = next(model.parameters()).device
    loss_sum = 0.0
    _sync(device)
    count = len(parts)
    for k in range(1, count + 1):
        part = parts.pop(0)  # dropped after its backward (all but the last), so its memory goes
        where.update(phase="forward", micro_batch=k)
        start = time.perf_counter()
        with _phase(meter, "forward"):
            loss = loss_fn(part)
        _sync(device)
        seconds["forward"] += time.perf_counter() - start
        if meter is not None and k == 1:
            record.saved_bytes = meter.live_bytes - record.baseline_bytes
        where["phase"] = "backward"
        start = time.perf_counter()
        with _phase(meter, "backward"):
            loss.backward()
        _sync(device)
        seconds["backward"] += time.perf_counter() - start
        loss_sum += loss.item()
        if k < count:  # the last loss and batch live on through the optimizer step, as in a
            del loss, part  # loop written `loss = f(batch); loss.backward(); optimizer.step()`
    if optimizer is not None:
        where.update(phase="optimizer", micro_batch=0)
        start = time.perf_counter()
        with _phase(meter, "optimizer"):
            if undo is not None:
                undo.copy_values()
            if count > 1:  # the gradients' sum becomes their mean, in place (no new memory)
                torch._foreach_div_([p.grad for p in model.parameters() if p.grad is not None],
                                    count)
            optimizer.step()
        _sync(device)
        seconds["optimizer"] = time.perf_counter() - start
    record.loss = loss_sum / count
    record.phase_s = seconds
