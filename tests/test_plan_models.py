"""The planner is exact on every model it is given: for every placement it can emit on the small
instance of every shipped Hugging Face config (offload included), the predicted peak is the
meter's and the gradients are bit-identical to no checkpointing; blocks that return their input
(nn.Identity, Dropout(0)) plan; the objectives never refuse a placement that fits."""

import random
from dataclasses import replace

import pytest
import torch
from torch import nn

from ckpt_course import hf
from ckpt_course.costs import MENU, measure_costs
from ckpt_course.models import GPTConfig, TinyGPT
from ckpt_course.plan import (
    all_placements,
    brute_force,
    make_plan,
    measure_peaks,
    optimal,
    placement_policy,
    predict,
    with_trunk,
)
from ckpt_course.train import check_gradients


def _exact(model, costs, placements, batch_size, seq_len=None):
    """Placements whose predicted peak is not the meter's, or whose gradients differ."""
    wrong = []
    for placement in placements:  # or policies (a checkpointed suffix is a menu's clause)
        policy = placement_policy(placement) if isinstance(placement, tuple) else placement
        predicted = predict(costs, policy).peak_bytes
        measured = measure_peaks(model, policy, batch_size, seq_len)[-1]
        equal = check_gradients(model, policy, batch_size, seq_len).equal
        if predicted != measured or not equal:
            wrong.append((str(policy), predicted - measured, equal))
    return wrong


def _small(name, n_layer=3):
    return hf.build(hf.small_config(hf.load_config(name), n_layer=n_layer, seq_len=16))


def test_offloaded_blocks_leave_the_shared_rotary_tables_on_the_device():
    """The rotary cos/sin slices all layers save are buffers: offload keeps them where they
    are (a host copy would come back once, at the last offloaded block's backward, and stay
    until the first's: 4,096 B the prediction did not have)."""
    model = hf.build(hf.small_config(hf.load_config("llama-3.2-1b"), n_layer=4, seq_len=32))
    costs = measure_costs(model, 2, 32, menu=MENU)
    placements = [((0, 1, "offload"), (1, 2, False), (2, 3, False), (3, 4, "offload")),
                  ((0, 1, "offload"), (1, 3, True), (3, 4, "offload")),
                  *(tuple((k, k + 1, option) for k in range(4)) for option in MENU)]
    assert _exact(model, costs, placements, 2, 32) == []


@pytest.mark.slow  # six configs, about 50 placements each: a minute
@pytest.mark.parametrize("name", hf.config_names())
def test_every_placement_option_is_exact_on_every_shipped_config(name):
    model = _small(name)
    costs = measure_costs(model, 2, 16, menu=MENU)
    placements = list(all_placements(3, lambda k: ("offload",)))  # plain, full, offload: all
    placements += [tuple((k, k + 1, option) for k in range(3)) for option in MENU]
    placements += random.Random(name).sample(list(all_placements(3, costs)), 6)  # mixed
    assert _exact(model, costs, placements, 2, 16) == []


@pytest.mark.parametrize("passthrough", [nn.Identity, lambda: nn.Dropout(0.0)])
def test_a_block_that_returns_its_input_plans_and_is_predicted_exactly(passthrough):
    torch.manual_seed(0)
    model = TinyGPT(GPTConfig(n_layer=3, d_model=32, n_head=2, seq_len=16))
    model.blocks[1] = passthrough()
    costs = measure_costs(model, 2, menu=("selective:save=mm,sdpa", "offload"))
    assert costs.layers[1].returns_input and not costs.layers[0].returns_input
    placements = list(all_placements(3))  # every plain / checkpointed placement
    placements += [tuple((k, k + 1, o) for k in range(3)) for o in costs.menu[0]]
    placements += [((0, 1, "offload"), (1, 2, True), (2, 3, "selective:save=mm,sdpa"))]
    assert _exact(model, costs, placements, 2) == []
    none, full = predict(costs, "none").peak_bytes, predict(costs, "full").peak_bytes
    for budget in (none, (none + full) // 2, full):
        best, brute = optimal(costs, budget), brute_force(costs, budget)
        assert (best.recompute_flops, best.peak_bytes) == (brute.recompute_flops,
                                                           brute.peak_bytes)
        assert best.placement[1] == (1, 2, False) or best.placement[0][1] > 1  # never alone


@pytest.fixture(scope="module")
def gpt4_menu():
    torch.manual_seed(0)
    model = TinyGPT(GPTConfig(n_layer=4, d_model=32, n_head=2, seq_len=64))  # offload peaks
    return model, measure_costs(model, 4, menu=MENU)  # lowest here


def test_the_flops_objective_offloads_where_nothing_else_fits(gpt4_menu):
    """FLOPs cannot price a copy: offload is the last resort, taken only where no recompute
    fits, never refused at a budget only offload reaches."""
    _, costs = gpt4_menu
    peaks = {str(placement_policy(p)): predict(costs, p).peak_bytes
             for p in all_placements(4, costs)}
    lowest = min(peaks.values())
    without = min(b for policy, b in peaks.items() if "offload" not in policy)
    assert lowest < without  # only offload reaches the lowest peak on this model
    plan = make_plan(costs, lowest, "flops")
    assert plan.fits and plan.best.peak_bytes == lowest and "Nothing fits" not in plan.report()
    assert optimal(costs, without, "flops").host_bytes == 0  # recompute fits: no offload
    assert optimal(costs, without - 1, "flops").host_bytes > 0


def test_the_time_objective_picks_plain_when_it_fits_even_if_noise_says_options_are_faster(
        gpt4_menu):
    """Given times where every option measured at or below plain (noise), the budget of no
    checkpointing gets no checkpointing, not offload everywhere at its lower peak."""
    _, costs = gpt4_menu
    times = tuple({"none": 1.0, "full": 0.999, **dict.fromkeys(m, 0.998)} for m in costs.menu)
    timed = replace(costs, times=times)
    best = optimal(timed, predict(costs, "none").peak_bytes, "time")
    assert str(best.policy) == "segments:none" and best.host_bytes == 0


def test_the_time_objective_takes_an_option_only_when_it_wins_by_more_than_its_spread(
        gpt4_menu):
    """Given times: offload's median is a little faster than full's, but its rounds spread
    wider than the difference; priced at the high end of what was measured, full wins. With
    spreads small enough, offload's median advantage stands."""
    _, costs = gpt4_menu
    budget = max(predict(costs, "full").peak_bytes, predict(costs, "offload").peak_bytes)
    times = tuple({"none": 1e-3, "full": 1.3e-3, **dict.fromkeys(m, 2e-3), "offload": 1.2e-3}
                  for m in costs.menu)
    noisy = tuple({"none": 1e-5, "full": 1e-5, **dict.fromkeys(m, 1e-5), "offload": 2e-4}
                  for m in costs.menu)
    quiet = tuple(dict.fromkeys(s, 1e-6) for s in noisy)

    def chosen(spreads):
        best = optimal(replace(costs, times=times, spreads=spreads), budget, "time")
        return {kind for _, _, kind in best.placement}

    assert chosen(quiet) == {"offload"}
    assert "offload" not in chosen(noisy) and True in chosen(noisy)


@pytest.mark.slow  # six configs, three suffixes, five placements each: a minute
@pytest.mark.parametrize("name", hf.config_names())
def test_every_suffix_option_is_exact_on_every_shipped_config(name):
    """The checkpointed suffix (final norm, head, loss: full, and the op-level points of its
    own Pareto set) on each shipped config's small instance, under plain, checkpointed and
    op-level blocks, and with the prefix inside block 0's region (the forward's local
    ``inputs_embeds`` freed when block 0 returns): predicted peak = meter, gradients
    bit-identical."""
    model = _small(name)
    costs = measure_costs(model, 2, 16, op_points=2, suffix=True)
    assert [t.suffix for t in costs.suffixes][0] == "full" and len(costs.suffixes) >= 2
    # GPT-2's forward also holds the token and position embeddings (two locals besides x_0)
    # to its end: not in the planner's terms, so its prefix stays as it is
    assert costs.trunk.prefix_recomputable == (name != "gpt2")
    sample = random.Random(name).sample(list(all_placements(3, costs)), 4)
    placements = [((0, 1, False), (1, 3, True)), *sample]
    wrong = []
    for trunk in costs.suffixes:
        policies = [placement_policy(p, trunk.suffix) for p in placements]
        if costs.trunk.prefix_recomputable:
            first = next(o for o in with_trunk(costs, "", "full").menu[0] if "ops=" in o)
            policies += [f"menu:0-2=full,prefix=full,suffix={trunk.suffix}",
                         f"menu:0={first},1-2=full,prefix=full,suffix={trunk.suffix}"]
        wrong += _exact(model, costs, policies, 2, 16)
    assert wrong == []
