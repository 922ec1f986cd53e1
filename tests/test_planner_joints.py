"""What a learner's model does around its blocks, as a held-out tester found it (R1, R5, R6,
R9): the residual added by the model's own loop (``x = x + block(x)``), frozen leading blocks,
a batch input that requires grad, and a second argument that carries a gradient (FiLM)."""

import copy

import pytest
import torch
from planner_checks import off_the_meter
from torch import nn

from ckpt_course.auto import _course_model
from ckpt_course.costs import MENU, measure_costs
from ckpt_course.plan import all_placements, make_plan, measure_peaks, predict

W = 32


class Mlp(nn.Module):
    """No residual inside: the model's loop adds it."""

    def __init__(self):
        super().__init__()
        self.norm, self.up, self.down = nn.LayerNorm(W), nn.Linear(W, 2 * W), nn.Linear(2 * W, W)

    def forward(self, x):
        return self.down(nn.functional.gelu(self.up(self.norm(x))))


class LoopResidual(nn.Module):
    def __init__(self, n=3):
        super().__init__()
        self.embed, self.head = nn.Linear(16, W), nn.Linear(W, 4)
        self.blocks = nn.ModuleList(Mlp() for _ in range(n))

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


def _course(model, batch):
    return _course_model(model, batch, None)


def test_the_residual_added_by_the_models_loop_is_measured_and_predicted_exactly():
    torch.manual_seed(0)
    course = _course(LoopResidual(), torch.randn(4, 8, 16))
    costs = measure_costs(copy.deepcopy(course), None, menu=MENU)
    assert [c.residual for c in costs.layers] == [True] * 3
    # every placement the planner can emit on it: one block per checkpointed segment
    placements = list(all_placements(costs.n, costs))
    assert all(j - i == 1 for p in placements for i, j, _ in p)
    picked = placements[::23] + [p for p in placements if all(k is True for *_, k in p)]
    assert off_the_meter(course, costs, picked) == []


def test_plans_on_a_loop_residual_model_fit_their_budget_and_never_span_blocks():
    torch.manual_seed(0)
    course = _course(LoopResidual(), torch.randn(4, 8, 16))
    costs = measure_costs(copy.deepcopy(course), None, menu=MENU)
    top, low = predict(costs, "none").peak_bytes, predict(costs, "full").peak_bytes
    for budget in range(low, top + 1, max(1, (top - low) // 6)):
        plan = make_plan(costs, budget)
        if not plan.fits:
            continue
        assert all(j - i == 1 for i, j, _ in plan.best.placement)
        assert measure_peaks(copy.deepcopy(course), plan.policy)[-1] == plan.best.peak_bytes
    assert "every-2" not in make_plan(costs, top).alternatives


def test_a_segment_across_the_models_add_is_refused_in_one_line():
    torch.manual_seed(0)
    costs = measure_costs(_course(LoopResidual(), torch.randn(4, 8, 16)), None)
    with pytest.raises(ValueError, match="segment 0-1 runs past block 0") as info:
        predict(costs, "every-2")
    assert "\n" not in str(info.value)


class Scaled(LoopResidual):
    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = x + 0.5 * block(x)  # more than the add between blocks: not measured
        return self.head(x)


class Mixed(LoopResidual):
    def forward(self, x):
        x = self.blocks[0](self.embed(x))
        for block in self.blocks[1:]:
            x = x + block(x)
        return self.head(x)


@pytest.mark.parametrize("model, words", [
    (Scaled, "block 1 does not get block 0's output"),
    (Mixed, r"adds the input to the output of blocks \[1, 2\]")])
def test_other_code_between_the_blocks_is_refused_in_one_line(model, words):
    torch.manual_seed(0)
    course = _course(model(), torch.randn(4, 8, 16))
    with pytest.raises(ValueError, match=words) as info:
        measure_costs(course, None)
    assert "\n" not in str(info.value)


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = Mlp()

    def forward(self, x):
        return x + self.mlp(x)


class Chain(LoopResidual):
    def __init__(self, n=3):
        super().__init__(n)
        self.blocks = nn.ModuleList(Residual() for _ in range(n))

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def test_a_batch_input_that_requires_grad_counts_its_gradient_and_is_left_as_it_was():
    torch.manual_seed(0)
    x = torch.randn(4, 8, 16).requires_grad_()
    course = _course(Chain(), x)
    costs = measure_costs(copy.deepcopy(course), None)
    assert x.grad is None  # the learner's tensor keeps its own
    assert off_the_meter(course, costs, ["none", "full", "every-2"]) == []
    plain = measure_costs(_course(Chain(), x.detach()), None)
    assert costs.trunk.base_bytes - plain.trunk.base_bytes == x.numel() * 4  # x.grad, kept


def test_a_checkpoint_around_frozen_leading_blocks_costs_what_plain_costs():
    torch.manual_seed(0)
    model = Chain(4)
    for frozen in (model.embed, model.blocks[0], model.blocks[1]):
        frozen.requires_grad_(False)
    course = _course(model, torch.randn(4, 8, 16))
    costs = measure_costs(copy.deepcopy(course), None)
    assert [c.frozen for c in costs.layers] == [True, True, False, False]
    none = predict(costs, "none")
    for policy in ("segments:0", "segments:0-1"):
        assert (predict(costs, policy).peak_bytes, predict(costs, policy).recompute_flops) == \
            (none.peak_bytes, 0)
    assert off_the_meter(course, costs,
                         ["segments:0", "segments:0-1", "full", "segments:1-2"]) == []


class FiLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear, self.film = nn.Linear(W, W), nn.Linear(W, 2 * W)

    def forward(self, x, c):
        scale, shift = self.film(c).chunk(2, -1)
        return x + torch.tanh(self.linear(x)) * (1 + scale) + shift


class Conditioned(nn.Module):
    """``c`` is made by the model and carries its graph: every block's backward sends a
    gradient into it."""

    def __init__(self, keyword=False):
        super().__init__()
        self.embed, self.cond, self.head = nn.Linear(16, W), nn.Linear(8, W), nn.Linear(W, 4)
        self.blocks, self.keyword = nn.ModuleList(FiLM() for _ in range(3)), keyword

    def forward(self, x, c):
        h, c = self.embed(x), torch.relu(self.cond(c))
        for block in self.blocks:
            h = block(h, c=c) if self.keyword else block(h, c)
        return self.head(h)


@pytest.mark.parametrize("keyword", [False, True])
def test_blocks_given_a_tensor_that_carries_the_graph_are_planned_exactly(keyword):
    torch.manual_seed(0)
    batch = (torch.randn(16, 32, 16), torch.randn(16, 1, 8))  # the blocks' backward peaks
    course = _course(Conditioned(keyword), batch)
    costs = measure_costs(copy.deepcopy(course), None, menu=MENU)
    c_bytes = 16 * W * 4  # its gradient: made by the last block's backward, kept to the prefix's
    assert [c.extra_grad_bytes for c in costs.layers] == [0, 0, c_bytes]
    placements = list(all_placements(costs.n, costs))
    assert all(j - i == 1 for p in placements for i, j, _ in p)  # a segment would keep c on
    assert off_the_meter(course, costs, ["none", "full", "menu:0=full", "menu:1=offload",
                                "menu:0=selective:recompute=gelu,silu,relu,2=full"]) == []
    with pytest.raises(ValueError, match="block 1 gets a tensor that carries") as info:
        predict(costs, "every-2")
    assert "\n" not in str(info.value)


class EncoderDecoder(nn.Module):
    """torch's own decoder layers called ``layer(y, memory)``; the memory comes out of a
    LayerNorm, which does not keep it: only a checkpoint around a decoder layer does."""

    def __init__(self):
        super().__init__()
        self.src, self.tgt, self.norm = nn.Linear(16, W), nn.Linear(16, W), nn.LayerNorm(W)
        self.blocks = nn.ModuleList(nn.TransformerDecoderLayer(W, 4, 64, 0.0, batch_first=True)
                                    for _ in range(2))
        self.head = nn.Linear(W, 4)

    def forward(self, src, tgt):
        memory, y = self.norm(self.src(src)), self.tgt(tgt)
        for block in self.blocks:
            y = block(y, memory)
        return self.head(y)


def test_decoder_layers_given_the_encoders_memory_are_planned_and_never_under_predicted():
    from ckpt_course.auto import auto_checkpoint

    torch.manual_seed(0)
    model, batch = EncoderDecoder(), (torch.randn(4, 8, 16), torch.randn(4, 6, 16))
    course = _course(model, batch)
    costs = measure_costs(copy.deepcopy(course), None)
    for policy in ("none", "full", "menu:0=full", "menu:1=full"):
        assert predict(costs, policy).peak_bytes >= measure_peaks(copy.deepcopy(course),
                                                                  policy)[-1]
    with auto_checkpoint(model, predict(costs, "full").peak_bytes, batch) as report:
        assert report.measured_peak <= predict(costs, "full").peak_bytes
