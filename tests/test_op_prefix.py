"""The prefix (embeddings) inside block 0's op-level checkpoint (``menu:0=selective:ops=...,
prefix=full``): the choice torch.compile makes on held-out models (recompute the embeddings,
keep block 0's op outputs), predicted to the byte, gradients bit-identical, its recompute the
option's plus the prefix's forward, and chosen by the planner where it pays."""

import pytest
import torch
from learner_models import LinearNet, ResMLP
from torch import nn

from ckpt_course.auto import _course_model
from ckpt_course.costs import measure_costs
from ckpt_course.models import GPTConfig, TinyGPT
from ckpt_course.op_choices import prefix_ops
from ckpt_course.plan import measure_peaks, optimal, predict, with_trunk
from ckpt_course.policies import applied, parse_policy
from ckpt_course.recompute import EXTRA_FLOP_FORMULAS
from ckpt_course.train import check_gradients

_Res = ResMLP


class _Net(LinearNet):
    def __init__(self):
        super().__init__([_Res(16) for _ in range(3)], d_in=8, width=16)


@pytest.fixture(scope="module")
def res():
    torch.manual_seed(0)
    model = _course_model(_Net(), torch.randn(32, 8), None)
    return model, measure_costs(model, None, op_points=3, suffix=True)


@pytest.fixture(scope="module")
def gpt3():
    """Attention, LayerNorm and an embedding of tokens and positions in the prefix."""
    torch.manual_seed(0)
    model = TinyGPT(GPTConfig(n_layer=3, d_model=32, n_head=2, seq_len=32, vocab_size=256))
    return model, measure_costs(model, 2, op_points=3, suffix=True)


def _prefix_options(costs):
    return list(with_trunk(costs, "", "full").menu[0])


def _backward_flops(model, policy, batch):
    counter = torch.utils.flop_counter.FlopCounterMode(display=False,
                                                       custom_mapping=EXTRA_FLOP_FORMULAS)
    with applied(model, policy):
        loss = model.loss(batch)
        with counter:
            loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def test_block_0s_options_with_the_prefix_inside_are_predicted_to_the_byte(res):
    model, costs = res
    options = _prefix_options(costs)
    assert options and all(o.startswith("selective:ops=") for o in options)
    for option in options:
        for rest in ("1..2=full", "1=selective:ops=2,2=full"):
            policy = f"menu:0={option},{rest},prefix=full"
            assert predict(costs, policy).peak_bytes == measure_peaks(model, policy)[-1], policy
            assert check_gradients(model, policy).equal, policy


def test_the_positions_shift_by_the_prefixs_ops_and_the_recompute_adds_its_forward(res):
    """The embedding here is one Linear on a 2-D batch: t() of its weight and addmm, two ops
    (SAC's policy sees both), 2 * 32 * 8 * 16 FLOPs. Block 0's option keeps the same op
    outputs with the prefix inside: the real backward runs the option's recompute plus that."""
    model, costs = res
    batch = model.example_batch()
    assert prefix_ops(model, batch) == 2
    plain = _backward_flops(model, "none", batch)
    option = next(o for o in costs.menu[0] if o.startswith("selective:ops="))
    shifted = parse_policy(option).indices
    inside = f"menu:0=selective:ops={','.join(str(k + 2) for k in shifted)},prefix=full"
    alone = f"menu:0={option}"
    assert (_backward_flops(model, inside, batch) - plain
            == _backward_flops(model, alone, batch) - plain + 2 * 32 * 8 * 16)
    assert predict(costs, inside).recompute_flops == predict(costs, alone).recompute_flops \
        + 2 * 32 * 8 * 16


def test_on_a_gpt_every_option_with_the_prefix_inside_is_exact(gpt3):
    model, costs = gpt3
    options = _prefix_options(costs)
    assert len(options) == 3
    for option in options:
        policy = f"menu:0={option},1-2=full,prefix=full,suffix=full"
        assert predict(costs, policy).peak_bytes == measure_peaks(model, policy, 2)[-1], policy
        assert check_gradients(model, policy, 2).equal, policy


def test_a_prefix_that_draws_random_numbers_gets_no_op_level_option_with_it():
    """Embedding dropout: in block 0's region the prefix's draw comes first, and SAC gives every
    later random op its decision (recompute), so a kept random op of block 0 would not be kept:
    the planner offers block 0 only the full checkpoint with the prefix inside."""
    torch.manual_seed(0)
    model = TinyGPT(GPTConfig(n_layer=2, d_model=32, n_head=2, seq_len=16, vocab_size=64,
                              dropout=0.1))
    costs = measure_costs(model, 2, op_points=2, suffix=True)
    assert costs.trunk.prefix_recomputable and costs.trunk.prefix_ops == -1
    assert any(o.startswith("selective:ops=") for o in costs.menu[0])
    assert _prefix_options(costs) == []


def test_the_clause_reads_back_and_other_options_stay_refused():
    text = "menu:0=selective:ops=5,9,1-2=full,prefix=full"
    assert str(parse_policy(text)) == text
    for wrong in ("menu:0=offload,prefix=full", "menu:0=selective:save=mm,prefix=full"):
        with pytest.raises(ValueError, match="prefix=full") as error:
            parse_policy(wrong)
        assert "\n" not in str(error.value)


def test_the_planner_takes_it_where_it_keeps_less_for_the_same_recompute(res):
    """Block 0 keeping its zero-recompute point with the prefix inside saves x_0 for the
    prefix's FLOPs: at a budget just under the zero-recompute peak, the planner picks it when
    nothing else recomputes as little."""
    model, costs = res
    zero = max((o for o in costs.menu[0] if o.startswith("selective:ops=")),
               key=lambda o: costs.menu[0][o].layer.saved_bytes)
    everywhere = "menu:" + ",".join(f"{k}={zero}" for k in range(3))
    inside = next(o for o in _prefix_options(costs) if parse_policy(o).indices == tuple(
        k + 2 for k in parse_policy(zero).indices))
    with_prefix = f"menu:0={inside},1={zero},2={zero},prefix=full"
    a, b = predict(costs, everywhere), predict(costs, with_prefix)
    assert b.kept_bytes < a.kept_bytes
    assert b.recompute_flops == a.recompute_flops + 2 * 32 * 8 * 16


def test_the_dp_with_these_options_matches_brute_force(res):
    """At budgets from the lowest peak to no checkpointing's, the DP (over every trunk
    variant, block 0's options with the prefix inside among them) and brute force over every
    placement of every variant agree, and some answer uses block 0 at an op-level option with
    the prefix inside."""
    from ckpt_course.plan import brute_force, optimal

    model, costs = res
    none = predict(costs, "none").peak_bytes
    low = min(predict(costs, p).peak_bytes for p in ("full", "menu:0-2=full,prefix=full"))
    answers = []
    for k in range(9):
        budget = low + (none - low) * k // 8
        dp, brute = optimal(costs, budget, "flops"), brute_force(costs, budget, "flops")
        assert (dp.recompute_flops, dp.peak_bytes) == (brute.recompute_flops, brute.peak_bytes)
        answers.append(str(dp.policy))
    assert any("prefix=full" in a and a.startswith("menu:0=selective:ops=") for a in answers)


def test_a_prefix_that_reshapes_a_3d_batch_can_run_inside_and_is_exact():
    """A Linear embedding of a (batch, time, features) input reshapes the batch: the meter
    counts that view when it first sees it and it stays all step (it is the batch), so it is
    no part of what the prefix keeps for backward; with the prefix inside block 0's region
    every option is predicted to the byte."""
    torch.manual_seed(0)
    net = _Net()
    batch = torch.randn(4, 6, 8)
    model = _course_model(net, batch, None)
    costs = measure_costs(model, None, op_points=2, suffix=True)
    assert costs.trunk.prefix_recomputable
    assert costs.trunk.prefix_batch_views == 4 * 6 * 8 * 4
    options = _prefix_options(costs)
    assert options
    for first in ("full", *options):
        policy = f"menu:0={first},1-2=full,prefix=full"
        assert predict(costs, policy).peak_bytes == measure_peaks(model, policy)[-1], policy
        assert check_gradients(model, policy).equal, policy


def _forward_peak(model, policy, batch):
    from ckpt_course.meter import MemoryMeter

    meter = MemoryMeter()
    with applied(model, policy), meter:
        meter.track(model)
        with meter.phase("forward"):
            loss = model.loss(batch)
        peak = meter.peak_bytes
        loss.backward()
    meter.untrack()
    model.zero_grad(set_to_none=True)
    return peak


def test_a_hugging_face_models_inputs_embeds_is_freed_when_block_0_returns(monkeypatch):
    """LlamaModel.forward holds x_0 in a local (``inputs_embeds``) to the end of its decoder,
    unread after block 0. Under prefix=full the region frees it when block 0 returns
    (``policies._release_prefix_output``): the forward peaks x_0's bytes below block 0..2
    checkpointed with x_0 kept as the segment's input (without the release, at the same
    peak), and every option with the prefix inside is predicted to the byte."""
    from ckpt_course import hf, policies

    torch.manual_seed(0)
    model = hf.build(hf.small_config(hf.load_config("llama-3.2-1b"), n_layer=3, seq_len=32))
    batch = model.example_batch(2)
    x0 = 2 * 32 * model.lm.config.hidden_size * 4
    kept, inside = _forward_peak(model, "menu:0-2=full", batch), "menu:0-2=full,prefix=full"
    assert _forward_peak(model, inside, batch) == kept - x0
    with monkeypatch.context() as patch:
        patch.setattr(policies, "_release_prefix_output", lambda x, out: None)
        assert _forward_peak(model, inside, batch) == kept
    costs = measure_costs(model, 2, op_points=2, suffix=True)
    assert costs.trunk.prefix_recomputable
    # the position ids it makes stay outside the region (the wrapper's block kwargs), under
    # every suffix option too
    assert {t.prefix_kept_outside for t in (costs.trunk, *costs.suffixes)} == {32 * 8}
    options = _prefix_options(costs)
    assert options
    blocks = next(o for o in costs.menu[1] if o.startswith("selective:ops="))
    for first in ("full", *options):
        for rest in ("1-2=full", f"1..2={blocks},suffix=full"):
            policy = f"menu:0={first},{rest},prefix=full"
            assert predict(costs, policy).peak_bytes == measure_peaks(model, policy, 2)[-1], \
                policy
            assert check_gradients(model, policy, 2).equal, policy


def test_a_prefix_output_read_after_block_0_is_not_planned_inside():
    """A model that reads the embeddings again after the blocks (here a statistic it logs):
    x_0 cannot be freed when block 0 returns, so the planner offers no prefix=full."""

    class Skip(_Net):
        def forward(self, x):
            x0 = x = self.embed(x)
            for block in self.blocks:
                x = block(x)
            self.logged = x0.detach().std()
            return self.head(x)

    torch.manual_seed(0)
    model = _course_model(Skip(), torch.randn(32, 8), None)
    costs = measure_costs(model, None, op_points=2, suffix=True)
    assert not costs.trunk.prefix_recomputable
    with pytest.raises(ValueError, match="prefix=full") as error:
        predict(costs, "menu:0=full,prefix=full")
    assert "\n" not in str(error.value)
    budgets = [predict(costs, p).peak_bytes for p in ("full", "none")]
    assert all("prefix" not in str(optimal(costs, b, "flops").policy) for b in budgets)


class _X0Net(_Net):
    """Every block also gets the embeddings (modded-nanogpt's x0 residual)."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(_X0Block(16) for _ in range(3))

    def forward(self, x):
        x0 = x = self.embed(x)
        for block in self.blocks:
            x = block(x, x0)
        return self.head(x)


class _X0Block(_Res):
    def forward(self, x, x0):
        return super().forward(x) + 0.5 * x0 * (x0.detach() > 0)


class _SeqFirst(_Net):
    """x_0 is a view (a transpose) of the embeddings, whose base a local holds."""

    def forward(self, x):
        h = self.embed(x)
        x = h.transpose(0, 1)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


@pytest.mark.parametrize("net", [_X0Net, _SeqFirst])
def test_a_model_that_keeps_x_0_past_block_0_gets_no_prefix_inside(net):
    """Blocks given x_0 (``block(x, x0)``), or x_0 a view of a tensor a local holds: x_0
    outlives block 0, which the planner's prefix=full does not count, so it is not offered."""
    torch.manual_seed(0)
    model = _course_model(net(), torch.randn(4, 6, 8), None)
    costs = measure_costs(model, None, op_points=2, suffix=True)
    assert not costs.trunk.prefix_recomputable


def test_prefix_full_typed_by_hand_leaves_a_learners_x_0_alone():
    """Only a model that says its forward holds x_0 unread has it freed
    (``frees_prefix_output``): on a learner's model whose blocks read x_0, the policy typed by
    hand trains as plain does, gradients bit-identical."""
    torch.manual_seed(0)
    model = _course_model(_X0Net(), torch.randn(4, 6, 8), None)
    assert not getattr(model, "frees_prefix_output", False)
    assert check_gradients(model, "menu:0-2=full,prefix=full").equal


def test_a_nested_segment_cannot_hold_the_prefix():
    with pytest.raises(ValueError, match="cannot hold nested checkpoints") as error:
        parse_policy("menu:0-3=full(0-1),prefix=full")
    assert "\n" not in str(error.value)
