"""Nested plans predicted to the byte: ``predict_nested`` against the meter (``measure_peaks``)
on the tiny GPT, a deeper GPT whose activations dominate, and the hand-trace net, where
nesting peaks below every single-level placement; without nesting it is ``predict``. Planned
for a peak budget (``optimal_with_nesting``), a nested plan never peaks above or costs more
than the single-level plan where one fits (on GPT blocks Griewank's trees do), and is still
chosen where nesting wins."""

import random
from dataclasses import replace

import pytest
import torch

from ckpt_course.costs import Backward, ChainCosts, LayerCost, OptionCost, TrunkCost
from ckpt_course.models import GPTConfig, HandTraceNet, TinyGPT
from ckpt_course.plan import (
    NestedPrediction,
    Prediction,
    all_placements,
    brute_force,
    measure_costs,
    measure_peaks,
    nested_optimal,
    optimal,
    optimal_frontier,
    optimal_with_nesting,
    placement_cost,
    predict,
    predict_nested,
)


def meter(model, policy, batch_size: int) -> int:
    return measure_peaks(model, policy, batch_size)[1]  # step 2: optimizer state present


# Shapes that exercise each rule of the model: plain blocks behind a child, children side by
# side, a child behind a plain block, children of children, several top-level segments.
SHAPES_8 = ["menu:0-7=full(2-5)", "menu:0-7=full(0-6(0-5(0-4)))",
            "menu:0-3=full(0-2),4-7=full(5-6)", "menu:0-7=full(1-2,4-5)",
            "menu:0-7=full(0-3(1-2),5-6)", "menu:0-7=full(0-3(0-1,2-3),4-7(4-5,6-7))",
            "menu:0-7=full(0-4(0-1,2-3),5-6)", "menu:0-7=full(0-2,3-4,5-6)"]


@pytest.fixture(scope="module")
def tiny_gpt():
    torch.manual_seed(0)
    model = TinyGPT(GPTConfig(n_layer=4, d_model=64, n_head=4, seq_len=32))
    return model, measure_costs(model, 4)


def test_the_tiny_gpts_nested_peaks_are_the_meters(tiny_gpt):
    model, costs = tiny_gpt
    for policy in ("menu:0-3=full(0-1)", "menu:0-3=full(0-2(0-1))", "menu:0-3=full(1-2)",
                   "menu:0-3=full(0-1,2-3)", "menu:0-3=full(2-3)"):
        assert predict_nested(costs, policy)[0] == meter(model, policy, 4), policy


@pytest.mark.slow
def test_a_deeper_gpts_nested_peaks_are_the_meters_for_planned_and_chosen_trees():
    """Eight blocks whose activations outweigh their parameters (the peak moves with the tree);
    nested_optimal's own trees, at every number of stored inputs, and the shapes above."""
    torch.manual_seed(0)
    model = TinyGPT(GPTConfig(n_layer=8, d_model=32, n_head=2, seq_len=256))
    costs = measure_costs(model, 8)
    x = costs.layers[0].input_bytes
    planned = [nested_optimal(costs, s * x) for s in range(2, 6)]
    for plan in planned:
        assert plan.peak_bytes == meter(model, plan.policy, 8), plan.policy
    lowest = optimal_frontier(costs, objective="flops")[-1]  # Griewank's trees peak above it:
    assert min(plan.peak_bytes for plan in planned) > lowest.peak_bytes  # planned by peak,
    assert optimal_with_nesting(costs, lowest.peak_bytes - 1) is None  # none is chosen
    assert optimal_with_nesting(costs, lowest.peak_bytes).policy == lowest.policy
    for policy in SHAPES_8:
        assert predict_nested(costs, policy)[0] == meter(model, policy, 8), policy


@pytest.mark.slow
def test_nesting_peaks_below_every_single_level_plan_on_the_hand_trace_net():
    """Sixteen Linear-ReLU blocks of tiny width on a large batch: a block keeps little beyond
    its input, so nesting (Griewank) wins; its predicted peak is the meter's, and below the
    lowest single-level peak, measured too."""
    torch.manual_seed(0)
    model = HandTraceNet(width=32, depth=16)
    costs = measure_costs(model, 4096)
    x = costs.layers[0].input_bytes
    single = optimal_frontier(costs)[-1]  # the single-level minimum
    assert single.peak_bytes == meter(model, single.policy, 4096)
    for stored in (2, 3):
        nested = nested_optimal(costs, stored * x)
        assert nested.peak_bytes == meter(model, nested.policy, 4096), nested.policy
        assert nested.peak_bytes < single.peak_bytes
    assert (costs.layers, costs.trunk) == (linear_relu_chain().layers, linear_relu_chain().trunk)
    below = optimal_with_nesting(costs, single.peak_bytes - 1)  # nesting wins: it is chosen
    assert isinstance(below, NestedPrediction) and below.peak_bytes < single.peak_bytes
    assert below.peak_bytes == meter(model, below.policy, 4096), below.policy
    assert optimal_with_nesting(costs, single.peak_bytes).policy == single.policy
    assert "predicted peak" in str(nested) and str(nested.policy) in str(nested)
    short = HandTraceNet(width=32, depth=8)
    short.load_state_dict({k: v for k, v in model.state_dict().items()
                           if int(k.split(".")[1]) < 8})
    costs8 = measure_costs(short, 4096)
    for policy in SHAPES_8:
        assert predict_nested(costs8, policy)[0] == meter(short, policy, 4096), policy


@pytest.mark.parametrize("seed", range(20))
def test_a_tree_without_nesting_predicts_what_predict_does(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 7)
    layers = tuple(LayerCost(rng.randint(1, 20), rng.randint(1, 20), rng.randint(0, 50),
                             rng.random() < 0.7, rng.random() < 0.4, 1, 1, 2, rng.randint(0, 9),
                             True, rng.randint(0, 80), rng.randint(0, 40), rng.randint(0, 60),
                             rng.randint(0, 50)) for _ in range(n))
    costs = ChainCosts(layers)
    for placement in all_placements(n):
        if any(kind is True and j == i + 1 for i, j, kind in placement):
            continue  # a one-block checkpoint is no tree node (one block runs plain)
        tree = tuple((i, j, ()) for i, j, _ in placement)
        assert predict_nested(costs, tree) == (predict(costs, placement).peak_bytes,
                                               predict(costs, placement).where)


def test_what_is_not_modelled_is_refused_not_guessed():
    identity = ChainCosts((LayerCost.simple(4, 2, 1), LayerCost(4, 4, 0, returns_input=True),
                           LayerCost.simple(4, 2, 1)))
    with pytest.raises(ValueError, match="return their input"):
        predict_nested(identity, ((0, 3, ((0, 2, ()),)),))
    plain = ChainCosts((LayerCost.simple(4, 2, 1),) * 4)
    with pytest.raises(ValueError, match="predict\\(\\)"):
        predict_nested(plain, "menu:0=selective:save=sdpa,1-3=full(1-2)")
    with pytest.raises(ValueError, match="covering blocks 0..3"):
        predict_nested(plain, ((0, 9, ()),))
    unchecked = ChainCosts((LayerCost.simple(4, 2, 1),) * 2 + (
        replace(LayerCost.simple(4, 2, 1), saves_input=False),) * 2)
    with pytest.raises(ValueError, match="do not save their input"):
        predict_nested(unchecked, "menu:0-3=full(0-1)")
    assert predict_nested(unchecked, "menu:0-1=full,2-3=full")[0] == predict(
        unchecked, "segments:0-1,2-3").peak_bytes  # no nesting: the single-level model
    assert nested_optimal(unchecked, 8).peak_bytes is None


def test_a_planned_tree_deeper_than_a_policy_nests_still_gets_its_numbers():
    """Two stored inputs over 64 blocks: the optimum nests 62 levels; it is planned and
    predicted, and asking for its policy says why it cannot run."""
    costs = ChainCosts((LayerCost.simple(4, 0, 1),) * 64)
    deep = nested_optimal(costs, 8)
    assert deep.peak_bytes is not None and deep.stored_bytes <= 8
    with pytest.raises(ValueError, match="levels deep"):
        deep.policy  # noqa: B018


def test_identity_blocks_leave_a_nested_plan_without_a_peak():
    costs = ChainCosts((LayerCost.simple(4, 0, 1), LayerCost(4, 4, 0, returns_input=True))
                       + (LayerCost.simple(4, 0, 1),) * 3)
    plan = nested_optimal(costs, 8)
    assert plan.peak_bytes is None and "no predicted peak" in str(plan)


def plan_cost(costs: ChainCosts, plan) -> int:
    """What ``optimal(..., "flops")`` minimises, for a single-level or a nested plan."""
    if isinstance(plan, Prediction):
        return placement_cost(costs, plan.placement, "flops")
    return 1024 * plan.recompute_flops


def test_on_gpt_blocks_a_nested_plan_never_peaks_above_the_single_level_one(tiny_gpt):
    """Griewank's tree at two stored inputs peaks above the single-level minimum on the tiny
    GPT (a block's tape outweighs its input); planned for a peak budget, the single-level plan
    is returned wherever it fits, and nothing below its minimum, as the meter confirms."""
    model, costs = tiny_gpt
    frontier = optimal_frontier(costs, objective="flops")
    lowest = frontier[-1]
    x = costs.layers[0].input_bytes
    assert nested_optimal(costs, 2 * x).peak_bytes > lowest.peak_bytes  # what went wrong
    for single in frontier:
        for budget in (single.peak_bytes, single.peak_bytes + x):
            plan = optimal_with_nesting(costs, budget)
            best = optimal(costs, budget, "flops")
            assert (plan_cost(costs, plan), plan.peak_bytes) <= (plan_cost(costs, best),
                                                                 best.peak_bytes)
    assert optimal_with_nesting(costs, lowest.peak_bytes - 1) is None
    assert meter(model, optimal_with_nesting(costs, lowest.peak_bytes).policy, 4) == (
        lowest.peak_bytes)


def linear_relu_chain() -> ChainCosts:
    """The hand-trace net's 16 blocks (Linear-ReLU, width 32, batch 4096) as measured: a block
    keeps its input and output, the output being the next block's input, and nothing more."""
    def block(first: bool) -> LayerCost:
        change = -1044352 if first else -520064
        back = Backward(524288, 524288, change, change - 524288)
        return LayerCost(524288, 524288, 0, True, True, 8388608, 8388608,
                         8388608 if first else 16777216, 4224, not first,
                         1048576, 1048576, 1048576, 524288, back, back,  # checkpointed: alike
                         first_backward=back, interior_backward=back,  # and as a segment's
                         interior_first_backward=back)  # first block, or not its last

    trunk = TrunkCost(base_bytes=202880, input_counted=False,
                      suffix_forward_peak_held=524288, suffix_forward_peak_free=524288,
                      suffix_backward_peak_held=524292, suffix_backward_peak_free=524292,
                      suffix_kept_held=524288, suffix_kept_free=524288, suffix_left=524292,
                      backward_left=524288, optimizer_peak=8320)
    return ChainCosts((block(True),) + (block(False),) * 15, trunk)


def test_where_nesting_wins_it_is_chosen_below_the_single_level_minimum():
    """Below the lowest single-level peak of the Linear-ReLU chain the plan nests, fits, and
    its peak is predict_nested's; at that peak a single level is chosen."""
    costs = linear_relu_chain()
    lowest = optimal_frontier(costs)[-1]
    plan = optimal_with_nesting(costs, lowest.peak_bytes - 1)
    assert isinstance(plan, NestedPrediction)
    assert plan.peak_bytes < lowest.peak_bytes
    assert predict_nested(costs, plan.policy)[0] == plan.peak_bytes
    assert isinstance(optimal_with_nesting(costs, lowest.peak_bytes), Prediction)


def random_saving_chain(rng: random.Random, n: int) -> ChainCosts:
    """Blocks that save their input (the nested model's domain), tapes from a fraction of the
    input (nesting can win) to many times it (it cannot), sometimes with two menu options."""
    def block():
        a = rng.randint(1, 20)
        back = Backward(rng.randint(0, 60), rng.randint(0, 60), rng.randint(-60, 20),
                        rng.randint(-60, 20))
        return LayerCost(a, a, rng.randint(0, 8 * a), True, rng.random() < 0.3,
                         rng.randint(1, 30), rng.randint(0, 30), rng.randint(1, 60),
                         rng.randint(0, 10), True, rng.randint(0, 80), rng.randint(0, 40),
                         rng.randint(0, 60), rng.randint(0, 50), back, back)

    menu = tuple({o: OptionCost(block(), rng.randint(0, 30)) for o in
                  ("selective:save=mm,sdpa", "selective:save=sdpa")} for _ in range(n))
    return ChainCosts(tuple(block() for _ in range(n)), menu=menu if rng.random() < 0.5 else ())


@pytest.mark.parametrize("seed", range(12))
def test_a_planned_nested_plan_fits_and_never_loses_to_the_single_level_optimum(seed):
    """At every budget from below the single-level minimum to the plain peak: the plan fits
    (by the model its peak came from), and where brute force over every single-level
    placement finds one that fits, the plan costs no more, and at equal cost peaks no higher."""
    rng = random.Random(seed)
    costs = random_saving_chain(rng, rng.randint(3, 5 if seed % 2 else 6))
    low = optimal_frontier(costs, objective="flops")[-1].peak_bytes
    high = predict(costs, "none").peak_bytes
    for budget in sorted({low - 40, low - 1, low, (low + high) // 2, high}):
        plan, single = optimal_with_nesting(costs, budget), brute_force(costs, budget, "flops")
        if single is not None:
            assert (plan_cost(costs, plan), plan.peak_bytes) <= (plan_cost(costs, single),
                                                                 single.peak_bytes), budget
        if plan is not None:
            assert plan.peak_bytes <= budget
            model_peak = (predict(costs, plan.placement).peak_bytes
                          if isinstance(plan, Prediction) else predict_nested(costs, plan.tree)[0])
            assert plan.peak_bytes == model_peak


def test_a_peak_budget_that_is_not_one_is_refused_in_one_line():
    costs = ChainCosts((LayerCost.simple(4, 0, 1),) * 3)
    with pytest.raises(ValueError, match="not understood"):
        optimal_with_nesting(costs, "lots")
    with pytest.raises(TypeError, match="got list"):
        optimal_with_nesting([1, 2], 100)
