"""Ranking ops by measured time: elementwise ops cost time, so the knapsack changes with the cap."""

import pytest
import torch

from ckpt_course.models import GPTConfig, TinyGPT
from ckpt_course.ranking import rank_ops, selective_from_ranking


@pytest.fixture(scope="module")
def ranking():
    torch.manual_seed(0)
    return rank_ops(TinyGPT(GPTConfig(d_model=32, n_head=2, seq_len=16)), batch_size=2,
                    by="time")


def test_every_op_that_runs_has_a_measured_time(ranking):
    ran = [c for c in ranking if c.calls]
    assert ran and all(c.seconds > 0 for c in ran)
    assert {"gelu", "layernorm"} <= {c.op for c in ran if c.flops == 0}
    rates = [c.bytes_per_second for c in ranking]
    assert rates == sorted(rates, reverse=True)


def test_a_time_cap_saves_what_a_flop_cap_calls_free(ranking):
    free = {c.op for c in ranking if c.flops == 0 and c.nameable and c.saved_bytes}
    by_flops = selective_from_ranking(ranking)  # FLOP cap 0: FLOP-free ops are all recomputed
    by_time = selective_from_ranking(ranking, max_recompute_s=0.0)
    assert not free & set(by_flops.ops) and free <= set(by_time.ops)
    everything = sum(c.seconds for c in ranking)
    assert str(selective_from_ranking(ranking, max_recompute_s=everything)) == "full"


def test_a_larger_time_cap_saves_no_more_ops(ranking):
    total = sum(c.seconds for c in ranking)
    saved = [set(selective_from_ranking(ranking, max_recompute_s=f * total).ops)
             for f in (0, 0.1, 0.3, 0.6)]
    assert all(a >= b for a, b in zip(saved, saved[1:], strict=False))


def test_rank_by_must_be_known():
    with pytest.raises(ValueError, match="flops, time"):
        rank_ops(TinyGPT(GPTConfig(d_model=32, n_head=2, seq_len=16)), batch_size=2, by="bytes")
