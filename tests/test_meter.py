"""MemoryMeter: exact live bytes, categories, budget, timeline. CPU, small, exact."""

import math
import re

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from ckpt_course.meter import CATEGORIES, MemoryMeter, parse_budget, time_average
from ckpt_course.models import HandTraceNet
from ckpt_course.units import GiB, KiB, MiB

PARAM_BYTES = 4 * (512 * 512 + 512) * 4  # 4 x Linear(512, 512) weight + bias, fp32


def test_a_tensor_counts_once_views_are_free_and_frees_are_seen():
    with MemoryMeter() as meter:
        a = torch.empty(512, 512)  # 512 * 512 * 4 bytes
        assert meter.live_bytes == MiB
        view = a[:, :256].t()  # shares a's storage
        assert meter.live_bytes == MiB
        del a  # the view keeps the storage alive
        assert meter.live_bytes == MiB
        del view
        assert meter.live_bytes == 0
    assert meter.peak_bytes == MiB
    assert meter.peak_op == "aten.empty.memory_format"
    assert meter.breakdown()["temporaries"] == 0


def test_outputs_that_are_not_new_tensors_are_skipped():
    a, b = torch.ones(256), torch.ones(256)
    ln_in = torch.randn(4, 8)
    mean, rstd = ln_in.mean(1, keepdim=True), 1 / ln_in.std(1, keepdim=True)
    with MemoryMeter() as meter:
        pieces = a.split(64)  # a tuple of views of a: counts a's storage once
        assert meter.live_bytes == 1024
        assert isinstance(a.sum().item(), float)  # item() returns a number: nothing to count
        assert meter.live_bytes == 1024
        total = torch._foreach_add([a, b], 1.0)  # a list of two new tensors
        assert meter.live_bytes == 1024 + 2 * 1024
        torch._foreach_add_(total, 1.0)  # in place, returns None
        grad_in, no_w, no_b = torch.ops.aten.native_layer_norm_backward(
            ln_in, ln_in, [8], mean, rstd, None, None, [True, False, False])
        assert no_w is None and no_b is None  # (tensor, None, None)
        assert meter.live_bytes == 3 * 1024 + 4 * 8 * 4  # + grad_in (ln_in is only an input)
        del pieces, total, grad_in
    assert meter.live_bytes == 1024  # a is still alive here


def test_hand_trace_forward_keeps_exactly_five_mib():
    model = HandTraceNet()
    batch = model.example_batch(512)
    meter = MemoryMeter().track(model)
    before = meter.live_bytes
    with meter, meter.phase("forward"):
        loss = model.loss(batch)
    # The meter counts op outputs only: x and y were made outside and are never an op's output
    # (addmm reads x, mse_loss reads y), so they are not counted. Each block makes addmm -> 1 MiB,
    # then relu -> 1 MiB; ReLU saves its output, the next addmm saves that same tensor, so the
    # addmm output dies and 4 relu outputs stay (4 MiB; the last one is saved by mse_loss).
    # On CPU, mse_loss's scalar keeps its 512x512 elementwise buffer as storage: +1 MiB.
    assert loss.untyped_storage().nbytes() == MiB
    assert meter.live_bytes - before == 4 * MiB + MiB
    assert meter.breakdown()["activations"] == 5 * MiB
    assert meter.breakdown()["parameters"] == PARAM_BYTES == before


def test_fake_tensors_count_the_same_without_memory_but_not_the_cpu_loss_buffer():
    with FakeTensorMode():
        model = HandTraceNet()
        batch = model.example_batch(512)
        meter = MemoryMeter().track(model)
        with meter, meter.phase("forward"):
            loss = model.loss(batch)
    assert loss.untyped_storage().nbytes() == 4
    # The same 4 relu outputs; the fake (meta) mse_loss returns a true 4-byte scalar.
    assert meter.breakdown()["activations"] == 4 * MiB + 4
    assert meter.breakdown()["parameters"] == PARAM_BYTES


def test_training_step_categories_are_exact():
    model = HandTraceNet()
    optimizer = torch.optim.AdamW(model.parameters())
    batch = model.example_batch(512)
    meter = MemoryMeter().track(model, optimizer)
    with meter:
        with meter.phase("forward"):
            loss = model.loss(batch)
        with meter.phase("backward"):
            loss.backward()
        del loss
        after_backward = meter.breakdown()
        with meter.phase("optimizer"):
            optimizer.step()
        after_step = meter.breakdown()
        optimizer.zero_grad(set_to_none=True)
    assert after_backward == {"parameters": PARAM_BYTES, "gradients": PARAM_BYTES,
                              "optimizer state": 0, "activations": 0, "temporaries": 0}
    # AdamW keeps exp_avg and exp_avg_sq per parameter, plus a float32 `step` per tensor (8).
    assert after_step["optimizer state"] == 2 * PARAM_BYTES + 8 * 4
    assert after_step["gradients"] == PARAM_BYTES
    assert after_step["temporaries"] == after_step["activations"] == 0
    assert meter.breakdown()["gradients"] == 0
    assert meter.live_bytes == PARAM_BYTES + 2 * PARAM_BYTES + 8 * 4
    assert sum(meter.peak_breakdown.values()) == meter.peak_bytes
    assert meter.peak_phase == "optimizer"  # the first step also allocates the state

    # A new meter finds all of it already there; the hooks of the old one come off.
    meter.untrack()
    again = MemoryMeter().track(model, optimizer)
    assert again.breakdown() == meter.breakdown()


def test_untrack_leaves_gradients_as_temporaries():
    model = HandTraceNet(width=64, depth=2)
    meter = MemoryMeter().track(model)
    meter.untrack()
    with meter, meter.phase("backward"):
        model.loss(model.example_batch(8)).backward()
    assert meter.breakdown()["gradients"] == 0
    assert meter.breakdown()["temporaries"] >= 2 * (64 * 64 + 64) * 4


def test_budget_refuses_the_allocation_and_recovers():
    model = HandTraceNet()
    batch = model.example_batch(512)
    outer = MemoryMeter().track(model)  # a second meter under it sees whether tensors really die
    meter = MemoryMeter().track(model)
    baseline = meter.live_bytes
    meter.budget = baseline + 2.5 * MiB
    with outer, meter:
        try:
            with meter.phase("forward"):
                model.loss(batch)
        except torch.OutOfMemoryError as error:  # the name is unbound when the block ends
            message, kind = str(error), type(error)
            # relu of block 2 failed: relu 1's output and addmm 2's output are held by the
            # frames in the traceback, the refused 1 MiB is gone (the outer meter saw it die).
            assert meter.live_bytes == outer.live_bytes == baseline + 2 * MiB
        assert meter.live_bytes == outer.live_bytes == baseline
    assert kind is torch.cuda.OutOfMemoryError  # one class, as on CUDA
    assert "Tried to allocate 1.00 MiB (aten.relu.default in forward)" in message
    assert "Budget 6.51 MiB; 6.01 MiB already in use" in message
    assert "(parameters 4.01 MiB, activations 2.00 MiB)" in message
    assert "checkpoint policy" in message
    assert meter.peak_bytes <= meter.budget

    meter.budget = baseline + 16 * MiB  # a bigger budget: the step runs
    with meter:
        with meter.phase("forward"):
            model.loss(batch).backward()
    assert meter.breakdown()["gradients"] == PARAM_BYTES


def test_out_of_memory_in_backward_then_a_smaller_batch_fits():
    model = HandTraceNet()
    big, small = model.example_batch(512), model.example_batch(64)
    meter = MemoryMeter(budget=PARAM_BYTES + 6 * MiB).track(model)
    baseline = meter.live_bytes
    with meter:
        with meter.phase("forward"):
            loss = model.loss(big)  # 5 MiB: fits
        with pytest.raises(torch.OutOfMemoryError, match="in backward"):
            with meter.phase("backward"):
                loss.backward()  # gradients (4 MiB) on top of activations do not
        del loss
        model.zero_grad(set_to_none=True)
        assert meter.live_bytes == baseline

        with meter.phase("forward"):
            loss = model.loss(small)  # 1/8 of the activations
        with meter.phase("backward"):
            loss.backward()
    assert meter.breakdown()["gradients"] == PARAM_BYTES


@pytest.mark.parametrize("bad", [0, -MiB, math.nan, math.inf, "lots", "-5MiB"])
def test_bad_budget_values_say_what_is_accepted(bad):
    with pytest.raises(ValueError, match="positive number of bytes or a size such as '64MiB'"):
        MemoryMeter(budget=bad)


@pytest.mark.parametrize("bad", [True, [MiB], torch.tensor(1.0)])
def test_bad_budget_types_say_what_is_accepted(bad):
    with pytest.raises(TypeError, match="positive number of bytes"):
        MemoryMeter(budget=bad)


def test_budget_strings():
    assert parse_budget("64MiB") == 64 * MiB
    assert parse_budget("1.5 GiB") == 1.5 * GiB
    assert parse_budget(4096) == 4096
    assert MemoryMeter(budget="2KiB").budget == 2048
    assert MemoryMeter().budget is None


@pytest.mark.parametrize("text, size", [
    ("80GB", 80 * 10**9), ("300 kB", 300 * 10**3), ("2 mb", 2 * 10**6), ("1TB", 10**12),
    ("3gib", 3 * GiB), ("64MIB", 64 * MiB), ("1_000_000_000", 10**9), ("3e5", 300_000),
    ("2.5e3KiB", 2500 * KiB), ("1e-3GiB", GiB // 1000), ("5e-1 MB", 500_000)])
def test_budget_strings_as_people_write_them(text, size):
    """Decimal units are their SI size (a card's "80GB"); binary ones in any case."""
    assert parse_budget(text) == size


@pytest.mark.parametrize("text, says", [
    ("1,5GiB", "not understood"), ("0x40000000", "not understood"),
    ("80 GiBs", "not understood"), ("-1M", "positive"), ("1e-9GiB", "is 1.07374 B")])
def test_budget_strings_that_are_refused(text, says):
    with pytest.raises(ValueError, match=says) as err:
        parse_budget(text)
    assert "\n" not in str(err.value) and re.search(r"'64[MG]iB'", str(err.value))


@pytest.mark.parametrize("text, means", [("1M", "'1MiB'.*'1MB'"), ("2 k", "'2KiB'.*'2KB'"),
                                         ("1.5g", "'1.5GiB'.*'1.5GB'")])
def test_a_unit_without_b_gets_both_readings(text, means):
    with pytest.raises(ValueError, match=means) as err:
        parse_budget(text)
    assert "\n" not in str(err.value)


def test_unknown_phase_names_the_phases():
    with pytest.raises(ValueError, match="forward, backward, optimizer"):
        with MemoryMeter().phase("fwd"):
            pass


def test_timeline_rises_through_forward_and_falls_through_backward():
    model = HandTraceNet()
    batch = model.example_batch(512)
    meter = MemoryMeter(timeline=True).track(model)
    with meter:
        with meter.phase("forward"):
            loss = model.loss(batch)
        with meter.phase("backward"):
            loss.backward()
            del loss
    points = meter.timeline
    forward = [p.live_bytes for p in points if p.phase == "forward"]
    peak = max(range(len(points)), key=lambda i: points[i].live_bytes)
    assert forward[-1] == max(forward) == PARAM_BYTES + 5 * MiB
    assert points[peak].phase == "backward" and 0 < peak < len(points) - 1
    assert points[-1].live_bytes == 2 * PARAM_BYTES < points[peak].live_bytes  # params + grads
    assert meter.timeline_peak() == meter.peak_bytes == points[peak].live_bytes
    assert [p.index for p in points] == list(range(len(points)))
    assert points[-1].live_bytes < meter.timeline_average() < meter.peak_bytes
    assert [p.seconds for p in points] == sorted(p.seconds for p in points)
    assert points[0].live_bytes < meter.timeline_time_average() < meter.peak_bytes
    with pytest.raises(ValueError, match="timeline=True"):
        MemoryMeter().timeline_peak()


def test_time_average_weights_each_level_by_how_long_it_lasted():
    # 10 bytes for 3 s, then 40 bytes for 1 s; the last level (0) ends the timeline
    assert time_average([10, 40, 0], [0.0, 3.0, 4.0]) == (10 * 3 + 40 * 1) / 4
    assert time_average([], []) == 0.0 and time_average([7], [1.0]) == 7.0


def test_categories_and_cuda_stats_on_cpu():
    meter = MemoryMeter()
    assert list(meter.breakdown()) == list(CATEGORIES)
    if not torch.cuda.is_available():
        assert meter.cuda_stats() is None


def test_count_adds_tensors_made_before_the_meter_once():
    x = torch.zeros(512, 512)
    with MemoryMeter() as meter:
        meter.count(x, x[0], category="activations")
        assert meter.live_bytes == 2**20 and meter.breakdown()["activations"] == 2**20
        with pytest.raises(ValueError, match="category must be one of"):
            meter.count(x, category="weights")
