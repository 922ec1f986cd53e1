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
