"""Bring your own model: a Hugging Face causal LM, built from its config, under the course's tools.

``load_config("llama-3.1-70b")`` reads a shipped config (``hf_configs/*.json``, written from the
published ``config.json`` files) or any ``config.json`` path; nothing is ever downloaded (the
package never calls ``from_pretrained``). ``build(config)`` makes the model with random weights
and wraps it in ``HFCausalLM``, which speaks the course protocol (``.blocks``,
``.example_batch``, ``.loss``), so tape, meter, policies, costs, plan, doctor, compare and train
run on it unchanged::

    small = build(small_config(load_config("llama-3.1-8b")))     # 4 layers, 64 wide: real
    costs = hf_config_costs(load_config("llama-3.1-70b"), 1, 4096)  # full size: fake tensors
    plan = make_plan(shard(costs, 8), "80GiB")
    print(handback(plan.best, 80))        # the transformers call, or a check_fn snippet

Two adaptations, both because the planner measures each block *alone*:

- A standalone call ``block(x)`` gets the keyword arguments the model last passed that block
  (attention mask, rotary tables, ...), through a forward pre-hook; a call from the model itself
  passes its own and is left alone.
- Rotary tables are made once per model as buffers (``HFCausalLM`` replaces the rotary module's
  forward by a slice of them) instead of once per step: a table made by the model's prefix is
  shared by every layer, which a block measured alone would count once per layer. HF computes
  them in float32 and casts to the activation dtype; the buffers hold the same values.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .units import check_positive_int

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the Hub, even by accident

CONFIG_DIR = Path(__file__).with_name("hf_configs")


def config_names() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


# ---------------------------------------------------------------- configs
def load_config(name_or_path):
    """A transformers config from a shipped name (``config_names()``) or a ``config.json`` path
    (or a folder holding one); one-line errors for an unknown name, bad JSON or an unknown
    ``model_type``."""
    from transformers import PretrainedConfig

    if isinstance(name_or_path, PretrainedConfig):
        return name_or_path
    text = str(name_or_path)
    path = CONFIG_DIR / f"{text.lower()}.json"
    if not path.is_file():
        path = Path(text)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ValueError(f"unknown model config {text!r}: give a config.json path or one of "
                             f"{', '.join(config_names())}")
    try:
        values = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}): fix the file or give another "
                         f"config.json") from None
    if not isinstance(values, dict) or "model_type" not in values:
        raise ValueError(f"{path} has no \"model_type\": a transformers config.json names its "
                         f"architecture, e.g. \"model_type\": \"llama\"")
    from transformers import CONFIG_MAPPING

    kind = values.pop("model_type")
    if kind not in CONFIG_MAPPING:
        raise ValueError(f"{path}: model_type {kind!r} is not known to this transformers; use "
                         f"one such as llama, mistral, qwen2 or gpt2")
    config = CONFIG_MAPPING[kind](**values)
    config.name_or_path = path.stem if path.parent == CONFIG_DIR else str(path)
    return config


def small_config(config, n_layer: int = 4, width: int = 64, n_head: int = 4, vocab: int = 256,
                 seq_len: int = 128):
    """The same architecture, small enough to run for real: ``n_layer`` layers, ``width`` wide,
    the same query/key-value head ratio (grouped-query attention stays grouped), the same MLP
    ratio, a ``vocab``-token vocabulary, ``seq_len`` positions and no dropout."""
    for what, value in (("n_layer", n_layer), ("width", width), ("n_head", n_head),
                        ("vocab", vocab), ("seq_len", seq_len)):
        check_positive_int(what, value)
    if width % n_head:
        raise ValueError(f"width ({width}) must be a multiple of n_head ({n_head})")
    small = config.__class__(**config.to_diff_dict())
    heads, hidden = config.num_attention_heads, config.hidden_size
    kv = getattr(config, "num_key_value_heads", None) or heads
    small.num_hidden_layers, small.hidden_size, small.num_attention_heads = n_layer, width, n_head
    if hasattr(config, "num_key_value_heads"):
        small.num_key_value_heads = max(1, n_head * kv // heads)
    if getattr(config, "head_dim", None):
        small.head_dim = width // n_head
    ffn = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
    if ffn:
        small.__setattr__("intermediate_size" if hasattr(config, "intermediate_size")
                          else "n_inner", width * ffn // hidden)
    small.vocab_size = vocab
    _set_positions(small, seq_len)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(small, key, None) is not None:
            setattr(small, key, 0)
    for key in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "attention_dropout", "dropout"):
        if hasattr(small, key):
            setattr(small, key, 0.0)
    small.name_or_path = f"{config.name_or_path or config.model_type} (small: {n_layer} layers, " \
                         f"{width} wide)"
    return small


def _positions_key(config) -> str:
    return "n_positions" if hasattr(config, "n_positions") else "max_position_embeddings"


def _set_positions(config, seq_len: int) -> None:
    setattr(config, _positions_key(config), seq_len)
    rope = getattr(config, "rope_parameters", None) or {}
    original = rope.get("original_max_position_embeddings")
    if original and original > seq_len:  # llama3 scaling needs the original length <= this
        rope["original_max_position_embeddings"] = seq_len


def longest(config) -> int:
    return getattr(config, _positions_key(config))


# ---------------------------------------------------------------- the wrapper
@dataclass(frozen=True)
class HFSizes:
    """What the course reads from a model's ``cfg``: its longest sequence and vocabulary."""

    seq_len: int
    vocab_size: int
    name: str


def find_decoder_layers(model: nn.Module, path: str | None = None) -> nn.ModuleList:
    """The repeated blocks of ``model``: the ``ModuleList`` at ``path`` (e.g. "model.layers")
    if given; else the one whose items are transformers ``GradientCheckpointingLayer``s (every
    HF decoder); else the longest ``ModuleList`` of modules all of one type."""
    if path is not None:
        found = model.get_submodule(path) if path else model
        if not isinstance(found, nn.ModuleList) or len(found) == 0:
            raise ValueError(f"{path!r} in {type(model).__name__} is not a non-empty "
                             f"nn.ModuleList: name the list of its repeated blocks")
        return found
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m)
             and len({type(b) for b in m}) == 1]
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
        decoders = [m for m in lists if isinstance(m[0], GradientCheckpointingLayer)]
    except ImportError:  # a plain nn.Module, transformers or not
        decoders = []
    if decoders or lists:
        return max(decoders or lists, key=len)
    raise ValueError(f"{type(model).__name__} has no repeated decoder layers (no nn.ModuleList "
                     f"of blocks): checkpoint policies need one; pass layers='path.to.list'")


class HFCausalLM(nn.Module):
    """A causal LM (a transformers ``...ForCausalLM``, or any module mapping token ids to logits)
    with the course protocol. ``layers``: the path of its block list if not found by itself."""

    def __init__(self, lm: nn.Module, layers: str | None = None, seq_len: int | None = None):
        super().__init__()
        self.lm = lm
        config = getattr(lm, "config", None)
        self._layers = [find_decoder_layers(lm, layers)]  # a list: not registered twice
        positions = longest(config) if config is not None else seq_len
        self.cfg = HFSizes(seq_len or positions, config.vocab_size if config is not None else 0,
                           getattr(config, "name_or_path", "") or type(lm).__name__)
        self._kwargs: dict[int, dict] = {}
        for block in self.blocks:
            block.register_forward_pre_hook(self._fill_kwargs, with_kwargs=True)
        self._share_rotary_tables()

    @property
    def blocks(self) -> nn.ModuleList:
        return self._layers[0]

    def _fill_kwargs(self, block, args, kwargs):
        """The model's call is recorded; a standalone ``block(x)`` gets that call's kwargs."""
        if kwargs or len(args) > 1:
            self._kwargs[id(block)] = kwargs
            return None
        return args, dict(self._kwargs.get(id(block), {}))

    def _share_rotary_tables(self) -> None:
        rotaries = [m for m in self.lm.modules() if type(m).__name__.endswith("RotaryEmbedding")]
        for rotary in rotaries:
            dtype = next(self.lm.parameters()).dtype
            x = torch.empty(0, dtype=dtype, device=rotary.inv_freq.device)
            cos, sin = rotary(x, torch.arange(self.cfg.seq_len, device=x.device)[None])
            # on every block too: a block measured alone tracks its own buffers only
            for module in (rotary, *self.blocks):
                module.register_buffer("shared_cos", cos, persistent=False)
                module.register_buffer("shared_sin", sin, persistent=False)

            def sliced(x, position_ids, rotary=rotary):
                n = position_ids.shape[-1]
                return rotary.shared_cos[:, :n], rotary.shared_sin[:, :n]

            rotary.forward = sliced

    def forward(self, idx):
        if idx.shape[1] > self.cfg.seq_len:
            raise ValueError(f"sequence of {idx.shape[1]} tokens is longer than the config "
                             f"allows ({self.cfg.seq_len}): use at most {self.cfg.seq_len}")
        out = self.lm(input_ids=idx, use_cache=False) if self.cfg.vocab_size else self.lm(idx)
        return getattr(out, "logits", out)

    def example_batch(self, batch_size: int = 2, seq_len: int | None = None, generator=None):
        check_positive_int("batch_size", batch_size)
        T = seq_len or min(self.cfg.seq_len, 128)
        if T > self.cfg.seq_len:
            raise ValueError(f"seq_len {T} is longer than the config allows ({self.cfg.seq_len}"
                             f"): use seq_len <= {self.cfg.seq_len}")
        idx = torch.randint(self.cfg.vocab_size, (batch_size, T + 1), generator=generator)
        return idx[:, :-1].contiguous(), idx[:, 1:].contiguous()

    def loss(self, batch):
        idx, targets = batch
        logits = self(idx)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def build(config, layers: str | None = None, seed: int = 0, attn: str = "sdpa") -> HFCausalLM:
    """The causal LM of ``config`` (a name, a path or a config), random weights, wrapped. Big
    configs: build under fake tensors (``hf_config_costs`` does)."""
    from transformers import AutoModelForCausalLM

    config = load_config(config)
    config._attn_implementation = attn
    if not _is_causal_lm(config):
        raise ValueError(f"{config.model_type} has no causal-LM head in transformers: give a "
                         f"decoder-only config (llama, mistral, qwen2, gpt2, ...)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        lm = AutoModelForCausalLM.from_config(config)
    return HFCausalLM(lm.train(), layers)


def _is_causal_lm(config) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def parameter_count(config) -> int:
    """Exact parameter count of the full config, built on fake tensors (nothing allocated)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        lm = build(config).lm
        return sum(p.numel() for p in lm.parameters())
