"""ckpt_course.pitfalls: bad input is refused before any work, with the accepted choices; the
facts lesson 3b builds on hold (the lesson asserts the rest under nbval)."""

import pytest
import torch

from ckpt_course import pitfalls


@pytest.mark.parametrize(("call", "words"), [
    (lambda: pitfalls.block_gradients({"reentrant": False}), "use_reentrant"),
    (lambda: pitfalls.bn_experiment("momentum=0"), "restore-buffers"),
    (lambda: pitfalls.ddp_cases(["reentrant twice"]), "pick from"),
])
def test_bad_input_names_the_choices(call, words):
    with pytest.raises(ValueError, match=words):
        call()


def test_restoring_buffers_makes_the_checkpointed_step_update_running_stats_once():
    broken, fixed = pitfalls.bn_experiment("none"), pitfalls.bn_experiment("restore-buffers")
    assert broken["tracked"] == [2, 2] and fixed["tracked"] == fixed["plain_tracked"] == [1, 1]
    assert fixed["same_running_stats"] and fixed["same_grads"]


def test_saved_for_backward_leaves_out_parameters_and_input():
    linear = torch.nn.Linear(4, 4, bias=False)
    x = torch.randn(3, 4, requires_grad=True)
    # mm keeps the input and the weight, both left out; relu keeps its 3 x 4 output
    assert pitfalls.saved_for_backward(linear, x, lambda t: linear(t).relu()) == 3 * 4 * 4


def test_a_reading_prints_each_instrument_on_one_line_and_cuda_only_when_there():
    cpu = pitfalls.Reading("full", 3 * 2**30, 2**20, 4 * 2**20)
    assert str(cpu) == (" full: peak RSS    3.00 GiB | meter: kept for backward   1.00 MiB, "
                        "peak 4.00 MiB")
    gpu = pitfalls.Reading("none", 2**30, 2**20, 2**21, cuda_reserved_bytes=2**22,
                           cuda_peak_allocated_bytes=2**21)
    assert str(gpu).splitlines()[1].split() == ["CUDA", "reserved", "4.00", "MiB,", "allocated",
                                                "peak", "2.00", "MiB"]


def test_the_compile_section_is_on_unless_the_environment_says_0(monkeypatch):
    monkeypatch.delenv("CKPT_COURSE_COMPILE", raising=False)
    assert pitfalls.compile_section_on()
    monkeypatch.setenv("CKPT_COURSE_COMPILE", "0")
    assert not pitfalls.compile_section_on()
