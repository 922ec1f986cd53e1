"""Op-level choices: the exact Pareto set of (kept bytes, recompute FLOPs) over which op
outputs a checkpointed block keeps, the ``selective:ops=...`` policy that keeps them, and the
planner using them (predicted peak = meter, gradients bit-identical)."""

import itertools

import pytest
import torch
from torch import nn

from ckpt_course import hf
from ckpt_course.costs import MENU, config_costs, measure_costs, measure_layer, measure_option
from ckpt_course.models import GPTConfig, TinyGPT
from ckpt_course.op_choices import block_ops, kept_bytes, pareto, recompute_flops, thin
from ckpt_course.plan import brute_force, optimal, optimal_frontier, predict
from ckpt_course.policies import Menu, SelectiveOps, parse_policy
from ckpt_course.timing import block_input
from tests.test_plan_models import _exact


def _small_gpt(n_layer=2):
    torch.manual_seed(0)
    return TinyGPT(GPTConfig(n_layer=n_layer, d_model=32, n_head=2, seq_len=16))


@pytest.fixture(scope="module")
def gpt_block():
    model = _small_gpt()
    x = block_input(model, model.example_batch(2, generator=torch.Generator().manual_seed(0)), 0)
    return model.blocks[0], x


def _frontier(points):
    """Non-dominated (bytes, flops) pairs of a list: by bytes, each one recomputing strictly
    less than every pair with fewer or equal bytes."""
    out = []
    for b, f in sorted(set(points)):
        if not out or f < out[-1][1]:
            out.append((b, f))
    return out


def test_the_pareto_set_is_the_frontier_of_every_choice_of_groups():
    """Every subset of every group of a small MLP block (no FLOP-free shortcut taken): the
    non-dominated (bytes, recompute) pairs are exactly what ``pareto`` returns."""
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 24), nn.GELU(),
                          nn.Linear(24, 8), nn.Tanh(), nn.Linear(8, 8))
    ops = block_ops(block, torch.randn(4, 8, requires_grad=True))
    groups = sorted({o.group for o in ops if not o.forced})
    assert len(groups) >= 8
    every = [(kept_bytes(ops, keep), recompute_flops(ops, keep))
             for r in range(len(groups) + 1) for keep in itertools.combinations(groups, r)]
    assert [(c.kept_bytes, c.recompute_flops) for c in pareto(ops)] == _frontier(every)


def test_the_model_is_what_flop_counter_and_meter_see_in_the_real_backward(gpt_block):
    """For every Pareto point and a few other choices (FLOP-free ops kept too), the recompute
    the model predicts is what FlopCounterMode counts in the real backward beyond a plain one,
    and the bytes it keeps are what the meter sees the block keep."""
    block, x = gpt_block
    ops = block_ops(block, x)
    plain = measure_layer(block, x)
    front = pareto(ops)
    assert len(front) > 4 and front[0].keep == () and front[-1].recompute_flops == 0
    nonzero = [o.group for o in ops if o.flops and not o.forced]
    free = [o.group for o in ops if not o.flops and o.new_bytes and not o.forced][:2]
    keeps = [c.keep for c in front[1:]] + [tuple(free), (nonzero[0], *free)]
    for keep in keeps:
        measured = measure_option(block, x, str(SelectiveOps(indices=keep)), plain)
        assert measured.recompute_flops == recompute_flops(ops, keep), keep
        assert measured.layer.saved_bytes == kept_bytes(ops, keep), keep
    # full recomputes what keeping nothing does: everything up to the early stop
    assert recompute_flops(ops, ()) == plain.recompute_flops < plain.forward_flops


def test_thinning_keeps_the_ends_and_the_best_point_at_each_level(gpt_block):
    front = pareto(block_ops(*gpt_block))
    thinned = thin(front, 3)
    assert len(thinned) == 3 and thinned[0] == front[1] and thinned[-1] == front[-1]
    for c in thinned:  # each is on the frontier
        assert c in front
    assert thin(front, len(front)) == front[1:] and thin(front, 0) == []


def test_selective_ops_round_trips_and_sits_in_a_menu():
    policy = parse_policy("selective:ops=12,3,17")
    assert policy == SelectiveOps(indices=(3, 12, 17))
    assert str(policy) == "selective:ops=3,12,17" and parse_policy(str(policy)) == policy
    menu = parse_policy("menu:0=selective:ops=3,12,1=full,2..3=selective:ops=17")
    assert isinstance(menu, Menu) and parse_policy(str(menu)) == menu
    assert [i[2] for i in menu.items] == ["selective:ops=3,12", "full", "selective:ops=17",
                                          "selective:ops=17"]


@pytest.mark.parametrize("text", ["selective:ops=", "selective:ops=1,1", "selective:ops=a",
                                  "selective:ops=-1", "selective:ops=1,,2"])
def test_bad_op_positions_get_one_line_naming_the_fix(text):
    with pytest.raises(ValueError, match="selective:ops=0,7,12") as error:
        parse_policy(text)
    assert "\n" not in str(error.value)


def test_op_points_are_checked_before_anything_is_measured():
    with pytest.raises(ValueError, match="op_points is how many"):
        measure_costs(_small_gpt(), 2, op_points=-1)
    with pytest.raises(ValueError, match="op_points is how many"):
        config_costs("gpt", 2, 16, op_points=True)


def _op_placements(costs):
    """Each op-level option everywhere, and mixed with full segments and offload."""
    n, options = costs.n, [o for o in costs.menu[0] if o.startswith("selective:ops=")]
    out = [tuple((k, k + 1, o) for k in range(n)) for o in options]
    out.append(((0, 1, options[0]), (1, n, True)) if n > 2 else ((0, 1, options[0]),
                                                                (1, 2, "offload")))
    out.append(((0, 1, "offload"), *((k, k + 1, options[-1]) for k in range(1, n))))
    return out


@pytest.fixture(scope="module")
def gpt3_costs():
    model = _small_gpt(3)
    return model, measure_costs(model, 2, menu=("offload",), op_points=3)


def test_op_level_placements_are_exact_on_the_tiny_gpt(gpt3_costs):
    model, costs = gpt3_costs
    placements = _op_placements(costs)
    none, full = predict(costs, "none").peak_bytes, predict(costs, "full").peak_bytes
    placements += [optimal(costs, b, "flops").placement for b in (full, (none + full) // 2)]
    assert _exact(model, costs, placements, 2) == []


@pytest.mark.slow  # a few seconds: an HF model, several placements measured and replayed
def test_op_level_placements_are_exact_on_a_small_hf_llama():
    model = hf.build(hf.small_config(hf.load_config("llama-3.2-1b"), n_layer=3, seq_len=16))
    costs = measure_costs(model, 2, 16, menu=("offload",), op_points=3)
    assert any(o.startswith("selective:ops=") for o in costs.menu[0])
    assert _exact(model, costs, _op_placements(costs), 2, 16) == []


def test_op_level_choices_never_recompute_more_than_the_menu_and_sometimes_less():
    """At every budget from the lowest peak to no checkpointing's, the planner with op-level
    points recomputes no more than with the four-option menu (its options are a superset and
    the DP is exact), and at some budgets strictly less."""
    torch.manual_seed(0)
    model = TinyGPT(GPTConfig(n_layer=2, d_model=32, n_head=2, seq_len=64))
    menu = measure_costs(model, 4, menu=MENU)
    ops = measure_costs(model, 4, menu=MENU, op_points=4)
    none = predict(menu, "none").peak_bytes
    low = optimal(menu, none, lambda c, seg: 0).peak_bytes
    less = 0
    for k in range(21):
        budget = low + (none - low) * k // 20
        a, b = optimal(menu, budget, "flops"), optimal(ops, budget, "flops")
        assert b.recompute_flops <= a.recompute_flops and b.peak_bytes <= budget
        less += b.recompute_flops < a.recompute_flops
    assert less > 0


def test_the_dp_with_op_level_options_matches_brute_force(gpt3_costs):
    """Every placement of a 3-block GPT with full segments, offload and three op-level points
    per block, tried one by one: the DP finds the same least recompute and lowest peak."""
    _, costs = gpt3_costs
    none = predict(costs, "none").peak_bytes
    low = optimal(costs, none, lambda c, seg: 0).peak_bytes
    for k in range(4):
        budget = low + (none - low) * k // 3
        best, brute = optimal(costs, budget, "flops"), brute_force(costs, budget, "flops")
        assert (best.recompute_flops, best.peak_bytes) == (brute.recompute_flops,
                                                           brute.peak_bytes)


@pytest.mark.slow  # a fake and a real measurement with options: several seconds
def test_op_level_options_of_a_config_on_fake_tensors_are_those_of_the_real_model():
    """config_costs measures the op-level options on a fake block: the same options, with the
    same recompute and kept bytes, as the real tiny GPT of that config."""
    cfg = GPTConfig(n_layer=2, d_model=32, n_head=2, seq_len=16)
    fake = config_costs(cfg, 2, 16, dtype=torch.float32, op_points=3)
    torch.manual_seed(0)
    real = measure_costs(TinyGPT(cfg), 2, op_points=3)
    assert list(fake.menu[0]) == list(real.menu[0]) and len(fake.menu[0]) == 3
    for option, measured in real.menu[0].items():
        assert fake.menu[0][option].recompute_flops == measured.recompute_flops
        assert fake.menu[0][option].layer.saved_bytes == measured.layer.saved_bytes


# ---------------------------------------------------------------- the command line
def test_plan_command_with_op_points_recomputes_less_where_the_menu_cannot(capsys):
    from ckpt_course.cli import _parser, costs_from_args, main

    argv = ["plan", "--model", "gpt", "--layers", "2", "--batch", "2", "--objective", "flops"]
    args = _parser().parse_args([*argv, "--budget", "1GiB", "--op-points", "6"])
    with_ops = costs_from_args(args)
    menu_only = costs_from_args(_parser().parse_args([*argv, "--budget", "1GiB"]))
    # a budget where the best op-level plan recomputes less than the best menu plan
    budget = next(p.peak_bytes for p in optimal_frontier(with_ops)
                  if (m := optimal(menu_only, p.peak_bytes)) is None
                  or m.recompute_flops > p.recompute_flops)
    assert main([*argv, "--budget", str(budget), "--op-points", "6"]) == 0
    out = capsys.readouterr().out
    assert "selective:ops=" in out
    assert f"optimal: {optimal(with_ops, budget).policy}" in out


@pytest.mark.parametrize("extra, error", [
    (["--op-points", "0"], "at least 1"),
    (["--op-points", "65"], "at most 64"),
    (["--op-points", "x"], "whole number"),
    (["--hf-config", "gpt2", "--op-points", "4"], "--op-points applies to --model and --config"),
])
def test_plan_command_refuses_bad_op_points_in_one_line(extra, error, capsys):
    from ckpt_course.cli import main

    argv = ["plan", "--budget", "1GiB", *extra]
    with pytest.raises(SystemExit) as code:  # argparse's exit, or main's own code
        raise SystemExit(main(argv))
    assert code.value.code == 2
    err = capsys.readouterr().err.strip()
    assert error in err.splitlines()[-1] and "Traceback" not in err  # argparse's usage, then it
