"""Training memory of big models without the memory: run them on fake tensors.

A fake tensor (``torch._subclasses.fake_tensor.FakeTensorMode``) has a shape, a dtype and a
storage, but no data. Every op runs its real shape logic, picks the same kernel it would pick on
real tensors (flash attention included), and autograd saves the same tensors for backward. So the
activation tape (``ckpt_course.tape``) of a Llama-70B layer is exact, yet takes a fraction of a
second and a few hundred MB instead of 140 GB. Two traps, both checked on torch 2.13:

- Do not use the meta device instead: SDPA silently takes the math path there and "saves" T x T
  attention matrices the real run never makes.
- ``.to(torch.bfloat16)`` fails on a fake module; build it under ``torch.set_default_dtype``.

One block is measured and multiplied by ``n_layer``; the rest (embeddings, final norm, head, loss)
is measured on the same model built with zero blocks. Per layer, the numbers a policy needs are
what the block saves (no checkpointing) and the block's input (all a fully checkpointed block
keeps until backward recomputes it).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from .models import GPTBlock, GPTConfig, Llama, LlamaBlock, LlamaConfig, TinyGPT
from .tape import record_tape
from .units import check_positive_int, fmt_bytes

# Optimizer state per parameter. AdamW keeps two moments (exp_avg, exp_avg_sq); we assume fp32
# moments, as mixed-precision training does: 2 x 4 bytes. (torch's own AdamW stores them in the
# parameter's dtype.) The common mixed-precision recipe also keeps a fp32 master copy of the
# weights, which the optimizer updates (bf16 weights are rounded from it): ``master_weights=True``
# adds those 4 bytes, 12 -> 16 bytes per parameter with AdamW.
MASTER_BYTES_PER_PARAM = 4
OPTIMIZER_BYTES_PER_PARAM = {"adamw": 8, "adam": 8, "sgd-momentum": 4, "sgd": 0}


@dataclass(frozen=True)
class LayerActivations:
    """One block's forward: what it saves for backward, and the size of its input."""

    saved_bytes: int  # unique non-parameter storages on the tape (no checkpointing)
    input_bytes: int  # the block input: what full checkpointing keeps per layer

    def __str__(self) -> str:
        return f"saves {fmt_bytes(self.saved_bytes)}; input {fmt_bytes(self.input_bytes)}"


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of one training step, by category. Assumptions: parameters and gradients in
    ``dtype``; optimizer state ``optimizer_bytes_per_param`` per parameter; activations at their
    peak (the start of backward, or the recompute of the last block under "full")."""

    config: str
    batch_size: int
    seq_len: int
    dtype: torch.dtype
    n_layer: int
    n_params: int
    param_bytes: int
    grad_bytes: int
    optimizer: str
    optimizer_bytes_per_param: int
    optimizer_bytes: int
    layer: LayerActivations
    non_block_bytes: int  # saved outside the blocks: embedding indices, final norm, head, loss
    activations: dict[str, int]  # policy ("none", "full") -> activation bytes at the peak
    master_bytes: int = 0  # fp32 master weights (``master_weights=True``)

    @property
    def state_bytes(self) -> int:
        """Weights, gradients, optimizer state and master weights: what no policy touches."""
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes + self.master_bytes

    @property
    def bytes_per_param(self) -> float:
        return self.state_bytes / self.n_params

    def total(self, policy: str = "none") -> int:
        """Every category at once: an upper bound (gradients grow as activations are freed)."""
        if policy not in self.activations:
            raise ValueError(f"unknown policy {policy!r}; choose one of {list(self.activations)}")
        return self.state_bytes + self.activations[policy]

    @property
    def totals(self) -> dict[str, int]:
        return {policy: self.total(policy) for policy in self.activations}

    def __str__(self) -> str:
        rows = [
            ("parameters", f"{self.n_params:,} x {self.dtype.itemsize} B", self.param_bytes),
            ("gradients", f"{self.dtype.itemsize} B/param", self.grad_bytes),
            ("optimizer", f"{self.optimizer}, {self.optimizer_bytes_per_param} B/param",
             self.optimizer_bytes),
        ]
        if self.master_bytes:
            rows.append(("master weights", f"fp32, {MASTER_BYTES_PER_PARAM} B/param",
                         self.master_bytes))
        for policy, b in self.activations.items():
            rows.append((f"activations ({policy})", "", b))
        for policy, b in self.totals.items():
            rows.append((f"total ({policy})", "", b))
        dtype = str(self.dtype).removeprefix("torch.")
        head = (f"{self.config}: batch {self.batch_size} x seq {self.seq_len}, {dtype}, "
                f"{self.n_layer} layers; per layer {self.layer}")
        return "\n".join([head] + [f"  {a:<20} {b:<24} {fmt_bytes(c):>11}" for a, b, c in rows])


def parameter_count(cfg: LlamaConfig | GPTConfig) -> int:
    """Exact parameter count: one fake block times ``n_layer``, plus the rest of the model."""
    _check_config(cfg)
    with _fake(torch.float32):
        return cfg.n_layer * _count(_block(cfg)) + _count(_trunk(cfg))


def layer_activation_bytes(cfg: LlamaConfig | GPTConfig, batch_size: int, seq_len: int,
                           dtype: torch.dtype = torch.bfloat16) -> LayerActivations:
    """What ONE block saves for backward on a (batch_size, seq_len, d_model) input, measured by
    the tape on fake tensors, and that input's size."""
    _check(cfg, batch_size, seq_len, dtype)
    with _fake(dtype):
        return _measure_block(_block(cfg), cfg, batch_size, seq_len)


def model_memory(cfg: LlamaConfig | GPTConfig, batch_size: int, seq_len: int,
                 dtype: torch.dtype = torch.bfloat16, optimizer: str = "adamw",
                 master_weights: bool = False) -> MemoryEstimate:
    """Parameters, gradients, optimizer state and activations of a training step, without
    allocating any of it. Activations for two policies:

    - "none": every block's tape, plus what is saved outside the blocks.
    - "full" (every block checkpointed): each block keeps only its input; backward recomputes one
      block at a time. The peak is the larger of the start of backward (inputs + what is saved
      outside the blocks) and the recompute of the last block (inputs + one block's tape).

    ``master_weights``: also a fp32 copy of the weights (mixed precision's usual recipe).
    """
    _check(cfg, batch_size, seq_len, dtype)
    if not isinstance(master_weights, bool):
        raise TypeError(f"master_weights is True or False, not {master_weights!r}")
    if master_weights and dtype == torch.float32:
        raise ValueError("master weights are fp32 copies of bf16/fp16 weights: with "
                         "dtype=torch.float32 leave master_weights=False")
    if optimizer not in OPTIMIZER_BYTES_PER_PARAM:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of "
                         f"{list(OPTIMIZER_BYTES_PER_PARAM)}")
    with _fake(dtype):
        block, trunk = _block(cfg), _trunk(cfg)
        n_params = cfg.n_layer * _count(block) + _count(trunk)
        layer = _measure_block(block, cfg, batch_size, seq_len)
        batch = trunk.example_batch(batch_size, seq_len)
        non_block = record_tape(trunk.loss, batch, model=trunk).activation_bytes
    L, per_param = cfg.n_layer, OPTIMIZER_BYTES_PER_PARAM[optimizer]
    return MemoryEstimate(
        config=getattr(cfg, "name", type(cfg).__name__), batch_size=batch_size, seq_len=seq_len,
        dtype=dtype, n_layer=L, n_params=n_params, param_bytes=n_params * dtype.itemsize,
        grad_bytes=n_params * dtype.itemsize, optimizer=optimizer,
        optimizer_bytes_per_param=per_param, optimizer_bytes=n_params * per_param,
        layer=layer, non_block_bytes=non_block,
        master_bytes=n_params * MASTER_BYTES_PER_PARAM if master_weights else 0,
        activations={
            "none": L * layer.saved_bytes + non_block,
            "full": L * layer.input_bytes + max(non_block, layer.saved_bytes),
        },
    )


# ---------------------------------------------------------------- helpers
@contextmanager
def _fake(dtype: torch.dtype):
    """Build and run under fake tensors, with ``dtype`` as the default (restored after)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with FakeTensorMode():
            yield
    finally:
        torch.set_default_dtype(old)


def _check_config(cfg):
    if not isinstance(cfg, (LlamaConfig, GPTConfig)):
        raise TypeError(f"expected a LlamaConfig or GPTConfig (see ckpt_course.models; "
                        f"llama_config('70b') gives a preset), got {type(cfg).__name__}")


def _check(cfg, batch_size: int, seq_len: int, dtype: torch.dtype):
    _check_config(cfg)
    check_positive_int("batch_size", batch_size)
    check_positive_int("seq_len", seq_len)
    if seq_len > cfg.seq_len:
        raise ValueError(f"seq_len {seq_len} is longer than the config's seq_len {cfg.seq_len}; "
                         f"use dataclasses.replace(cfg, seq_len={seq_len})")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating type such as torch.bfloat16, not {dtype}")


def _block(cfg) -> nn.Module:
    return LlamaBlock(cfg) if isinstance(cfg, LlamaConfig) else GPTBlock(cfg)


def _trunk(cfg) -> nn.Module:
    """The model with zero blocks: embeddings, final norm and head."""
    if isinstance(cfg, LlamaConfig):
        return Llama(cfg.with_layers(0))
    return TinyGPT(replace(cfg, n_layer=0))


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _measure_block(block: nn.Module, cfg, batch_size: int, seq_len: int) -> LayerActivations:
    # requires_grad: in a model the block input is the previous block's output
    x = torch.randn(batch_size, seq_len, cfg.d_model, requires_grad=True)
    tape = record_tape(block, x)
    return LayerActivations(tape.activation_bytes, x.untyped_storage().nbytes())
