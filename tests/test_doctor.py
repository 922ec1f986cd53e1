"""The OOM doctor on CPU: it finds the OOM (step 2, thanks to AdamW's state), says where and
why, prescribes the cheapest fix with the planner, and the fix fits when run again."""

import argparse

import pytest
import torch

from ckpt_course.cli import add_doctor_arguments, run_doctor
from ckpt_course.doctor import doctor, prescribe, run_steps
from ckpt_course.models import GPTConfig, TinyGPT
from ckpt_course.plan import measure_costs, predict
from ckpt_course.units import KiB, MiB, fmt_bytes

CFG = GPTConfig(n_layer=4, d_model=64, n_head=4, seq_len=32)
BATCH = 4


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return TinyGPT(CFG)


@pytest.fixture(scope="module")
def costs(model):
    return measure_costs(model, BATCH)


def test_steps_without_budget_peak_where_the_planner_says(model, costs):
    run = run_steps(model, None, "none", BATCH, steps=2)
    assert run.fits and run.steps[1].peak_bytes == predict(costs, "none").peak_bytes
    # step 1 has no optimizer state during forward and backward: its peak is the optimizer step
    assert run.steps[0].peak_phase == "optimizer" and run.steps[0].optimizer_state_bytes == 0
    assert run.steps[1].optimizer_state_bytes == costs.optimizer_bytes
    assert run.steps[1].peak_bytes - run.steps[0].peak_bytes > 0


def test_doctor_finds_a_step_two_oom_prescribes_a_policy_and_verifies_it(model, costs):
    budget = 4.5 * MiB  # above step 1's peak, below step 2's
    report = doctor(model, budget, BATCH, timing=False)
    oom = report.run.oom
    assert oom.step == 2 and len(report.run.steps) == 1
    assert oom.live_bytes + oom.tried_bytes > budget >= oom.live_bytes
    assert oom.breakdown["optimizer state"] == costs.optimizer_bytes
    assert oom.phase == "forward" and oom.layer == "blocks.3" and oom.module.startswith("blocks.3.")
    assert set(oom.by_layer) >= {"blocks.0", "blocks.1", "blocks.2"}
    text = str(report)
    assert "Why step 2 and not step 1: AdamW made its state" in text
    fix = report.fix
    assert fix.kind == "policy" and fix.policy.startswith(("segments:", "menu:"))
    ver = report.verification
    assert ver.run.fits and len(ver.run.steps) == 3
    assert ver.run.peak_bytes == fix.predicted.peak_bytes <= budget
    assert ver.recompute_flops == ver.predicted_recompute_flops > 0
    assert "With the fix, 3 steps fit" in text


def test_backward_oom_is_attributed_to_the_module_running(model, costs):
    full = predict(costs, "full")
    budget = full.peak_bytes - 1  # the checkpointed step fails at its own peak
    run = run_steps(model, budget, "full", BATCH, steps=2)
    assert run.oom.step == 2 and run.oom.phase == "backward"
    assert run.oom.layer == f"blocks.{full.block}"


def test_no_placement_fits_so_micro_batches_with_accumulation(model, costs):
    budget = 4 * MiB  # below every placement's peak, above the optimizer step
    assert predict(costs, "full").peak_bytes > budget
    fix = prescribe(model, budget, BATCH)
    assert fix.kind == "micro-batch" and fix.micro_batches in (2, 4)
    assert "gradients accumulated" in str(fix)
    run = run_steps(model, budget, fix.policy, BATCH, steps=2, micro_batches=fix.micro_batches)
    assert run.fits and run.peak_bytes == fix.predicted.peak_bytes


def test_optimizer_step_alone_over_budget_means_shard(model):
    fix = prescribe(model, 3.5 * MiB, BATCH)
    assert fix.kind == "shard" and fix.devices == 2
    assert "The optimizer step alone needs" in str(fix)


def test_budget_below_the_parameters_recommends_sharding_or_offload_with_numbers(model):
    report = doctor(model, 800 * KiB, BATCH, timing=False)
    assert report.run.oom.step == 1 and report.verification is None
    text = str(report.fix)
    params = sum(p.nbytes for p in model.parameters())
    assert f"The parameters alone need {fmt_bytes(params)}" in text
    assert f"budget {fmt_bytes(800 * KiB)}" in text
    assert "offload parameters and optimizer state" in text


def test_fitting_setup_needs_no_fix(model):
    report = doctor(model, 100 * MiB, BATCH, timing=False)
    assert report.run.fits and report.fix is None and "No out-of-memory error" in str(report)


def parser():
    p = argparse.ArgumentParser(prog="doctor")
    add_doctor_arguments(p)
    return p


def test_doctor_command(capsys):
    args = parser().parse_args(["--model", "gpt", "--layers", "2", "--batch", "4", "--seq", "32",
                                "--budget", "8MiB", "--steps", "2", "--no-timing"])
    assert run_doctor(args) == 0
    out = capsys.readouterr().out
    assert "DIAGNOSIS" in out and "PRESCRIPTION" in out and "With the fix, 2 steps fit" in out


@pytest.mark.parametrize("argv, message", [
    (["--budget", "plenty"], "not understood"),
    (["--budget", "0MiB"], "positive"),
    (["--budget", "1MiB", "--model", "gpt-9"], "invalid choice"),
])
def test_doctor_command_rejects_bad_input(argv, message, capsys):
    with pytest.raises(SystemExit):
        parser().parse_args(argv)
    assert message in capsys.readouterr().err


def test_the_budget_is_parsed_once_where_it_enters(model, monkeypatch):
    """The doctor parses its budget and hands bytes down: running the steps, prescribing
    (the planner, sharding) and verifying never parse it again."""
    from ckpt_course import doctor as doctor_module
    from ckpt_course import plan, sharding
    from ckpt_course.meter import parse_budget

    parsed = []

    def counting(budget):
        parsed.append(budget)
        return parse_budget(budget)

    for module in (doctor_module, plan, sharding):
        monkeypatch.setattr(module, "parse_budget", counting)
    report = doctor(model, "4.5MiB", BATCH, timing=False)
    assert report.fix.kind == "policy" and report.verification.run.fits
    assert parsed == ["4.5MiB"]


def test_the_step_time_is_printed_with_its_round_by_round_spread(model, monkeypatch):
    """Given step times (no clock): the ratio is median over median, and every round's ratio
    bounds the printed range, so a learner sees how much the clock moved."""
    import ckpt_course.doctor as doctor_module

    given = ([1.0, 1.2, 0.9, 1.1, 1.0], [1.3, 1.9, 1.2, 1.4, 1.3])
    monkeypatch.setattr(doctor_module, "step_times", lambda *a, **k: given)
    report = doctor(model, 4.5 * MiB, BATCH, timing=True)
    ver = report.verification
    assert ver.step_time_ratio == pytest.approx(1.3 / 1.0)
    assert ver.step_time_range == pytest.approx((1.4 / 1.1, 1.9 / 1.2))  # least, most
    assert "Step time: 1.30x the plain step" in str(report)
    assert "round by round 1.27x to 1.58x" in str(report)


def test_the_sharded_share_counts_gradients_too(capsys):
    """Parameters, gradients and optimizer state split over N devices: the share printed is all
    three over N (it once left the gradients out)."""
    run_doctor(parser().parse_args(["--budget", "5MiB", "--model", "gpt", "--layers", "2",
                                    "--batch", "2", "--no-timing", "--steps", "1"]))
    out = capsys.readouterr().out
    costs = measure_costs(TinyGPT(GPTConfig(n_layer=2)), 2)
    grads = costs.gradient_bytes + costs.trunk.grad_bytes
    state = costs.param_bytes + grads + costs.optimizer_bytes
    n = int(out.split("optimizer state over ")[1].split()[0])
    assert f"each keeps {fmt_bytes(state / n)} of them" in out
