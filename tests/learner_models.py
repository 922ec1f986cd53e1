"""A learner's own model, as the planner's tests build it: blocks in a list between a Linear
embedding and a Linear head, with nothing of the course protocol (``auto`` adapts it)."""

from __future__ import annotations

from torch import nn


class ResMLP(nn.Module):
    """LayerNorm, Linear 4x, GELU, Linear, residual: a transformer's MLP half."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(),
                                 nn.Linear(4 * width, width))

    def forward(self, x):
        return x + self.mlp(self.norm(x))


class LinearNet(nn.Module):
    """A Linear embedding, the blocks, a Linear head."""

    def __init__(self, blocks, d_in: int = 16, width: int = 32, d_out: int = 4):
        super().__init__()
        self.embed, self.head = nn.Linear(d_in, width), nn.Linear(width, d_out)
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)
