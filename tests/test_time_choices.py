"""Choices by time are robust to noise: on GIVEN rounds and spreads (no clock is read), an
option wins only by more than its measured spread, and a load that slows every option of a
round alike does not count as spread."""

from dataclasses import replace

import pytest
import torch

from ckpt_course.costs import MENU, measure_costs, medians_and_spreads
from ckpt_course.models import GPTConfig, TinyGPT
from ckpt_course.plan import optimal, predict

NONE = [1.0e-3, 2.0e-3, 1.2e-3, 3.0e-3, 1.1e-3]  # plain, under a load that comes and goes


def test_a_load_shared_by_a_round_cancels_in_the_difference():
    full = [t + d for t, d in zip(NONE, [3.0e-4, 3.1e-4, 2.9e-4, 3.0e-4, 3.2e-4], strict=True)]
    times, spreads = medians_and_spreads({"none": NONE, "full": full})
    assert times["none"] == pytest.approx(1.2e-3)  # the median of plain's rounds
    assert times["full"] == pytest.approx(1.2e-3 + 3.0e-4)  # plus the median difference
    assert spreads["none"] == 0  # plain's noise is in each option's difference
    assert spreads["full"] < 2e-5  # the differences agree; the rounds themselves do not
    alone, alone_spreads = medians_and_spreads({"full": full})
    assert alone_spreads["full"] > 4e-4  # without plain to pair with: the load is spread


def test_without_plain_each_option_is_its_own_median_and_half_interquartile_range():
    times, spreads = medians_and_spreads({"full": [1.0, 2.0, 3.0, 4.0, 5.0]})
    assert times == {"full": 3.0}
    assert spreads == {"full": pytest.approx((4.5 - 1.5) / 2)}  # quartiles 1.5 and 4.5


def test_one_round_has_no_spread():
    times, spreads = medians_and_spreads({"none": [1.0], "full": [1.5]})
    assert times == {"none": 1.0, "full": 1.5} and spreads == {"none": 0, "full": 0}


@pytest.fixture(scope="module")
def gpt4_menu():
    torch.manual_seed(0)
    model = TinyGPT(GPTConfig(n_layer=2, d_model=32, n_head=2, seq_len=64))
    return measure_costs(model, 4, menu=MENU)


def _chosen(costs, rounds) -> set:
    """The kinds the time objective places at a budget both full and offload fit, every block
    measured with the given rounds."""
    budget = max(predict(costs, "full").peak_bytes, predict(costs, "offload").peak_bytes)
    times, spreads = medians_and_spreads(rounds)
    timed = replace(costs, times=(times,) * costs.n, spreads=(spreads,) * costs.n)
    return {kind for _, _, kind in optimal(timed, budget, "time").placement}


def _rounds(costs, offload_over_none) -> dict[str, list[float]]:
    """Given rounds: full always 0.30 ms over plain, every other menu option 1 ms over,
    offload over plain by ``offload_over_none`` in each round."""
    menu = {o for m in costs.menu for o in m} - {"offload"}
    rounds = {"none": NONE, "full": [t + 3e-4 for t in NONE]}
    rounds.update({o: [t + 1e-3 for t in NONE] for o in menu})
    rounds["offload"] = [t + d for t, d in zip(NONE, offload_over_none, strict=True)]
    return rounds


@pytest.mark.slow  # measures a 2-block GPT's menu once (a few seconds)
def test_offload_wins_when_it_is_faster_than_full_by_more_than_its_spread(gpt4_menu):
    steady = [2.5e-4, 2.5e-4, 2.6e-4, 2.4e-4, 2.5e-4]  # 0.05 ms faster than full, +-0.005
    assert _chosen(gpt4_menu, _rounds(gpt4_menu, steady)) == {"offload"}


@pytest.mark.slow
def test_offload_loses_when_its_lead_is_within_its_spread(gpt4_menu):
    noisy = [2.5e-4, 0.5e-4, 4.5e-4, 2.0e-4, 3.0e-4]  # the same median lead, +-0.1 ms
    chosen = _chosen(gpt4_menu, _rounds(gpt4_menu, noisy))
    assert "offload" not in chosen and True in chosen  # full: checkpointed segments
