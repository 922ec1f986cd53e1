"""Blocks whose forward does not replay the way the planner measures it (a held-out tester's
R10, R11, R2): blocks run under the model's ``torch.autocast``, blocks holding their own
random generator or Python state that a recompute changes, and blocks whose work is drawn at
random (stochastic depth)."""

import copy
import random

import numpy as np
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


class OwnGenerator(Block):
    """Noise from a generator of its own (a seeded noise-injection layer)."""

    def __init__(self):
        super().__init__()
        self.noise = torch.Generator().manual_seed(123)

    def forward(self, x):
        h = self.down(F.gelu(self.up(self.norm(x))))
        return x + h + 0.1 * torch.randn(h.shape, generator=self.noise) * h


class Counter(Block):
    """A step-dependent schedule held in the block: each forward counts."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x + self.down(F.gelu(self.up(self.norm(x)))) / (1 + 0.1 * self.calls)


class RunningMean(Block):
    """A running mean of its own (a buffer, not BatchNorm's), updated in place and used."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.zeros(W))

    def forward(self, x):
        if self.training:
            with torch.no_grad():
                self.mean.mul_(0.9).add_(0.1 * x.mean((0, 1)))
        return super().forward(x - self.mean)


def _train(model, steps=3):
    """The learner's own loop: AdamW steps on one batch; the parameters after."""
    optimizer = torch.optim.AdamW(model.parameters(), 1e-3)
    torch.manual_seed(0)
    for _ in range(steps):
        optimizer.zero_grad()
        model(_batch()).square().mean().backward()
        optimizer.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("block", [OwnGenerator, Counter, RunningMean])
def test_a_block_whose_forward_does_not_replay_is_never_recomputed(block):
    from ckpt_course.auto import auto_checkpoint
    from ckpt_course.costs import MENU
    from ckpt_course.plan import make_plan

    torch.manual_seed(0)
    model = Net(block)
    costs = measure_costs(copy.deepcopy(_course(model)), None, menu=MENU, op_points=2)
    assert [c.replays for c in costs.layers] == [False] * 3
    assert [set(m) for m in costs.menu] == [{"offload"}] * 3  # nothing that re-runs forward
    assert len(costs.notes) == 1 and costs.notes[0].startswith("blocks 0, 1, 2: ")
    plain = measure_peaks(copy.deepcopy(_course(model)), "none")[-1]
    plan = make_plan(costs, plain - 1, "flops")
    assert {kind for *_, kind in plan.best.placement} <= {False, "offload"}
    report = auto_checkpoint(model, int(plain * 0.93), _batch(), op_points=2)
    assert all(kind in (False, "offload") for *_, kind in report.plan.best.placement)
    torch.manual_seed(0)
    expected = _train(Net(block))  # the same model, no policy
    assert all(torch.equal(a, b) for a, b in zip(_train(model), expected, strict=True))


class HiddenCounter(Block):
    """State no scan of the block sees: a counter inside a dict the block holds."""

    def __init__(self):
        super().__init__()
        self.state = {"calls": 0}

    def forward(self, x):
        self.state["calls"] += 1
        return x + self.down(F.gelu(self.up(self.norm(x)))) * (1 + self.state["calls"] % 2)


class ListedGenerator(Block):
    """A generator no scan of the block's attributes sees: inside a list."""

    def __init__(self):
        super().__init__()
        self.noise = [torch.Generator().manual_seed(123)]

    def forward(self, x):
        h = self.down(F.gelu(self.up(self.norm(x))))
        return x + h * torch.rand(h.shape, generator=self.noise[0])


@pytest.mark.parametrize("block", [HiddenCounter, ListedGenerator])
def test_state_no_scan_sees_is_caught_by_two_plain_runs_and_never_recomputed(block):
    """Two plain runs of the block alone differ (a counter in a dict, a generator in a list):
    it runs plain or offloaded only, and auto_checkpoint installs no recompute (its gradient
    check on the whole step stays behind it)."""
    from ckpt_course.auto import auto_checkpoint
    from ckpt_course.costs import MENU

    torch.manual_seed(0)
    model = Net(block)
    costs = measure_costs(copy.deepcopy(_course(model)), None, menu=MENU, op_points=2)
    assert [c.replays for c in costs.layers] == [False] * 3
    assert [set(m) for m in costs.menu] == [{"offload"}] * 3
    plain = measure_peaks(copy.deepcopy(_course(model)), "none")[-1]
    try:
        report = auto_checkpoint(model, plain - 1, _batch(), op_points=0)
    except ValueError as error:
        assert str(error).startswith("nothing fits")
    else:
        assert {kind for *_, kind in report.plan.best.placement} <= {False, "offload"}
        report.undo()


class StochasticDepth(Block):
    """The block skipped whole on a random draw (stochastic depth / LayerDrop), with p."""

    def __init__(self, p=0.5):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.training and torch.rand(()) < self.p:
            return x
        return super().forward(x)


@pytest.mark.parametrize("seed", [0, 1, 3])
def test_blocks_skipped_on_a_random_draw_are_refused_in_one_line_before_planning(seed):
    from ckpt_course.auto import auto_checkpoint

    torch.manual_seed(0)
    model = Net(StochasticDepth)
    torch.manual_seed(seed)  # seeds 0 and 3 skip every block in the draw measured
    with pytest.raises(ValueError, match=r"^block \d \(StochasticDepth\) does different work "
                                         r"from one random draw .* drop probability at 0") as e:
        auto_checkpoint(model, 200_000, _batch(), op_points=0)
    assert "\n" not in str(e.value)
    for block in model.blocks:  # its worst case, drop probability 0, plans exactly
        block.p = 0.0
    course = _course(model)
    costs = measure_costs(copy.deepcopy(course), None)
    for policy in ("none", "full"):
        assert predict(costs, policy).peak_bytes == measure_peaks(copy.deepcopy(course),
                                                                  policy)[-1], policy


class HalfSkip(Block):
    """Skips its MLP on a random draw but still makes a new tensor (x * 1)."""

    def forward(self, x):
        if self.training and torch.rand(()) < 0.5:
            return x * 1.0
        return super().forward(x)


class LayerDrop(Net):
    """The model skips calling a block on a random draw (LayerDrop in the model's loop)."""

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            if not (self.training and torch.rand(()) < 0.5):
                x = block(x)
        return self.head(x)


@pytest.mark.parametrize("model, what", [
    (lambda: Net(HalfSkip), r"ran \d+ ops in one training forward and \d+ in another"),
    (lambda: LayerDrop(), r"ran in one training forward and not in another")])
def test_work_drawn_at_random_is_named_in_the_refusal(model, what):
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"^block \d \(\w+\) does different work .*" + what):
        measure_costs(_course(model()), None)


def test_the_planner_matches_brute_force_around_a_block_that_does_not_replay():
    from ckpt_course.plan import brute_force, optimal, placement_cost

    torch.manual_seed(0)
    model = Net(Block, n=4)
    model.blocks[1] = Counter()
    costs = measure_costs(_course(model), None, menu=("selective:save=mm,sdpa", "offload"))
    assert [c.replays for c in costs.layers] == [True, False, True, True]
    low, high = (predict(costs, p).peak_bytes for p in ("menu:0..3=offload", "none"))
    for budget in range(low, high + 1, max(1, (high - low) // 12)):
        best, truth = optimal(costs, budget, "flops"), brute_force(costs, budget, "flops")
        assert (best is None) == (truth is None), budget
        if best is not None:
            assert placement_cost(costs, best.placement, "flops") == placement_cost(
                costs, truth.placement, "flops"), budget
            assert not any(kind is True and i <= 1 < j for i, j, kind in best.placement)
            assert not any(kind is True and i <= 1 < j for i, j, kind in truth.placement)


class PythonNoise(Block):
    """Noise drawn from Python's ``random``, a stream checkpoint does not restore: no scan of
    the block sees it, two plain runs of the block differ."""

    def forward(self, x):
        h = self.down(F.gelu(self.up(self.norm(x))))
        return x + h * (1 + 0.1 * random.random())


def test_a_block_whose_plain_runs_differ_is_never_recomputed():
    """S1: every option was left out but full, which recomputes, so make_plan emitted it."""
    from ckpt_course.costs import MENU
    from ckpt_course.plan import make_plan
    from ckpt_course.train import check_gradients

    torch.manual_seed(0)
    course = _course(Net(PythonNoise))
    costs = measure_costs(copy.deepcopy(course), None, menu=MENU, op_points=2)
    assert [c.replays for c in costs.layers] == [False] * 3
    assert [set(m) for m in costs.menu] == [{"offload"}] * 3
    plain = measure_peaks(copy.deepcopy(course), "none")[-1]
    for fraction in (0.99, 0.95):
        plan = make_plan(costs, int(plain * fraction), "flops")
        if plan.fits:
            assert {kind for *_, kind in plan.best.placement} <= {False, "offload"}
            assert check_gradients(course, plan.policy).equal


class PythonDrop(Block):
    def forward(self, x):
        if self.training and random.random() < 0.5:
            return x
        return super().forward(x)


class NumpyDrop(Block):
    def forward(self, x):
        if self.training and np.random.random() < 0.5:
            return x
        return super().forward(x)


@pytest.mark.parametrize("block", [PythonDrop, NumpyDrop])
def test_blocks_skipped_on_pythons_or_numpys_draw_are_refused_too(block):
    """S2: the draw check read torch's streams only; the measuring then crashed in backward."""
    torch.manual_seed(0)
    state = random.getstate(), np.random.get_state()[1].copy()
    with pytest.raises(ValueError, match=rf"^block \d \({block.__name__}\) does different work "
                                         r"from one random draw") as e:
        measure_costs(_course(Net(block)), None)
    assert "\n" not in str(e.value)
    assert random.getstate() == state[0]  # the learner's streams as they were
    assert (np.random.get_state()[1] == state[1]).all()
