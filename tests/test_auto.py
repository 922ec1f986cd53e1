"""auto_checkpoint: measure, plan, apply and verify in one call, on a learner's own model (no
course protocol) and on a course model; predicted peak = measured; undo leaves the model as
it was; gradients are those of no checkpointing."""

import copy
import re

import pytest
import torch
from learner_models import LinearNet, ResMLP
from torch import nn

from ckpt_course.auto import auto_checkpoint
from ckpt_course.meter import MemoryMeter
from ckpt_course.models import GPTConfig, TinyGPT
from ckpt_course.policies import _installed
from ckpt_course.step import make_optimizer, run_step

Block = ResMLP


class MyNet(LinearNet):
    """A learner's own model: a block list and a forward, nothing else."""

    def __init__(self, width=32, depth=6):
        super().__init__([Block(width) for _ in range(depth)], width=width)


def _grads(model, batch):
    model.zero_grad(set_to_none=True)
    model(batch).float().square().mean().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return grads


def test_a_learners_own_model_fits_as_predicted_and_undoes():
    torch.manual_seed(0)
    model, batch = MyNet(), torch.randn(64, 16)
    plain = _grads(model, batch)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with auto_checkpoint(model, 10**9, batch) as generous:  # everything fits: nothing to do
        assert generous.plan.best.recompute_flops == 0
    none = generous.predicted_peak
    report = auto_checkpoint(model, none - 1, batch)
    assert report.measured_peak == report.predicted_peak <= none - 1 and report.fits
    assert all(_installed(b) is not None for b in model.blocks)  # applied
    assert all(torch.equal(a, b) for a, b in zip(plain, _grads(model, batch), strict=True))
    assert "measured" in str(report) and str(report.policy) in str(report)
    report.undo()
    assert all(_installed(b) is None for b in model.blocks)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # untouched


class SequentialNet(MyNet):
    """Blocks kept in an nn.Sequential and run by it, as timm's ViT keeps them."""

    def __init__(self):
        super().__init__(depth=4)
        self.blocks = nn.Sequential(*self.blocks)

    def forward(self, x):
        return self.head(self.blocks(self.embed(x)))


def test_blocks_in_an_nn_sequential_are_planned_as_predicted():
    torch.manual_seed(0)
    model, batch = SequentialNet(), torch.randn(64, 16)
    plain = _grads(model, batch)
    generous = auto_checkpoint(model, 10**9, batch, op_points=0)
    generous.undo()
    report = auto_checkpoint(model, generous.predicted_peak - 1, batch, op_points=0)
    assert report.plan.costs.n == 4 and any(_installed(b) is not None for b in model.blocks)
    assert report.measured_peak == report.predicted_peak < generous.predicted_peak
    assert all(torch.equal(a, b) for a, b in zip(plain, _grads(model, batch), strict=True))
    report.undo()
    with pytest.raises(ValueError, match="course's models are planned over their own"):
        auto_checkpoint(TinyGPT(GPTConfig(n_layer=2, d_model=16, n_head=2, seq_len=8)), "1GiB",
                        torch.zeros(2, 8, dtype=torch.long), layers="blocks")


def test_a_course_model_uses_its_own_loss():
    torch.manual_seed(0)
    model = TinyGPT(GPTConfig(n_layer=4, d_model=32, n_head=2, seq_len=16))
    batch = model.example_batch(4, generator=torch.Generator().manual_seed(0))
    generous = auto_checkpoint(model, 10**9, batch)
    generous.undo()
    report = auto_checkpoint(model, generous.predicted_peak - 1, batch)
    try:
        assert report.measured_peak == report.predicted_peak and report.fits
    finally:
        report.undo()


def test_a_budget_nothing_fits_says_why_and_changes_nothing():
    model = MyNet()
    with pytest.raises(ValueError, match="nothing fits in .*: the parameters alone need"):
        auto_checkpoint(model, 1024, torch.randn(8, 16))
    assert all(_installed(b) is None for b in model.blocks)
    with pytest.raises(ValueError, match="budget"):
        auto_checkpoint(model, "lots", torch.randn(8, 16))
    with pytest.raises(ValueError, match="tensor or a tuple of tensors"):
        auto_checkpoint(model, "1MiB", [1, 2])


@pytest.mark.parametrize("batch, names", [
    ({"input_ids": torch.randn(8, 16)}, "got a dict (keys 'input_ids'): pass tuple(batch.values"),
    (torch.randn(8, 16).numpy(), "got ndarray: torch.from_numpy(batch)"),
    ((), "got an empty tuple"), ((torch.randn(8, 16), 3), "got a tuple holding int")])
def test_a_batch_of_another_kind_is_named_as_given(batch, names):
    with pytest.raises(ValueError, match=re.escape(names)):
        auto_checkpoint(MyNet(), "1MiB", batch)


# ---------------------------------------------------------------- models the planner cannot read
class _TupleBlock(Block):
    def forward(self, x):
        return super().forward(x), None


class _TupleNet(MyNet):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(_TupleBlock(32) for _ in range(4))

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)[0]
        return self.head(x)


class _Reversed(MyNet):
    def forward(self, x):
        x = self.embed(x)
        for block in reversed(self.blocks):
            x = block(x)
        return self.head(x)


class _Twice(MyNet):
    def forward(self, x):
        x = self.embed(x)
        for block in [*self.blocks, self.blocks[0]]:
            x = block(x)
        return self.head(x)


def _frozen():
    model = MyNet()
    model.requires_grad_(False)
    return model


@pytest.mark.parametrize("make, batch, loss_fn, error", [
    (_TupleNet, torch.randn(64, 16), None, "returns tuple, not a tensor"),
    (_Reversed, torch.randn(64, 16), None, r"in list order; this model ran blocks \[5, 4, 3"),
    (_Twice, torch.randn(64, 16), None, r"ran blocks \[0, 1, 2, 3, 4, 5, 0\]"),
    (MyNet, torch.randn(0, 16), None, r"no elements \(shape \(0, 16\)\)"),
    (_frozen, torch.randn(64, 16), None, "no parameter of MyNet requires grad"),
    (MyNet, torch.randn(64, 16), lambda out, batch: 3, "one-element tensor .* got int"),
    (MyNet, torch.randn(64, 16), lambda out, batch: out, r"got a tensor of shape \(64, 4\)"),
])
def test_a_model_the_planner_cannot_read_is_refused_in_one_line_and_left_alone(
        make, batch, loss_fn, error):
    torch.manual_seed(0)
    model = make()
    with pytest.raises(ValueError, match=error) as refused:
        auto_checkpoint(model, "5MiB", batch, loss_fn=loss_fn)
    assert "\n" not in str(refused.value)
    assert all(_installed(b) is None for b in model.blocks)


# ---------------------------------------------------------------- no side effects on the model
class _NormBlock(Block):
    def __init__(self, width):
        super().__init__(width)
        self.norm = nn.BatchNorm1d(width)
        self.drop = nn.Dropout(0.3)

    def forward(self, x):
        return x + self.drop(self.mlp(self.norm(x)))


class _NormNet(MyNet):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(_NormBlock(32) for _ in range(6))


def test_planning_leaves_the_models_buffers_mode_gradients_and_random_stream_alone():
    torch.manual_seed(0)
    model, batch = _NormNet(), torch.randn(64, 16)
    model(batch).sum().backward()  # gradients the learner already has
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    generous = auto_checkpoint(model, 10**9, batch)
    generous.undo()
    report = auto_checkpoint(model, generous.predicted_peak - 1, batch)
    try:
        assert str(report.policy) != "none"  # a plan that re-runs a BatchNorm block's forward
        assert torch.equal(torch.get_rng_state(), rng)
        assert not any(m.training for m in model.modules())
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
        assert all(torch.equal(a, p.grad) for a, p in zip(grads, model.parameters(),
                                                          strict=True))
        # and training under it updates the running statistics once per step, as plain does
        model.train()
        plain = _NormNet()
        plain.load_state_dict(before)
        for net in (model, plain):
            torch.manual_seed(1)
            net(batch).square().mean().backward()
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in plain.state_dict().items())
    finally:
        report.undo()


def test_op_level_options_never_recompute_more_and_stay_exact():
    torch.manual_seed(0)
    model, batch = MyNet(), torch.randn(256, 16)
    plain = _grads(model, batch)
    generous = auto_checkpoint(model, 10**9, batch, op_points=0)
    generous.undo()
    fewer = []
    for share in (0.8, 0.75, 0.7):
        budget = int(generous.predicted_peak * share)
        with auto_checkpoint(model, budget, batch, op_points=0) as menu_only:
            pass
        with auto_checkpoint(model, budget, batch) as op_level:  # op_points=6 by default
            assert op_level.measured_peak == op_level.predicted_peak <= budget
            assert all(torch.equal(a, b) for a, b in zip(plain, _grads(model, batch),
                                                         strict=True))
        assert op_level.plan.best.recompute_flops <= menu_only.plan.best.recompute_flops
        fewer.append(op_level.plan.best.recompute_flops < menu_only.plan.best.recompute_flops)
    assert any(fewer) and "selective:ops=" in str(op_level.policy)


# ---------------------------------------------------------------- the learner's own loss
class _AuxNet(MyNet):
    """Returns (logits, aux_loss), the auxiliary loss from a head of its own on the last
    block's output (a load-balancing or distillation term)."""

    def __init__(self):
        super().__init__(depth=4)
        self.aux_head = nn.Linear(32, 64)

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x), self.aux_head(x).square().mean()


def _logits_and_aux(out, batch):
    logits, aux = out  # a tensor here would unpack into rows, silently
    return logits.square().mean() + 0.1 * aux


def test_a_tuple_output_reaches_the_learners_loss_fn_whole():
    torch.manual_seed(0)
    model, batch, seen = _AuxNet(), torch.randn(64, 16), []

    def loss_fn(out, batch):
        seen.append(type(out))
        return _logits_and_aux(out, batch)

    def grads():
        model.zero_grad(set_to_none=True)
        _logits_and_aux(model(batch), batch).backward()
        found = [p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
        return found

    plain = grads()
    generous = auto_checkpoint(model, 10**9, batch, loss_fn=loss_fn, op_points=0)
    generous.undo()
    assert seen and set(seen) == {tuple}
    # AdamW keeps two moments per trained parameter: the aux head's are planned for
    trained = sum(p.numel() * p.element_size() for p in model.parameters())
    assert generous.plan.costs.optimizer_bytes >= 2 * trained
    with auto_checkpoint(model, generous.predicted_peak - 1, batch, loss_fn=loss_fn,
                         op_points=0) as report:
        assert report.measured_peak == report.predicted_peak and report.fits
        assert str(report.policy) != "none"
        under_plan = grads()
    assert all(torch.equal(a, b) for a, b in zip(plain, under_plan, strict=True))
    names = [name for name, _ in model.named_parameters()]
    assert plain[names.index("aux_head.weight")].abs().sum() > 0  # the aux term is trained


# ---------------------------------------------------------------- gradient accumulation
def _accumulated_peak(model, batch, micro_batches: int) -> int:
    """Step 2's peak of the learner's own loop: ``micro_batches`` forward/backward passes on
    ``batch`` (the default loss), gradients added up, then one AdamW step."""
    optimizer, meter = make_optimizer(model), MemoryMeter()
    steps = [[(batch.clone(),) for _ in range(micro_batches)] for _ in (1, 2)]  # not metered
    with meter:
        meter.track(model, optimizer)
        for step, parts in enumerate(steps, 1):
            record = run_step(model, optimizer, parts, meter, step=step,
                              loss_fn=lambda part: model(part[0]).square().mean())
        meter.untrack()
    model.zero_grad(set_to_none=True)
    return record.peak_bytes


def test_a_plan_for_accumulated_micro_batches_holds_for_every_micro_batch():
    torch.manual_seed(0)
    model, batch = MyNet(depth=4), torch.randn(64, 16)
    generous = auto_checkpoint(model, 10**9, batch, op_points=0)
    generous.undo()
    budget = int(generous.predicted_peak * 0.93)
    with auto_checkpoint(model, budget, batch, op_points=0) as one_pass:
        assert _accumulated_peak(copy.deepcopy(model), batch, 2) > budget  # not its step
    plain = _grads(model, batch)
    with auto_checkpoint(model, budget, batch, op_points=0, micro_batches=3) as report:
        assert report.micro_batches == 3 and "3 micro-batches" in str(report)
        assert report.measured_peak == report.predicted_peak <= budget
        assert _accumulated_peak(copy.deepcopy(model), batch, 3) == report.measured_peak
        assert all(torch.equal(a, b) for a, b in zip(plain, _grads(model, batch), strict=True))
    assert report.plan.best.recompute_flops > one_pass.plan.best.recompute_flops


@pytest.mark.parametrize("micro_batches", [0, 1.5, True, "2"])
def test_micro_batches_not_a_whole_number_is_refused_before_any_work(micro_batches):
    with pytest.raises(ValueError, match="micro_batches is how many .* got") as refused:
        auto_checkpoint(MyNet(), "1MiB", torch.randn(8, 16), micro_batches=micro_batches)
    assert "\n" not in str(refused.value)
