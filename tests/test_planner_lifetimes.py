"""Tensors that outlive the prefix or the blocks, and optimizer state, as held-out testers
found them (issue 20 item 2: Q1, Q5, Q6, P1, P13): every prediction equals the meter, or the
model is refused in one line while it is measured, never a silent wrong number."""

import copy

import pytest
import torch
from learner_models import LinearNet, ResMLP
from planner_checks import off_the_meter
from torch import nn

from ckpt_course.auto import _course_model
from ckpt_course.costs import measure_costs
from ckpt_course.plan import measure_peaks, predict, predict_nested

POLICIES = ("none", "full", "every-2", "segments:0-1")


class Res(nn.Module):
    def __init__(self, width=32):
        super().__init__()
        self.norm, self.linear = nn.LayerNorm(width), nn.Linear(width, width)

    def forward(self, x):
        return x + torch.tanh(self.linear(self.norm(x)))


class Net(LinearNet):
    def __init__(self, blocks, unused=False):
        super().__init__(blocks)
        if unused:
            self.pooler = nn.Linear(32, 32)  # never called, as a leftover head often is


def _course(model):
    torch.manual_seed(0)
    return _course_model(model, torch.randn(64, 16), None)


def _wrong(course, policies=POLICIES):
    """(policy, metered - predicted) for each policy off the meter or off plain's gradients."""
    costs = measure_costs(copy.deepcopy(course), None)
    return costs, off_the_meter(course, costs, policies)


def test_a_parameter_the_forward_never_uses_gets_no_optimizer_state():
    torch.manual_seed(0)
    costs, wrong = _wrong(_course(Net([Res(), Res()], unused=True)))
    assert wrong == []
    torch.manual_seed(0)
    used_only = measure_costs(_course(Net([Res(), Res()])), None)
    assert costs.optimizer_bytes == used_only.optimizer_bytes  # AdamW skips the unused Linear
    assert costs.param_bytes - used_only.param_bytes == (32 * 32 + 32) * 4  # still counted


@pytest.mark.parametrize("blocks", [[nn.Identity()], [nn.Identity(), nn.Dropout(0.0),
                                                      nn.Identity()]])
def test_a_block_list_that_only_passes_its_input_through_is_refused_in_one_line(blocks):
    from ckpt_course.auto import auto_checkpoint

    with pytest.raises(ValueError, match="every block returns its input.*nothing to checkpoint"):
        measure_costs(_course(Net(blocks)), None)
    with pytest.raises(ValueError, match="nothing to checkpoint"):
        auto_checkpoint(Net(copy.deepcopy(blocks)), 10**9, torch.randn(64, 16))


def test_pass_through_blocks_among_computing_ones_still_plan_exactly():
    torch.manual_seed(0)
    _, wrong = _wrong(_course(Net([nn.Identity(), Res(), nn.Identity()])),
                      ("none", "full", "segments:0-2"))
    assert wrong == []


def test_hand_made_costs_of_pass_through_blocks_only_are_refused_by_the_planner():
    from ckpt_course.costs import ChainCosts, LayerCost
    from ckpt_course.plan import make_plan

    costs = ChainCosts((LayerCost(4, 4, 0, returns_input=True),) * 2)
    for plan in (lambda: predict(costs, "none"), lambda: make_plan(costs, 10**9)):
        with pytest.raises(ValueError, match="nothing to checkpoint"):
            plan()


class LongSkip(Net):
    """x_0 used again after the last block: its gradient from the head waits for block 0's."""

    def forward(self, x):
        x0 = x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x + x0)


class Gated(Res):
    def forward(self, x, gate=None):
        return x + torch.tanh(self.linear(self.norm(x))) * gate


class MadeGate(Net):
    """The prefix makes a tensor every block gets as a keyword (a mask, positions): the blocks
    and checkpoints that keep it decide when it dies."""

    def __init__(self, blocks, grad=False):
        super().__init__(blocks)
        self.grad = grad

    def forward(self, x):
        h = self.embed(x)
        gate = torch.sigmoid(h if self.grad else h.detach())
        for block in self.blocks:
            h = block(h, gate=gate)
        return self.head(h)


class BufferGate(MadeGate):
    """The same gate as a buffer, made once: it lives all step, as the planner counts it."""

    def __init__(self, blocks):
        super().__init__(blocks)
        self.register_buffer("gate", torch.full((64, 32), 0.5), persistent=False)

    def forward(self, x):
        h = self.embed(x)
        for block in self.blocks:
            h = block(h, gate=self.gate)
        return self.head(h)


@pytest.mark.parametrize("model, words", [
    (LongSkip([Res(), Res()]), "code after the last block uses a tensor made before"),
    (MadeGate([Gated(), Gated()]), "block 0 gets keyword 'gate', a tensor the model makes in "
                                   r"its forward \(8,192 B\)"),
])
def test_tensors_that_outlive_what_the_memory_model_holds_are_refused_while_measuring(
        model, words):
    from ckpt_course.auto import auto_checkpoint

    with pytest.raises(ValueError, match=words):
        measure_costs(_course(model), None)
    with pytest.raises(ValueError, match=words):
        auto_checkpoint(copy.deepcopy(model), 10**9, torch.randn(64, 16))


def test_a_gate_made_once_as_a_buffer_plans_exactly():
    torch.manual_seed(0)
    _, wrong = _wrong(_course(BufferGate([Gated(), Gated()])))
    assert wrong == []


class ParamGate(Net):
    """One nn.Parameter the model passes every block (and, ``in_head``, uses in its head too):
    its gradient is made once, by the last block (or the head), and added into after."""

    def __init__(self, blocks, in_head=False):
        super().__init__(blocks)
        self.gate, self.in_head = nn.Parameter(torch.full((32,), 0.5)), in_head

    def forward(self, x):
        h = self.embed(x)
        for block in self.blocks:
            h = block(h, gate=self.gate)
        return self.head(h * self.gate if self.in_head else h)


@pytest.mark.parametrize("in_head", [False, True])
def test_a_parameter_passed_to_every_block_has_its_gradient_counted_once(in_head):
    torch.manual_seed(0)
    blocks = [Gated(), Gated(), Gated()]
    costs, wrong = _wrong(_course(ParamGate(blocks, in_head)),
                          (*POLICIES, "segments:1-2", "segments:0,2"))
    assert wrong == []
    gate_grad = 32 * 4  # made by the last block (or the head), then added into in place
    grads = [c.grad_bytes for c in costs.layers]
    assert grads[:2] == [grads[0]] * 2 and grads[2] - grads[0] == (0 if in_head else gate_grad)


class Light(nn.Module):
    """x + linear(x): its backward ends adding up x's two gradients, after its Linear let x go
    (when nothing else keeps x)."""

    def __init__(self, width=32, heavy=False):
        super().__init__()
        self.linear, self.heavy = nn.Linear(width, width), heavy

    def forward(self, x):
        h = self.linear(x)
        if self.heavy:
            h = torch.exp(torch.sin(torch.tanh(h)))
        return x + h


def test_a_checkpoint_lets_its_input_go_with_its_last_saved_tensor():
    from ckpt_course.costs import MENU
    from ckpt_course.plan import optimal

    torch.manual_seed(0)
    course = _course(Net([Light(), Light(heavy=True), Light()]))
    costs = measure_costs(copy.deepcopy(course), None, menu=MENU)
    selective = "selective:recompute=gelu,silu,relu"
    for policy in ("menu:2=full", f"menu:0={selective},2=full", "full", "segments:1-2",
                   "segments:0-1", "every-2"):
        predicted = predict(costs, policy).peak_bytes
        assert (policy, measure_peaks(copy.deepcopy(course), policy)[-1]) == (policy, predicted)
    # the light block checkpointed alone keeps what it keeps plain: its input, nothing more
    assert predict(costs, "menu:2=full").peak_bytes == predict(costs, "none").peak_bytes
    plan = optimal(costs, predict(costs, "none").peak_bytes)  # the DP prices it the same way
    assert plan.peak_bytes == predict(costs, plan.placement).peak_bytes


class Scaled(nn.Module):
    """x + relu(linear(x)) * 0.5: the gradient of the scaling reads no saved tensor, so a
    backward runs it before it first reads one (and a last block's recompute starts there)."""

    def __init__(self, width=32):
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, x):
        return x + torch.relu(self.linear(x)) * 0.5


def test_a_block_inside_a_segment_is_measured_recomputed_whole_before_its_backward():
    from ckpt_course.plan import optimal

    class NormLinear(Res):  # its recompute, as a segment's last block, stops at its Linear
        def forward(self, x):
            return x + self.linear(torch.relu(self.norm(x)))

    torch.manual_seed(0)  # ResMLP: its backward peaks above the others'
    course = _course(Net([ResMLP(32), Scaled(), NormLinear()]))
    costs, wrong = _wrong(course, ("segments:0-2", "segments:1-2", "segments:0-1", "full"))
    assert wrong == []
    plan = optimal(costs, predict(costs, "segments:0-2").peak_bytes)  # the DP agrees
    assert plan.peak_bytes == predict(costs, plan.placement).peak_bytes
    torch.manual_seed(0)  # and so does a nested tree, whose inner segment ends at block 2
    course = _course(Net([ResMLP(32), Scaled(), NormLinear(), ResMLP(32)]))
    costs = measure_costs(copy.deepcopy(course), None)
    for tree in ("menu:0-3=full(0-2)", "menu:0-3=full(0-1)"):
        assert predict_nested(costs, tree)[0] == measure_peaks(copy.deepcopy(course), tree)[-1]
