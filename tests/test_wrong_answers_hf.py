"""Lesson 4b's check: it passes the solution and rejects the layer counts learners write (the
paper's formula, K/V with every head, RMSNorm's float32 copy forgotten, GeLU's one tensor)."""

import pytest

from ckpt_course.checks import CheckFailed, phase4b


def right(hidden, heads, kv_heads, intermediate, seq, batch, p):
    sb, d = seq * batch, hidden // heads
    return (2 * ((4 + p) * sb * hidden + 4 * sb) + 3 * p * sb * hidden
            + 2 * p * sb * kv_heads * d + 4 * heads * sb + p * sb * hidden
            + 4 * p * sb * intermediate)


def paper(hidden, heads, kv_heads, intermediate, seq, batch, p):
    return seq * batch * hidden * (34 + 5 * heads * seq // hidden)


def every_head(hidden, heads, kv_heads, intermediate, seq, batch, p):
    return right(hidden, heads, heads, intermediate, seq, batch, p)


def norms_in_dtype(hidden, heads, kv_heads, intermediate, seq, batch, p):
    fp32_copy = 2 * (4 - p) * seq * batch * hidden  # as if RMSNorm kept its input in p bytes
    return right(hidden, heads, kv_heads, intermediate, seq, batch, p) - fp32_copy


def gelu_like(hidden, heads, kv_heads, intermediate, seq, batch, p):
    two = 2 * p * seq * batch * intermediate  # silu's output and the product forgotten
    return right(hidden, heads, kv_heads, intermediate, seq, batch, p) - two


def as_float(*args):
    return float(right(*args))


def test_the_right_count_passes():
    assert phase4b.layer_bytes(right) is None


@pytest.mark.parametrize("wrong, hint", [
    (paper, "than the tape holds"), (every_head, "how many heads"),
    (norms_in_dtype, "RMSNorm"), (gelu_like, "than the tape holds"), (as_float, "whole number")])
def test_wrong_counts_fail_with_a_hint_not_the_number(wrong, hint):
    with pytest.raises(CheckFailed, match=hint) as failed:
        phase4b.layer_bytes(wrong)
    assert "tape holds" in str(failed.value) or hint in str(failed.value)
