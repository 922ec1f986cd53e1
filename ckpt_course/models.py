"""The course's models. Every one exposes the same small protocol, which the rest of the package
relies on:

- ``model.blocks``: an ``nn.ModuleList`` of blocks, each mapping one tensor to one tensor. This is
  the "sequence of layers" that checkpoint policies cut into segments.
- ``model.example_batch(batch_size, seq_len=None, generator=None)``: inputs and targets.
- ``model.loss(batch)``: the scalar training loss for such a batch.

Three families:
- ``HandTraceNet``: 4 x (Linear -> ReLU), 512 wide; with batch 512 in fp32 every activation is
  exactly 1 MiB, so a learner can count the tape by hand.
- ``TinyGPT`` from a ``GPTConfig``: small enough to train on 2 CPU cores, with naive or
  ``scaled_dot_product_attention`` attention.
- ``Llama`` from a ``LlamaConfig`` (RMSNorm, SwiGLU, grouped-query attention, RoPE), with presets up
  to 70B, meant to be built on fake tensors (see ``ckpt_course.estimate``) and never allocated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from .units import check_positive_int


def _randn(shape, generator):
    return torch.randn(shape, generator=generator)


def token_batch(vocab_size: int, batch_size: int, seq_len: int, generator=None) -> tuple:
    """A language model's batch: random token ids and the same ids shifted by one (targets)."""
    idx = torch.randint(vocab_size, (batch_size, seq_len + 1), generator=generator)
    return idx[:, :-1].contiguous(), idx[:, 1:].contiguous()


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of next-token logits, in fp32 (a no-op for fp32 logits) as mixed precision
    computes it."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.to(logits.device).flatten())


def _batch_shape(batch_size, seq_len, longest: int | None) -> tuple[int, int | None]:
    """Check an example batch's size (and length, against the model's ``longest``) before any
    work, with the fix in the message."""
    check_positive_int("batch_size", batch_size)
    if seq_len is not None:
        check_positive_int("seq_len", seq_len)
        if longest is not None and seq_len > longest:
            raise ValueError(f"seq_len {seq_len} is longer than the model supports ({longest}, "
                             f"its config's seq_len): use seq_len <= {longest}, or build the "
                             f"model with a config of seq_len={seq_len}")
    return batch_size, seq_len


# ---------------------------------------------------------------- the hand-trace net
class HandTraceNet(nn.Module):
    """``depth`` blocks of Linear(width, width) -> ReLU. Batch 512, width 512, fp32: 1 MiB each."""

    def __init__(self, width: int = 512, depth: int = 4):
        super().__init__()
        self.width = width
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(width, width), nn.ReLU()) for _ in range(depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x

    def example_batch(self, batch_size: int = 512, seq_len=None, generator=None):
        _batch_shape(batch_size, None, None)
        return (
            _randn((batch_size, self.width), generator),
            _randn((batch_size, self.width), generator),
        )

    def loss(self, batch) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(self(x), y)


# ---------------------------------------------------------------- the tiny GPT
@dataclass(frozen=True)
class GPTConfig:
    n_layer: int = 4
    d_model: int = 128
    n_head: int = 4
    seq_len: int = 128
    vocab_size: int = 256
    dropout: float = 0.0
    attention: str = "sdpa"  # "sdpa" (scaled_dot_product_attention) or "naive" (softmax(QK^T)V)

    def __post_init__(self):
        if self.attention not in ("sdpa", "naive"):
            raise ValueError(f"attention must be 'sdpa' or 'naive', not {self.attention!r}")
        if self.d_model % self.n_head:
            raise ValueError(
                f"d_model ({self.d_model}) must be a multiple of n_head ({self.n_head})"
            )


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        B, T, C = x.shape
        H = self.cfg.n_head
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, H, C // H).transpose(1, 2) for t in (q, k, v))
        y = self.core(q, k, v)
        return self.drop(self.proj(y.transpose(1, 2).reshape(B, T, C)))

    def core(self, q, k, v):
        """The attention core: softmax(QK^T / sqrt(d)) V, causal."""
        p = self.cfg.dropout if self.training else 0.0
        if self.cfg.attention == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        T = q.shape[-2]
        att = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        return F.dropout(att, p) @ v


class GPTBlock(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.d_model, 4 * cfg.d_model),
            nn.GELU(),
            nn.Linear(4 * cfg.d_model, cfg.d_model),
            nn.Dropout(cfg.dropout),
        )

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


def check_parameters_fit(cfg) -> None:
    """Refuse, before any allocation, a real (not fake, not meta) model whose float32 weight
    matrices alone exceed this machine's free memory: building it would fail in the allocator
    or swap. Counted in closed form (embeddings, head and each block's matrices; biases and
    norms left out: a lower bound), not by ``estimate.parameter_count``, which builds the model
    on fake tensors and would run on every model built. Fake or meta tensors pass."""
    from torch._subclasses.fake_tensor import FakeTensor

    from .step import available_memory  # step imports this module: imported when called

    probe = torch.empty(0)
    if isinstance(probe, FakeTensor) or probe.is_meta:
        return
    d, n = cfg.d_model, cfg.vocab_size * cfg.d_model
    if isinstance(cfg, GPTConfig):
        n_params = 2 * n + cfg.seq_len * d + cfg.n_layer * 12 * d * d
    else:
        kv = cfg.n_kv_head * cfg.head_dim
        n_params = 2 * n + cfg.n_layer * (2 * d * d + 2 * d * kv + 3 * d * cfg.d_ff)
    free = available_memory()
    if free is None or 4 * n_params <= free:
        return
    raise ValueError(f"{cfg} has over {n_params:,} parameters ({4 * n_params / 2**30:.1f} GiB in "
                     f"float32), more than the {free / 2**30:.1f} GiB this machine has free: use "
                     "a smaller d_model, n_layer or vocab_size, or build it on fake tensors "
                     "(ckpt_course.estimate)")


class TinyGPT(nn.Module):
    def __init__(self, cfg: GPTConfig = GPTConfig()):
        super().__init__()
        check_parameters_fit(cfg)
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(GPTBlock(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def forward(self, idx):
        T = idx.shape[1]
        if T > self.cfg.seq_len:
            raise ValueError(
                f"sequence of {T} tokens is longer than the config's seq_len {self.cfg.seq_len}: "
                f"use at most {self.cfg.seq_len} tokens, or a config with a longer seq_len"
            )
        x = self.drop(self.tok(idx) + self.pos(torch.arange(T, device=idx.device)))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

    def example_batch(self, batch_size: int = 8, seq_len: int | None = None, generator=None):
        _batch_shape(batch_size, seq_len, self.cfg.seq_len)
        return token_batch(self.cfg.vocab_size, batch_size, seq_len or self.cfg.seq_len, generator)

    def loss(self, batch):
        idx, targets = batch
        return next_token_loss(self(idx.to(self.head.weight.device)), targets)


# ---------------------------------------------------------------- Llama-style configs
@dataclass(frozen=True)
class LlamaConfig:
    n_layer: int
    d_model: int
    n_head: int
    n_kv_head: int
    d_ff: int
    vocab_size: int = 32000
    seq_len: int = 4096
    name: str = "custom"

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def with_layers(self, n_layer: int) -> LlamaConfig:
        return replace(self, n_layer=n_layer)


# The shapes of Llama 2 7B, 13B and 70B (6.74B, 13.0B and 68.98B parameters, as published and
# asserted in tests; no weights), and a tiny one that runs for real on a laptop. Real Llama 3,
# Mistral, Qwen and GPT-2 configs: ckpt_course.hf.
LLAMA_PRESETS: dict[str, LlamaConfig] = {
    "llama-tiny": LlamaConfig(4, 128, 4, 2, 344, vocab_size=256, seq_len=128, name="llama-tiny"),
    "llama-7b": LlamaConfig(32, 4096, 32, 32, 11008, name="llama-7b"),
    "llama-13b": LlamaConfig(40, 5120, 40, 40, 13824, name="llama-13b"),
    "llama-70b": LlamaConfig(80, 8192, 64, 8, 28672, name="llama-70b"),
}


def llama_config(name: str) -> LlamaConfig:
    """A preset by name ('7b' and 'llama-7b' both work)."""
    key = name if name in LLAMA_PRESETS else f"llama-{name}"
    if key not in LLAMA_PRESETS:
        raise ValueError(f"unknown config {name!r}; choose one of: {', '.join(LLAMA_PRESETS)}")
    return LLAMA_PRESETS[key]


def _rope_tables(cfg: LlamaConfig):
    inv = 1.0 / (10000 ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim))
    angles = torch.outer(torch.arange(cfg.seq_len, dtype=torch.float32), inv)
    angles = torch.cat([angles, angles], dim=-1)
    dtype = torch.get_default_dtype()
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


class LlamaAttention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        hd = cfg.head_dim
        self.wq = nn.Linear(cfg.d_model, cfg.n_head * hd, bias=False)
        self.wk = nn.Linear(cfg.d_model, cfg.n_kv_head * hd, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.n_kv_head * hd, bias=False)
        self.wo = nn.Linear(cfg.n_head * hd, cfg.d_model, bias=False)
        cos, sin = _rope_tables(cfg)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, x):
        B, T, _ = x.shape
        c, hd = self.cfg, self.cfg.head_dim
        q = self.wq(x).view(B, T, c.n_head, hd).transpose(1, 2)
        k = self.wk(x).view(B, T, c.n_kv_head, hd).transpose(1, 2)
        v = self.wv(x).view(B, T, c.n_kv_head, hd).transpose(1, 2)
        cos, sin = self.cos[:T], self.sin[:T]
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=c.n_kv_head != c.n_head
        )
        return self.wo(y.transpose(1, 2).reshape(B, T, c.n_head * hd))


class SwiGLU(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.w3 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.w2 = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class LlamaBlock(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=1e-5)
        self.attn = LlamaAttention(cfg)
        self.mlp_norm = nn.RMSNorm(cfg.d_model, eps=1e-5)
        self.mlp = SwiGLU(cfg)

    def forward(self, x):
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    """Build big presets only on fake tensors (``ckpt_course.estimate``): 70B is 140 GB in bf16."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        check_parameters_fit(cfg)
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(LlamaBlock(cfg) for _ in range(cfg.n_layer))
        self.norm = nn.RMSNorm(cfg.d_model, eps=1e-5)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def forward(self, idx):
        if idx.shape[1] > self.cfg.seq_len:
            raise ValueError(f"sequence of {idx.shape[1]} tokens is longer than the rotary table "
                             f"(the config's seq_len {self.cfg.seq_len}): use at most "
                             f"{self.cfg.seq_len} tokens, or a config with a longer seq_len")
        x = self.tok(idx)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))

    def example_batch(self, batch_size: int = 1, seq_len: int | None = None, generator=None):
        _batch_shape(batch_size, seq_len, self.cfg.seq_len)
        return token_batch(self.cfg.vocab_size, batch_size, seq_len or self.cfg.seq_len, generator)

    def loss(self, batch):
        idx, targets = batch
        return next_token_loss(self(idx), targets)


# ---------------------------------------------------------------- the course models by name
COURSE_MODELS = {"hand-trace": 512, "gpt": 8, "llama-tiny": 8}  # name -> default batch size


def build_model(name: str, n_layer: int | None = None, d_model: int | None = None,
                dropout: float = 0.0) -> nn.Module:
    """A course model by name (``COURSE_MODELS``), with the config's defaults unless given."""
    if name not in COURSE_MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(COURSE_MODELS)}")
    for what, value in (("n_layer", n_layer), ("d_model", d_model)):
        if value is not None:
            check_positive_int(what, value)
    if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"dropout is a probability in [0, 1), got {dropout!r}")
    if name == "hand-trace":
        if dropout:
            raise ValueError("the hand-trace net has no dropout: leave dropout at 0")
        return HandTraceNet(width=d_model or 512, depth=n_layer or 4)
    if name == "gpt":
        cfg = GPTConfig(dropout=dropout)
        return TinyGPT(replace(cfg, n_layer=n_layer or cfg.n_layer, d_model=d_model or cfg.d_model))
    if d_model is not None or dropout:
        raise ValueError("llama-tiny has a fixed width and no dropout: give only n_layer")
    cfg = LLAMA_PRESETS["llama-tiny"]
    return Llama(cfg.with_layers(n_layer) if n_layer else cfg)


def longest_sequence(model: nn.Module) -> int | None:
    """The longest sequence ``model`` takes (its config's seq_len); None: it takes no sequence."""
    cfg = getattr(model, "cfg", None)
    return getattr(cfg, "seq_len", None)


def sized(cpu, gpu):
    """The one switch between lesson sizes: ``gpu`` when CUDA is present, else ``cpu``."""
    return gpu if torch.cuda.is_available() else cpu


def course_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
