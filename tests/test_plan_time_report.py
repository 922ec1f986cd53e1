"""The plan reports time as the time model predicts it, the median, with the spread of the
measurements next to it, while the time objective still prices each option at its high end
(median + spread: an option wins only by more than the noise). All on GIVEN timings."""

import pytest

from ckpt_course.costs import ChainCosts, LayerCost, OptionCost
from ckpt_course.plan import block_table, make_plan, placement_cost, predict

MS = 1e-3
# per block: measured seconds (medians) and their spreads, none / full / one menu option
TIMES = ({"none": 1.0 * MS, "full": 1.5 * MS, "offload": 1.2 * MS},
         {"none": 2.0 * MS, "full": 2.25 * MS, "offload": 1.9 * MS},  # offload: noise below
         {"none": 1.0 * MS, "full": 1.75 * MS, "offload": 1.1 * MS})
SPREADS = ({"none": 0.01 * MS, "full": 0.02 * MS, "offload": 0.03 * MS},
           {"none": 0.04 * MS, "full": 0.05 * MS, "offload": 0.06 * MS},
           {"none": 0.0, "full": 0.1 * MS, "offload": 0.02 * MS})


def timed_chain(spreads=SPREADS) -> ChainCosts:
    block = LayerCost.simple(4, 2, 1)
    menu = ({"offload": OptionCost(LayerCost.simple(4, 0, 1), 0, 6)},) * 3
    return ChainCosts((block,) * 3, menu=menu, times=TIMES, spreads=spreads)


def test_a_prediction_carries_the_median_and_the_spread_apart():
    costs = timed_chain()
    both = predict(costs, "menu:0-1=full,2=offload")
    # blocks 0 and 1 under full, block 2 offloaded: medians and spreads each added up
    assert both.extra_time_s == pytest.approx((0.5 + 0.25 + 0.1) * MS)
    assert both.extra_time_spread_s == pytest.approx((0.03 + 0.09 + 0.02) * MS)
    faster = predict(costs, "menu:1=offload")  # a median below plain is reported as measured
    assert faster.extra_time_s == pytest.approx(-0.1 * MS)
    assert faster.extra_time_spread_s == pytest.approx(0.1 * MS)
    plain = predict(costs, "none")
    assert (plain.extra_time_s, plain.extra_time_spread_s) == (0, 0)


def test_the_objective_still_prices_the_high_end_and_never_below_one_nanosecond():
    costs = timed_chain()
    assert placement_cost(costs, "menu:0-1=full,2=offload", "time") == (
        round((0.5 + 0.03) * 1e6) + round((0.25 + 0.09) * 1e6) + round((0.1 + 0.02) * 1e6))
    assert placement_cost(costs, "menu:1=offload", "time") == 1  # -0.1 + 0.1 ms: noise
    assert placement_cost(timed_chain(spreads=()), "segments:0", "time") == round(0.5e6)


def test_the_plan_table_and_report_show_median_and_spread_separately():
    costs = timed_chain()
    plan = make_plan(costs, predict(costs, "full").peak_bytes, "time")
    full = next(r for r in plan.table() if r["policy"] == "full")
    assert full["extra_time_s"] == pytest.approx((0.5 + 0.25 + 0.75) * MS)
    assert full["extra_time_spread_s"] == pytest.approx((0.03 + 0.09 + 0.1) * MS)
    assert "1.50 ± 0.22 ms" in str(plan)
    rows = block_table(costs, predict(costs, "menu:0-1=full,2=offload"))
    assert [(r["extra_time_s"], r["extra_time_spread_s"]) for r in rows] == [
        pytest.approx(((0.5 + 0.25) * MS, 0.12 * MS)), pytest.approx((0.1 * MS, 0.02 * MS))]


def test_untimed_costs_report_no_time():
    costs = ChainCosts((LayerCost.simple(4, 2, 1),) * 3)
    p = predict(costs, "full")
    assert (p.extra_time_s, p.extra_time_spread_s) == (None, None)
    assert "spread" not in str(make_plan(costs, p.peak_bytes))
