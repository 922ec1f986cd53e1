"""The planner's speed-ups are exact: the pruning by a lower bound on the cost to finish
(``_Chain.least_to_finish``) and the beam it guides never change the plan's cost, on uniform
chains (one block repeated, where the fronts grow largest) and near-uniform ones (the same
block with a few bytes and FLOPs changed here and there), with and without a menu."""

import random
from dataclasses import replace

import numpy as np
import pytest

from ckpt_course.costs import Backward, ChainCosts, LayerCost, OptionCost, TrunkCost
from ckpt_course.plan import (
    _Chain,
    brute_force,
    optimal,
    placement_cost,
    predict,
    segment_flops,
)

OPTIONS = ("selective:save=mm,sdpa", "selective:save=sdpa", "offload")


def random_block(rng: random.Random) -> LayerCost:
    """A block with arbitrary numbers (the DP must be exact on any)."""
    def r(hi, lo=0):
        return rng.randint(lo, hi)

    def back():
        return Backward(r(60), r(60), r(20, -60), r(20, -60))

    return LayerCost(r(20, 1), r(20, 1), r(50), rng.random() < 0.7, rng.random() < 0.4,
                     r(30, 1), r(30, 1), r(60), r(10), rng.random() < 0.9, r(80), r(40), r(60),
                     r(50), back(), back())


def uniform(rng: random.Random, n: int, options: int, jitter: float) -> ChainCosts:
    """One random block (and ``options`` menu options) repeated n times; ``jitter``: the share
    of blocks whose kept bytes and FLOPs move by a few units (a near-uniform chain)."""
    trunk = TrunkCost(*(rng.randint(0, 50) for _ in range(3)), rng.random() < 0.5,
                      rng.random() < 0.8, *(rng.randint(0, 50) for _ in range(11)))
    menu = ({o: OptionCost(random_block(rng), rng.randint(0, 30),
                           rng.randint(0, 50) * (o == "offload")) for o in OPTIONS[:options]},)
    times = ({"none": rng.random(), "full": 1 + rng.random(),
              **{o: 1 + rng.random() for o in OPTIONS[:options]}},)
    one = ChainCosts((random_block(rng),), trunk, menu=menu if options else (),
                     times=times if options else ())

    def near(c: LayerCost) -> LayerCost:
        if rng.random() >= jitter:
            return c
        return replace(c, saved_bytes=c.saved_bytes + rng.randint(0, 3),
                       forward_flops=c.forward_flops + rng.randint(0, 2))

    layers = tuple(near(one.layers[0]) for _ in range(n))
    menu = tuple({o: OptionCost(near(oc.layer), oc.recompute_flops, oc.host_bytes)
                  for o, oc in one.menu[0].items()} for _ in range(n)) if options else ()
    times = one.times[:1] * n if options else ()
    return replace(one, layers=layers, menu=menu, times=times)


def budgets(costs: ChainCosts) -> list[int]:
    none, full = predict(costs, "none").peak_bytes, predict(costs, "full").peak_bytes
    low = min(none, full)
    return [int(low + (none - low) * f) for f in (0.0, 0.1, 0.3, 0.5, 0.7, 0.9)]


def without_pruning(monkeypatch):
    """The general DP: no lower bound, so nothing pruned by it and the beam spread only."""
    monkeypatch.setattr(_Chain, "least_to_finish", lambda *args: None)


@pytest.mark.parametrize("seed", range(12))
def test_pruned_plan_costs_what_brute_force_finds_on_small_uniform_chains(seed):
    rng = random.Random(seed)
    costs = uniform(rng, rng.randint(2, 5), seed % 3, jitter=0.3 * (seed % 2))
    for objective in ("flops", "time") if costs.times else ("flops",):
        for budget in budgets(costs):
            fast, brute = optimal(costs, budget, objective), brute_force(costs, budget, objective)
            assert (fast is None) == (brute is None), budget
            if fast is not None:
                assert (placement_cost(costs, fast.placement, objective), fast.peak_bytes) == (
                    placement_cost(costs, brute.placement, objective), brute.peak_bytes)


@pytest.mark.parametrize("seed", range(6))
def test_pruned_plan_costs_what_the_general_dp_finds_on_longer_uniform_chains(seed,
                                                                               monkeypatch):
    rng = random.Random(100 + seed)
    costs = uniform(rng, rng.randint(12, 24), seed % 3, jitter=0.2 * (seed % 2))
    objectives = ("flops", "time") if costs.times else ("flops",)
    fast = {(b, o): optimal(costs, b, o) for b in budgets(costs) for o in objectives}
    without_pruning(monkeypatch)
    for (budget, objective), plan in fast.items():
        general = optimal(costs, budget, objective)
        assert (plan is None) == (general is None), budget
        if plan is not None:
            assert (placement_cost(costs, plan.placement, objective), plan.peak_bytes) == (
                placement_cost(costs, general.placement, objective), general.peak_bytes)
            assert plan.peak_bytes <= budget


def test_the_lower_bound_never_exceeds_the_cost_to_finish():
    """From the start, with nothing kept, the bound is at most the optimum's cost."""
    rng = random.Random(7)
    for _ in range(8):
        costs = uniform(rng, rng.randint(3, 16), rng.randint(0, 2), jitter=rng.random())
        chain = _Chain(costs, segment_flops)
        for budget in budgets(costs):
            best = optimal(costs, budget, "flops")
            if best is None:
                continue
            start = chain.least_to_finish(0, costs.trunk.prefix_keeps_input,
                                          np.zeros(1, np.int64), budget)
            assert start[0] <= placement_cost(costs, best.placement, "flops") * (1 + 1e-9) + 1
