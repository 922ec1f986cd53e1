"""What the planner is given, as a held-out tester gave it (P1, P2, P8, P11): blocks called
with arguments besides the hidden state, blocks alike in repr but not in behaviour, one module
listed twice, a model already under a policy, and a plan the meter refutes."""

import copy

import torch
from planner_checks import off_the_meter
from torch import nn

from ckpt_course.auto import _course_model
from ckpt_course.costs import measure_costs
from ckpt_course.plan import predict
from ckpt_course.policies import _installed


class Gated(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, x, gate=None):
        h = self.linear(x)
        if gate is not None:  # the model always passes one: more is saved
            h = torch.exp(h) * torch.sigmoid(gate)
        return x + h


class Flagged(nn.Module):
    def __init__(self, width, heavy):
        super().__init__()
        self.linear, self.heavy = nn.Linear(width, width), heavy

    def forward(self, x):
        h = self.linear(x)
        if self.heavy:  # repr shows the Linear only: the flag is a plain attribute
            h = torch.exp(torch.sin(torch.tanh(h)))
        return x + h


class Net(nn.Module):
    def __init__(self, blocks, gate=None):
        super().__init__()
        self.embed, self.head = nn.Linear(16, 32), nn.Linear(32, 4)
        self.blocks = nn.ModuleList(blocks)
        self.gate = gate

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = block(x) if self.gate is None else block(x, gate=self.gate)
        return self.head(x)


def _wrong(model, policies):
    torch.manual_seed(0)
    course = _course_model(model, torch.randn(64, 16), None)
    costs = measure_costs(copy.deepcopy(course), None)
    return costs, off_the_meter(course, costs, policies)


def test_blocks_are_measured_with_the_keyword_arguments_the_model_passes():
    torch.manual_seed(0)
    model = Net([Gated(32) for _ in range(3)], gate=nn.Parameter(torch.zeros(32)))
    costs, wrong = _wrong(model, ["none", "full"])
    assert wrong == []
    # with the gate, each block keeps exp's (64, 32) float32 output and sigmoid(gate)'s 32 floats
    plain = _wrong(Net([Gated(32) for _ in range(3)]), [])[0]
    more = [a.kept_bytes - b.kept_bytes for a, b in zip(costs.layers, plain.layers, strict=True)]
    assert more == [64 * 32 * 4 + 32 * 4] * 3


def test_blocks_alike_in_repr_but_not_in_behaviour_are_measured_each():
    torch.manual_seed(0)
    costs, wrong = _wrong(Net([Flagged(32, False), Flagged(32, True), Flagged(32, False)]),
                          ["none", "full"])
    assert wrong == []
    light, heavy, again = costs.layers
    assert light == again and heavy.kept_bytes > light.kept_bytes


def test_one_module_listed_twice_is_refused_by_name():
    import pytest

    block = Flagged(32, False)
    course = _course_model(Net([block, Flagged(32, True), block]), torch.randn(64, 16), None)
    with pytest.raises(ValueError, match="blocks 0 and 2 are the same module"):
        measure_costs(course, None)


def test_auto_checkpoint_refuses_a_model_already_under_a_policy_before_any_work(monkeypatch):
    import pytest

    from ckpt_course import auto

    torch.manual_seed(0)
    model, batch = Net([Flagged(32, False) for _ in range(3)]), torch.randn(64, 16)
    report = auto.auto_checkpoint(model, 10**9, batch)
    monkeypatch.setattr(auto, "measure_costs", lambda *a, **k: pytest.fail("measured"))
    with pytest.raises(ValueError, match="undo it first"):
        auto.auto_checkpoint(model, 10**9, batch)
    report.undo()


def test_auto_checkpoint_installs_nothing_when_the_meter_refutes_the_plan(monkeypatch):
    import pytest

    from ckpt_course import auto

    torch.manual_seed(0)
    model, batch = Net([Flagged(32, False) for _ in range(3)]), torch.randn(64, 16)
    course = _course_model(copy.deepcopy(model), batch, None)
    peak = predict(measure_costs(course, None), "none").peak_bytes  # the plan at this budget
    monkeypatch.setattr(auto, "_metered_step", lambda work, policy, micro_batches: peak + 4096)
    with pytest.raises(ValueError, match=r"ask for 4\.00 KiB less") as info:
        auto.auto_checkpoint(model, peak, batch)
    assert f"auto_checkpoint(model, {peak - 4096}, batch)" in str(info.value)
    assert all(_installed(block) is None for block in model.blocks)


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Linear(16, 32), nn.Linear(32, 4)
        self.blocks = nn.ModuleList(Flagged(32, False) for _ in range(3))

    def forward(self, x, mask):
        x = self.embed(x) * mask
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class DictOut(TwoInputs):
    def forward(self, x, mask):
        return {"logits": super().forward(x, mask)}


def test_a_model_with_two_inputs_is_called_with_both_and_a_dict_output_is_read():
    from ckpt_course.auto import auto_checkpoint

    x, mask = torch.randn(64, 16), torch.ones(64, 32)
    for model in (TwoInputs(), DictOut()):
        report = auto_checkpoint(model, 10**9, (x, mask))
        assert report.measured_peak == report.predicted_peak
        report.undo()


def test_a_batch_short_of_the_model_inputs_is_refused_by_name():
    import pytest

    from ckpt_course.auto import auto_checkpoint

    with pytest.raises(ValueError, match=r"takes 2 inputs \(x, mask\).*batch=\(x, mask\)"):
        auto_checkpoint(TwoInputs(), 10**9, torch.randn(64, 16))


def test_a_dict_output_with_several_tensors_asks_for_a_loss():
    import pytest

    from ckpt_course.auto import auto_checkpoint

    class Several(TwoInputs):
        def forward(self, x, mask):
            out = super().forward(x, mask)
            return {"a": out, "b": out * 2}

    with pytest.raises(ValueError, match="pass loss_fn="):
        auto_checkpoint(Several(), 10**9, (torch.randn(64, 16), torch.ones(64, 32)))
    report = auto_checkpoint(Several(), 10**9, (torch.randn(64, 16), torch.ones(64, 32)),
                             loss_fn=lambda out, batch: out["b"].square().mean())
    assert report.measured_peak == report.predicted_peak
    report.undo()
