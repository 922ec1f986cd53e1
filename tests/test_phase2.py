"""Phase 2: the hand-trace helpers agree with the meter and with hand formulas, to the byte, and
the phase 2 checks pass right answers and fail wrong ones with hints that keep the number back."""


import matplotlib
import pytest
import torch

from ckpt_course.tape import record_tape
from ckpt_course.trace import (
    LOSS,
    compare_variants,
    hand_input,
    hand_trace_net,
    layer_table,
    plot_timelines,
    recompute_by_op,
    recompute_table,
    sum_loss,
    trace_policies,
    trace_step,
    trace_table,
    variant_table,
)
from ckpt_course.train import measure_step

matplotlib.use("Agg")

W = 64  # batch = width = 64: an activation and a weight gradient are both 16 KiB
A = W * W * 4
BIAS, LOSS_BYTES, SEED = W * 4, 4, 4


def peak_formula(depth, width=W):
    a = width * width * 4
    return (depth + 2) * a + (depth - 1) * width * 4 + LOSS_BYTES + SEED


@pytest.fixture(scope="module")
def traces():
    return trace_policies(hand_trace_net(width=W), ("none", "full", "every-2"), batch_size=W)


def test_trace_agrees_with_measure_step(traces):
    net = hand_trace_net(width=W)
    for policy, t in traces.items():
        m = measure_step(net, policy, batch=(hand_input(net, W),), loss_fn=sum_loss(net))
        assert (t.baseline_bytes, t.saved_bytes, t.peak_bytes) == (
            m.baseline_bytes, m.saved_bytes, m.peak_above_baseline)
        assert t.peak_phase == m.peak_phase == "backward"


def test_saved_and_peak_follow_the_hand_formulas(traces):
    assert traces["none"].saved_bytes == 4 * A + LOSS_BYTES  # h1..h4, x is baseline
    assert traces["full"].saved_bytes == 3 * A + LOSS_BYTES  # inputs h1..h3 of layers 2..4
    assert traces["every-2"].saved_bytes == 1 * A + LOSS_BYTES  # h2, input of segment [3, 4]
    assert {t.peak_bytes for t in traces.values()} == {peak_formula(4)}
    params = 4 * (A + BIAS)
    assert traces["none"].baseline_bytes == params + A  # parameters + x


def test_the_tape_is_the_saved_set_plus_x():
    net = hand_trace_net(width=W)
    x = hand_input(net, W)
    tape = record_tape(sum_loss(net), (x,), model=net)
    assert tape.activation_bytes == 5 * A and tape.param_bytes == 3 * A
    assert trace_step(net, "none", batch_size=W).saved_bytes == tape.activation_bytes - x.nbytes + 4


def test_walking_backward_layer_by_layer(traces):
    whole = {p: {k: b // A for k, b in t.by_layer().items()} for p, t in traces.items()}
    assert list(whole["none"]) == [4, 3, 2, 1]  # backward order
    assert whole["none"] == whole["full"] == {4: 6, 3: 6, 2: 6, 1: 6}  # one out, one grad in
    assert whole["every-2"] == {4: 5, 3: 5, 2: 6, 1: 6}
    t = traces["none"]
    assert (t.peak_layer, t.peak_op) == (2, "aten.sum")  # the bias gradients tip the tie
    assert t.peak_point.live_bytes == t.peak_bytes and t.peak_point.phase == "backward"


def test_recompute_runs_inside_the_layer_that_first_needs_it(traces):
    layers = [p.layer for p in traces["every-2"].points
              if p.phase == "backward" and p.op == "aten.addmm"]
    assert layers == [4, 4, 2, 2]
    assert not [p for p in traces["none"].points if p.phase == "backward" and p.op == "aten.addmm"]
    first = traces["none"].points[0]
    assert first.phase == "forward" and first.layer == 1
    assert traces["none"].points[-1].layer != LOSS


def test_timeline_average_and_layer_starts(traces):
    for t in traces.values():
        assert max(t.timeline) == t.peak_bytes and 0 < t.average_bytes < t.peak_bytes
        assert set(t.timeline_phases) == {"forward", "backward"}
        starts = list(t.layer_starts().values())
        assert starts == sorted(starts) and len(starts) == 4
    assert traces["every-2"].average_bytes < traces["none"].average_bytes
    for t in traces.values():
        seconds = t.timeline_seconds
        assert len(seconds) == len(t.timeline) and seconds == sorted(seconds)
        assert 0 < t.time_average_bytes < t.peak_bytes


def test_checkpointing_lowers_the_peak_only_when_activations_make_it():
    results = compare_variants({"as is": {"width": W, "batch_size": W},
                                "grads freed": {"width": W, "batch_size": W, "free_grads": True},
                                "batch 4x width": {"width": W, "batch_size": 4 * W}})
    peaks = {v: {p: t.peak_bytes for p, t in r.items()} for v, r in results.items()}
    for v, p in peaks.items():
        assert p["full"] == p["none"], v  # a block's one activation is the next block's input
    assert peaks["as is"]["every-2"] == peaks["as is"]["none"]
    assert peaks["grads freed"]["every-2"] == peaks["grads freed"]["none"] - A
    assert peaks["grads freed"]["none"] == 6 * A + BIAS + LOSS_BYTES + SEED
    assert results["grads freed"]["none"].peak_layer == 4  # now at the start of backward
    assert peaks["batch 4x width"]["every-2"] < peaks["batch 4x width"]["none"]
    assert "grads freed" in str(variant_table(results))


def test_recompute_by_op_and_the_early_stop():
    unit = 2 * W**3
    for policy in ("full", "every-2"):
        r = recompute_by_op(hand_trace_net(width=W), policy, batch_size=W)
        assert r["ops"] == {"aten.addmm": 4, "aten.relu": 4, "aten.t": 4}
        assert r["flops"] == r["forward_flops"] == 4 * unit
        assert r["step_flops"] == 11 * unit  # backward: 4 weight grads + 3 input grads
    relu_first = hand_trace_net(width=W, relu_first=True)
    full = recompute_by_op(relu_first, "full", batch_size=W)
    assert full["ops"] == {"aten.relu": 4, "aten.t": 4} and full["flops"] == 0
    every2 = recompute_by_op(relu_first, "every-2", batch_size=W)
    assert every2["ops"]["aten.addmm"] == 2 and every2["flops"] == 2 * unit
    assert "0.50" in str(recompute_table({"relu first, every-2": every2}))


def test_tables_and_plot(traces):
    assert "every-2" in str(trace_table(traces)) and "<table>" in trace_table(traces)._repr_html_()
    assert "layer 4" in str(layer_table(traces))
    axes = plot_timelines(traces)
    assert len(axes) == 3 and axes[0].get_title() == "none"


def test_trace_step_refuses_other_models():
    with pytest.raises(TypeError, match="hand_trace_net"):
        trace_step(torch.nn.Linear(2, 2))
