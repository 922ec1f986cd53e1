"""``auto_checkpoint``: one call that fits a model's training step in a memory budget.

For any ``nn.Module`` with a repeated block list (the course's models, a Hugging Face model, or
your own with ``self.blocks = nn.ModuleList(...)``)::

    report = auto_checkpoint(model, "40MiB", batch)   # measure, plan, apply, verify
    print(report)                                     # what it chose, predicted and measured
    ...train as usual: the policy is installed on the model's blocks...
    report.undo()                                     # or: with auto_checkpoint(...): ...

1. Measure each distinct block and the rest of the model on ``batch`` (``costs.measure_costs``,
   with every option of ``costs.MENU``: checkpointed segments, selective variants, offload;
   and points of each block's exact Pareto set over which op outputs to keep, ``op_choices``;
   and the suffix after the last block checkpointed, fully or at op-level points: for a
   course model the final layers and the loss, for your own model the layers after the last
   block up to its output, since your loss is your own code; and, where it measures exact,
   the layers before the first block run inside the first block's checkpoint).
2. Plan: the placement with the fewest recomputed FLOPs whose predicted peak fits the budget
   (``plan.optimal``; offload only where nothing else fits).
3. Apply it to the model's blocks (``policies.apply_policy``: instance forwards, removed by
   ``undo``; parameters and state_dict untouched).
4. Verify, on a copy of the model: one step's gradients under the plan equal plain's bit for
   bit (``train.check_gradients``; a block whose recompute does not replay its forward the
   same way installs nothing), and two AdamW steps under the meter; step 2 (optimizer state
   present) is what the planner predicts; a step over the budget installs nothing.
Measuring and verifying run on a copy of the model, under a forked random stream: the model's
weights, buffers, gradients and train/eval mode never change, only its blocks' forwards.

A model without the course protocol (``.example_batch``, ``.loss``) gets a thin adapter: the
blocks are found as its longest ``nn.ModuleList`` of one type (``hf.find_decoder_layers``), the
batch is the one given (the model is called on as many of its leading tensors as its forward
has required inputs: ``(x, mask, targets)`` for ``forward(x, mask)``), and the loss is
``loss_fn(output, batch)`` (default: the mean square of the output, or of its "logits" or only
tensor when it returns a dict: a stand-in whose memory is that of any scalar loss on it).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .costs import MENU, check_op_points, measure_costs
from .meter import parse_budget
from .plan import Plan, make_plan, measure_peaks
from .policies import AppliedPolicy, _installed, apply_policy
from .train import check_gradients
from .units import fmt_bytes, fmt_flops


class _Adapted(nn.Module):
    """The course protocol around any module: its blocks, the given batch, a loss."""

    def __init__(self, model: nn.Module, batch: tuple, loss_fn, blocks: nn.ModuleList,
                 inputs: int = 1):
        super().__init__()
        self.inner = model
        self._blocks = [blocks]  # a list: not registered a second time
        self._batch, self._loss_fn, self._inputs = batch, loss_fn, inputs

    @property
    def blocks(self) -> nn.ModuleList:
        return self._blocks[0]

    @property
    def suffix_entry(self) -> nn.Module:
        """A checkpointed suffix ends where the learner's model returns (``policies._Trunk``):
        the learner computes the loss with code of their own, which no policy wraps."""
        return self.inner

    def example_batch(self, batch_size=None, seq_len=None, generator=None) -> tuple:
        return self._batch

    def loss(self, batch):
        out = _model_output(self.inner(*batch[:self._inputs]), self._loss_fn is _mean_square)
        loss = self._loss_fn(out, batch)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError(f"loss_fn(output, batch) must return a one-element tensor (a "
                             f"scalar loss), got {_described(loss)}")
        return loss


def _model_output(out, default_loss: bool):
    """What the loss reads: ``.logits`` (transformers' outputs), a tuple's first item; a
    mapping goes to a learner's ``loss_fn`` as it is, and to the default loss as its "logits"
    or its only tensor (else refused in one line naming ``loss_fn``)."""
    out = getattr(out, "logits", out)
    if isinstance(out, Mapping) and default_loss:
        tensors = [v for v in out.values() if isinstance(v, torch.Tensor)]
        if "logits" in out or len(tensors) == 1:
            return out["logits"] if "logits" in out else tensors[0]
        raise ValueError(f"the model returns a {type(out).__name__} with keys "
                         f"{', '.join(map(repr, out))}: pass loss_fn=lambda out, batch: ... "
                         f"that computes the loss you train on from it")
    return out[0] if isinstance(out, (tuple, list)) else out


def _inputs_taken(model: nn.Module, batch: tuple) -> int:
    """How many of the batch's leading tensors the model's forward takes: its required
    positional parameters (at least one). A forward needing more than the batch holds is
    refused before any work."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):  # no signature to read (a C function): one input
        return 1
    needed = [p for p in params if p.default is p.empty
              and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(needed) > len(batch):
        names = ", ".join(p.name for p in needed)
        raise ValueError(f"{type(model).__name__}.forward takes {len(needed)} inputs ({names}) "
                         f"but the batch holds {len(batch)} tensor(s): pass batch=({names}"
                         f"{', targets' if len(batch) > 1 else ''}), its inputs first in that "
                         f"order")
    return max(1, len(needed))


def _described(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return type(value).__name__


def _mean_square(output: torch.Tensor, batch) -> torch.Tensor:
    return output.float().square().mean()


@dataclass
class AutoReport:
    """What ``auto_checkpoint`` chose and found; ``undo()`` (or leaving ``with``) removes it."""

    plan: Plan
    handle: AppliedPolicy
    measured_peak: int  # step 2 of two AdamW steps on a copy, under the policy

    @property
    def policy(self):
        return self.plan.policy

    @property
    def predicted_peak(self) -> int:
        return self.plan.best.peak_bytes

    @property
    def fits(self) -> bool:
        return self.measured_peak <= self.plan.budget

    def undo(self) -> None:
        """Give the blocks their own forward back (safe to call twice)."""
        self.handle.remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.undo()

    def __str__(self):
        best = self.plan.best
        return (f"auto_checkpoint: {best.policy} on {self.plan.costs.n} blocks, budget "
                f"{fmt_bytes(self.plan.budget)}: predicted peak {fmt_bytes(best.peak_bytes)} "
                f"({best.where}), measured {fmt_bytes(self.measured_peak)}"
                f"{'' if self.fits else ' (OVER the budget)'}; recompute "
                f"{fmt_flops(best.recompute_flops)} = {best.overhead:+.1%} of a plain step. "
                f"report.undo() removes it.")


def auto_checkpoint(model: nn.Module, budget, batch, loss_fn=None, menu=MENU,
                    op_points: int = 6, trunk: bool = False) -> AutoReport:
    """Measure, plan, apply and verify the cheapest checkpoint placement that fits ``budget``
    (bytes or "40MiB") for a training step on ``batch`` (a tensor or a tuple whose first item
    is the model's input; the course's models take their own ``(idx, targets)``). Raises a
    one-line ``ValueError`` naming the fix when nothing fits; the model is unchanged then.
    ``op_points``: besides ``menu``, up to this many op-level options per distinct block
    (``op_choices``: which op outputs a checkpoint keeps; 0: the menu alone).
    ``trunk=True``: also weigh a checkpointed suffix and prefix (a menu's ``suffix=`` and
    ``prefix=`` clauses). Their recompute runs the model's own code around the blocks a second
    time in backward, so a forward with side effects (a call counter, its own random generator,
    a buffer it updates in place) would do them twice and train differently: only for a model
    whose forward is pure, which no measurement can check; hence off by default."""
    budget = parse_budget(budget)  # once, here
    check_op_points(op_points)
    if not isinstance(trunk, bool):
        raise TypeError(f"trunk is True or False, got {trunk!r}")
    course = _course_model(model, batch, loss_fn)
    _check_no_policy(course.blocks)
    # Everything runs on a copy, with the random stream put back: the learner's model keeps its
    # buffers (BatchNorm's statistics), its train/eval mode and its gradients; seeded runs
    # reproduce with or without this call.
    with torch.random.fork_rng(devices=_cuda_devices(model)):
        work = copy.deepcopy(course)
        costs = measure_costs(work, None, menu=menu, op_points=op_points, suffix=trunk)
        plan = make_plan(costs, budget, "flops")
        if not plan.fits:
            raise ValueError(f"nothing fits in {fmt_bytes(budget)}: {plan.advice()}")
        _check_replays(work, plan)
        measured = measure_peaks(work, plan.policy)[-1]
    if measured > budget:
        raise ValueError(
            f"{plan.best.policy} was predicted to peak at {fmt_bytes(plan.best.peak_bytes)} but "
            f"a step under it measured {fmt_bytes(measured)}, over the budget "
            f"{fmt_bytes(budget)}: the planner's memory model misses something this model does "
            f"(e.g. blocks that share state or return views of larger tensors); nothing was "
            f"installed: ask for {fmt_bytes(measured - plan.best.peak_bytes)} less, "
            f"auto_checkpoint(model, {budget - (measured - plan.best.peak_bytes)}, batch)")
    handle = apply_policy(model, plan.policy, blocks=course.blocks,
                          suffix_entry=model if isinstance(course, _Adapted) else None)
    return AutoReport(plan, handle, measured)


def _check_replays(work: nn.Module, plan: Plan) -> None:
    """One step's gradients under the plan equal plain's bit for bit (``check_gradients``, on
    the working copy), or nothing is installed: a recompute re-runs a block's Python forward,
    and what checkpoint does not restore (a random generator or state the block keeps where
    the planner's measuring does not see it) would train differently."""
    best = plan.best
    recomputed = sorted({k for i, j, kind in best.placement if kind is not False
                         and not str(kind).startswith("offload") for k in range(i, j)})
    parts = [f"block{'s' if len(recomputed) > 1 else ''} {', '.join(map(str, recomputed))}"
             ] if recomputed else []
    parts += [f"the {part}" for part in ("prefix", "suffix") if getattr(best, part)]
    if not parts:
        return
    check = check_gradients(work, plan.policy)
    if not check.equal or check.state_changed:
        what = (f"the gradients ({len(check.mismatched)} parameters differ from plain, e.g. "
                f"{check.mismatched[0]})" if not check.equal else
                f"the model's state ({', '.join(check.state_changed[:3])} differ from plain "
                f"after a step)")
        raise ValueError(
            f"{best.policy} fits but changes {what}: the forward of "
            f"{' and '.join(parts)} does not run the same when recomputed (random numbers "
            f"from a generator of its own, state it changes); nothing was installed: draw from "
            f"torch's global random stream (checkpoint restores it) and keep such state out of "
            f"forward, or give a budget that fits without recomputing them")


def _check_no_policy(blocks) -> None:
    """Before any work: a model already under a policy would be measured under it, and the
    plan could not be installed on top."""
    for k, block in enumerate(blocks):
        if _installed(block) is not None:
            raise ValueError(f"block {k} already runs under {_installed(block).handle.policy}: "
                             f"undo it first (report.undo(), or remove() on apply_policy's "
                             f"handle), then call auto_checkpoint again")


def _cuda_devices(model: nn.Module) -> list[int]:
    return sorted({t.device.index or 0 for t in [*model.parameters(), *model.buffers()]
                   if t.device.type == "cuda"})


def _course_model(model: nn.Module, batch, loss_fn) -> nn.Module:
    """``model`` itself if it speaks the course protocol, else an adapter; one-line errors
    before any work for what cannot be planned."""
    from .hf import find_decoder_layers

    if not isinstance(model, nn.Module):
        raise TypeError(f"auto_checkpoint plans an nn.Module, not {type(model).__name__}")
    batch = (batch,) if isinstance(batch, torch.Tensor) else tuple(batch)
    if not batch or not all(isinstance(t, torch.Tensor) for t in batch):
        raise ValueError("batch is a tensor or a tuple of tensors (the model's input first), "
                         f"got {type(batch).__name__}")
    if not batch[0].numel():
        raise ValueError(f"the batch's input has no elements (shape {tuple(batch[0].shape)}): "
                         f"give the batch you train on")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"no parameter of {type(model).__name__} requires grad: there is no "
                         f"training step to fit (unfreeze what you train)")
    if all(hasattr(model, name) for name in ("blocks", "example_batch", "loss")) and \
            loss_fn is None:
        return _Given(model, batch)
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or not len(blocks):
        blocks = find_decoder_layers(model)
    return _Adapted(model, batch, loss_fn or _mean_square, blocks, _inputs_taken(model, batch))


class _Given(nn.Module):
    """A course model, its own loss, on the batch given."""

    def __init__(self, model: nn.Module, batch: tuple):
        super().__init__()
        self.inner, self._batch = model, batch
        self.cfg = getattr(model, "cfg", None)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.inner.blocks

    def example_batch(self, batch_size=None, seq_len=None, generator=None) -> tuple:
        return self._batch

    def loss(self, batch):
        return self.inner.loss(batch)
