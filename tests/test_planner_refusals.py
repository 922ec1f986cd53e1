"""Refusals and messages of the planner that held-out testers found wrong (issue 20: Q2, Q7-Q10,
P9, P10): each bad input is refused in one line naming the fix, before any work is done."""

import pytest

from ckpt_course.policies import parse_policy


@pytest.mark.parametrize("text, says", [
    ("menu:suffix=", "suffix= names no option: write suffix=full or selective:..."),
    ("menu:prefix=", "prefix= names no option: write prefix=full"),
    ("menu:0-1=full,suffix= ", "suffix= names no option"),
    ("menu:suffix=full,suffix=full", "suffix= is given twice: give it once"),
    ("menu:0-1=full,prefix=full,prefix=full", "prefix= is given twice: give it once"),
    ("menu:suffix=full,0=full,suffix=selective:ops=1", "suffix= is given twice"),
    ("menu:suffix=bogus", "the suffix runs full or selective:..."),
    ("menu:0=full,suffix=every-2", "the suffix runs full or selective:..."),
])
def test_an_empty_repeated_or_unknown_trunk_clause_is_refused_in_one_line(text, says):
    """Q8: an empty clause was dropped (``menu:suffix=`` read as ``menu:none``), a repeated one
    let the later win, and ``suffix=bogus`` listed the block policies the suffix refuses."""
    with pytest.raises(ValueError) as error:
        parse_policy(text)
    message = str(error.value)
    assert says in message and "\n" not in message
    assert "every-K" not in message  # not the block policies' list


def test_a_wrong_selective_suffix_still_says_what_is_wrong_with_its_ops():
    with pytest.raises(ValueError, match=r"unknown op name\(s\) \['zz'\]"):
        parse_policy("menu:suffix=selective:save=zz")
