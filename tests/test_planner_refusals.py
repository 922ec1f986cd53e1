"""Refusals and messages of the planner that held-out testers found wrong (issue 20: Q2, Q7-Q10,
P9, P10): each bad input is refused in one line naming the fix, before any work is done."""

import pytest
import torch
from torch import nn

from ckpt_course.policies import applied, parse_policy


class Residual(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.norm, self.linear = nn.LayerNorm(width), nn.Linear(width, width)

    def forward(self, x):
        return x + torch.tanh(self.linear(self.norm(x)))


class Chain(nn.Module):
    """Embedding, three residual blocks, a head; ``again``: the code after the last block calls
    block 0 once more (Q10's model)."""

    def __init__(self, again=False, width=16):
        super().__init__()
        self.embed, self.head = nn.Linear(8, width), nn.Linear(width, 4)
        self.blocks = nn.ModuleList(Residual(width) for _ in range(3))
        self.again = again

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        if self.again:
            x = self.blocks[0](x)
        return self.head(x)


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


def test_a_block_called_inside_an_open_suffix_is_refused_in_forward_in_one_line():
    """Q10: the code after the last block calls block 0 again. Under ``suffix=full`` that call
    ran inside the suffix's checkpoint and backward failed with torch's multi-line
    CheckpointError; now forward stops at the call, and nothing was trained."""
    torch.manual_seed(0)
    model = Chain(again=True)
    with applied(model, "menu:suffix=full"), pytest.raises(RuntimeError) as error:
        model(torch.randn(4, 8)).sum().backward()
    message = str(error.value)
    assert message.startswith("block 0 ran after the last block, inside the checkpointed suffix")
    assert message.endswith("drop suffix=") and "\n" not in message
    assert all(p.grad is None for p in model.parameters())
    model(torch.randn(4, 8)).sum().backward()  # the policy is gone and nothing stayed open
