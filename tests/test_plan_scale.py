"""The planner's speed-ups are exact: the pruning by a lower bound on the cost to finish
(``_Chain.least_to_finish``, its Lagrangian relaxation), the ranges of each front that
checkpointed segments take by that bound (``_Chain.checkpoint_ranges``) and the beam it guides
never change the plan's cost or its peak, on uniform chains (one block repeated, where the
fronts grow largest) and near-uniform ones (the same block with a few bytes and FLOPs changed
here and there), with and without the full menu (four options per block)."""

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

OPTIONS = ("selective:save=mm,sdpa", "selective:save=sdpa", "offload",
           "selective:recompute=gelu,silu,relu")


def random_block(rng: random.Random) -> LayerCost:
    """A block with arbitrary numbers (the DP must be exact on any)."""
    def r(hi, lo=0):
        return rng.randint(lo, hi)

    def back():
        return Backward(r(60), r(60), r(20, -60), r(20, -60))

    return LayerCost(r(20, 1), r(20, 1), r(50), rng.random() < 0.7, rng.random() < 0.4,
                     r(30, 1), r(30, 1), r(60), r(10), rng.random() < 0.9, r(80), r(40), r(60),
                     r(50), back(), back())


def uniform(rng: random.Random, n: int, options: int, jitter: float,
            free: int = 0) -> ChainCosts:
    """One random block (and ``options`` menu options) repeated n times; ``jitter``: the share
    of blocks whose kept bytes and FLOPs move by a few units (a near-uniform chain). The first
    ``free`` options recompute no FLOPs (as keeping matmul and attention outputs does on a GPT
    block: the counter gives the activations none), so the FLOPs objective prices them at one
    unit each and the fronts hold a pair per count of them, the case that grows them most."""
    trunk = TrunkCost(*(rng.randint(0, 50) for _ in range(3)), rng.random() < 0.5,
                      rng.random() < 0.8, *(rng.randint(0, 50) for _ in range(11)))
    menu = ({o: OptionCost(random_block(rng), rng.randint(0, 30) * (k >= free),
                           rng.randint(0, 50) * (o == "offload"))
             for k, o in enumerate(OPTIONS[:options])},)
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
    """The general DP: no lower bound, so nothing pruned by it (fronts nor checkpoint ranges)
    and the beam spread only."""
    monkeypatch.setattr(_Chain, "_lagrangian", lambda self: (None, None))


def without_any_bound(monkeypatch):
    """The plain Pareto DP: no lower bound and no beam's bound either (costs taken as possibly
    negative), so only the exact room and Pareto prunings remain."""
    without_pruning(monkeypatch)
    built = _Chain.__init__

    def unbounded(self, *args):
        built(self, *args)
        self.nonnegative = False

    monkeypatch.setattr(_Chain, "__init__", unbounded)


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
    assert_same_plans(costs, fast)


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


@pytest.mark.parametrize("seed", range(8))
def test_the_full_menu_plans_what_the_plain_pareto_dp_plans_on_uniform_chains(seed,
                                                                             monkeypatch):
    """Four options per block, two of them free of FLOPs, on uniform and near-uniform chains:
    every pruning and the beam together give the plan (its cost and predicted peak) that the
    Pareto DP with no bound at all gives, at every budget and both objectives."""
    rng = random.Random(200 + seed)
    costs = uniform(rng, rng.randint(12, 28), 4, jitter=0.25 * (seed % 2), free=2)
    fast = {(b, o): optimal(costs, b, o) for b in budgets(costs) for o in ("flops", "time")}
    without_any_bound(monkeypatch)
    assert_same_plans(costs, fast)


@pytest.mark.parametrize("seed", range(6))
def test_a_checkpoint_range_holds_every_pair_the_bound_lets_through(seed):
    """``checkpoint_ranges`` cuts each front to the range that a checkpointed segment [i, j)
    may take; every pair whose cost + the segment's price + the lower bound at (j, False) on
    its Kept + x_i stays within the bound must be inside it, for any subset of lambdas."""
    rng = random.Random(300 + seed)
    costs = uniform(rng, 12, 4, jitter=0.5, free=2)
    chain = _Chain(costs, segment_flops)
    g, lams = chain._lagrangian()
    budget = budgets(costs)[seed % 6]
    for i in range(costs.n):
        for left in (False, True):
            stops, _, prices, x_i = chain.ckpt[i, left]
            # a random Pareto front: Kept ascending, cost descending
            kept = np.cumsum(rng.choices(range(1, 40), k=30)).astype(np.int64)
            cost = np.cumsum(rng.choices(range(1, 9000), k=30))[::-1].astype(np.int64)
            bound = int(cost[0] + rng.randint(0, 60000))
            subset = np.array(sorted(rng.sample(range(len(lams)), rng.randint(1, len(lams)))))
            lo, hi = chain.checkpoint_ranges(kept, cost, x_i, stops, prices, budget, bound,
                                             subset)
            for s, (j, price) in enumerate(zip(stops, prices, strict=True)):
                least = chain.least_to_finish(int(j), False, kept + x_i, budget)
                passing = np.nonzero(cost + int(price) + least <= bound)[0]
                assert all(lo[s] <= p < hi[s] for p in passing), (i, left, int(j))


def picky(costs: ChainCosts, seg):
    """FLOPs, but even blocks may not run plain and the last block may only be recomputed in a
    longer checkpoint: from the state before it no way finishes (its bound is infinite)."""
    i, j, kind = seg
    if (kind is False and i % 2 == 0) or i == costs.n - 1:
        return None
    return segment_flops(costs, seg)


@pytest.mark.parametrize("seed", range(6))
def test_states_no_way_finishes_from_are_pruned_exactly(seed):
    rng = random.Random(400 + seed)
    costs = uniform(rng, rng.randint(3, 4 if seed % 2 else 6), 2 * (seed % 2), jitter=0.5,
                    free=1)
    assert np.isinf(_Chain(costs, picky)._lagrangian()[0][costs.n - 1]).all()
    for budget in budgets(costs):
        fast, brute = optimal(costs, budget, picky), brute_force(costs, budget, picky)
        assert (fast is None) == (brute is None), budget
        if fast is not None:
            assert (placement_cost(costs, fast.placement, picky), fast.peak_bytes) == (
                placement_cost(costs, brute.placement, picky), brute.peak_bytes)


def assert_same_plans(costs, fast: dict) -> None:
    """Each (budget, objective) -> plan of ``fast`` costs and peaks what ``optimal`` plans now
    (with its prunings switched off by the caller), and fits its budget."""
    for (budget, objective), plan in fast.items():
        general = optimal(costs, budget, objective)
        assert (plan is None) == (general is None), budget
        if plan is not None:
            assert (placement_cost(costs, plan.placement, objective), plan.peak_bytes) == (
                placement_cost(costs, general.placement, objective), general.peak_bytes)
            assert plan.peak_bytes <= budget
