"""Phase 3 checks: a right answer passes; each typical wrong one fails with a hint that teaches
and does not give the answer away."""

import re

import pytest
import torch

from ckpt_course.checks import CheckFailed
from ckpt_course.checks import phase3 as checks
from ckpt_course.estimate import layer_activation_bytes
from ckpt_course.models import GPTConfig


def numbers(text: str) -> set[int]:
    return {int(n.replace(",", "")) for n in re.findall(r"\d[\d,]*", text)}


def fails(check, fn, *hint_words, secret=None):
    with pytest.raises(CheckFailed) as info:
        check(fn)
    hint = str(info.value)
    for word in hint_words:
        assert word in hint, f"{word!r} not in hint: {hint}"
    if secret is not None:
        assert secret not in numbers(hint), f"the hint gives the answer away: {hint}"
    return hint


# ---------------------------------------------------------------- 3.1 recompute FLOPs
def recompute(B, T, C, L, fc2=False, attention=True):
    per_block = 2 * B * T * C * 3 * C + 2 * B * T * C * C + 2 * B * T * C * 4 * C
    per_block += 4 * B * T * T * C if attention else 0
    per_block += 2 * B * T * 4 * C * C if fc2 else 0
    return L * per_block


def test_full_recompute_right():
    checks.full_recompute(recompute)


def test_full_recompute_counting_the_last_matmul():
    fails(checks.full_recompute, lambda *a: recompute(*a, fc2=True), "never read",
          secret=recompute(2, 16, 32, 2))


def test_full_recompute_forgetting_attention():
    fails(checks.full_recompute, lambda *a: recompute(*a, attention=False), "Q K^T",
          secret=recompute(2, 16, 32, 2))


def test_full_recompute_not_a_number():
    fails(checks.full_recompute, lambda *a: None, "return a number")


# ---------------------------------------------------------------- 3.2 per-GPU bytes
def test_per_gpu_right():
    checks.per_gpu(lambda n, g, a: n * 12 / g + a)


def test_per_gpu_sharding_the_activations_too():
    fails(checks.per_gpu, lambda n, g, a: (n * 12 + a) / g, "micro-batch")


def test_per_gpu_not_sharding_the_state():
    fails(checks.per_gpu, lambda n, g, a: n * 12 + a, "divides")


def test_per_gpu_wrong_bytes_per_parameter():
    fails(checks.per_gpu, lambda n, g, a: n * 16 / g + a, "bf16 weight")


# ---------------------------------------------------------------- 3.3 attention bytes
def extra(B, H, T, mask=True, lse=True):
    return 4 * B * H * T * T + (T * T if mask else 0) - (4 * B * H * T if lse else 0)


def test_attention_bytes_right():
    checks.attention_bytes(extra)


def test_attention_formula_matches_the_tapes_at_another_size():
    cfg = GPTConfig(d_model=48, n_head=3, seq_len=24)
    naive = layer_activation_bytes(GPTConfig(d_model=48, n_head=3, seq_len=24,
                                             attention="naive"), 2, 24, torch.float32)
    assert naive.saved_bytes - layer_activation_bytes(cfg, 2, 24, torch.float32).saved_bytes \
        == extra(2, 3, 24)


def test_attention_bytes_forgetting_the_mask():
    fails(checks.attention_bytes, lambda *a: extra(*a, mask=False), "mask", secret=extra(1, 2, 16))


def test_attention_bytes_forgetting_the_logsumexp():
    fails(checks.attention_bytes, lambda *a: extra(*a, lse=False), "logsumexp",
          secret=extra(1, 2, 16))


# ---------------------------------------------------------------- 3.4 ops to save
def test_ops_to_save_right():
    checks.ops_to_save(lambda: {"mm", "sdpa"})


def test_ops_to_save_saving_a_free_op():
    fails(checks.ops_to_save, lambda: {"mm", "sdpa", "gelu"}, "gelu", "recompute them")


def test_ops_to_save_missing_attention():
    hint = fails(checks.ops_to_save, lambda: {"mm"}, "sdpa")
    assert "FLOPs" in hint


def test_ops_to_save_unknown_name():
    fails(checks.ops_to_save, lambda: {"matmul"}, "rank_ops")


# ---------------------------------------------------------------- 3.4 policy for a budget
@pytest.fixture(scope="module")
def measured():
    return {name: (peak, flops) for peak, flops, name in checks._candidates()}


def test_policy_for_budget_right(measured):
    checks.policy_for_budget(
        lambda budget: min((f, p, n) for n, (p, f) in measured.items() if p <= budget)[2])


def test_policy_for_budget_lowest_peak_is_not_the_answer(measured):
    lowest = min(measured, key=lambda n: measured[n][0])
    fails(checks.policy_for_budget, lambda budget: lowest, "fewer FLOPs")


def test_policy_for_budget_ignoring_the_budget(measured):
    fails(checks.policy_for_budget, lambda budget: "none", "over it")


def test_policy_for_budget_not_a_candidate():
    fails(checks.policy_for_budget, lambda budget: "sqrt", "not a candidate")
    fails(checks.policy_for_budget, lambda budget: "everything", "return one of")
