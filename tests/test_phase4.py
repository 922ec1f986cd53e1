"""Checks of phase 4: right answers pass, wrong ones fail with a hint that teaches and does not
contain the answer."""

import pytest
import torch

from ckpt_course.checks import CheckFailed, phase4
from ckpt_course.models import GPTConfig, TinyGPT
from ckpt_course.plan import Segments, measure_costs, optimal, predict


def right_state(model):
    params = list(model.parameters())
    return 8 * sum(p.numel() for p in params) + 4 * len(params)


def test_adamw_state_right_and_wrong(capsys):
    phase4.adamw_state(right_state)
    assert "Correct" in capsys.readouterr().out
    with pytest.raises(CheckFailed, match="too few bytes") as error:
        phase4.adamw_state(lambda m: 8 * sum(p.numel() for p in m.parameters()))
    assert "optimizer.state[p]" in str(error.value)
    with pytest.raises(CheckFailed, match="too many bytes"):
        phase4.adamw_state(lambda m: 2 * right_state(m))


def right_recompute(placement, layers):
    total = 0
    for start, stop, ckpt in placement:
        if ckpt:
            total += sum(c.forward_flops for c in layers[start:stop - 1])
            total += layers[stop - 1].recompute_flops
    return total


def test_recompute_right_and_wrong():
    phase4.recompute_flops(right_recompute)

    def whole_forward(placement, layers):
        return sum(c.forward_flops for a, b, ckpt in placement if ckpt for c in layers[a:b])

    with pytest.raises(CheckFailed, match="stops as soon as the last saved tensor") as error:
        phase4.recompute_flops(whole_forward)
    assert "FLOP" not in str(error.value)  # no numbers
    with pytest.raises(CheckFailed, match="re-runs the forward"):
        phase4.recompute_flops(lambda placement, layers: 1)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = TinyGPT(GPTConfig(n_layer=6, d_model=64, n_head=2, seq_len=32))
    costs = measure_costs(model, 4)
    full, every2 = predict(costs, "full"), predict(costs, "every-2")
    budget = full.peak_bytes + (every2.peak_bytes - full.peak_bytes) // 2
    return model, costs, budget, optimal(costs, budget)


def test_capstone_passes_the_optimum(setup, capsys):
    model, costs, budget, best = setup
    phase4.capstone(lambda: best.policy, model, budget, 4)
    assert "(yours)" in capsys.readouterr().out
    phase4.capstone(lambda: str(best.policy), model, budget, 4)  # text works too


def test_capstone_rejects_full_for_its_recompute_without_giving_the_answer(setup):
    model, costs, budget, best = setup
    assert predict(costs, "full").recompute_flops > 1.1 * best.recompute_flops  # a real test
    with pytest.raises(CheckFailed, match="fits, but recomputes") as error:
        phase4.capstone(lambda: "full", model, budget, 4)
    hint = str(error.value)
    assert str(best.policy) not in hint and f"{best.overhead:.1%}" not in hint
    assert "which block's tape is freed first in backward" in hint


def test_capstone_rejects_a_policy_that_does_not_fit(setup):
    model, costs, budget, best = setup
    with pytest.raises(CheckFailed, match="ran out of memory in step") as error:
        phase4.capstone(lambda: Segments(((0, 1),)), model, budget, 4)
    assert str(best.policy) not in str(error.value)


def test_capstone_stub_fails_with_not_implemented(setup):
    model, costs, budget, best = setup

    def stub():
        raise NotImplementedError("Exercise 4.3-capstone")

    with pytest.raises(NotImplementedError):
        phase4.capstone(stub, model, budget, 4)
