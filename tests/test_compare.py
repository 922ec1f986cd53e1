"""compare and its tools: exact bytes and FLOPs from hand formulas; timings only exist (> 0)."""

import argparse
from statistics import median

import matplotlib.image
import pytest
import torch

from ckpt_course.cli import add_compare_arguments, run_compare, split_policies
from ckpt_course.compare import (
    Comparison,
    PolicyResult,
    batch_sweep,
    best_fit,
    compare,
    layer_memory,
    measure_split,
    rank_ops,
    selective_from_ranking,
)
from ckpt_course.estimate import layer_activation_bytes
from ckpt_course.models import GPTConfig, TinyGPT
from ckpt_course.tape import record_tape

TINY = GPTConfig(n_layer=2, d_model=32, n_head=2, seq_len=16)
B, T, C, L = 2, 16, 32, 2
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def full_recompute_flops(B, T, C, L):
    """Per block: qkv, attention (QK^T and PV), proj, fc1; fc2 is never re-run (torch stops the
    recompute once the last saved tensor, fc2's input, is rebuilt)."""
    return L * (2 * B * T * C * 3 * C + 4 * B * T * T * C + 2 * B * T * C * C
                + 2 * B * T * C * 4 * C)


@pytest.fixture(scope="module")
def comparison():
    return compare(TINY, ["none", "full", "offload"], steps=2, batch_size=B, live=False)


def test_compare_measures_every_policy(comparison):
    none, full, offload = (comparison[p] for p in ("none", "full", "offload"))
    assert [r["policy"] for r in comparison.rows()] == ["none", "full", "offload"]
    assert none.recompute_flops == offload.recompute_flops == 0
    assert full.recompute_flops == full_recompute_flops(B, T, C, L)
    assert full.saved_bytes < none.saved_bytes and offload.saved_bytes < none.saved_bytes
    assert offload.offload_bytes > 0 and none.offload_bytes == full.offload_bytes == 0
    # the ratios divide medians of the raw step times by none's (the reference)
    assert comparison.reference == "none"
    for r in (full, offload):
        assert r.time_ratio == median(r.times_s) / median(none.times_s)
    assert all(r.fits and r.step_time_s > 0 and len(r.times_s) == 2 for r in comparison.results)
    assert all(0 < r.forward_time_s < r.step_time_s for r in comparison.results)
    assert all(r.tokens_per_s == B * T / r.step_time_s for r in comparison.results)


def test_compare_table_and_png(comparison, tmp_path):
    text = str(comparison)
    assert all(p in text for p in ("none", "full", "offload", "vs none"))
    assert "<table>" in comparison._repr_html_()
    path = tmp_path / "compare.png"
    comparison.save_png(path)
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert matplotlib.image.imread(path).ndim == 3


def test_a_policy_over_the_budget_is_reported_as_oom(comparison):
    budget = (comparison["none"].peak_bytes + comparison["full"].peak_bytes) // 2
    assert comparison["full"].peak_bytes < budget < comparison["none"].peak_bytes
    result = compare(TINY, ["none", "full"], steps=1, batch_size=B, budget=budget, live=False)
    assert not result["none"].fits and result["none"].peak_bytes is None
    assert result["none"].step_time_s is None
    assert result["full"].fits and result["full"].peak_bytes == comparison["full"].peak_bytes
    assert result.reference == "full" and "OOM" in str(result)


def test_compare_with_the_live_plot_ends_with_its_figure():
    result = compare(TINY, ["none", "full"], steps=2, memory_steps=1, batch_size=B)
    live = result.live
    assert live.progress() == "full: policy 2/2, step 3/3"
    assert len(live.axes[1].collections) == 2


def test_bad_policies_are_refused_before_any_work():
    with pytest.raises(ValueError, match="unknown policy"):
        compare(TINY, ["none", "fulll"], live=False)
    with pytest.raises(ValueError, match="each policy once"):
        compare(TINY, ["full", "every-1"], live=False)


# ---------------------------------------------------------------- command line
def parser():
    p = argparse.ArgumentParser(prog="ckpt-course compare")
    add_compare_arguments(p)
    return p


def run(argv):
    """As ckpt-course's main does: a ValueError from the run is a usage error too."""
    p = parser()
    args = p.parse_args(argv)
    try:
        return run_compare(args)
    except ValueError as error:
        p.error(str(error))


def test_command_prints_the_table_and_writes_a_png(tmp_path, capsys):
    out = tmp_path / "plot.png"
    argv = ["--layers", "1", "--width", "32", "--heads", "2", "--seq", "16", "--batch", "2",
            "--steps", "1", "--policies", "none,selective:save=mm,sdpa", "--out", str(out)]
    assert run(argv) == 0
    text = capsys.readouterr().out
    assert "selective:save=mm,sdpa" in text and "none" in text and str(out) in text
    assert out.read_bytes()[:8] == PNG_SIGNATURE


@pytest.mark.parametrize("argv", [
    ["--policies", "none,fulll"], ["--layers", "0"], ["--batch", "two"], ["--budget", "lots"],
    ["--device", "tpu"], ["--width", "30", "--heads", "4"], ["--out", "plot.jpg"],
])
def test_bad_arguments_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run(argv)
    assert exit_info.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_policy_lists_keep_a_selective_policys_ops_together():
    assert split_policies("none,selective:save=mm,sdpa,offload") == [
        "none", "selective:save=mm,sdpa", "offload"]
    assert split_policies("full; selective:recompute=gelu,layernorm") == [
        "full", "selective:recompute=gelu,layernorm"]


# ---------------------------------------------------------------- the step's parts, batch sizes
def test_measure_split_times_each_part():
    split = measure_split(TINY, batch_size=B, rounds=3)
    parts = (split.forward_s, split.backward_s, split.optimizer_s)
    assert min(parts) > 0
    # the step is timed on its own; in every step it contains each of its parts, so its median
    # is at least each part's median
    assert split.step_s >= max(parts)


def test_batch_sweep_under_a_budget(comparison):
    budget = (comparison["none"].peak_bytes + comparison["full"].peak_bytes) // 2
    points = batch_sweep(TINY, ["none", "full"], [B], budget=budget, rounds=1)
    assert [p.peak_bytes for p in points] == [comparison[p].peak_bytes for p in ("none", "full")]
    assert [p.fits for p in points] == [False, True]
    assert best_fit(points, "none") is None and best_fit(points, "full").batch_size == B
    assert points[0].tokens_per_s is None and points[1].tokens_per_s > 0


# ---------------------------------------------------------------- ranking ops
def test_rank_ops_credits_every_saved_byte_to_the_op_that_made_it():
    model = TinyGPT(TINY)
    ranking = {c.op: c for c in rank_ops(model, batch_size=B)}
    x = torch.randn(B, T, C, requires_grad=True)
    assert sum(c.saved_bytes for c in ranking.values()) == record_tape(
        model.blocks[0], x).activation_bytes
    act = B * T * C * 4  # one (B, T, C) float32 activation
    assert ranking["mm"].saved_bytes == 7 * act  # qkv output (3C) and fc1 output (4C)
    assert ranking["mm"].flops == 2 * B * T * C * (3 * C + C + 4 * C + 4 * C)
    assert ranking["sdpa"].flops == 4 * B * T * T * C
    assert ranking["gelu"].saved_bytes == 4 * act and ranking["gelu"].flops == 0
    assert ranking["input"].saved_bytes == act


@pytest.mark.parametrize("kwargs, names", [
    (dict(batch_size=10**6), "use a smaller batch_size"),  # refused from an estimate, not by malloc
    (dict(block=2), "from 0 to 1"),
    (dict(block=-1), "from 0 to 1"),
    (dict(block=True), "from 0 to 1"),
    (dict(rounds=0), "rounds=5"),
])
def test_rank_ops_refuses_bad_arguments_before_any_work(kwargs, names):
    with pytest.raises(ValueError, match=names):
        rank_ops(TinyGPT(TINY), **kwargs)


def test_selective_policy_from_the_ranking():
    ranking = rank_ops(TinyGPT(TINY), batch_size=B)
    first_with_flops = next(c for c in ranking if c.flops)
    assert all(c.flops == 0 for c in ranking[: ranking.index(first_with_flops)])
    assert str(selective_from_ranking(ranking)) == "selective:save=mm,sdpa"
    assert str(selective_from_ranking(ranking, max_recompute_flops=10**12)) == "full"


# ---------------------------------------------------------------- one block on fake tensors
def test_layer_memory_matches_the_tape_and_sees_what_selective_keeps():
    cfg = GPTConfig(d_model=64, n_head=4, seq_len=32)
    b, t, c = 2, 32, 64
    act = b * t * c * 4
    tape = layer_activation_bytes(cfg, b, t, torch.float32)
    assert layer_memory(cfg, b, t, "none", torch.float32) == tape.saved_bytes
    assert layer_memory(cfg, b, t, "full", torch.float32) == tape.input_bytes == act
    ranking = {o.op: o for o in rank_ops(TinyGPT(cfg), batch_size=b)}
    kept = ranking["mm"].saved_bytes + ranking["sdpa"].saved_bytes + ranking["input"].saved_bytes
    # SAC keeps every output of a named op: proj's and fc2's too, which backward never reads
    assert layer_memory(cfg, b, t, "selective:save=mm,sdpa", torch.float32) == kept + 2 * act
    with pytest.raises(ValueError, match="offload"):
        layer_memory(cfg, b, t, "offload")


def test_a_time_ratio_is_printed_with_its_rounds_spread():
    def row(policy, times):
        return PolicyResult(policy, True, 1, 1, 0, 1, 0, median(times), times_s=times)

    result = Comparison([row("none", [1.0, 2.0, 1.0]), row("full", [1.5, 2.2, 1.2])], 8, 16,
                        None, "none", 3)
    result["full"].time_ratio = median([1.5, 2.2, 1.2]) / median([1.0, 2.0, 1.0])
    assert result.round_ratios("full") == [1.5, 1.1, 1.2]  # each round against its own pair
    assert result.spread("full") == ("median 1.50x none, rounds 1.10x to 1.50x "
                                     "(3 interleaved rounds)")
