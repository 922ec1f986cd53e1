"""The time model's structure (no timed asserts: times are measured, never compared to a bound)."""

from collections import Counter

import pytest
import torch

from ckpt_course.models import GPTConfig, TinyGPT
from ckpt_course.recompute import measure_recompute
from ckpt_course.timing import OpTimer, predict, profile_step, recomputed


@pytest.fixture(scope="module")
def gpt():
    torch.manual_seed(0)
    model = TinyGPT(GPTConfig(n_layer=4, d_model=32, n_head=2, seq_len=16))
    batch = model.example_batch(2, generator=torch.Generator().manual_seed(0))
    return model, batch, profile_step(model, batch, rounds=1)


def by_name(ops: Counter) -> Counter:
    out = Counter()
    for (name, _), n in ops.items():
        out[name] += n
    return out


@pytest.mark.parametrize("policy", ["full", "every-2", "selective:save=mm,sdpa"])
def test_recomputed_ops_are_recompute_py_counts_split_by_shape(gpt, policy):
    model, batch, _ = gpt
    assert by_name(recomputed(model, batch, policy).ops) == measure_recompute(model, batch,
                                                                             policy).ops


def test_keys_tell_the_blocks_matmuls_apart(gpt):
    model, batch, profile = gpt
    shapes = {key for key in profile.forward.calls if key[0] == "aten.addmm"}
    assert len(shapes) == 4  # qkv, attention out, MLP up, MLP down: one time each
    assert all(profile.forward.calls[k] == 4 for k in shapes)  # one of each per block


def test_full_is_priced_at_the_recomputed_ops_measured_times_plus_its_trial(gpt):
    model, batch, profile = gpt
    what = recomputed(model, batch, "full")
    assert set(what.ops) <= set(profile.forward.calls)  # every recomputed op was timed
    by_op = Counter()
    for key, n in what.ops.items():
        by_op[key[0]] += n * profile.forward.seconds[key] / profile.forward.calls[key]
    by_op["checkpoint overhead"] = what.trial.residual_s(profile) * 4  # 4 blocks, each tried
    pred = predict(profile, what)
    assert pred.copy_s == 0
    assert pred.op_seconds == pytest.approx(dict(by_op), rel=1e-9)


def test_the_block_trial_recomputes_one_block_of_full(gpt):
    model, batch, _ = gpt
    what = recomputed(model, batch, "full")
    assert what.trial.recomputed + what.trial.recomputed + what.trial.recomputed \
        + what.trial.recomputed == what.ops  # the 4 blocks are alike: each re-runs the same
    assert what.trial.ops >= sum(what.trial.recomputed.values())


def test_selective_recomputes_fewer_ops_than_full_and_not_the_saved_ones(gpt):
    model, batch, profile = gpt
    full, sel = recomputed(model, batch, "full"), recomputed(model, batch,
                                                             "selective:save=mm,sdpa")
    assert sum(sel.ops.values()) < sum(full.ops.values())
    assert not {n for n, _ in sel.ops} & {"aten.addmm", "aten.mm",
                                          "aten._scaled_dot_product_flash_attention_for_cpu"}
    assert sel.region_ops == 4 * sel.trial.ops  # every op of the 4 blocks runs under SAC
    assert "selective bookkeeping" in predict(profile, sel).op_seconds


def test_every_2_recomputes_all_full_does_and_more():
    model = TinyGPT(GPTConfig(n_layer=4, d_model=32, n_head=2, seq_len=16))
    batch = model.example_batch(2, generator=torch.Generator().manual_seed(0))
    full, every2 = recomputed(model, batch, "full").ops, recomputed(model, batch, "every-2").ops
    assert every2 - full and not full - every2  # the trailing ops of each segment's first block


def test_offload_moves_what_its_trial_block_moves_once_per_block(gpt):
    model, batch, _ = gpt
    what = recomputed(model, batch, "offload")
    assert not what.ops  # nothing recomputed; its copies back are bytes moved, not ops
    assert what.bytes_moved == 4 * what.trial.bytes_moved > 0


def test_offload_bytes_double_with_the_batch(gpt):
    model, _, _ = gpt
    moved = [recomputed(model, model.example_batch(n, generator=torch.Generator().manual_seed(0)),
                        "offload").bytes_moved for n in (2, 4)]
    assert moved[1] == 2 * moved[0]  # twice the tokens, twice the saved activations


def test_op_timer_counts_every_op_once():
    x = torch.ones(3, requires_grad=True)
    with OpTimer() as timer:
        (x.sin() * 2).sum().backward()
    assert by_name(timer.calls)["aten.sin"] == 1 and by_name(timer.calls)["aten.cos"] == 1
    assert set(timer.seconds) == set(timer.calls) and min(timer.seconds.values()) >= 0
