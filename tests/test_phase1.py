"""Phase 1: the step breakdown, one checkpointed block, the every-N dial, their plots, and the
exercise checks (a right answer passes; a wrong one fails with a hint that hides the answer)."""

import math

import matplotlib
import pytest
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ckpt_course import plots, sweeps  # noqa: E402
from ckpt_course.estimate import model_memory  # noqa: E402
from ckpt_course.meter import CATEGORIES  # noqa: E402
from ckpt_course.models import GPTConfig, HandTraceNet, TinyGPT  # noqa: E402
from ckpt_course.recompute import counting, measure_recompute  # noqa: E402
from ckpt_course.tape import record_tape  # noqa: E402
from ckpt_course.train import check_gradients, measure_step  # noqa: E402

CFG = dict(d_model=32, n_head=2, seq_len=32, vocab_size=64)


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


# ---------------------------------------------------------------- step_breakdown (1.1)
def test_step_two_holds_parameters_and_adamw_state_and_activations_scale_with_tokens():
    torch.manual_seed(0)
    model = TinyGPT(GPTConfig(n_layer=2, **CFG))
    before = [p.detach().clone() for p in model.parameters()]
    n = sum(p.numel() for p in model.parameters())
    tensors = len(list(model.parameters()))
    rows = sweeps.breakdown_sweep(model, [(4, 16), (8, 16), (8, 32)])
    for r in rows:
        assert r.step == 2 and set(r.categories) == set(CATEGORIES)
        assert r.categories["parameters"] == 4 * n
        # exp_avg + exp_avg_sq, fp32, plus one 4-byte step counter per parameter tensor
        assert r.categories["optimizer state"] == 8 * n + 4 * tensors
        assert r.peak_bytes == sum(r.categories.values())
    a = [r.categories["activations"] for r in rows]
    assert a[1] / a[0] == pytest.approx(2, rel=2e-3)  # batch doubled
    assert a[2] / a[1] == pytest.approx(2, rel=2e-3)  # sequence doubled (SDPA: no T x T)
    # the copy trained, the model did not
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters(), strict=True))


def test_step_one_peaks_before_adamw_has_any_state_when_activations_dominate():
    model = TinyGPT(GPTConfig(n_layer=2, **CFG))
    first = sweeps.step_breakdown(model, 16, 32, step=1)
    assert first.peak_phase == "backward" and first.categories["optimizer state"] == 0
    assert first.categories["gradients"] == 0  # zero_grad(set_to_none) freed them; none yet
    with pytest.raises(ValueError, match="counts from 1"):
        sweeps.step_breakdown(model, 2, 8, step=0)


def test_estimate_categories_match_the_estimate():
    est = model_memory(GPTConfig(n_layer=2, **CFG), 2, 16, dtype=torch.float32)
    cats = sweeps.estimate_categories(est, "full")
    assert set(cats) == set(CATEGORIES)
    assert sum(cats.values()) == est.total("full")


# ---------------------------------------------------------------- CheckpointBlocks (1.3)
def test_checkpointing_one_block_forgets_its_tape_minus_its_input_and_recomputes_its_forward():
    torch.manual_seed(0)
    b, t = 2, 16
    model = TinyGPT(GPTConfig(n_layer=3, dropout=0.1, **CFG))
    batch = model.example_batch(b, t, generator=torch.Generator().manual_seed(0))
    tape = record_tape(model.loss, batch, model=model)
    x_bytes = b * t * CFG["d_model"] * 4
    plain = measure_step(model, "none", batch=batch).saved_bytes
    one = sweeps.CheckpointBlocks((1,))
    assert plain - measure_step(model, one, batch=batch).saved_bytes == (
        tape.by_module()["blocks.1"] - x_bytes)
    with counting() as block_forward:
        model.blocks[1](torch.randn(b, t, CFG["d_model"]))
    assert measure_recompute(model, batch, one).flops == block_forward.flops > 0


def test_one_block_gradients_are_exact_unless_the_rng_state_is_dropped():
    model = TinyGPT(GPTConfig(n_layer=2, dropout=0.1, **CFG))
    assert check_gradients(model, sweeps.CheckpointBlocks((1,)), seq_len=16).equal
    reckless = sweeps.CheckpointBlocks((1,), preserve_rng_state=False)
    assert "preserve_rng_state=False" in str(reckless)
    result = check_gradients(model, reckless, seq_len=16)
    assert not result.equal and result.max_abs_diff > 0


def test_checkpoint_blocks_rejects_bad_indices():
    with pytest.raises(ValueError, match="block numbers"):
        sweeps.CheckpointBlocks(())
    model = TinyGPT(GPTConfig(n_layer=2, **CFG))
    with pytest.raises(ValueError, match="has 2 blocks"):
        measure_step(model, sweeps.CheckpointBlocks((2,)), batch_size=2, seq_len=8)


# ---------------------------------------------------------------- the dial (1.4)
def chain_dial(depth=8, width=32, batch_size=1024):
    model = HandTraceNet(width=width, depth=depth)
    batch = model.example_batch(batch_size, generator=torch.Generator().manual_seed(0))
    return sweeps.dial(model, batch, loss_fn=lambda b: model(b[0]).sum())


def test_dial_on_a_chain_keeps_segment_inputs_and_recomputes_one_forward_for_every_n():
    L, width, batch_size = 8, 32, 1024
    act = width * batch_size * 4
    d = chain_dial(L, width, batch_size)
    assert [p.n for p in d.points] == list(range(1, L + 1)) and d.none.n == 0
    assert d.none.saved_bytes == L * act + 4  # every ReLU output, and the loss
    assert d.none.recompute_flops == 0
    forward_flops = L * 2 * batch_size * width * width
    for p in d.points:
        # segment inputs, less the first (the batch itself), and the 4-byte loss
        assert p.saved_bytes == (math.ceil(L / p.n) - 1) * act + 4, p.policy
        assert p.recompute_flops == forward_flops, p.policy
        assert p.peak_above_baseline == pytest.approx((math.ceil(L / p.n) + p.n) * act,
                                                      abs=0.2 * act)
    assert d.best().n in (2, 3) and d.sqrt_n == math.sqrt(L)
    assert d.at(4).n == 4
    with pytest.raises(KeyError, match="not measured"):
        d.at(9)


def test_dial_rejects_segment_sizes_the_model_does_not_have():
    model = HandTraceNet(width=16, depth=3)
    with pytest.raises(ValueError, match="from 1 to 3"):
        sweeps.dial(model, model.example_batch(8), ns=[0, 4])


# ---------------------------------------------------------------- plots
def test_breakdown_bars_stack_the_nonzero_categories_with_a_limit_line():
    rows = {"a": {"parameters": 3, "activations": 5}, "b": {"parameters": 3, "activations": 9}}
    ax = plots.breakdown_bars(rows, limit=20, limit_label="GPU")
    assert len(ax.containers) == 2  # parameters and activations only
    tops = [bar.get_y() + bar.get_height() for bar in ax.containers[-1]]
    assert tops == [8, 12]
    assert any(line.get_ydata()[0] == 20 for line in ax.lines)


def test_timeline_marks_the_peak_and_shades_phases():
    model = TinyGPT(GPTConfig(n_layer=2, **CFG))
    step = measure_step(model, "none", batch_size=4, seq_len=16)
    ax = plots.timeline(step, baseline=step.baseline_bytes)
    labels = ax.get_legend_handles_labels()[1]
    assert {"forward", "backward", "average", "peak (backward)"} <= set(labels)
    with pytest.raises(ValueError, match="no timeline"):
        plots.timeline([])


def test_dial_figure_and_slider_redraw_from_the_measurements():
    d = chain_dial(depth=4)
    mem, flops = plots.dial_figure(d, n=3)
    assert "every-3" in mem.get_title()
    assert len(flops.patches) == 4 + 1  # a bar per N, and the highlighted one
    widget = plots.dial_slider(d)
    slider = widget.children[0]
    assert slider.description == "N" and (slider.min, slider.max) == (1, 4)
    assert slider.value == d.best().n
