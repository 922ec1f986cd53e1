"""The planner: its memory model against the meter, its dynamic program against brute force, the
closed forms it must reproduce, the Segments policy, configs on fake tensors, the command."""

import math
import random
from dataclasses import replace

import pytest
import torch

from ckpt_course.cli import main
from ckpt_course.costs import (
    MENU,
    Backward,
    ChainCosts,
    LayerCost,
    OptionCost,
    TrunkCost,
    config_costs,
    measure_costs,
)
from ckpt_course.models import GPTConfig, HandTraceNet, TinyGPT
from ckpt_course.plan import (
    all_placements,
    brute_force,
    checkpointed,
    every_k_placement,
    make_plan,
    measure_peaks,
    optimal,
    optimal_frontier,
    placement_cost,
    placement_policy,
    predict,
    simulate_nested,
)
from ckpt_course.policies import Segments, parse_policy
from ckpt_course.recompute import measure_recompute
from ckpt_course.sharding import min_devices, shard
from ckpt_course.train import train
from ckpt_course.units import MiB, fmt_bytes

SMALL_GPT = GPTConfig(n_layer=4, d_model=64, n_head=4, seq_len=32)



def random_costs(rng: random.Random, n: int) -> ChainCosts:
    """A chain with arbitrary per-block numbers: the DP must agree with brute force on any."""
    def r(hi, lo=0):
        return rng.randint(lo, hi)

    def back():
        return Backward(r(60), r(60), r(20, -60), r(20, -60))

    layers = tuple(
        LayerCost(r(20, 1), r(20, 1), r(50), rng.random() < 0.7, rng.random() < 0.4, r(30, 1),
                  r(30, 1), r(60), r(10), rng.random() < 0.9, r(80), r(40), r(60), r(50), back(),
                  back())
        for _ in range(n))
    trunk = TrunkCost(r(50), r(50), r(50), rng.random() < 0.5, rng.random() < 0.8,
                      *(r(50) for _ in range(11)))
    return ChainCosts(layers, trunk)


# ---------------------------------------------------------------- the dynamic program
def test_all_placements_counts_every_way_to_cut_a_chain():
    # each block is plain, starts a checkpointed segment, or continues the one before it:
    # F(2n+1) ways (Fibonacci: 2, 5, 13, 34, 89, ...), about 2.6^n
    assert [sum(1 for _ in all_placements(n)) for n in range(1, 6)] == [2, 5, 13, 34, 89]
    assert len(set(all_placements(6))) == sum(1 for _ in all_placements(6))


@pytest.mark.parametrize("seed", range(60))
def test_dp_equals_brute_force_on_random_chains(seed):
    rng = random.Random(seed)
    costs = random_costs(rng, rng.randint(1, 7))
    peaks = sorted({predict(costs, p).peak_bytes for p in all_placements(costs.n)})
    for budget in {peaks[0] - 1, peaks[0], peaks[len(peaks) // 3], peaks[-1], peaks[-1] + 5}:
        dp, brute = optimal(costs, max(budget, 1)), brute_force(costs, max(budget, 1))
        assert (dp is None) == (brute is None), f"budget {budget}"
        if dp is not None:  # the fewest FLOPs, and among those the lowest peak
            assert (dp.recompute_flops, dp.peak_bytes) == (brute.recompute_flops,
                                                           brute.peak_bytes)
            assert dp.peak_bytes <= budget


@pytest.mark.parametrize("seed", range(60))
def test_frontier_is_exactly_the_pareto_points_of_every_placement(seed):
    rng = random.Random(seed)
    costs = random_costs(rng, rng.randint(1, 6))
    points = {(p.peak_bytes, p.recompute_flops)
              for p in map(lambda q: predict(costs, q), all_placements(costs.n))}
    pareto = sorted(p for p in points
                    if not any(q != p and q[0] <= p[0] and q[1] <= p[1] for q in points))
    frontier = sorted((p.peak_bytes, p.recompute_flops) for p in optimal_frontier(costs))
    assert frontier == pareto


def test_equally_cheap_placements_are_broken_by_the_lower_peak():
    """Two 2-block segments cost the same recompute; the one at the start peaks lower."""
    costs = ChainCosts((LayerCost.simple(1, 2, 1),) * 4)
    cheap = {str(Segments(checkpointed(p))): predict(costs, p) for p in all_placements(4)}
    first, second = cheap["segments:0-1"], cheap["segments:1-2"]
    assert first.recompute_flops == second.recompute_flops
    assert first.peak_bytes < second.peak_bytes <= 10
    best = optimal(costs, 10)
    assert best.recompute_flops == first.recompute_flops
    assert best.peak_bytes == min(p.peak_bytes for p in cheap.values()
                                  if p.recompute_flops == best.recompute_flops and
                                  p.peak_bytes <= 10)


def test_dp_equals_brute_force_on_ten_layers():
    rng = random.Random(10)
    costs = random_costs(rng, 10)
    predictions = [predict(costs, p) for p in all_placements(10)]
    peaks = sorted(p.peak_bytes for p in predictions)
    for budget in (peaks[len(peaks) // 10], peaks[len(peaks) // 2]):
        fits = [p.recompute_flops for p in predictions if p.peak_bytes <= budget]
        assert optimal(costs, budget).recompute_flops == min(fits)


def test_unlimited_budget_means_no_checkpointing_and_no_recompute():
    for seed in range(5):
        costs = random_costs(random.Random(seed), 6)
        best = optimal(costs, 10**12)
        assert best.recompute_flops == 0 and checkpointed(best.placement) == ()


@pytest.mark.parametrize("n_layer", [16, 36, 64])
def test_uniform_chain_reproduces_chen_sqrt_memory(n_layer):
    """Chen et al.'s chain: every layer keeps one unit (its input). Every-k keeps L/k segment
    inputs and rebuilds k units at a time: L/k + k, least at k = sqrt(L), 2 sqrt(L) units."""
    costs = ChainCosts((LayerCost.simple(1, 0, 1),) * n_layer)
    peaks = {k: predict(costs, every_k_placement(n_layer, k)).peak_bytes
             for k in range(1, n_layer + 1)}
    k_best = min(peaks, key=peaks.get)
    assert peaks[k_best] == 2 * math.isqrt(n_layer) == predict(costs, "sqrt").peak_bytes
    assert predict(costs, "none").peak_bytes == n_layer + 1  # all L inputs + the loss gradient
    # the optimum at that memory recomputes less than the best every-k: uneven segments
    best = optimal(costs, peaks[k_best])
    every_k_flops = predict(costs, every_k_placement(n_layer, k_best)).recompute_flops
    assert best.recompute_flops < every_k_flops


# ---------------------------------------------------------------- the model against the meter
@pytest.fixture(scope="module")
def gpt():
    torch.manual_seed(0)
    model = TinyGPT(SMALL_GPT)
    return model, measure_costs(model, 4)


def test_predicted_peak_is_the_meters_peak_for_every_placement_of_the_tiny_gpt(gpt):
    model, costs = gpt
    for placement in all_placements(4):
        policy = Segments(checkpointed(placement))
        assert predict(costs, placement).peak_bytes == measure_peaks(model, policy, 4)[1], policy


def test_predicted_peak_is_the_meters_peak_for_the_hand_trace_net():
    model = HandTraceNet(width=128)
    costs = measure_costs(model, 128)
    for policy in ("none", "full", "every-2", "segments:1-3", "segments:0,2..3"):
        assert predict(costs, policy).peak_bytes == measure_peaks(model, policy, 128)[1], policy


def test_optimal_placement_fits_when_trained_and_recomputes_what_it_predicts(gpt):
    model, costs = gpt
    full, none = predict(costs, "full").peak_bytes, predict(costs, "none").peak_bytes
    budget = (full + none) // 2
    plan = make_plan(costs, budget)
    assert plan.fits and full <= plan.best.peak_bytes <= budget
    records = train(model, plan.policy, steps=2, batch_size=4, budget=budget, progress=False)
    assert records[1].recompute_flops == plan.best.recompute_flops
    assert 0 < plan.best.recompute_flops < predict(costs, "full").recompute_flops
    assert plan.best.recompute_flops <= plan.best_every_k()[1].recompute_flops


def test_recompute_flops_match_the_counter_for_segments(gpt):
    model, costs = gpt
    batch = model.example_batch(4, generator=torch.Generator().manual_seed(0))
    for policy in ("full", "segments:0-2", "segments:1,2-3"):
        assert measure_recompute(model, batch, policy).flops == \
            predict(costs, policy).recompute_flops


def test_micro_batch_costs_predict_accumulation_steps():
    from ckpt_course.doctor import run_steps

    model = TinyGPT(SMALL_GPT)
    costs = measure_costs(model, 2, accumulate=True)
    for policy in ("none", "full"):
        run = run_steps(model, None, policy, batch_size=4, steps=2, micro_batches=2)
        assert run.steps[1].peak_bytes == predict(costs, policy).peak_bytes


# ---------------------------------------------------------------- the Segments policy
def test_segments_text_round_trips_and_validates():
    s = Segments(((0, 1), (1, 2), (2, 3), (5, 7)))
    assert str(s) == "segments:0..2,5-6" and Segments.parse(str(s)) == s
    assert Segments.parse("segments:0-2,5") == Segments(((0, 3), (5, 6)))
    assert [list(r) for r in s.segments(8)] == [[0], [1], [2], [5, 6]]
    with pytest.raises(ValueError, match="overlap"):
        Segments(((0, 3), (2, 4)))
    with pytest.raises(ValueError, match="reaches block 6"):
        s.segments(6)
    with pytest.raises(ValueError, match="inclusive block numbers"):
        Segments.parse("segments:a-b")


def test_segments_checkpoint_exactly_their_blocks():
    model = HandTraceNet(width=64)
    costs = measure_costs(model, 64)
    seg = train(model, Segments(((1, 3),)), steps=1, batch_size=64, progress=False)[0]
    every2 = train(model, "every-2", steps=1, batch_size=64, progress=False)[0]
    # blocks 1-2 as one segment keep its input only: one block input less than plain
    plain = train(model, "none", steps=1, batch_size=64, progress=False)[0]
    assert plain.saved_bytes - seg.saved_bytes == costs.layers[1].input_bytes
    assert seg.recompute_flops == predict(costs, "segments:1-2").recompute_flops
    assert every2.recompute_flops == 2 * seg.recompute_flops


# ---------------------------------------------------------------- configs and the command
def test_70b_plans_on_fake_tensors_in_seconds():
    costs = config_costs("70b", 1, 4096)
    layer = costs.layers[0]
    assert costs.n == 80 and layer.input_bytes == 4096 * 8192 * 2  # bf16 residual stream
    # in bf16 the norm saves a float32 copy of the block input, not the input itself
    assert not layer.saves_input and layer.kept_bytes > 2 * layer.input_bytes
    assert costs.param_bytes == pytest.approx(69e9 * 2, rel=0.01)
    plan = make_plan(costs, "80GiB")
    assert not plan.fits and "parameters alone need" in plan.advice()


def test_plan_command_prints_the_plan(capsys):
    # FLOPs, not measured time: a test reads no clock (a noisy time once made offload "win")
    argv = ["plan", "--model", "hand-trace", "--layers", "3", "--batch", "64", "--budget", "2GiB",
            "--objective", "flops"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "optimal: segments:none" in out and "+0.0% of a plain step" in out


@pytest.mark.slow  # measures a small GPT twice and meters two steps: seconds
def test_plan_command_plans_a_step_of_micro_batches(capsys):
    """--micro-batches 2: the gradients are there from the first micro-batch's backward, so
    every peak is a later micro-batch's: the none row is a metered 2-micro-batch step's."""
    from ckpt_course.doctor import run_steps
    from ckpt_course.models import build_model

    argv = ["plan", "--model", "gpt", "--layers", "2", "--batch", "4", "--seq", "32",
            "--budget", "2GiB", "--objective", "flops"]
    rows = []
    for micro_batches in (1, 2):
        assert main([*argv, "--micro-batches", str(micro_batches)]) == 0
        out = capsys.readouterr().out
        rows.append(next(line.split()[1:3] for line in out.splitlines()
                         if line.startswith("  none ")))
        run = run_steps(build_model("gpt", 2), None, "none", batch_size=4 * micro_batches,
                        seq_len=32, steps=2, micro_batches=micro_batches)
        assert " ".join(rows[-1]) == fmt_bytes(run.steps[-1].peak_bytes), micro_batches
    assert rows[0] != rows[1] and "a step of 2 micro-batches" in out


@pytest.mark.slow  # builds the 70B config's costs on fake tensors: seconds
def test_plan_command_for_70b_says_to_shard(capsys):
    assert main(["plan", "--config", "70b", "--batch", "1", "--seq", "4096",
                 "--budget", "80GiB"]) == 1
    out = capsys.readouterr().out
    costs = config_costs("70b", 1, 4096, menu=MENU)
    assert (f"the parameters alone need {fmt_bytes(costs.param_bytes)}, more than the budget "
            f"80.00 GiB") in out
    n, best = min_devices(costs, "80GiB")
    assert optimal(shard(costs, n - 1), "80GiB") is None  # the fewest devices
    assert f"Sharded over {n} devices it fits: {best.policy}" in out
    assert parse_policy(str(best.policy)) == best.policy  # a policy every command accepts
    # told it already has 8 devices, it names the same fewest count, not 8 times some count
    assert main(["plan", "--config", "70b", "--batch", "1", "--seq", "4096",
                 "--budget", "80GiB", "--devices", "8"]) == 1
    assert f"Sharded over {n} devices it fits: {best.policy}" in capsys.readouterr().out


def test_budget_below_the_parameters_says_so_with_numbers():
    costs = measure_costs(TinyGPT(SMALL_GPT), 4)
    plan = make_plan(costs, 512 * 1024)
    assert plan.best is None
    assert plan.advice().startswith(f"the parameters alone need {fmt_bytes(costs.param_bytes)}, "
                                    "more than the budget 512.00 KiB")
    assert costs.param_bytes > 512 * 1024
    assert "Shard" in plan.advice()
    with pytest.raises(ValueError, match="nothing fits"):
        print(plan.policy)
    assert make_plan(costs, 100 * MiB).best.recompute_flops == 0


# ---------------------------------------------------------------- the per-block menu
def random_menu_costs(rng: random.Random, n: int, n_options: int) -> ChainCosts:
    """A random chain whose blocks also have ``n_options`` menu options, each an arbitrary
    plain-like LayerCost with its own recompute, host bytes and time."""
    costs = random_costs(rng, n)
    names = ["selective:save=mm,sdpa", "selective:save=sdpa", "offload"][:n_options]
    base = random_costs(rng, n * n_options).layers
    menu = tuple({name: OptionCost(base[k * n_options + m], rng.randint(0, 30),
                                   rng.randint(0, 50) * (name == "offload"))
                  for m, name in enumerate(names)} for k in range(n))
    times = tuple({"none": rng.random(), "full": 1 + rng.random(),
                   **{name: 1 + rng.random() for name in names}} for _ in range(n))
    return replace(costs, menu=menu, times=times)


@pytest.mark.parametrize("n, n_options, seeds", [
    (3, 3, 12), (5, 2, 6), (6, 1, 4),
    pytest.param(8, 1, 1, marks=pytest.mark.slow)])  # 8 blocks: brute force takes seconds
@pytest.mark.parametrize("objective", ["time", "flops"])
def test_menu_dp_equals_brute_force_over_every_menu(n, n_options, seeds, objective):
    for seed in range(seeds):
        rng = random.Random(1000 * n + seed)
        costs = random_menu_costs(rng, n, n_options)
        predictions = [predict(costs, p) for p in all_placements(n, costs)]
        peaks = sorted(p.peak_bytes for p in predictions)
        for budget in (peaks[0] - 1, peaks[0], peaks[len(peaks) // 4], peaks[len(peaks) // 2],
                       peaks[-1]):
            dp, brute = optimal(costs, budget, objective), brute_force(costs, budget, objective)
            assert (dp is None) == (brute is None), (seed, budget)
            if dp is not None:  # the least cost, and among those the lowest peak
                assert (placement_cost(costs, dp.placement, objective), dp.peak_bytes) == (
                    placement_cost(costs, brute.placement, objective), brute.peak_bytes)
                assert dp.peak_bytes <= budget


def test_menu_policies_round_trip_through_the_vocabulary():
    costs = random_menu_costs(random.Random(3), 5, 3)
    for placement in list(all_placements(5, costs))[::37]:
        policy = placement_policy(placement)
        assert parse_policy(str(policy)) == policy
        assert predict(costs, str(policy)).placement == placement


@pytest.fixture(scope="module")
def gpt8():
    torch.manual_seed(0)
    model = TinyGPT(GPTConfig(n_layer=8, d_model=32, n_head=2, seq_len=16))
    return model, measure_costs(model, 2, menu=MENU)


def test_predicted_peak_and_recompute_are_the_meters_for_every_menu_of_two_blocks():
    torch.manual_seed(0)
    model = TinyGPT(GPTConfig(n_layer=2, d_model=64, n_head=4, seq_len=32))
    costs = measure_costs(model, 4, menu=MENU)
    assert len(costs.menu[0]) == 4  # three selective variants and offload
    batch = model.example_batch(4, generator=torch.Generator().manual_seed(0))
    for placement in all_placements(2, costs):
        policy, p = placement_policy(placement), predict(costs, placement)
        assert p.peak_bytes == measure_peaks(model, policy, 4)[1], policy
        assert p.recompute_flops == measure_recompute(model, batch, policy).flops, policy


def test_predicted_peak_is_the_meters_for_a_sample_of_menus_on_eight_blocks(gpt8):
    model, costs = gpt8
    rng = random.Random(8)
    kinds = [False, True, *costs.menu[0]]
    for _ in range(12):
        placement = tuple((k, k + 1, rng.choice(kinds)) for k in range(8))
        policy = placement_policy(placement)
        assert predict(costs, placement).peak_bytes == measure_peaks(model, policy, 2)[1], policy


def test_offload_is_priced_by_time_not_flops(gpt8):
    _, costs = gpt8
    none = predict(costs, "none").peak_bytes
    by_flops = optimal(costs, none - 1, "flops")
    assert "offload" not in str(by_flops.policy)
    assert predict(costs, "offload").host_bytes == 8 * costs.menu[0]["offload"].host_bytes > 0
    with pytest.raises(ValueError, match="times=True"):
        optimal(costs, none, "time")


# ---------------------------------------------------------------- nested recomputation
def _griewank_forward_steps(n: int, slots: int) -> int:
    """Griewank & Walther's minimal number of forward steps to reverse n steps with ``slots``
    checkpoints: r n - C(slots + r, slots + 1), r the least with C(slots + r, slots) >= n."""
    r = 0
    while math.comb(slots + r, slots) < n:
        r += 1
    return r * n - math.comb(slots + r, slots + 1)


UNIT = replace(LayerCost.simple(1, 0, 1), recompute_flops=0)  # its tape is its input


@pytest.mark.parametrize("n", [2, 3, 5, 8, 13, 32])
def test_nested_equals_griewanks_binomial_optimum_on_uniform_chains(n):
    """Stored inputs s = Griewank's s - 1 checkpoints + the one being reversed; the first sweep
    (n forwards, the last one taped) is the plain step, so recompute = t(n, s - 1) + 1 - n."""
    from ckpt_course.plan import nested_optimal

    costs = ChainCosts((UNIT,) * n)
    assert nested_optimal(costs, 1) is None
    for s in range(2, n + 1):
        best = nested_optimal(costs, s)
        assert best.recompute_flops == _griewank_forward_steps(n, s - 1) + 1 - n
        assert best.stored_bytes <= s


def test_nesting_reaches_below_the_single_level_minimum():
    from ckpt_course.plan import nested_optimal

    costs = ChainCosts((UNIT,) * 32)
    single = optimal_frontier(costs)[-1]  # the single-level minimum
    assert optimal(costs, single.peak_bytes - 1) is None
    stored = single.kept_bytes + 1  # the segment inputs + the block being reversed
    assert nested_optimal(costs, stored - 1) is not None
    nested = nested_optimal(costs, 2)
    assert nested is not None and nested.stored_bytes == 2 < stored
    assert parse_policy(str(nested.policy)) == nested.policy


@pytest.mark.parametrize("seed", range(8))
def test_nested_equals_brute_force_on_small_heterogeneous_chains(seed):
    from ckpt_course.plan import all_trees, nested_optimal, simulate_nested

    rng = random.Random(seed)
    n = rng.randint(2, 6)
    costs = ChainCosts(tuple(replace(LayerCost.simple(rng.randint(1, 9), 0, rng.randint(1, 9)),
                                     recompute_flops=rng.randint(0, 5)) for _ in range(n)))
    results = [simulate_nested(costs, t) for t in all_trees(0, n)]
    for budget in sorted({peak for peak, _ in results}):
        best = nested_optimal(costs, budget)
        assert best.recompute_flops == min(f for p, f in results if p <= budget)
        assert best.stored_bytes <= budget


def test_nested_policy_runs_and_recomputes_what_the_tree_predicts(gpt):
    from ckpt_course.plan import _fill, simulate_nested

    model, costs = gpt
    batch = model.example_batch(4, generator=torch.Generator().manual_seed(0))
    for policy in ("menu:0-3=full(0-1)", "menu:0-3=full(0-2(0-1))", "menu:0-3=full(1-2)"):
        tree = _fill(0, 4, tuple((a, b, c) for a, b, _, c in parse_policy(policy).items))
        assert measure_recompute(model, batch, policy).flops == simulate_nested(costs, tree)[1]
    torch.manual_seed(0)
    reference = TinyGPT(SMALL_GPT)
    nested = TinyGPT(SMALL_GPT)
    nested.load_state_dict(reference.state_dict())
    reference.loss(batch).backward()
    from ckpt_course.policies import applied
    with applied(nested, "menu:0-3=full(0-2(0-1))"):
        nested.loss(batch).backward()
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(reference.parameters(),
                                                           nested.parameters(), strict=True))


@pytest.mark.parametrize("seed", range(20))
def test_checkpointed_moments_in_prefix_sums_equal_the_event_walk(seed):
    """The DP prices every checkpointed segment [i, j) at once from prefix sums and running
    maxima; each must be segment_events' highest moment, term by term the same sums."""
    from ckpt_course.plan import _Chain, segment_events, segment_flops

    costs = random_costs(random.Random(seed), 9)
    chain = _Chain(costs, segment_flops)
    for i in range(costs.n):
        for left in (False, True):
            stops, tops, prices, _ = chain.ckpt[i, left]
            assert list(stops) == list(range(i + 1, costs.n + 1))
            for j, top, price in zip(stops, tops, prices, strict=True):
                seg = (i, int(j), True)
                assert top == max(e[0] for e in segment_events(costs, seg, left)), seg
                assert price == segment_flops(costs, seg)


def test_costs_too_large_for_int64_are_planned_exactly():
    """FLOPs of 10^20 (and offload priced above all recompute) overflow int64: the fronts fall
    back to Python integers and the answer is brute force's."""
    rng = random.Random(5)
    costs = random_menu_costs(rng, 4, 3)
    costs = replace(costs, layers=tuple(replace(c, forward_flops=c.forward_flops * 10**20,
                                                recompute_flops=c.recompute_flops * 10**20)
                                        for c in costs.layers))
    peaks = sorted(predict(costs, p).peak_bytes for p in all_placements(4, costs))
    for budget in (peaks[0], peaks[len(peaks) // 3], peaks[-1]):
        dp, brute = optimal(costs, budget, "flops"), brute_force(costs, budget, "flops")
        assert (placement_cost(costs, dp.placement, "flops"), dp.peak_bytes) == (
            placement_cost(costs, brute.placement, "flops"), brute.peak_bytes)


@pytest.mark.parametrize("seed", range(10))
def test_nested_tables_equal_the_recursion_when_inputs_have_one_size(seed):
    """Every transformer's block inputs have one size: nested_optimal then fills int64 tables
    room by room; they must give the memoised recursion's least recompute at every budget,
    with the first input counted or not (a batch made outside the meter)."""
    from ckpt_course.plan import _boundary_bytes, _nested_by_recursion, nested_optimal

    rng = random.Random(seed)
    n = rng.randint(2, 12)
    layers = tuple(replace(LayerCost.simple(3, 0, rng.randint(1, 9)),
                           recompute_flops=rng.randint(0, 5)) for _ in range(n))
    costs = ChainCosts(layers, TrunkCost(input_counted=seed % 2 == 0))
    x = [_boundary_bytes(costs, k) for k in range(n)]
    for budget in range(1, sum(x) + 4):
        fast, slow = nested_optimal(costs, budget), _nested_by_recursion(costs, budget, x)
        assert (fast is None) == (slow is None), budget
        if fast is not None:
            assert fast.recompute_flops == slow.recompute_flops, budget
            assert fast.stored_bytes <= budget
            assert simulate_nested(costs, fast.tree) == (fast.stored_bytes,
                                                         fast.recompute_flops)
