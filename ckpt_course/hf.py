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
import math
import os
import types
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor

from .models import next_token_loss, token_batch
from .units import check_positive_int, shown

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the Hub, even by accident

CONFIG_DIR = Path(__file__).with_name("hf_configs")


def config_names() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


# ---------------------------------------------------------------- configs
# The decoder-only architectures whose size fields are checked here (and tested: hf_configs/).
SUPPORTED = ("gpt2", "llama", "mistral", "qwen2")

# Bounds on a config's sizes, above any published decoder (Llama 3.1 405B: 126 layers, 16384
# wide, 53248 MLP, a 128K vocabulary; Gemma 3: 262K): beyond them a value is a typo. The layer
# bound also keeps the planner quick: its time grows with the square of the depth (on 2 busy
# cores, 22 s at 128 layers, 90 s at 256), so 10^6 layers would run for days.
MAX_LAYERS = 256
MAX_WIDTH = 2**17  # hidden_size, intermediate_size (also at most 64 x hidden_size)
MAX_VOCAB = 2**22
MAX_POSITIONS = 2**25
MAX_MLP_RATIO = 64

# transformers' names (GPT-2 maps them to n_layer, n_head, n_embd, n_positions itself)
_SIZE_FIELDS = ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "hidden_size",
                "intermediate_size", "n_inner", "head_dim", "vocab_size",
                "max_position_embeddings")
_OPTIONAL = ("num_key_value_heads", "intermediate_size", "n_inner", "head_dim")  # None: default


def _json_key(config_class, name: str) -> str:
    """The key a config.json of ``config_class`` writes ``name`` under (GPT-2: n_layer, ...)."""
    return getattr(config_class, "attribute_map", {}).get(name, name)


def _check_whole(key: str, value, where: str) -> None:
    """One size field: a whole number >= 1 (JSON 12.0, true and "12" are not)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where}: {key} must be a whole number >= 1, got {value!r}: write it "
                         f"without quotes or a decimal point, e.g. \"{key}\": 16")
    if value < 1:
        raise ValueError(f"{where}: {key} must be >= 1, got {value}: a model has at least one "
                         f"of each; write e.g. \"{key}\": 16")


def check_model_type(kind, where: str = "config") -> None:
    """A one-line error unless ``kind`` is a supported decoder-only causal LM, naming them."""
    if kind not in SUPPORTED if isinstance(kind, str) else True:
        raise ValueError(f"{where}: model_type {kind!r} is not a supported causal LM with "
                         f"repeated decoder layers (encoders such as bert and encoder-decoders "
                         f"such as t5 are not): use one of {', '.join(SUPPORTED)}")


def check_config(config, where: str | None = None) -> None:
    """Every size of ``config`` checked, each error one line naming the field and the fix: whole
    numbers >= 1, heads dividing the width, key/value heads dividing the heads, and the bounds
    above (so no size makes a tool hang)."""
    where = where or (getattr(config, "name_or_path", "") or "config")
    check_model_type(getattr(config, "model_type", None), where)
    _check_sizes(type(config), lambda name: (_json_key(type(config), name),
                                             getattr(config, name, _ABSENT)), where)


_ABSENT = object()


def _check_sizes(cls, get, where: str) -> None:
    """``check_config`` on what ``get(name)`` gives, (the key as written, its value): a config's,
    or a config.json's with its class's defaults, so a file is checked before transformers
    builds it."""
    values = {}
    for name in _SIZE_FIELDS:
        written, value = get(name)
        if value is _ABSENT or (value is None and name in _OPTIONAL):
            continue
        _check_whole(written, value, where)
        values[name] = value
    key = lambda name: _json_key(cls, name)  # noqa: E731
    heads, hidden = values["num_attention_heads"], values["hidden_size"]
    for name, most in (("num_hidden_layers", MAX_LAYERS), ("hidden_size", MAX_WIDTH),
                       ("intermediate_size", MAX_WIDTH), ("n_inner", MAX_WIDTH),
                       ("vocab_size", MAX_VOCAB), ("max_position_embeddings", MAX_POSITIONS)):
        if values.get(name, 0) > most:
            raise ValueError(f"{where}: {key(name)} {values[name]:,} is beyond what this course "
                             f"plans (at most {most:,}; the largest published models use far "
                             f"less): check the value")
    if hidden % heads:
        fixed = hidden // heads * heads or heads
        raise ValueError(f"{where}: {key('hidden_size')} {hidden} is not a multiple of "
                         f"{key('num_attention_heads')} {heads}: each head gets hidden_size / "
                         f"heads dimensions; use e.g. {key('hidden_size')} {fixed}")
    kv = values.get("num_key_value_heads", heads)
    if heads % kv:
        raise ValueError(f"{where}: num_key_value_heads {kv} does not divide num_attention_heads "
                         f"{heads}: grouped-query attention shares each key/value head among "
                         f"equally many query heads; use a divisor such as "
                         f"{max(d for d in range(1, kv + 1) if heads % d == 0)}")
    ffn = values.get("intermediate_size") or values.get("n_inner")
    if ffn is not None and ffn > MAX_MLP_RATIO * hidden:
        raise ValueError(f"{where}: the MLP width {ffn} is more than {MAX_MLP_RATIO} x "
                         f"{key('hidden_size')} {hidden}: check intermediate_size (published "
                         f"models use 2.5 to 8 x)")


EPSILON_FIELDS = ("rms_norm_eps", "layer_norm_epsilon", "layer_norm_eps")


def _check_file_fields(values: dict, where: str) -> None:
    """What a config.json must say itself (transformers would fill in a default silently) and
    the norms' epsilon: a small positive number."""
    if not any(k in values for k in ("vocab_size", "n_vocab")):
        raise ValueError(f"{where}: no vocab_size: a config.json names its vocabulary's size, "
                         f"e.g. \"vocab_size\": 32000")
    for name in EPSILON_FIELDS:
        value = values.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not (
                math.isfinite(value) and 0 < value < 1):
            raise ValueError(f"{where}: {name} {shown(value)} must be a small positive number: "
                             f"use e.g. \"{name}\": 1e-05")


def _read_json(path: Path) -> dict:
    try:
        values = json.loads(path.read_text(encoding="utf-8-sig"))  # a Windows editor's BOM
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}): fix the file or give another "
                         f"config.json") from None
    except RecursionError:
        raise ValueError(f"{path} is not a config.json (nested thousands of levels deep): fix "
                         f"the file or give another config.json") from None
    except OSError as error:
        raise ValueError(f"{path} cannot be read ({error.strerror}): check the path") from None
    if not isinstance(values, dict) or "model_type" not in values:
        raise ValueError(f"{path} has no \"model_type\": a transformers config.json names its "
                         f"architecture, e.g. \"model_type\": \"llama\"")
    return values


def load_config(name_or_path):
    """A transformers config from a shipped name (``config_names()``), a ``config.json`` path
    (or a folder holding one) or a config object, checked (``check_config``) before anything
    is built: this is where a config enters the package, so every tool gets the same one-line
    errors."""
    from transformers import CONFIG_MAPPING, PretrainedConfig

    if isinstance(name_or_path, PretrainedConfig):
        check_config(name_or_path)
        return name_or_path
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"config must be a shipped name ({', '.join(config_names())}), a "
                        f"config.json path or a transformers config, got "
                        f"{type(name_or_path).__name__}")
    text = str(name_or_path)
    path = CONFIG_DIR / f"{text.lower()}.json"
    if not text or "/" in text or not path.is_file():
        path = Path(text)
        if path.is_dir():
            path = path / "config.json"
        if not text or not path.is_file():
            raise ValueError(f"unknown model config {text!r}: give a config.json path or one of "
                             f"{', '.join(config_names())}")
    values = _read_json(path)
    kind = values.pop("model_type")
    check_model_type(kind, str(path))
    cls = CONFIG_MAPPING[kind]
    defaults = cls()

    def get(name):  # as written in the file, else the class's default
        for written in (_json_key(cls, name), name):
            if written in values:
                return written, values[written]
        return _json_key(cls, name), getattr(defaults, name, _ABSENT)

    _check_sizes(cls, get, str(path))  # before transformers, whose errors span lines
    _check_file_fields(values, str(path))
    from huggingface_hub.errors import StrictDataclassError

    try:
        config = cls(**values)
    except (TypeError, ValueError, StrictDataclassError) as error:  # strict fields: one line
        reason = " ".join(str(error).split())[:200]
        raise ValueError(f"{path}: {reason}: fix that field") from None
    config.name_or_path = path.stem if path.parent == CONFIG_DIR else str(path)
    check_config(config, str(path))
    if path.parent != CONFIG_DIR:  # the shipped ones are built by the tests
        _check_builds(config, str(path))
    return config


def _check_builds(config, where: str) -> None:
    """Build one layer of ``config`` on fake tensors (nothing allocated, milliseconds): a field
    transformers reads only when it builds the model (an unknown activation, a rope_theta that
    is text, a dropout of 2) fails here, where the config enters, in one line."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    try:
        with FakeTensorMode(), torch.random.fork_rng(devices=[]):
            build(with_layers(config, 1))
    except (TypeError, ValueError, KeyError, AttributeError, IndexError, RuntimeError) as error:
        reason = " ".join(str(error).split())[:200]
        raise ValueError(f"{where}: transformers cannot build this config ({type(error).__name__}"
                         f": {reason}): fix that field") from None


SMALL_MAX_WIDTH, SMALL_MAX_VOCAB = 2048, 2**16  # a small instance is built with real weights


def small_config(config, n_layer: int = 4, width: int = 64, n_head: int = 4, vocab: int = 256,
                 seq_len: int = 128):
    """The same architecture, small enough to run for real: ``n_layer`` layers, ``width`` wide,
    the same query/key-value head ratio (grouped-query attention stays grouped), the same MLP
    ratio, a ``vocab``-token vocabulary, ``seq_len`` positions and no dropout."""
    for what, value, most in (("n_layer", n_layer, MAX_LAYERS), ("width", width, SMALL_MAX_WIDTH),
                              ("n_head", n_head, width), ("vocab", vocab, SMALL_MAX_VOCAB),
                              ("seq_len", seq_len, SMALL_MAX_TOKENS)):
        check_positive_int(what, value)
        if value > most:
            raise ValueError(f"{what} {value:,} is more than a small instance runs for real (at "
                             f"most {most:,}): use a smaller {what}")
    if width % n_head:
        raise ValueError(f"width ({width}) must be a multiple of n_head ({n_head})")
    small = config.__class__(**config.to_diff_dict())
    heads, hidden = config.num_attention_heads, config.hidden_size
    kv = getattr(config, "num_key_value_heads", None) or heads
    small.num_hidden_layers, small.hidden_size, small.num_attention_heads = n_layer, width, n_head
    if hasattr(config, "num_key_value_heads"):  # the same grouping, or the closest that divides
        small.num_key_value_heads = max(d for d in range(1, n_head + 1)
                                        if n_head % d == 0 and d <= max(1, n_head * kv // heads))
    if getattr(config, "head_dim", None):
        small.head_dim = width // n_head
    ffn = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
    if ffn:
        small.__setattr__("intermediate_size" if hasattr(config, "intermediate_size")
                          else "n_inner", max(1, width * ffn // hidden))
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
def _sliced_rotary(rotary, x, position_ids):
    """The rotary module's forward, made once: the first positions of the shared tables."""
    n = position_ids.shape[-1]
    return rotary.shared_cos[:, :n], rotary.shared_sin[:, :n]


@dataclass(frozen=True)
class HFSizes:
    """What the course reads from a model's ``cfg``: its longest sequence and vocabulary."""

    seq_len: int
    vocab_size: int
    name: str


def find_decoder_layers(model: nn.Module, path: str | None = None) -> nn.ModuleList:
    """The repeated blocks of ``model``: the ``ModuleList`` (or ``nn.Sequential``) at ``path``
    (e.g. "model.layers") if given; else the one whose items are transformers
    ``GradientCheckpointingLayer``s (every HF decoder); else the longest ``ModuleList`` of modules
    all of one type; else the longest ``nn.Sequential`` of two or more such (timm's ViT keeps its
    blocks so: its forward runs them once each, in order, as the planner needs)."""
    if path is not None:
        if not isinstance(path, str):
            raise TypeError(f"layers is the dotted path of the block list, such as "
                            f"'model.layers', got {type(path).__name__} {path!r}")
        try:
            found = model.get_submodule(path) if path else model
        except AttributeError:
            raise ValueError(f"{type(model).__name__} has no submodule {path!r}: name the list "
                             f"of its repeated blocks, e.g. 'model.layers'") from None
        if not isinstance(found, (nn.ModuleList, nn.Sequential)) or len(found) == 0:
            raise ValueError(f"{path!r} in {type(model).__name__} is not a non-empty "
                             f"nn.ModuleList: name the list of its repeated blocks")
        return found
    lists = _block_lists(model, nn.ModuleList, 1) or _block_lists(model, nn.Sequential, 2)
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
        decoders = [m for m in lists if isinstance(m[0], GradientCheckpointingLayer)]
    except ImportError:  # a plain nn.Module, transformers or not
        decoders = []
    if decoders or lists:
        return max(decoders or lists, key=len)
    raise ValueError(f"{type(model).__name__} has no repeated blocks (no nn.ModuleList or "
                     f"nn.Sequential of modules of one type): checkpoint policies need one; "
                     f"name yours with layers='path.to.list'")


def _block_lists(model: nn.Module, kind: type, at_least: int) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, kind) and len(m) >= at_least
            and len({type(b) for b in m}) == 1]


@contextmanager
def _as_if_real():
    """transformers takes a FakeTensor for a trace (its mask code cannot read fake values), so
    on fake tensors it builds an explicit s x s causal mask and repeats the key/value heads for
    SDPA, which the real run does not: the tape would hold both. The real run here has no cache
    (offset 0) and one sequence per row (positions 0..T-1, nothing packed): fake tensors are
    given those answers."""
    from transformers import masking_utils

    decide = masking_utils._ignore_causal_mask_sdpa
    packed = masking_utils.find_packed_sequence_indices

    def ignore_mask(padding_mask, q_length, kv_length, q_offset, *args, **kwargs):
        q_offset = 0 if isinstance(q_offset, FakeTensor) else q_offset
        return decide(padding_mask, q_length, kv_length, q_offset, *args, **kwargs)

    masking_utils._ignore_causal_mask_sdpa = ignore_mask
    masking_utils.find_packed_sequence_indices = lambda ids: None
    try:
        yield
    finally:
        masking_utils._ignore_causal_mask_sdpa = decide
        masking_utils.find_packed_sequence_indices = packed


# the decoders whose forward reads ``inputs_embeds`` only before their first layer
_HOLD_EMBEDS_UNREAD = frozenset({"llama", "mistral", "qwen2"})


class HFCausalLM(nn.Module):
    """A causal LM (a transformers ``...ForCausalLM``, or any module mapping token ids to logits)
    with the course protocol. ``layers``: the path of its block list if not found by itself."""

    def __init__(self, lm: nn.Module, layers: str | None = None, seq_len: int | None = None):
        if not isinstance(lm, nn.Module):
            raise TypeError(f"HFCausalLM wraps an nn.Module (a transformers ...ForCausalLM), got "
                            f"{type(lm).__name__}: build one with hf.build(config)")
        super().__init__()
        self.lm = lm
        config = getattr(lm, "config", None)
        self._layers = [find_decoder_layers(lm, layers)]  # a list: not registered twice
        positions = longest(config) if config is not None else seq_len
        self.cfg = HFSizes(seq_len or positions, config.vocab_size if config is not None else 0,
                           getattr(config, "name_or_path", "") or type(lm).__name__)
        # its forward holds the token embeddings (x_0) in a local, unread after the first
        # layer, to its end: under prefix=full the region may free them when block 0 returns
        # (``policies._release_prefix_output``; read from each one's code, transformers 5.23)
        self.frees_prefix_output = getattr(config, "model_type", None) in _HOLD_EMBEDS_UNREAD
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
            rotary.forward = types.MethodType(_sliced_rotary, rotary)  # deepcopy-safe

    def forward(self, idx):
        if idx.shape[1] > self.cfg.seq_len:
            raise ValueError(f"sequence of {idx.shape[1]} tokens is longer than the config "
                             f"allows ({self.cfg.seq_len}): use at most {self.cfg.seq_len}")
        with _as_if_real() if isinstance(idx, FakeTensor) else nullcontext():
            out = self.lm(input_ids=idx, use_cache=False) if self.cfg.vocab_size else self.lm(idx)
        return getattr(out, "logits", out)

    def example_batch(self, batch_size: int = 2, seq_len: int | None = None, generator=None):
        check_positive_int("batch_size", batch_size)
        T = seq_len or min(self.cfg.seq_len, 128)
        if T > self.cfg.seq_len:
            raise ValueError(f"seq_len {T} is longer than the config allows ({self.cfg.seq_len}"
                             f"): use seq_len <= {self.cfg.seq_len}")
        return token_batch(self.cfg.vocab_size, batch_size, T, generator)

    def loss(self, batch):
        idx, targets = batch
        return next_token_loss(self(idx), targets)


def build(config, layers: str | None = None, seed: int = 0, attn: str = "sdpa") -> HFCausalLM:
    """The causal LM of ``config`` (a name, a path or a config), random weights, wrapped. Big
    configs: build under fake tensors (``hf_config_costs`` does)."""
    from transformers import AutoModelForCausalLM

    config = load_config(config)
    if attn not in ("sdpa", "eager"):
        raise ValueError(f"attn is 'sdpa' or 'eager' (the attention the course measures), got "
                         f"{attn!r}")
    config._attn_implementation = attn
    check_causal_lm(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        lm = AutoModelForCausalLM.from_config(config)
    return HFCausalLM(lm.train(), layers)


def check_causal_lm(config) -> None:
    """A one-line error unless transformers builds ``config`` as a causal LM (a stack of
    repeated decoder layers under a language-model head)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    check_model_type(config.model_type, getattr(config, "name_or_path", "") or "config")
    assert config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES  # every SUPPORTED one is


# The small instance runs for real: about 8 KiB and 0.5 ms per token and layer on a laptop CPU,
# so 64K tokens take some GiB and seconds per step; more would look like a hang.
SMALL_MAX_TOKENS = 2**16


def small_model(config, n_layer: int | None = None, batch_size: int | None = None,
                seq_len: int | None = None) -> tuple[HFCausalLM, int, int]:
    """The small real instance of ``config`` (``small_config``) for the doctor and lessons, with
    its batch size and sequence length; a sequence longer than the config allows is refused."""
    config = load_config(config)
    n_layer = 4 if n_layer is None else check_positive_int("n_layer", n_layer)
    batch_size = 4 if batch_size is None else check_positive_int("batch_size", batch_size)
    seq = min(64, longest(config)) if seq_len is None else check_positive_int("seq_len", seq_len)
    if seq > longest(config):
        raise ValueError(f"seq_len {seq} is longer than {config.name_or_path} allows "
                         f"({longest(config)} positions): use --seq {longest(config)} or less "
                         f"(seq_len={longest(config)} in Python)")
    if n_layer > MAX_LAYERS:
        raise ValueError(f"n_layer {n_layer} is more than this course runs (at most "
                         f"{MAX_LAYERS}): use fewer layers, e.g. --layers 8 (n_layer=8 in Python)")
    if batch_size * seq > SMALL_MAX_TOKENS:
        raise ValueError(f"batch_size {batch_size} x seq_len {seq} is {batch_size * seq:,} tokens, "
                         f"more than the small instance runs for real (at most "
                         f"{SMALL_MAX_TOKENS:,}): use a smaller batch or sequence (--batch, "
                         f"--seq)")
    return build(small_config(config, n_layer, seq_len=seq)), batch_size, seq


def with_layers(config, n_layer: int):
    """A copy of ``config`` with ``n_layer`` decoder layers (its per-layer lists cut to match)."""
    import copy

    one = copy.deepcopy(load_config(config))
    one.num_hidden_layers = n_layer
    types = list(getattr(one, "layer_types", None) or [])
    if types:  # cut, or grown by its last kind (a config that was cut before)
        one.layer_types = (types + types[-1:] * n_layer)[:n_layer]
    return one


def parameter_count(config) -> int:
    """Exact parameter count of the full config: a one-layer and a two-layer model built on
    fake tensors (nothing allocated), their difference being one layer's, so that the time does
    not grow with the depth (the decoder layers of one config are alike)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    config = load_config(config)
    with FakeTensorMode():
        one, two = (sum(p.numel() for p in build(with_layers(config, n)).lm.parameters())
                    for n in (1, 2))
    return one + (two - one) * (config.num_hidden_layers - 1)


# ---------------------------------------------------------------- full size, on fake tensors
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
          "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}


def as_dtype(dtype) -> torch.dtype:
    """A floating-point torch dtype, or its name as the command line writes it ("bf16")."""
    if isinstance(dtype, str) and dtype.lower() in DTYPES:
        return DTYPES[dtype.lower()]
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    raise ValueError(f"dtype {dtype!r} is not one the planner models: use torch.bfloat16, "
                     f"torch.float16 or torch.float32 (or 'bf16', 'fp16', 'fp32')")


def hf_config_costs(config, batch_size: int, seq_len: int, dtype: torch.dtype = torch.bfloat16,
                    master_weights: bool = False):
    """``costs.config_costs`` for a transformers config: a one-layer model of it built on fake
    tensors and measured by ``measure_costs`` (its block and trunk, from the model's own code),
    the block repeated ``num_hidden_layers`` times. Parameters, gradients and activations in
    ``dtype``; AdamW state as ``estimate`` assumes (two fp32 moments), plus a fp32 master copy
    (4 B per parameter) if ``master_weights``."""
    from dataclasses import replace

    from . import estimate
    from .costs import ChainCosts, measure_costs

    config = load_config(config)
    check_positive_int("batch_size", batch_size)
    check_positive_int("seq_len", seq_len)
    dtype = as_dtype(dtype)
    if not isinstance(master_weights, bool):
        raise TypeError(f"master_weights is True or False, got {master_weights!r}")
    if seq_len > longest(config):
        raise ValueError(f"seq_len {seq_len} is longer than {config.name_or_path} allows "
                         f"({longest(config)} positions): use seq_len <= {longest(config)}")
    n_layer, n_params = config.num_hidden_layers, parameter_count(config)
    one = with_layers(config, 1)
    _set_positions(one, seq_len)
    with estimate._fake(dtype), torch.random.fork_rng(devices=[]):
        model = build(one)
        measured = measure_costs(model, batch_size, seq_len, optimizer=None)
        largest = max(p.numel() for p in model.parameters())
    per_param = estimate.OPTIMIZER_BYTES_PER_PARAM["adamw"] + 4 * master_weights
    params, state = n_params * dtype.itemsize, n_params * per_param
    trunk = replace(measured.trunk, base_bytes=params + state, optimizer_peak=2 * 4 * largest)
    name = config.name_or_path or config.model_type
    notes = (f"{name} on fake tensors: one {type(model.blocks[0]).__name__} measured, times "
             f"{n_layer}; {str(dtype).removeprefix('torch.')} parameters, gradients and "
             f"activations; AdamW state {per_param} B per parameter"
             f"{' (fp32 master weights included)' if master_weights else ''}",)
    return ChainCosts(measured.layers * n_layer, trunk, name=name, param_bytes=params,
                      optimizer_bytes=state, notes=notes)


# ---------------------------------------------------------------- the plan, handed back
@dataclass(frozen=True)
class Handback:
    """A placement in the user's own terms: ``code`` runs on a transformers model ``model``."""

    placement: tuple
    expressed: tuple  # the placement the code applies (the plan's, or the closest expressible)
    code: str
    kind: str  # "transformers", "check_fn" or "none"
    note: str = ""

    def __str__(self) -> str:
        return (f"{self.note}\n" if self.note else "") + self.code

    def apply(self, model: nn.Module) -> None:
        """Run ``code`` on ``model`` (an ``HFCausalLM`` or its transformers model)."""
        lm = model.lm if isinstance(model, HFCausalLM) else model
        exec(compile(self.code, "<handback>", "exec"), {"model": lm})


def _single_blocks(placement) -> tuple[int, ...] | None:
    """The checkpointed blocks if each checkpointed segment is one block, else None."""
    ranges = [(i, j) for i, j, c in placement if c]
    return None if any(j - i > 1 for i, j in ranges) else tuple(i for i, _ in ranges)


def _each_alone(n: int, blocks) -> tuple:
    from .plan import placement_from_checkpointed

    return placement_from_checkpointed(n, [(k, k + 1) for k in blocks])


def _layers_path(model: nn.Module) -> str:
    lm = model.lm if isinstance(model, HFCausalLM) else model
    blocks = model.blocks if isinstance(model, HFCausalLM) else find_decoder_layers(lm)
    return next(name for name, m in lm.named_modules() if m is blocks)


def layers_path(model_or_config) -> str:
    """Where the decoder layers of a transformers model sit, e.g. "transformer.h" (GPT-2) or
    "model.layers" (Llama): found in the model itself, or in a one-layer model of a config built
    on fake tensors (nothing allocated)."""
    if isinstance(model_or_config, nn.Module):
        return _layers_path(model_or_config)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        return _layers_path(build(with_layers(model_or_config, 1)))


def _check_layers(layers):
    """``handback``'s ``layers``: None, a dotted attribute path, a model or a config."""
    import re

    from transformers import PretrainedConfig

    if layers is None or isinstance(layers, (nn.Module, PretrainedConfig)):
        return layers
    if not isinstance(layers, str) or not re.fullmatch(r"[A-Za-z_]\w*(\.\w+)*", layers):
        raise ValueError(f"layers is where the decoder layers sit, as a path such as "
                         f"'transformer.h' or 'model.layers', the model or its config; got "
                         f"{layers!r}")
    return layers


# the layers of any transformers decoder, in order, when the caller does not say where they sit
_ANY_DECODER = ("from transformers.modeling_layers import GradientCheckpointingLayer\n"
                "layers = [m for m in model.modules() if isinstance(m, "
                "GradientCheckpointingLayer)]\n")


def handback(placement, n: int, layers=None, costs=None) -> Handback:
    """The code that applies ``placement`` (of ``n`` blocks) to a transformers model ``model``.
    ``layers`` says where its decoder layers sit: their path ("transformer.h"), the model, or
    its config object (``layers_path``); without it the code finds them by transformers' class
    of decoder layers. The forms:

    - every ``n_every``-th block checkpointed (0, k, 2k, ...), each alone: transformers'
      ``model.activation_checkpointing_enable(every_n_layers=k)`` (transformers 5.x; each
      checkpointed layer runs ``torch.utils.checkpoint`` with ``use_reentrant=False``);
    - other single blocks: ``apply_activation_checkpointing(model, check_fn=...)`` on them;
    - a segment of several blocks is one checkpoint around several layers, which neither can
      express: given ``costs``, the cheapest expressible placement that peaks no higher is
      handed back instead (else each block of the segment alone), with a note;
    - a block under a menu option (selective, offload) is checkpointed whole, with a note:
      per-layer checkpointing in transformers has no such option.

    A plan that checkpoints the trunk (``prefix=full``, ``suffix=...``: the embeddings or the
    head inside a checkpoint) is refused: give the policy, not only its placement, so it can
    be, and plan without the trunk for transformers (``trunk=False``)."""
    from .plan import Placement, as_placement, predict  # noqa: F401
    from .policies import Policy, parse_policy

    if isinstance(placement, (str, Policy)) and (
            getattr(parse_policy(placement), "prefix", "")
            or getattr(parse_policy(placement), "suffix", "")):
        raise ValueError(f"{placement} checkpoints the embeddings or the head (prefix=, "
                         f"suffix=), which transformers' per-layer checkpointing cannot run: "
                         f"plan without them (auto_checkpoint(..., trunk=False)) to hand back")
    check_positive_int("n", n)
    layers = _check_layers(layers)
    placement = as_placement(n, placement)
    blocks = _single_blocks(placement)
    options = sorted({kind for _, _, kind in placement if isinstance(kind, str)})
    note = ("" if not options else
            f"# transformers checkpoints whole layers only: the plan's {', '.join(options)} "
            "layers are checkpointed whole here (less kept, more recomputed)")
    if blocks is None:
        want = predict(costs, placement) if costs is not None else None
        blocks = _closest_expressible(placement, n, costs, want)
        segment = ("# the plan checkpoints several layers as one segment, which per-layer "
                   "checkpointing cannot express;\n# this applies the cheapest per-layer placement "
                   "that peaks no higher" + ("" if costs is not None else " (each layer alone)"))
        if costs is not None and predict(costs, _each_alone(n, blocks)).peak_bytes > \
                want.peak_bytes:
            from .units import fmt_bytes

            got = predict(costs, _each_alone(n, blocks)).peak_bytes
            segment = ("# the plan checkpoints several layers as one segment, which per-layer "
                       "checkpointing cannot express,\n# and no per-layer placement peaks as low "
                       f"({fmt_bytes(want.peak_bytes)}): this checkpoints every layer, peak "
                       f"{fmt_bytes(got)}")
        note = "\n".join(filter(None, (note, segment)))
    if not blocks:
        code = "# nothing to checkpoint: train as is\nmodel.activation_checkpointing_disable()"
        return Handback(placement, _each_alone(n, ()), code, "none", note)
    k = blocks[1] - blocks[0] if len(blocks) > 1 else n
    if blocks[0] == 0 and blocks == tuple(range(0, n, k)):
        code = ("model.activation_checkpointing_enable(\n"
                "    activation_checkpointing_kwargs={\"use_reentrant\": False}, "
                f"every_n_layers={k})")
        return Handback(placement, _each_alone(n, blocks), code, "transformers", note)
    if layers is not None and not isinstance(layers, str):
        layers = layers_path(layers)  # found once: the same for every placement
    code = ("from functools import partial\n"
            "from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (\n"
            "    CheckpointImpl, apply_activation_checkpointing, checkpoint_wrapper)\n"
            + (_ANY_DECODER if layers is None else "") + "\n"
            f"chosen = {{id({'layers' if layers is None else 'model.' + layers}[i]) "
            f"for i in {list(blocks)}}}\n"
            "apply_activation_checkpointing(\n"
            "    model, checkpoint_wrapper_fn=partial(checkpoint_wrapper, "
            "checkpoint_impl=CheckpointImpl.NO_REENTRANT),\n"
            "    check_fn=lambda module: id(module) in chosen)")
    return Handback(placement, _each_alone(n, blocks), code, "check_fn", note)


def _closest_expressible(placement, n: int, costs, want) -> tuple[int, ...]:
    """Per-layer placements (the first m blocks, or every k-th), the cheapest whose predicted
    peak is at most ``want``'s; without costs, each block of every segment alone."""
    from .plan import predict

    inside = tuple(k for i, j, c in placement if c for k in range(i, j))
    if costs is None:
        return inside
    options = {tuple(range(m)) for m in range(n + 1)} | {tuple(range(0, n, k))
                                                        for k in range(1, n + 1)}
    fits = [(predict(costs, _each_alone(n, b)), b) for b in options]
    fits = [(p.recompute_flops, p.peak_bytes, b) for p, b in fits
            if p.peak_bytes <= want.peak_bytes]
    return min(fits)[2] if fits else tuple(range(n))


def verify_handback(model: HFCausalLM, handback_: Handback, batch_size: int = 2,
                    seq_len: int | None = None) -> tuple[int, int]:
    """(predicted, measured) peak of ``handback_`` applied to a fresh copy of ``model``: the
    course's meter around transformers' own checkpointing (no course policy installed)."""
    import copy

    from .costs import measure_costs
    from .plan import measure_peaks, predict

    if not isinstance(model, HFCausalLM) or not isinstance(handback_, Handback):
        raise TypeError("verify_handback(model, handback(...)) takes the HFCausalLM that build() "
                        f"made and a Handback; got {type(model).__name__}, "
                        f"{type(handback_).__name__}")
    costs = measure_costs(model, batch_size, seq_len)
    predicted = predict(costs, handback_.expressed).peak_bytes
    fresh = copy.deepcopy(model)
    handback_.apply(fresh)
    measured = measure_peaks(fresh, "none", batch_size=batch_size, seq_len=seq_len)[-1]
    return predicted, measured


# ---------------------------------------------------------------- the formula, term by term
@dataclass(frozen=True)
class Term:
    """One term of Korthikanti et al.'s per-layer activations, sbh(34 + 5as/h) bytes (2-byte
    activations, 1-byte dropout masks), next to the measured tape rows that make it."""

    name: str
    paper: int  # the paper's bytes
    measured: int  # bytes of the tape's storages that make this term
    rows: tuple[str, ...]  # "module: op.attr" of those storages


# (term, paper's bytes in units of sbh or, for "as2b", a*s*s*b)
PAPER = (("norm inputs", 4, "sbh"), ("QKV projection input", 2, "sbh"), ("Q, K, V", 6, "sbh"),
         ("softmax output, its dropout mask and output", 5, "as2b"),
         ("attention output (out-projection input)", 2, "sbh"), ("dropout masks", 2, "sbh"),
         ("MLP input", 2, "sbh"), ("activation function (GeLU input)", 8, "sbh"),
         ("MLP second linear input", 8, "sbh"), ("not in the paper", 0, "sbh"))


def _term_of(entry, hidden: int) -> str:
    """Which paper term a saved storage of a decoder layer belongs to, by its module and op."""
    module, op, attr = entry.module.split(".")[-1], entry.op, entry.attr
    if "Dropout" in op or entry.dtype == torch.bool:
        return "dropout masks"
    if "norm" in module or module.startswith("ln_"):
        return "norm inputs" if entry.shape[-1] == hidden else "not in the paper"
    if op.startswith("ScaledDotProduct"):
        return {"query": "Q, K, V", "key": "Q, K, V", "value": "Q, K, V",
                "logsumexp": "softmax output, its dropout mask and output",
                "output": "attention output (out-projection input)"}.get(attr, "not in the paper")
    if module in ("c_attn", "q_proj", "k_proj", "v_proj", "qkv_proj"):
        return "QKV projection input"
    if module in ("o_proj", "out_proj") or entry.module.endswith("attn.c_proj"):
        return "attention output (out-projection input)"
    if module in ("c_fc", "gate_proj", "up_proj", "fc1", "gate_up_proj"):
        return "MLP input"
    if module in ("c_proj", "down_proj", "fc2"):
        return "MLP second linear input"
    return "activation function (GeLU input)" if "mlp" in entry.module else "not in the paper"


def formula_terms(tape, config, batch_size: int, seq_len: int) -> list[Term]:
    """The tape of one decoder layer of ``config`` (run on ``batch_size`` x ``seq_len`` tokens)
    next to Korthikanti et al.'s sbh(34 + 5as/h), term by term: every activation storage of the
    tape is assigned to exactly one term (``_term_of``), so ``sum(measured)`` is the tape's
    activation bytes and ``sum(paper)`` the formula."""
    h, a = config.hidden_size, config.num_attention_heads
    unit = {"sbh": seq_len * batch_size * h, "as2b": a * seq_len * seq_len * batch_size}
    rows: dict[str, list] = {name: [] for name, _, _ in PAPER}
    for entry in tape.entries:
        if not entry.is_param:
            rows[_term_of(entry, h)].append(entry)
    return [Term(name, k * unit[per], sum(e.nbytes for e in rows[name]),
                 tuple(f"{e.module}: {e.label}" for e in rows[name])) for name, k, per in PAPER]


REAL_LAYER_BYTES = 2 * 2**30  # a real one-layer model above this: use fake tensors


def layer_tape(config, batch_size: int, seq_len: int, dtype: torch.dtype = torch.float32,
               fake: bool = False):
    """The tape of the first decoder layer of ``config`` on ``batch_size`` x ``seq_len`` tokens:
    built for real (small configs) or, with ``fake``, on fake tensors (any size)."""
    from . import estimate
    from .tape import record_tape

    check_positive_int("batch_size", batch_size)
    check_positive_int("seq_len", seq_len)
    dtype = as_dtype(dtype)
    one = with_layers(config, 1)
    if longest(one) < seq_len:
        _set_positions(one, seq_len)
    if not fake:  # built and run for real: bounded like the small instance
        if batch_size * seq_len > SMALL_MAX_TOKENS:
            raise ValueError(f"{batch_size} x {seq_len} tokens is more than a real run here "
                             f"takes (at most {SMALL_MAX_TOKENS:,}): pass fake=True, or fewer")
        if parameter_count(one) * dtype.itemsize > REAL_LAYER_BYTES:
            raise ValueError(f"one layer of {one.name_or_path or one.model_type} with its "
                             f"embeddings is over {REAL_LAYER_BYTES // 2**30} GiB of weights: pass "
                             f"fake=True (nothing allocated), or a small_config")
    old = torch.get_default_dtype()
    with estimate._fake(dtype) if fake else nullcontext(), torch.random.fork_rng(devices=[]):
        torch.set_default_dtype(dtype)
        try:
            model = build(one)
            model(torch.zeros(batch_size, seq_len, dtype=torch.long))  # the layer's kwargs
            x = torch.randn(batch_size, seq_len, one.hidden_size, requires_grad=True)
            return record_tape(model.blocks[0], x)
        finally:
            torch.set_default_dtype(old)
