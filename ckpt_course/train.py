"""Real training steps under a checkpoint policy, one record per step.

``train(model, "every-2", steps=5)`` runs AdamW steps and returns a ``StepRecord`` per step: loss,
step time, peak memory, the bytes held for backward at the end of forward, and the FLOPs backward
recomputes. Every other tool (live plots, comparisons, the OOM doctor) reads these records.

Step times include the meter's cost when ``measure_memory=True``; compare policies' speed with
``measure_memory=False`` and interleaved runs (see ``bench/``).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from .meter import MemoryMeter, parse_budget
from .policies import applied, parse_policy
from .recompute import measure_recompute


@dataclass
class StepRecord:
    """One measured training step. Byte counts are exact live tensor bytes (device-independent)."""

    step: int
    policy: str
    loss: float
    time_s: float
    peak_bytes: int | None = None  # peak of live tensor bytes during the step
    saved_bytes: int | None = None  # live bytes added by forward: what backward will read
    recompute_flops: int | None = None  # FLOPs backward spends re-running forward
    tokens: int = 0  # samples x sequence length processed by the step
    cuda_peak_bytes: int | None = None  # the CUDA allocator's own peak, when on CUDA

    def as_dict(self) -> dict:
        return asdict(self)


def _check_model(model) -> None:
    missing = [name for name in ("blocks", "example_batch", "loss") if not hasattr(model, name)]
    if missing:
        raise ValueError(
            f"{type(model).__name__} lacks {', '.join(missing)}: training needs a course "
            "model with "
            "`.blocks` (an nn.ModuleList), `.example_batch(batch_size, seq_len, generator)` and "
            "`.loss(batch)`; see ckpt_course.models"
        )


def _to(batch, device):
    return tuple(t.to(device) for t in batch)


def _tokens(batch) -> int:
    x = batch[0]
    return x.shape[0] * (x.shape[1] if x.dim() > 1 and not x.is_floating_point() else 1)


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def train(
    model: torch.nn.Module,
    policy="none",
    steps: int = 5,
    batch_size: int = 8,
    seq_len: int | None = None,
    lr: float = 1e-3,
    seed: int = 0,
    device=None,
    measure_memory: bool = True,
    budget=None,
    count_recompute: bool = True,
    progress: bool = True,
    on_step=None,
) -> list[StepRecord]:
    """Run ``steps`` AdamW steps of ``model.loss`` under ``policy``; return one record per step.

    ``budget`` (bytes) makes the meter raise ``torch.OutOfMemoryError`` when live memory would
    exceed it; the failed step's memory is released first, so the process stays usable.
    ``on_step(record)`` is called after each step (live plots use it).
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    policy = parse_policy(policy)
    _check_model(model)
    if budget is not None:
        parse_budget(budget)  # fail before any work, with the accepted forms in the message
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device).train()
    generator = torch.Generator().manual_seed(seed)

    def next_batch():  # one at a time: a list of every step's batch would creep into the peak
        return _to(model.example_batch(batch_size, seq_len, generator=generator), device)

    batch = next_batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)

    recompute_flops = None
    if count_recompute:
        recompute_flops = measure_recompute(model, batch, policy).flops
        model.zero_grad(set_to_none=True)

    meter = MemoryMeter(budget=budget) if measure_memory else None
    records = []
    with applied(model, policy), meter or contextlib.nullcontext():
        if meter is not None:
            meter.track(model, optimizer)
        for step in tqdm(
            range(steps), desc=str(policy), delay=1.0, disable=not progress, leave=False
        ):
            if step:
                batch = next_batch()
            record = _one_step(model, optimizer, batch, meter, device)
            record.step, record.policy, record.recompute_flops = step, str(policy), recompute_flops
            records.append(record)
            if on_step is not None:
                on_step(record)
    if meter is not None:
        meter.untrack()
    return records


def training_step(model, optimizer, batch, meter: MemoryMeter | None = None):
    """One AdamW step: clear gradients, forward, backward, optimizer step. Under a ``meter`` each
    phase labels what it allocates and the step starts a fresh peak (``meter.peak_bytes``).
    Returns the loss tensor and the bytes forward left alive for backward (None unmetered)."""
    optimizer.zero_grad(set_to_none=True)
    if meter is None:
        loss = model.loss(batch)
        loss.backward()
        optimizer.step()
        return loss.detach(), None
    meter.reset_peak()
    before = meter.live_bytes
    with meter.phase("forward"):
        loss = model.loss(batch)
    saved = meter.live_bytes - before
    with meter.phase("backward"):
        loss.backward()
    with meter.phase("optimizer"):
        optimizer.step()
    return loss.detach(), saved


def _one_step(model, optimizer, batch, meter, device) -> StepRecord:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    message = None
    _sync(device)
    start = time.perf_counter()
    try:
        loss, saved = training_step(model, optimizer, batch, meter)
        _sync(device)
    except torch.OutOfMemoryError as error:
        message = str(error)
    if message is not None:
        # Raised outside the except block so no traceback keeps the failed step's tensors alive.
        optimizer.zero_grad(set_to_none=True)
        raise torch.OutOfMemoryError(message)
    elapsed = time.perf_counter() - start
    return StepRecord(
        step=0,
        policy="",
        loss=loss.item(),
        time_s=elapsed,
        peak_bytes=meter.peak_bytes if meter is not None else None,
        saved_bytes=saved,
        tokens=_tokens(batch),
        cuda_peak_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
    )


@dataclass
class StepMeasurement:
    """One forward and backward (no optimizer) under a policy, measured by a ``MemoryMeter``.

    ``baseline_bytes``: parameters and the input batch, live before forward.
    ``saved_bytes``: what forward added and left alive for backward (the tape, as memory).
    ``peak_bytes``: the highest live bytes during forward and backward, baseline included;
    ``peak_breakdown`` splits it by category, ``peak_phase``/``peak_op`` say when and where.
    ``meter``: the meter itself, with its ``timeline`` of live bytes.
    """

    policy: str
    baseline_bytes: int
    saved_bytes: int
    peak_bytes: int
    peak_breakdown: dict
    peak_phase: str | None
    peak_op: str | None
    meter: MemoryMeter

    @property
    def peak_above_baseline(self) -> int:
        return self.peak_bytes - self.baseline_bytes


def measure_step(
    model, policy="none", batch=None, batch_size=None, seq_len=None, seed=0, loss_fn=None
) -> StepMeasurement:
    """Run one forward+backward of ``loss_fn(batch)`` (default ``model.loss``) under ``policy``
    and measure its memory exactly. Gradients are cleared before and after."""
    policy = parse_policy(policy)
    _check_model(model)
    if batch is None:
        size = {} if batch_size is None else {"batch_size": batch_size}
        generator = torch.Generator().manual_seed(seed)
        batch = model.example_batch(seq_len=seq_len, generator=generator, **size)
    loss_fn = loss_fn or model.loss
    model.zero_grad(set_to_none=True)
    meter = MemoryMeter(timeline=True)
    torch.manual_seed(seed)
    with applied(model, policy), meter:
        meter.track(model).count(*batch)
        meter.reset_peak()
        baseline = meter.live_bytes
        with meter.phase("forward"):
            loss = loss_fn(batch)
        saved = meter.live_bytes - baseline
        with meter.phase("backward"):
            loss.backward()
        del loss
    meter.untrack()
    model.zero_grad(set_to_none=True)
    return StepMeasurement(
        str(policy), baseline, saved, meter.peak_bytes, dict(meter.peak_breakdown),
        meter.peak_phase, meter.peak_op, meter,
    )


@dataclass
class GradCheck:
    """Gradients under a policy compared with no policy, parameter by parameter."""

    policy: str
    equal: bool  # every gradient torch.equal to the reference: bit-identical
    max_abs_diff: float
    mismatched: list[str]


def _gradients(model, batch, seed):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # same dropout masks in both runs
    model.loss(batch).backward()
    grads = {
        name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None
    }
    model.zero_grad(set_to_none=True)
    return grads


def check_gradients(
    model, policy, batch_size: int = 4, seq_len: int | None = None, seed: int = 0
) -> GradCheck:
    """Is checkpointing exact? Compare every gradient with and without ``policy``,
    dropout included."""
    policy = parse_policy(policy)
    _check_model(model)
    model.train()
    device = next(model.parameters()).device
    batch = _to(
        model.example_batch(batch_size, seq_len, generator=torch.Generator().manual_seed(seed)),
        device,
    )
    reference = _gradients(model, batch, seed)
    with applied(model, policy):
        checked = _gradients(model, batch, seed)
    mismatched = [
        n for n in reference if not torch.equal(reference[n], checked.get(n, torch.empty(0)))
    ]
    diff = max(
        ((reference[n] - checked[n]).abs().max().item() for n in mismatched if n in checked),
        default=0.0,
    )
    return GradCheck(str(policy), not mismatched, diff, mismatched)
