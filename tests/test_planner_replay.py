"""Blocks whose forward does not replay the way the planner measures it (a held-out tester's
R10, R11, R2): blocks run under the model's ``torch.autocast``, blocks holding their own
random generator or Python state that a recompute changes, and blocks whose work is drawn at
random (stochastic depth)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ckpt_course.auto import _course_model
from ckpt_course.costs import measure_costs
from ckpt_course.plan import measure_peaks, predict

W = 32


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.up, self.down = nn.LayerNorm(W), nn.Linear(W, 2 * W), nn.Linear(2 * W, W)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(self.norm(x))))


class Net(nn.Module):
    def __init__(self, block=Block, n=3):
        super().__init__()
        self.embed, self.head = nn.Linear(16, W), nn.Linear(W, 4)
        self.blocks = nn.ModuleList(block() for _ in range(n))

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class AutocastAll(Net):
    """Mixed precision the usual way: the whole forward under autocast (bf16 on CPU), so the
    hidden state between blocks is bf16 and the blocks' weights fp32."""

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return super().forward(x).float()


class AutocastBlocks(Net):
    """Autocast around the blocks only: the residual add keeps the hidden state fp32, the
    blocks' matmuls run in bf16."""

    def forward(self, x):
        x = self.embed(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            for block in self.blocks:
                x = block(x)
        return self.head(x)


def _batch():
    return torch.randn(4, 8, 16, generator=torch.Generator().manual_seed(1))


def _course(model):
    return _course_model(model, _batch(), None)


@pytest.mark.parametrize("net", [AutocastAll, AutocastBlocks])
def test_blocks_under_the_models_autocast_are_measured_under_it_exactly(net):
    torch.manual_seed(0)
    course = _course(net())
    costs = measure_costs(copy.deepcopy(course), None, menu=("selective:save=mm,sdpa",))
    for policy in ("none", "full", "segments:0-1", "menu:0=selective:save=mm,sdpa"):
        assert predict(costs, policy).peak_bytes == measure_peaks(copy.deepcopy(course),
                                                                  policy)[-1], policy
