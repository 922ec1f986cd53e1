"""Phase 1: the step breakdown, one checkpointed block, the every-N dial, their plots, and the
exercise checks (a right answer passes; a wrong one fails with a hint that hides the answer)."""

import math

import matplotlib
import pytest
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ckpt_course import plots, sweeps  # noqa: E402
from ckpt_course.checks import CheckFailed  # noqa: E402
from ckpt_course.checks import phase1 as checks  # noqa: E402
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


# ---------------------------------------------------------------- exercise checks
def right_state(n):
    return {"parameters": 4 * n, "gradients": 4 * n, "optimizer state": 8 * n}


def right_pick(n_layers, act, budget):
    return min(range(1, n_layers + 1), key=lambda n: math.ceil(n_layers / n) + n)


@pytest.mark.parametrize("check, answer", [
    (checks.training_state_bytes, right_state),
    (checks.activation_ratio, lambda b, s: b * s),
    (checks.mlp_saved_bytes, lambda b, t, d: 36 * b * t * d),
    (checks.checkpoint_saving, lambda tape, block, x: tape.by_module()[block] - x),
    (checks.pick_n, right_pick),
])
def test_right_answers_pass(check, answer, capsys):
    check(answer)
    assert capsys.readouterr().out.startswith("Correct")


def hint(check, answer) -> str:
    with pytest.raises(CheckFailed) as failure:
        check(answer)
    return str(failure.value)


def test_state_hint_names_what_adamw_keeps_not_the_bytes():
    n, _, _ = checks._state_after_one_step(GPTConfig(n_layer=1, **checks.SMALL))
    text = hint(checks.training_state_bytes, lambda n: {**right_state(n), "optimizer state": 0})
    assert "two running averages" in text and str(8 * n) not in text
    assert "dict" in hint(checks.training_state_bytes, lambda n: 16 * n)


def test_ratio_hint_points_at_the_sequence_dimension():
    text = hint(checks.activation_ratio, lambda b, s: b * s * s)
    assert "sequence" in text and "T x T" in text


def test_mlp_hints_name_the_missed_tape_row_or_the_counted_weights():
    # bytes: 4 x (1 + 4 + 4) x B T d. Leave out a 4d-wide tensor, then the d-wide one.
    text = hint(checks.mlp_saved_bytes, lambda b, t, d: 20 * b * t * d)
    assert "GeluBackward0.self of module mlp.1" in text or "of module mlp.2" in text
    assert "AddmmBackward0.mat1 of module mlp.0" in hint(checks.mlp_saved_bytes,
                                                         lambda b, t, d: 32 * b * t * d)
    weights = 4 * (16 * 64 + 64 * 16)  # mlp.0 and mlp.2 weights at d_model 16
    text = hint(checks.mlp_saved_bytes, lambda b, t, d: 36 * b * t * d + weights)
    assert "parameters" in text and str(36 * 2 * 8 * 16) not in text
    assert "4 bytes" in hint(checks.mlp_saved_bytes, lambda b, t, d: 9 * b * t * d)
    assert "int" in hint(checks.mlp_saved_bytes, lambda b, t, d: 36.0 * b * t * d)


def test_one_block_hint_says_the_input_stays():
    text = hint(checks.checkpoint_saving, lambda tape, block, x: tape.by_module()[block])
    assert "keeps the block's input" in text
    text = hint(checks.checkpoint_saving, lambda tape, block, x: tape.activation_bytes - x)
    assert "other blocks keep theirs" in text


def test_pick_n_runs_the_answer_and_refuses_an_n_over_budget():
    assert "over the budget" in hint(checks.pick_n, lambda n_layers, act, budget: 1)
    assert "from 1 to 9" in hint(checks.pick_n, lambda n_layers, act, budget: 0)


def test_autocast_step_saves_bf16_for_matmuls_and_keeps_layer_norm_inputs_in_fp32():
    model = TinyGPT(GPTConfig(n_layer=1, d_model=32, n_head=2, seq_len=16, vocab_size=64))
    batch = model.example_batch(2, generator=torch.Generator().manual_seed(0))
    plain, mixed, by_dtype = sweeps.autocast_step(model, batch)
    assert plain.saved_bytes / 2 < mixed.saved_bytes < plain.saved_bytes
    assert by_dtype["bfloat16"] > 0 and by_dtype["float32"] > 0
    assert all(p.grad is None and p.dtype == torch.float32 for p in model.parameters())
    fp32_tape = record_tape(model.loss, batch, model=model)
    assert {e.dtype for e in fp32_tape.entries if e.dtype.is_floating_point} == {torch.float32}
    layer_norm = [e for e in record_tape(lambda b: _autocast_loss(model, b), batch, model=model)
                  .entries if e.op == "NativeLayerNormBackward0" and e.attr == "input"]
    assert layer_norm and all(e.dtype == torch.float32 for e in layer_norm)


def _autocast_loss(model, batch):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return model.loss(batch)
