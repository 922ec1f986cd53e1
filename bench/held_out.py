"""The held-out 3-block models a tester compared with torch.compile (finding P15): hand
attention with masked_fill, softmax and Dropout; RMSNorm + SwiGLU; a residual LayerNorm-GELU
MLP; and a mix of a residual MLP, a SwiGLU block and a Dropout MLP. Each is a plain
``nn.Module`` with a ``blocks`` list, planned through ``auto._course_model`` (the adapter
``auto_checkpoint`` uses: the given batch, a mean-square loss), as a learner's model is."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ckpt_course.auto import _course_model


class Attn(nn.Module):
    """Pre-LayerNorm hand attention: causal masked_fill, softmax, Dropout(0.1), residual."""

    def __init__(self, width: int):
        super().__init__()
        self.qkv, self.o = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.d, self.n = nn.Dropout(0.1), nn.LayerNorm(width)

    def forward(self, x):
        q, k, v = self.qkv(self.n(x)).chunk(3, -1)
        a = (q @ k.transpose(-1, -2)) / 8
        a = a.masked_fill(torch.ones(a.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
        return x + self.o(self.d(a.softmax(-1)) @ v)


class SwiGLU(nn.Module):
    """RMSNorm, then a SwiGLU MLP (gate and up 3x wider, no biases), residual."""

    def __init__(self, width: int):
        super().__init__()
        self.g = nn.Linear(width, 3 * width, bias=False)
        self.u = nn.Linear(width, 3 * width, bias=False)
        self.dn = nn.Linear(3 * width, width, bias=False)
        self.n = nn.RMSNorm(width)

    def forward(self, x):
        h = self.n(x)
        return x + self.dn(F.silu(self.g(h)) * self.u(h))


class Res(nn.Module):
    """LayerNorm, Linear 4x, GELU, Linear, residual."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(),
                                 nn.Linear(4 * width, width))

    def forward(self, x):
        return x + self.mlp(self.norm(x))


class DropMLP(nn.Module):
    """Linear 4x, ReLU, Dropout(0.2), Linear, Dropout(0.2), residual."""

    def __init__(self, width: int):
        super().__init__()
        self.l1, self.l2 = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)
        self.d = nn.Dropout(0.2)

    def forward(self, x):
        return x + self.d(self.l2(self.d(F.relu(self.l1(x)))))


class Net(nn.Module):
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


def _made(blocks, shape):
    torch.manual_seed(0)
    net = Net([make(32) for make in blocks])
    return _course_model(net, torch.randn(*shape), None), None


MODELS = {
    "attn": lambda: _made([Attn] * 3, (4, 12, 16)),
    "swiglu": lambda: _made([SwiGLU] * 3, (4, 12, 16)),
    "res": lambda: _made([Res] * 3, (64, 16)),
    "mixed": lambda: _made([Res, SwiGLU, DropMLP], (4, 12, 16)),
}
