"""Tensors that outlive the prefix or the blocks, and optimizer state, as held-out testers
found them (issue 20 item 2: Q1, Q5, Q6, P1, P13): every prediction equals the meter, or the
model is refused in one line while it is measured, never a silent wrong number."""

import copy

import torch
from torch import nn

from ckpt_course.auto import _course_model
from ckpt_course.costs import measure_costs
from ckpt_course.plan import measure_peaks, predict
from ckpt_course.train import check_gradients

POLICIES = ("none", "full", "every-2", "segments:0-1")


class Res(nn.Module):
    def __init__(self, width=32):
        super().__init__()
        self.norm, self.linear = nn.LayerNorm(width), nn.Linear(width, width)

    def forward(self, x):
        return x + torch.tanh(self.linear(self.norm(x)))


class Net(nn.Module):
    def __init__(self, blocks, unused=False):
        super().__init__()
        self.embed, self.head = nn.Linear(16, 32), nn.Linear(32, 4)
        self.blocks = nn.ModuleList(blocks)
        if unused:
            self.pooler = nn.Linear(32, 32)  # never called, as a leftover head often is

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _course(model):
    torch.manual_seed(0)
    return _course_model(model, torch.randn(64, 16), None)


def _wrong(course, policies=POLICIES):
    """(policy, metered - predicted) for each policy off the meter or off plain's gradients."""
    costs = measure_costs(copy.deepcopy(course), None)
    wrong = []
    for policy in policies:
        predicted = predict(costs, policy).peak_bytes
        measured = measure_peaks(copy.deepcopy(course), policy)[-1]
        if predicted != measured or not check_gradients(course, policy).equal:
            wrong.append((policy, measured - predicted))
    return costs, wrong


def test_a_parameter_the_forward_never_uses_gets_no_optimizer_state():
    torch.manual_seed(0)
    costs, wrong = _wrong(_course(Net([Res(), Res()], unused=True)))
    assert wrong == []
    torch.manual_seed(0)
    used_only = measure_costs(_course(Net([Res(), Res()])), None)
    assert costs.optimizer_bytes == used_only.optimizer_bytes  # AdamW skips the unused Linear
    assert costs.param_bytes - used_only.param_bytes == (32 * 32 + 32) * 4  # still counted
