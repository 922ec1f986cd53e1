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
With ``micro_batches=N`` (gradient accumulation: N forward/backward passes, each on the batch
given, then one optimizer step) it measures a micro-batch after the first, where every gradient
is already held (``measure_costs(accumulate=True)``), and verifies a step of N micro-batches.
Measuring and verifying run on a copy of the model, under a forked random stream: the model's
weights, buffers, gradients and train/eval mode never change, only its blocks' forwards.

A model without the course protocol (``.example_batch``, ``.loss``) gets a thin adapter: the
blocks are found as its longest ``nn.ModuleList`` of one type (``hf.find_decoder_layers``), the
batch is the one given (the model is called on as many of its leading tensors as its forward
has required inputs: ``(x, mask, targets)`` for ``forward(x, mask)``), and the loss is
``loss_fn(output, batch)``, the output as the model returns it (a tuple or dict included;
default: the mean square of the output, of a tuple's first item, or of a dict's "logits" or only
tensor: a stand-in whose memory is that of any scalar loss on it).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .costs import MENU, check_op_points, copy_of, measure_costs
from .doctor import run_steps
from .meter import parse_budget
from .plan import Plan, make_plan
from .policies import AppliedPolicy, apply_policy
from .recording import check_no_policy
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
        out = self.inner(*batch[:self._inputs])
        loss = self._loss_fn(_model_output(out) if self._loss_fn is _mean_square else out, batch)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError(f"loss_fn(output, batch) must return a one-element tensor (a "
                             f"scalar loss), got {_described(loss)}")
        return loss


def _model_output(out):
    """What the default loss reads: ``.logits`` (transformers' outputs), a tuple's first item,
    a mapping's "logits" or its only tensor (else refused in one line naming ``loss_fn``). A
    learner's ``loss_fn`` gets the output as the model returns it instead: an auxiliary loss
    in a tuple, ``(logits, aux_loss)``, is part of the step measured."""
    out = getattr(out, "logits", out)
    if isinstance(out, Mapping):
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
    # which block list was planned, where the model has others as long (else "")
    blocks_note: str = ""
    micro_batches: int = 1  # forward/backward passes per optimizer step planned for

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
        return (f"auto_checkpoint: {best.policy} on {self.plan.costs.n} blocks, for a step of "
                f"{_micro_batches_said(self.micro_batches)}, budget "
                f"{fmt_bytes(self.plan.budget)}: predicted peak {fmt_bytes(best.peak_bytes)} "
                f"({best.where}), measured {fmt_bytes(self.measured_peak)}"
                f"{'' if self.fits else ' (OVER the budget)'}; recompute "
                f"{fmt_flops(best.recompute_flops)} = {best.overhead:+.1%} of a plain step"
                f"{self.blocks_note}. report.undo() removes it.")


def auto_checkpoint(model: nn.Module, budget, batch, loss_fn=None, menu=MENU,
                    op_points: int = 6, trunk: bool = False, layers: str | None = None,
                    micro_batches: int = 1) -> AutoReport:
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
    whose forward is pure, which no measurement can check; hence off by default.
    ``layers``: the dotted path of the block list (e.g. "encoder.layers") where the model has
    several, or one the search does not find (``hf.find_decoder_layers``).
    ``micro_batches``: how many forward/backward passes, each on ``batch``, add their gradients
    up before one optimizer step (gradient accumulation); a plan for one pass per step does not
    cover the second, which runs with every gradient already held."""
    budget = parse_budget(budget)  # once, here
    check_op_points(op_points)
    _check_micro_batches(micro_batches)
    if not isinstance(trunk, bool):
        raise TypeError(f"trunk is True or False, got {trunk!r}")
    course = _course_model(model, batch, loss_fn, layers)
    check_no_policy(course.blocks, "call auto_checkpoint again")  # nor installed on top
    # Everything runs on a copy, with the random stream put back: the learner's model keeps its
    # buffers (BatchNorm's statistics), its train/eval mode and its gradients; seeded runs
    # reproduce with or without this call.
    with torch.random.fork_rng(devices=_cuda_devices(model)):
        work = copy_of(course, "auto_checkpoint measures and verifies on")
        costs = measure_costs(work, None, menu=menu, op_points=op_points, suffix=trunk,
                              accumulate=micro_batches > 1)
        plan = make_plan(costs, budget, "flops")
        if not plan.fits:
            raise ValueError(f"nothing fits in {fmt_bytes(budget)} for a step of "
                             f"{_micro_batches_said(micro_batches)}: {plan.advice()} (plan a "
                             f"smaller batch with auto_checkpoint(..., micro_batches=N))")
        _check_replays(work, plan)
        measured = _metered_step(work, plan.policy, micro_batches)
    if measured > budget:
        raise ValueError(
            f"{plan.best.policy} was predicted to peak at {fmt_bytes(plan.best.peak_bytes)} but "
            f"a step under it measured {fmt_bytes(measured)}, over the budget "
            f"{fmt_bytes(budget)}: the planner's memory model misses something this model does "
            f"(e.g. blocks that share state or return views of larger tensors); nothing was "
            f"installed: ask for {fmt_bytes(measured - plan.best.peak_bytes)} less, "
            f"auto_checkpoint(model, {budget - (measured - plan.best.peak_bytes)}, batch"
            f"{f', micro_batches={micro_batches}' if micro_batches > 1 else ''})")
    handle = apply_policy(model, plan.policy, blocks=course.blocks,
                          suffix_entry=model if isinstance(course, _Adapted) else None)
    return AutoReport(plan, handle, measured, _blocks_note(model, course.blocks), micro_batches)


def _check_micro_batches(micro_batches) -> None:
    if isinstance(micro_batches, bool) or not isinstance(micro_batches, int) or \
            micro_batches < 1:
        raise ValueError(f"micro_batches is how many forward/backward passes (each on the batch "
                         f"given) add their gradients up before one optimizer step, a whole "
                         f"number >= 1 such as 4; got {micro_batches!r}")


def _micro_batches_said(micro_batches: int) -> str:
    if micro_batches == 1:
        return "one forward/backward"
    return f"{micro_batches} micro-batches (gradients accumulated)"


def _metered_step(work: nn.Module, policy, micro_batches: int) -> int:
    """The peak of step 2 of two AdamW steps under ``policy``, each of ``micro_batches``
    forward/backward passes on the batch given (``doctor.run_steps``: ``step.run_step`` on a
    list of micro-batches), what the planner predicts: step 2 has optimizer state."""
    # work's example_batch is the batch given, whatever size is asked: one "sample" each
    run = run_steps(work, None, policy, batch_size=micro_batches, steps=2,
                    micro_batches=micro_batches, copy_model=False)
    work.zero_grad(set_to_none=True)
    return run.steps[-1].peak_bytes


def _blocks_note(model: nn.Module, blocks) -> str:
    """Which list was planned, said only where the model has another list of as many blocks
    of one type (an encoder and a decoder): the planner plans one chain, and which one it took
    is otherwise invisible."""
    lists = {id(m): name for name, m in model.named_modules()
             if isinstance(m, (nn.ModuleList, nn.Sequential)) and len(m) == len(blocks)
             and len({type(b) for b in m}) == 1}
    planned = lists.pop(id(blocks), None)
    if planned is None or not lists:
        return ""
    others = ", ".join(lists.values())
    return (f"; planned the blocks of {planned}, not those of {others} (as many): to plan "
            f"another list, pass layers='{next(iter(lists.values()))}'")


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


def _cuda_devices(model: nn.Module) -> list[int]:
    return sorted({t.device.index or 0 for t in [*model.parameters(), *model.buffers()]
                   if t.device.type == "cuda"})


def _course_model(model: nn.Module, batch, loss_fn, layers=None) -> nn.Module:
    """``model`` itself if it speaks the course protocol, else an adapter; one-line errors
    before any work for what cannot be planned."""
    from .hf import find_decoder_layers

    if not isinstance(model, nn.Module):
        raise TypeError(f"auto_checkpoint plans an nn.Module, not {type(model).__name__}")
    batch = _batch_tuple(batch)
    if not batch[0].numel():
        raise ValueError(f"the batch's input has no elements (shape {tuple(batch[0].shape)}): "
                         f"give the batch you train on")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"no parameter of {type(model).__name__} requires grad: there is no "
                         f"training step to fit (unfreeze what you train)")
    if all(hasattr(model, name) for name in ("blocks", "example_batch", "loss")) and \
            loss_fn is None:
        if layers is not None:
            raise ValueError("the course's models are planned over their own `blocks`: leave "
                             "out layers= (it names the block list of a model of your own)")
        return _Given(model, batch)
    if getattr(getattr(model, "config", None), "use_cache", False) is True:
        raise ValueError("model.config.use_cache is True: each layer fills a key/value cache "
                         "that a training step does not use and the planner cannot measure; set "
                         "model.config.use_cache = False for training (transformers does the "
                         "same when it checkpoints)")
    blocks = getattr(model, "blocks", None)
    lists = (nn.ModuleList, nn.Sequential)
    if layers is not None or not isinstance(blocks, lists) or not len(blocks):
        blocks = find_decoder_layers(model, layers)
    return _Adapted(model, batch, loss_fn or _mean_square, blocks, _inputs_taken(model, batch))


def _batch_tuple(batch) -> tuple:
    """The batch as a tuple of tensors, the model's input first; what else was given is named
    as given (a dict is a Hugging Face habit: its values in the forward's order will do)."""
    shape = "a tensor or a tuple of tensors in the order the model's forward takes them"
    if isinstance(batch, dict):
        raise ValueError(f"batch is {shape}, got a dict (keys {', '.join(map(repr, batch))}): "
                         f"pass tuple(batch.values()) if that is the forward's order")
    if isinstance(batch, torch.Tensor):
        return (batch,)
    if not isinstance(batch, (tuple, list)):
        fix = ": torch.from_numpy(batch)" if type(batch).__module__ == "numpy" else ""
        raise ValueError(f"batch is {shape}, got {type(batch).__name__}{fix}")
    if not batch:
        raise ValueError(f"batch is {shape}, got an empty {type(batch).__name__}")
    odd = [type(t).__name__ for t in batch if not isinstance(t, torch.Tensor)]
    if odd:
        raise ValueError(f"batch is {shape}, got a {type(batch).__name__} holding "
                         f"{', '.join(odd)}")
    return tuple(batch)


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
