"""Real training steps under a checkpoint policy, one record per step.

``train(model, "every-2", steps=5)`` runs AdamW steps and returns a ``StepRecord`` per step: loss,
step time, peak memory, the bytes held for backward at the end of forward, and the FLOPs backward
recomputes. The steps are ``ckpt_course.step.run_step``'s, as everywhere in the course.

Step times include the meter's cost when ``measure_memory=True``; compare policies' speed with
``measure_memory=False`` and interleaved runs (see ``bench/``).
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .meter import MemoryMeter, parse_budget
from .policies import applied, apply_policy, parse_policy
from .recompute import measure_recompute
from .step import (
    StepRecord,
    check_batch,
    check_learning_rate,
    check_run,
    check_seed,
    make_batch,
    make_optimizer,
    run_step,
    seeded,
)
from .units import shown

__all__ = ["StepRecord", "check_gradients", "measure_step", "train"]


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
    """Run ``steps`` AdamW steps of ``model.loss`` under ``policy``; return one record per step
    (``step`` counts from 1). ``seed`` fixes the batches and the dropout masks.

    ``budget`` (bytes) makes the meter raise ``torch.OutOfMemoryError`` when live memory would
    exceed it; the failed step is undone first (``ckpt_course.step``), so the process stays
    usable. Batches are not counted by the meter, as ``predict`` does not count them: a budget
    ``predict`` says fits, fits. ``on_step(record)`` is called after each step (live plots)."""
    device = check_run(model, batch_size=batch_size, steps=steps, seq_len=seq_len, device=device)
    policy = parse_policy(policy)
    check_learning_rate(lr)
    check_seed(seed)
    if budget is not None:
        parse_budget(budget)  # fail before any work, with the accepted forms in the message
        if not measure_memory:
            raise ValueError("a budget is enforced by the memory meter: keep measure_memory=True "
                             "with a budget, or drop the budget")
    for name, value in (("measure_memory", measure_memory), ("count_recompute", count_recompute),
                        ("progress", progress)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} is True or False, got {shown(value)}")
    if on_step is not None and not callable(on_step):
        raise TypeError(f"on_step must be a function called with each StepRecord, got "
                        f"{type(on_step).__name__} {shown(on_step)}: pass e.g. on_step=print")
    check_policy_fits(model, policy)
    model.to(device).train()
    generator = torch.Generator().manual_seed(seed)
    optimizer = make_optimizer(model, lr)
    meter = MemoryMeter(budget=budget) if measure_memory else None
    records = []
    with seeded(seed, device):
        batch = make_batch(model, batch_size, seq_len, generator, device)
        recompute_flops = None
        if count_recompute:
            recompute_flops = measure_recompute(model, batch, policy, seed).flops
            model.zero_grad(set_to_none=True)
        try:
            with applied(model, policy), meter or contextlib.nullcontext():
                if meter is not None:
                    meter.track(model, optimizer)
                for step in tqdm(range(1, steps + 1), desc=str(policy), delay=1.0,
                                 disable=not progress, leave=False):
                    if step > 1:  # one at a time, made outside the meter
                        batch = make_batch(model, batch_size, seq_len, generator, device)
                    record = run_step(model, optimizer, batch, meter, step=step,
                                      policy=str(policy))
                    record.recompute_flops, record.meter = recompute_flops, None
                    records.append(record)
                    if on_step is not None:
                        on_step(record)
        finally:
            if meter is not None:
                meter.untrack()
    return records


def check_policy_fits(model, policy) -> None:
    """Install ``policy`` on the model's blocks and remove it: a policy naming blocks the model
    does not have fails here, in one line, before any work."""
    apply_policy(model, policy).remove()


def measure_step(
    model, policy="none", batch=None, batch_size=None, seq_len=None, seed=0, loss_fn=None
) -> StepRecord:
    """Run one forward+backward of ``loss_fn(batch)`` (default ``model.loss``) under ``policy``
    and measure its memory exactly; no optimizer. The batch is counted in the baseline
    (``baseline_bytes``: parameters and batch, live before forward); ``meter`` keeps the
    ``timeline``. Gradients are cleared before and after."""
    policy = parse_policy(policy)
    check_run(model, batch_size=batch_size, seq_len=seq_len)
    check_seed(seed)
    check_policy_fits(model, policy)
    if batch is not None:
        check_batch(tuple(batch) if isinstance(batch, (tuple, list)) else batch)
    if batch is None:
        batch = make_batch(model, batch_size, seq_len, torch.Generator().manual_seed(seed))
    meter = MemoryMeter(timeline=True)
    torch.manual_seed(seed)
    with applied(model, policy), meter:
        meter.track(model)
        record = run_step(model, None, tuple(batch), meter, loss_fn=loss_fn, count_batch=True,
                          policy=str(policy))
    meter.untrack()
    model.zero_grad(set_to_none=True)
    return record


@dataclass
class GradCheck:
    """Gradients under a policy compared with no policy, parameter by parameter."""

    policy: str
    equal: bool  # every gradient torch.equal to the reference: bit-identical
    max_abs_diff: float
    mismatched: list[str]
    # the model's own state the step left different from the reference's (a buffer, a
    # counter, a random generator a recompute ran again): the next step would differ
    state_changed: list[str] = field(default_factory=list)


def _gradients(model, batch, seed):
    model.zero_grad(set_to_none=True)
    with seeded(seed, next(model.parameters()).device):  # same dropout masks in both runs
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
    dropout included. The run without it is on a copy of the model as it was, so both start
    from the same state (a block's own random generator, a step counter, running statistics):
    a difference is the policy's."""
    policy = parse_policy(policy)
    device = check_run(model, batch_size=batch_size, seq_len=seq_len)
    check_seed(seed)
    check_policy_fits(model, policy)
    model.train()
    batch = make_batch(model, batch_size, seq_len, torch.Generator().manual_seed(seed), device)
    plain = copy.deepcopy(model)
    reference = _gradients(plain, batch, seed)
    with applied(model, policy):
        checked = _gradients(model, batch, seed)
    mismatched = [
        n for n in reference if not torch.equal(reference[n], checked.get(n, torch.empty(0)))
    ]
    diff = max(
        ((reference[n] - checked[n]).abs().max().item() for n in mismatched if n in checked),
        default=0.0,
    )
    return GradCheck(str(policy), not mismatched, diff, mismatched, _state_changed(plain, model))


def _state_changed(reference, model) -> list[str]:
    """Names of the buffers and public plain attributes (numbers, strings, containers of
    them, tensors, random generators) that differ between two copies of a model."""
    theirs = dict(reference.named_modules())
    changed = [name for (name, a), b in zip(reference.named_buffers(), model.buffers(),
                                            strict=True) if _comparable(a) != _comparable(b)]
    for name, module in model.named_modules():
        for key, value in vars(module).items():
            if key.startswith("_") or key == "forward":  # private (per-call caches); a
                continue  # policy's instance forward
            other = vars(theirs[name]).get(key)
            if _comparable(value) != _comparable(other):
                changed.append(f"{name}.{key}" if name else key)
    return changed


def _comparable(value):
    """What of an attribute two copies of a model can compare: plain values and containers
    of them, tensors' and generators' contents; anything else compares equal (unknown)."""
    if isinstance(value, torch.Generator):
        return ("generator", tuple(value.get_state().tolist()))
    if isinstance(value, torch.Tensor):  # its bits (NaN equals NaN), made on the CPU
        if value.layout != torch.strided or value.device.type == "meta":
            return ("tensor", tuple(value.shape), value.dtype)
        bits = value.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        return ("tensor", tuple(value.shape), value.dtype, bits.numpy().tobytes())
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return tuple(map(_comparable, value))
    if isinstance(value, dict):
        return tuple((k, _comparable(v)) for k, v in value.items())
    return "unknown"
