"""The reveal tables of lessons 3, 3b, 4 and 4b (ckpt_course/predicts/phase3*.py, phase4*.py).

Each typical wrong answer is typed here as a learner would type it (a number worked out by hand
from the lesson's sizes, a set, a word), and the reveal must print that mistake's reason, not a
generic one; the right answer is right; where a section refutes a model (3.1's time overhead,
3b.6's tiny blocks) the answer is judged against the measurement, and the model's figure gets
its refutation. The lessons' sizes below are typed from the notebooks, not read from the tables.
"""

import math
from pathlib import Path
from types import SimpleNamespace as NS

import lesson_runs
import pytest
import torch
from lesson_runs import output_lines

from ckpt_course.predicts import all_tables, lookup
from ckpt_course.reveal import NO_PREDICTION, RIGHT, judge

# 3.1 and 3.3: the tiny GPT (GPTConfig()) at batch 8
B, T, C, L, V, H = 8, 128, 128, 4, 256, 4
SIZES = {"B": B, "T": T, "C": C, "L": L, "V": V, "H": H}
FULL = L * (2 * B * T * C * 3 * C + 4 * B * T * T * C + 2 * B * T * C * 5 * C)
FC2 = L * 2 * B * T * 4 * C * C  # the MLP's second matmul: what the early stop skips
HEAD = 2 * B * T * C * V
# 3.2: Llama-2-70B's parameters and its activations under full at batch 1 x 4096
N70, ACT70, GPU = 68_976_648_192, 7_131_398_144, 80 * 10**9
# 3.3: naive against SDPA at T = 1024, batch 1, 4 heads
T3 = 1024
EXTRA = 4 * H * T3 * T3 + T3 * T3 - 4 * H * T3
SDPA = 4 * (B * T * C + B * H * T)


def gpus(bytes_per_param, activations):
    return math.ceil(bytes_per_param * N70 / (GPU - activations))


# 4: three blocks, two checkpointed segments (0-1 and 2); 100-FLOP forwards, 60 when stopped early
COSTS = NS(layers=[NS(forward_flops=100, recompute_flops=60)] * 3)
PLACEMENT = [(0, 2, True), (2, 3, False)]
PLAN = 100 + 60
N_EL, N_T = 300_000, 50
STATE = 8 * N_EL + 4 * N_T
BLOCK = torch.nn.Linear(4, 4)  # 4 x 4 + 4 floats of parameters: 80 bytes
RUNS = {"none": NS(saved_bytes=8 * 2**20), "every-2": NS(saved_bytes=5 * 2**20)}
RSS = {"none": NS(meter_saved_bytes=9_000, meter_peak_bytes=20_000, peak_rss_bytes=500_000_000),
       "full": NS(meter_saved_bytes=3_000, meter_peak_bytes=16_000, peak_rss_bytes=500_000_000)}
# 4b: GPT-2 small (64 wide, 4 heads) at s = 32, b = 2; Llama-3.1-8B's Q, K, V at 4096 x 1
SBH, A = 32 * 2 * 64, 4
GELU_NEW = 4 * 4 * 4 * SBH
GPT2 = 4 * 12 * SBH + GELU_NEW + 4 * A * 64 + 16 * 64
QKV = 2 * 4096 * (4096 + 2 * 1024)

# key: (derived, measured, given, [(typed answer, words its reason must contain)])
CASES = {
    "3.1/full-recompute": (FULL, FULL, SIZES, [
        (FULL + FC2, "second matmul"), (FULL + FC2 + HEAD, "a whole forward"),
        (FULL - L * 4 * B * T * T * C, "attention's two matmuls"), (FULL // L, "one block"),
        (2 * (FULL + FC2 + HEAD), "never backward")]),
    "3.1/full-overhead": (0.271, 0.354, {}, [
        (1.0, "off by the whole backward"), (0.271, "FLOP model"), (2, "never re-run"),
        (0, "cannot be free"), (0.6, "more than the clock says")]),
    "3.1/bigger-batch": ("full", "full", {}, [
        ("none", "keeps every activation"), ("same", "a fraction of none's"),
        ("Neither", "which fits more")]),
    "3.2/bytes-per-param": (12, 12.0, {}, [
        (16, "master copy"), (8, "two fp32 moments alone"), (10, "add the bf16 gradient"),
        (4, "two fp32 moments"), (20, "neither")]),
    "3.2/gpus-full": (gpus(12, ACT70), None, {"n_params": N70, "activations": ACT70}, [
        (gpus(12, 0), "not sharded"), (gpus(16, ACT70), "16 bytes per parameter"),
        (gpus(2, ACT70), "the weights alone"), (1, "overflow"), (40, "more than needed")]),
    "3.3/naive-extra": (EXTRA, EXTRA, {}, [
        (EXTRA + 3 * T3 * T3, "a bool"), (EXTRA - T3 * T3, "add the causal mask"),
        (EXTRA + 4 * H * T3, "logsumexp"), (H * T3 * T3, "4-byte float32"),
        (EXTRA + 4 * H * T3 * T3, "not the scores too")]),
    "3.3/sdpa-bytes": (SDPA, SDPA, SIZES, [
        (4 * B * T * C, "add the logsumexp"), (4 * B * H * T * T, "no T x T matrix"),
        (12 * B * T * C + SDPA, "kept either way"), (L * SDPA, "per layer")]),
    "3.4/save-ops": ({"mm", "sdpa"}, {"mm", "sdpa"}, {}, [
        ({"mm"}, "SDPA costs FLOPs"), (["sdpa"], "the matmuls cost FLOPs"),
        ({"GELU"}, "recomputes* it"), ({"gelu", "layernorm"}, "FLOP-free"),
        (set(), "recomputes everything"), ({"mm", "gelu"}, "recomputes* it"),
        ({"mm", "layernorm"}, "exactly the ops")]),
    "3b.1/rss-drop": (0, 0, RSS, [
        (6_000, "live bytes drop"), (4_000, "meter's peak"), (500_000_000, "whole peak RSS"),
        (1_234, "cannot go down")]),
    "3b.1/every2-peak-ratio": (1.0, 1.0, {"runs": RUNS}, [
        (0.5, "not half the peak"), (0.625, "bytes kept for backward"),
        (0.75, "assumes activations"), (4 / 3, "holds no more"), (0.1, "made of gradients")]),
    "3b.2/block-grads": (0, 0, {}, [
        (4, "autograd.Function"), (2, "all or nothing"), (3, "none of its parameters")]),
    "3b.3/first-diff-step": (2, 2, {}, [
        (1, "step 1's forward runs before any recompute"), (0, "count from 1"),
        (3, "already differ"), (12, "differs early")]),
    "3b.4/compile-saved-at-zero": (0, 0, {"eager": 200_000, "input": 16_384}, [
        (200_000, "compile's default, budget 1"), (50_000, "one block's"),
        (16_384, "input is not counted"), (1_000, "compile keeps nothing")]),
    "3b.5/ddp-raises": ({"reentrant + find_unused_parameters",
                         "reentrant, module checkpointed twice"}, None, {}, [
        ({"reentrant + find_unused_parameters"}, "checkpointed twice under reentrant raises"),
        (("reentrant, module checkpointed twice",), "hides b's parameters"),
        ({"reentrant", "reentrant + find_unused_parameters",
          "reentrant + find_unused_parameters + static_graph",
          "reentrant, module checkpointed twice",
          "reentrant, module checkpointed twice + static_graph"}, "static_graph=True learns"),
        (set(), "two cases raise"), ({"reentrant"}, "a separate backward")]),
    "3b.6/tiny-ratio": (1.337, 3.61, {}, [
        (1.337, "FLOP model"), (1.33, "textbook"), (1.0, "more work than none"),
        (2.0, "each of the 32 regions"), (9.0, "not that large")]),
    "3b.7/bn-tracked": (2, 2, {}, [
        (1, "the recompute is a forward too"), (0, "forward counts one"),
        (3, "backward itself updates nothing"), (4, "each BatchNorm counts its own")]),
    "3b.8/sequential-share": (1.0, 1.0, {}, [
        (0.25, "runs the last segment plainly"), (0, "never checkpoints its last"),
        (0.5, "only the last segment"), (0.75, "it is every block")]),
    "4.1/adamw-state": (STATE, STATE, {"n_elements": N_EL, "n_tensors": N_T}, [
        (8 * N_EL, "`step` counter"), (4 * N_EL + 4 * N_T, "not one"),
        (4 * N_EL, "and a counter"), (12 * N_EL + 4 * N_T, "includes the parameters"),
        (16 * N_EL + 4 * N_T, "parameters + gradients + state"), (2 * N_EL + N_T, "elements")]),
    "4.2/block-bytes": (5_000, 5_000, {"x": torch.zeros(250), "failed_at": 3,
                                       "model": NS(blocks=[BLOCK])}, [
        (4_000, "add the block's output"), (6_000, "output twice"),
        (5_080, "counted apart"), (15_000, "all the finished blocks")]),
    "4.3/plan-recompute": (PLAN, PLAN, {"costs": COSTS, "plan": NS(best=NS(placement=PLACEMENT)),
                                        "full": NS(recompute_flops=999)}, [
        (200, "stops early"), (300, "every block whole"), (999, "full's recompute")]),
    "4.3/menu-peak": (9_000, 9_000, {"budget": 9_500, "plan": NS(best=NS(peak_bytes=8_800)),
                                     "state": 2_000}, [
        (9_500, "that is the budget"), (8_800, "plain-or-checkpointed plan"),
        (7_000, "step 1's peak")]),
    "4.3/nested-forwards": (465, 465, {}, [
        (496, "never re-run"), (1024, "not 32 for each"), (31, "square of the length"),
        (32, "own forward")]),
    "4.4/prescribed-peak": (9_000, 9_000, {"budget": 9_500, "none_peak": 12_000,
                                           "full": NS(peak_bytes=6_000)}, [
        (9_500, "that is the budget"), (12_000, "ran out of memory"), (6_000, "full's peak")]),
    "4b.1/gpt2-layer": (GPT2, GPT2, {}, [
        (SBH * (34 + 5 * A * 32 // 64), "the paper's count"),
        (2 * SBH * (34 + 5 * A * 32 // 64), "in float32"),
        (GPT2 - 3 * GELU_NEW // 4, "four 4h-wide tensors"),
        (GPT2 - 4 * A * 64 - 16 * 64, "small terms")]),
    "4b.2/llama-qkv": (QKV, QKV, {}, [
        (6 * 4096 * 4096, "not 32"), (2 * 4096 * 4096, "the query alone"),
        (QKV // 2, "2 bytes per"), (2 * 4096 * (4096 + 1024), "both K and V")]),
    "4b.4/small-peak": (7_000, 7_000, {"budget": 7_500, "none": 9_000, "full": 5_000}, [
        (7_500, "that is the budget"), (9_000, "without checkpointing"), (5_000, "full's peak")]),
}
MINE = sorted(k for k in all_tables() if k.split(".")[0] in ("3", "3b", "4", "4b"))


def test_every_predict_of_these_lessons_is_tried_here():
    assert MINE == sorted(CASES)


@pytest.mark.parametrize("key", sorted(CASES))
def test_each_typical_wrong_answer_gets_its_own_reason(key):
    derived, measured, given, tries = CASES[key]
    entry = lookup(key)
    assert len(entry.wrong) >= 3
    for typed, words in tries:
        reason = judge(typed, derived, measured, entry, given)
        assert words in reason, f"{key}: {typed!r} got {reason!r}"


@pytest.mark.parametrize("key", sorted(CASES))
def test_the_right_answer_is_right_and_none_says_so(key):
    derived, measured, given, _ = CASES[key]
    entry = lookup(key)
    right = measured if entry.judge == "measured" else derived
    assert judge(right, derived, measured, entry, given) == RIGHT
    if isinstance(right, set):  # the same names in a list are right too
        assert judge(sorted(right), derived, measured, entry, given) == RIGHT
    assert judge(None, derived, measured, entry, given) == NO_PREDICTION


@pytest.mark.parametrize("key", sorted(CASES))
def test_an_answer_of_another_form_gets_one_sentence_on_the_form(key):
    derived, measured, given, _ = CASES[key]
    entry = lookup(key)
    odd = [float("nan"), -3, "12", [1, 2]] if entry.form in ("number", "count") else [12, 0.5]
    for typed in odd:
        reason = judge(typed, derived, measured, entry, given)
        assert reason.startswith("the answer is"), f"{key}: {typed!r} got {reason!r}"


def test_where_a_section_refutes_a_model_the_measurement_decides():
    # 3.1: the textbook's 0.33 is within the clock's spread of the measured 0.354
    overhead = lookup("3.1/full-overhead")
    assert judge(0.33, 0.271, 0.354, overhead, {}) == RIGHT
    # 3b.6: the FLOP model (the derivation) is refuted, the measured 3.61x is right
    tiny = lookup("3b.6/tiny-ratio")
    assert judge(3.5, 1.337, 3.61, tiny, {}) == RIGHT
    assert "FLOP model" in judge(1.337, 1.337, 3.61, tiny, {})


def test_the_tables_name_what_the_package_names():
    from ckpt_course.pitfalls import DDP_CASES
    from ckpt_course.policies import OP_NAMES

    assert set(lookup("3.4/save-ops").choices) == set(OP_NAMES)
    assert lookup("3b.5/ddp-raises").choices == tuple(DDP_CASES)


LESSONS = [Path(__file__).resolve().parents[1] / "notebooks" / name for name in (
    "3_choosing_a_policy.ipynb", "3b_pitfalls.ipynb", "4_diagnose_a_real_oom.ipynb",
    "4b_your_model.ipynb")]


@pytest.mark.slow
@pytest.mark.parametrize("path", lesson_runs.each(LESSONS))
def test_wrong_first_guesses_run_to_the_end_and_each_gets_its_reason(path, lesson_run):
    """Every Predict of lessons 3-4b answered with its first typical wrong answer (the session's
    one run, tests/lesson_runs.py); the tables' answers must agree with the lesson's derivations
    (strict), each reveal prints its reason."""
    run = lesson_run(path)
    code = [c for c in run.nb.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code), "the lesson stopped early"
    lines = output_lines(run.nb)
    for what, reason in run.expected.items():
        head = next(i for i, line in enumerate(lines) if line.startswith(f"{what}: yours"))
        assert reason in lines[head + 1], f"{what}: {lines[head + 1]!r}"
