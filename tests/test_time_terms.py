"""The time model's terms on GIVEN measurements: each term is priced as the model says, from
numbers written here (no clock is read)."""

from collections import Counter

import pytest

from ckpt_course.timing import (
    BlockTrial,
    OpTimes,
    Recomputed,
    StepProfile,
    block_trial,
    clock_fn,
    median_error,
    predict,
    profile_step,
    recomputed,
)

MM = ("aten.mm", ((8, 4), (4, 4)))
GELU = ("aten.gelu", ((8, 4),))
GELU_BACK = ("aten.gelu_backward", ((8, 4), (8, 4)))
NEW = ("aten.cos", ((8, 4),))  # an op the plain step never ran


def profile(step_s=1.0) -> StepProfile:
    """A plain step: forward ran mm twice (4 ms in all) and gelu once (1 ms); backward ran
    gelu_backward once (3 ms). 10 ms of forward, 3 ops: 5 ms outside the ops."""
    forward = OpTimes(Counter({MM: 2, GELU: 1}), {MM: 0.004, GELU: 0.001})
    backward = OpTimes(Counter({GELU_BACK: 1}), {GELU_BACK: 0.003})
    return StepProfile(forward, backward, forward_s=0.010, backward_s=0.020, optimizer_s=0.0,
                       step_s=step_s)


def test_an_op_costs_its_forward_time_else_its_backward_time_else_nothing():
    p = profile()
    assert p.op_seconds(MM) == pytest.approx(0.002)  # 4 ms over 2 calls
    assert p.op_seconds(GELU) == pytest.approx(0.001)
    assert p.op_seconds(GELU_BACK) == pytest.approx(0.003)
    assert p.op_seconds(NEW) == 0.0


def test_a_checkpoint_prices_its_ops_and_its_trials_residual_per_recomputed_op():
    # the trial block re-ran one mm and one gelu (3 ms at the profile's times) and took 7 ms
    # more than plain: 4 ms of mechanism over 2 recomputed ops, 2 ms per op
    trial = BlockTrial(extra_s=0.007, recomputed=Counter({MM: 1, GELU: 1}), ops=5)
    what = Recomputed("full", Counter({MM: 3, GELU: 3}), 0, 0, trial=trial)
    pred = predict(profile(), what)
    assert pred.op_seconds == pytest.approx({"aten.mm": 0.006, "aten.gelu": 0.003,
                                             "checkpoint overhead": 0.012})
    assert pred.copy_s == 0 and pred.extra_s == pytest.approx(0.021)
    assert pred.ratio == pytest.approx(1.021)


def test_selective_prices_its_trials_residual_per_op_of_its_regions():
    # the trial block (10 ops, one gelu re-run: 1 ms) took 6 ms more: 5 ms over 10 ops
    trial = BlockTrial(extra_s=0.006, recomputed=Counter({GELU: 1}), ops=10)
    what = Recomputed("selective:save=mm", Counter({GELU: 4}), 0, 0, region_ops=40,
                      trial=trial)
    pred = predict(profile(), what)
    assert pred.op_seconds == pytest.approx({"aten.gelu": 0.004,
                                             "selective bookkeeping": 0.020})


def test_offload_prices_its_trials_time_per_byte_moved():
    # the trial block moved 1,000 bytes in 2 ms more than plain; the step moves 4,000
    trial = BlockTrial(extra_s=0.002, recomputed=Counter(), ops=10, bytes_moved=1000)
    what = Recomputed("offload", Counter(), 4000, 8, trial=trial)
    pred = predict(profile(), what)
    assert pred.copy_s == pytest.approx(0.008) and pred.recompute_s == 0


def test_a_trial_faster_than_its_ops_prices_no_negative_mechanism():
    # noise: the block under the policy ran only 1 ms slower, less than its re-run mm (2 ms)
    trial = BlockTrial(extra_s=0.001, recomputed=Counter({MM: 1}), ops=5)
    assert trial.residual_s(profile()) == 0.0
    pred = predict(profile(), Recomputed("full", Counter({MM: 4}), 0, 0, trial=trial))
    assert pred.op_seconds == pytest.approx({"aten.mm": 0.008, "checkpoint overhead": 0.0})


def test_no_policy_adds_nothing():
    pred = predict(profile(step_s=0.5), Recomputed("none", Counter(), 0, 0))
    assert pred.extra_s == 0 and pred.ratio == 1 and pred.plain_s == 0.5


def test_per_op_overhead_is_forwards_time_outside_its_ops():
    assert profile().overhead_per_op_s == pytest.approx((0.010 - 0.005) / 3)


def test_a_clock_is_wall_or_cpu_and_a_wrong_one_is_refused_before_any_work():
    assert clock_fn("wall") is not clock_fn("cpu")
    for measure in (lambda: profile_step(None, None, clock="gpu"),  # no model needed:
                    lambda: recomputed(None, None, "full", clock="gpu"),  # refused first
                    lambda: block_trial(None, None, "full", clock="gpu")):
        with pytest.raises(ValueError, match="clock is 'wall' or 'cpu', not 'gpu'"):
            measure()


def test_a_count_of_rounds_below_one_is_refused_before_any_work():
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        profile_step(None, None, rounds=0)
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        block_trial(None, None, "full", repeats=0)


def test_the_mechanisms_standard_error_scales_to_the_step_like_its_price():
    # a trial whose median difference may be off by 1 ms: four blocks' worth may be off by 4 ms
    trial = BlockTrial(extra_s=0.007, recomputed=Counter({MM: 1, GELU: 1}), ops=5,
                       error_s=0.001)
    pred = predict(profile(), Recomputed("full", Counter({MM: 4, GELU: 4}), 0, 0, trial=trial))
    assert pred.error_s == pytest.approx(0.004)
    offload = BlockTrial(extra_s=0.002, recomputed=Counter(), ops=10, bytes_moved=1000,
                         error_s=0.0005)
    pred = predict(profile(), Recomputed("offload", Counter(), 3000, 6, trial=offload))
    assert pred.error_s == pytest.approx(0.0015)
    assert predict(profile(), Recomputed("none", Counter(), 0, 0)).error_s == 0


def test_the_standard_error_of_a_median_comes_from_the_interquartile_range():
    # quartiles of 1..9 (exclusive method): 2.5 and 7.5; sigma ~ 5 / 1.349
    assert median_error([1.0, 2, 3, 4, 5, 6, 7, 8, 9]) == pytest.approx(
        1.2533 * 5 / 1.349 / 3)
    assert median_error([3.0] * 9) == 0 and median_error([1.0]) == 0
    # one wild round (a machine stalled) moves it no more than any other large round
    assert median_error([1.0, 2, 3, 4, 5, 6, 7, 8, 900]) == median_error(
        [1.0, 2, 3, 4, 5, 6, 7, 8, 9])
