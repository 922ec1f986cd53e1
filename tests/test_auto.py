"""auto_checkpoint: measure, plan, apply and verify in one call, on a learner's own model (no
course protocol) and on a course model; predicted peak = measured; undo leaves the model as
it was; gradients are those of no checkpointing."""

import pytest
import torch
from torch import nn

from ckpt_course.auto import auto_checkpoint
from ckpt_course.models import GPTConfig, TinyGPT
from ckpt_course.policies import _installed


class Block(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(),
                                 nn.Linear(4 * width, width))

    def forward(self, x):
        return x + self.mlp(self.norm(x))


class MyNet(nn.Module):
    """A learner's own model: a block list and a forward, nothing else."""

    def __init__(self, width=32, depth=6):
        super().__init__()
        self.embed = nn.Linear(16, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.head = nn.Linear(width, 4)

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


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
