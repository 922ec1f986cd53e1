"""Ranking ops by time: elementwise ops cost time, so the knapsack changes with the cap.

No test here reads a clock: the op times are given (``op_seconds``), the same for every run."""

import pytest
import torch

from ckpt_course.models import GPTConfig, TinyGPT
from ckpt_course.ranking import OpCost, rank_ops, selective_from_ranking

# Given per-op forward times (seconds) for one block, shaped like a CPU's: matmuls dominate, the
# FLOP-free ops (gelu, layernorm, add, ...) are cheap but not free.
GIVEN = {"mm": 4e-4, "sdpa": 2e-4, "gelu": 5e-5, "layernorm": 3e-5, "add": 1e-5,
         "dropout": 2e-5, "view": 1e-6, "transpose": 1e-6, "split": 1e-6, "t": 1e-6}


@pytest.fixture(scope="module")
def ranking():
    torch.manual_seed(0)
    model = TinyGPT(GPTConfig(d_model=32, n_head=2, seq_len=16))
    return rank_ops(model, batch_size=2, by="time",
                    op_seconds={op: GIVEN.get(op, 1e-6) for op in _ops(model)})


def _ops(model):
    return {c.op for c in rank_ops(model, batch_size=2)}


def test_given_times_are_used_and_ranked_by_bytes_per_second(ranking):
    assert {c.op: c.seconds for c in ranking if c.op in GIVEN} == {
        op: s for op, s in GIVEN.items() if op in {c.op for c in ranking}}
    rates = [c.bytes_per_second for c in ranking]
    assert rates == sorted(rates, reverse=True)


def test_a_time_cap_saves_what_a_flop_cap_calls_free(ranking):
    free = {c.op for c in ranking if c.flops == 0 and c.nameable and c.saved_bytes}
    assert {"gelu", "layernorm"} <= free
    by_flops = selective_from_ranking(ranking)  # FLOP cap 0: FLOP-free ops are all recomputed
    by_time = selective_from_ranking(ranking, max_recompute_s=0.0)
    assert not free & set(by_flops.ops) and free <= set(by_time.ops)
    everything = sum(c.seconds for c in ranking)
    assert str(selective_from_ranking(ranking, max_recompute_s=everything)) == "full"


def test_a_larger_time_cap_saves_no_more_ops(ranking):
    total = sum(c.seconds for c in ranking)
    saved = [_saved(selective_from_ranking(ranking, max_recompute_s=f * total))
             for f in (0, 0.01, 0.03, 0.1, 0.3, 0.6, 1.0)]
    assert all(a >= b for a, b in zip(saved, saved[1:], strict=False))
    assert saved[0] != saved[-1]  # the dial does move


def _saved(policy) -> set[str]:
    return set(getattr(policy, "ops", ()))  # "full" saves no op's output


def test_the_cap_takes_a_prefix_never_skips_to_a_cheaper_op():
    """A knapsack that skips 'big' (does not fit) and takes 'small' would save more at a larger
    cap than at a smaller one; the prefix stops at the first op that does not fit."""
    ranking = [OpCost("gelu", 100, 0, 1, 1.0), OpCost("mm", 90, 10, 1, 5.0),  # 100, 18 B/s
               OpCost("layernorm", 10, 0, 1, 1.0)]  # 10 B/s: last
    assert set(selective_from_ranking(ranking, max_recompute_s=1.0).ops) == {"mm", "layernorm"}
    assert set(selective_from_ranking(ranking, max_recompute_s=2.0).ops) == {"mm", "layernorm"}
    assert set(selective_from_ranking(ranking, max_recompute_s=6.0).ops) == {"layernorm"}
    assert str(selective_from_ranking(ranking, max_recompute_s=7.0)) == "full"


def test_rank_by_must_be_known():
    with pytest.raises(ValueError, match="flops, time"):
        rank_ops(TinyGPT(GPTConfig(d_model=32, n_head=2, seq_len=16)), batch_size=2, by="bytes")


def test_ranking_and_timing_do_not_import_each_other():
    """timing (the op timer, a block's input) sits below ranking: ranking imports it, never the
    other way round (checked in a fresh interpreter, where nothing else loaded ranking)."""
    import subprocess
    import sys

    code = ("import sys, ckpt_course.timing; "
            "assert 'ckpt_course.ranking' not in sys.modules, 'timing imports ranking'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_cap_walks_the_ops_by_its_own_measure(ranking):
    """Lesson 3 asks a time-ranked list for a FLOP cap: the FLOP-free ops are recomputed however
    the clock ordered them (an mm ranked above gelu by time must not stop the FLOP prefix)."""
    shuffled = list(reversed(ranking))
    for cap in (0, 10**6, 10**12):
        assert str(selective_from_ranking(ranking, cap)) == str(
            selective_from_ranking(shuffled, cap))
    free = {c.op for c in ranking if c.flops == 0 and c.nameable}
    assert not free & set(getattr(selective_from_ranking(ranking), "ops", ()))
    mm_first = sorted(ranking, key=lambda c: c.op != "mm")  # the clock put an mm on top
    assert not free & set(getattr(selective_from_ranking(mm_first), "ops", ()))
