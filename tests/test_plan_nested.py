"""Nested plans predicted to the byte: ``predict_nested`` against the meter (``measure_peaks``)
on the tiny GPT, a deeper GPT whose activations dominate, and the hand-trace net, where
nesting peaks below every single-level placement; without nesting it is ``predict``."""

import random
from dataclasses import replace

import pytest
import torch

from ckpt_course.costs import ChainCosts, LayerCost
from ckpt_course.models import GPTConfig, HandTraceNet, TinyGPT
from ckpt_course.plan import (
    all_placements,
    measure_costs,
    measure_peaks,
    nested_optimal,
    optimal_frontier,
    predict,
    predict_nested,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Byte counts do not depend on threads; one thread keeps tiny ops fast on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def meter(model, policy, batch_size: int) -> int:
    return measure_peaks(model, policy, batch_size)[1]  # step 2: optimizer state present


# Shapes that exercise each rule of the model: plain blocks behind a child, children side by
# side, a child behind a plain block, children of children, several top-level segments.
SHAPES_8 = ["menu:0-7=full(2-5)", "menu:0-7=full(0-6(0-5(0-4)))",
            "menu:0-3=full(0-2),4-7=full(5-6)", "menu:0-7=full(1-2,4-5)",
            "menu:0-7=full(0-3(1-2),5-6)", "menu:0-7=full(0-3(0-1,2-3),4-7(4-5,6-7))",
            "menu:0-7=full(0-4(0-1,2-3),5-6)", "menu:0-7=full(0-2,3-4,5-6)"]


def test_the_tiny_gpts_nested_peaks_are_the_meters():
    torch.manual_seed(0)
    model = TinyGPT(GPTConfig(n_layer=4, d_model=64, n_head=4, seq_len=32))
    costs = measure_costs(model, 4)
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
