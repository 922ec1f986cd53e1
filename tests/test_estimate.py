"""Fake-tensor estimates against hand formulas, and against real tensors to the byte."""

from dataclasses import replace

import pytest
import torch

from ckpt_course.estimate import layer_activation_bytes, model_memory, parameter_count
from ckpt_course.models import LLAMA_PRESETS, GPTConfig, LlamaBlock, TinyGPT, llama_config
from ckpt_course.tape import record_tape
from ckpt_course.units import GiB


def _llama_params(c):
    kv = c.n_kv_head * c.head_dim
    per_layer = 2 * c.d_model**2 + 2 * c.d_model * kv + 3 * c.d_model * c.d_ff + 2 * c.d_model
    return c.n_layer * per_layer + 2 * c.vocab_size * c.d_model + c.d_model  # + emb, head, norm


@pytest.mark.parametrize("name, published", [("7b", 6.74e9), ("70b", 68.98e9)])
def test_parameter_count_matches_llama2(name, published):
    cfg = llama_config(name)
    n = parameter_count(cfg)
    assert n == _llama_params(cfg)
    assert abs(n - published) / published < 0.01


def _llama_layer_formula(c, B, T):
    """Bytes one Llama block saves in bf16 (2 bytes), from its ops, with RMSNorm in fp32 (4)."""
    d, F, H, kv = c.d_model, c.d_ff, c.n_head, c.n_kv_head * c.head_dim
    norm = 4 * B * T * d + 4 * B * T + 4 * B * T * d  # x.float(), rstd (B,T,1), x * rstd: fp32
    attn = (2 * B * T * d  # normed input of wq/wk/wv (one storage, saved three times)
            + 2 * B * T * d + 2 * 2 * B * T * kv  # flash attention: q after RoPE, k, v (GQA)
            + 4 * B * H * T  # logsumexp (B, H, T) in fp32
            + 2 * B * T * d)  # attention output, which wo also saves (a view)
    mlp = 2 * B * T * d + 4 * 2 * B * T * F  # normed input; w1 out, silu out, w3 out, product
    return 2 * norm + attn + mlp  # = 24BTd + 8BT + 4BT*kv + 4BHT + 8BTF


def test_llama_70b_layer_activations():
    cfg = llama_config("70b")
    layer = layer_activation_bytes(cfg, batch_size=1, seq_len=4096)
    assert 1.5 * GiB < layer.saved_bytes < 1.8 * GiB
    assert layer.saved_bytes == _llama_layer_formula(cfg, 1, 4096) == 1_762_689_024
    assert layer.input_bytes == 1 * 4096 * 8192 * 2


def test_llama_70b_model_memory():
    cfg, B, T = llama_config("70b"), 1, 4096
    m = model_memory(cfg, B, T)
    n = _llama_params(cfg)
    assert (m.n_params, m.param_bytes, m.grad_bytes, m.optimizer_bytes) == (n, 2 * n, 2 * n, 8 * n)
    d, V = cfg.d_model, cfg.vocab_size
    # token ids and targets: with B=1, idx[:, :-1] and idx[:, 1:] are already contiguous, so
    # .contiguous() returns views and both are one int64 storage of T+1 ids, counted once;
    # final norm (fp32 x, rstd, x * rstd); head input (bf16); fp32 log-softmax (the loss
    # upcasts the logits); nll_loss's scalar total_weight
    non_block = 8 * (T + 1) + (8 * B * T * d + 4 * B * T) + 2 * B * T * d + 4 * B * T * V + 4
    assert m.non_block_bytes == non_block
    per_layer = _llama_layer_formula(cfg, B, T)
    assert m.activations == {
        "none": 80 * per_layer + non_block,
        "full": 80 * B * T * d * 2 + max(non_block, per_layer),
    }
    assert m.total("full") == 12 * n + m.activations["full"]
    assert torch.get_default_dtype() == torch.float32  # restored after building in bf16
    assert "llama-70b" in str(m) and "activations (full)" in str(m)


@pytest.mark.parametrize("attention", ["sdpa", "naive"])
def test_gpt_fake_estimate_equals_real_tape(attention):
    cfg = GPTConfig(n_layer=2, d_model=32, n_head=4, seq_len=16, attention=attention)
    B, T = 3, 16
    fake = layer_activation_bytes(cfg, B, T, dtype=torch.float32)
    block = TinyGPT(cfg).blocks[0]
    real = record_tape(block, torch.randn(B, T, cfg.d_model, requires_grad=True))
    assert fake.saved_bytes == real.activation_bytes
    assert fake.input_bytes == B * T * cfg.d_model * 4
    assert parameter_count(cfg) == sum(p.numel() for p in TinyGPT(cfg).parameters())


def test_llama_fake_estimate_equals_real_tape():
    cfg = replace(LLAMA_PRESETS["llama-tiny"], seq_len=32)
    fake = layer_activation_bytes(cfg, 2, 32, dtype=torch.float32)
    real = record_tape(LlamaBlock(cfg), torch.randn(2, 32, cfg.d_model, requires_grad=True))
    assert fake.saved_bytes == real.activation_bytes


def test_bad_input_says_what_to_do():
    cfg = GPTConfig(seq_len=16)
    with pytest.raises(ValueError, match=r"dataclasses.replace\(cfg, seq_len=32\)"):
        layer_activation_bytes(cfg, 1, 32)
    with pytest.raises(ValueError, match="choose one of"):
        model_memory(cfg, 1, 16, optimizer="lion")
    with pytest.raises(ValueError, match="floating type"):
        model_memory(cfg, 1, 16, dtype=torch.int8)
    with pytest.raises(TypeError, match="LlamaConfig or GPTConfig"):
        parameter_count("70b")


def test_master_weights_make_adamw_mixed_precision_16_bytes_per_parameter():

    cfg = llama_config("llama-7b")
    plain = model_memory(cfg, 1, 256)
    master = model_memory(cfg, 1, 256, master_weights=True)
    assert plain.bytes_per_param == 2 + 2 + 8 and master.bytes_per_param == 2 + 2 + 8 + 4
    assert master.total("full") - plain.total("full") == 4 * plain.n_params
    assert "master weights" in str(master) and "master" not in str(plain)
    with pytest.raises(ValueError, match="master_weights=False"):
        model_memory(cfg, 1, 256, dtype=torch.float32, master_weights=True)


def test_a_model_too_big_for_this_machine_is_refused_before_it_is_built(monkeypatch):
    from ckpt_course import step
    from ckpt_course.models import LLAMA_PRESETS, GPTConfig, Llama, TinyGPT

    need = 4 * parameter_count(GPTConfig())  # biases and norms too: above the closed form
    monkeypatch.setattr(step, "available_memory", lambda: need // 2)
    with pytest.raises(ValueError, match="smaller d_model, n_layer or vocab_size"):
        TinyGPT(GPTConfig())
    monkeypatch.setattr(step, "available_memory", lambda: 1)
    with pytest.raises(ValueError, match="fake tensors"):
        Llama(LLAMA_PRESETS["llama-tiny"])
    # estimate builds on fake tensors: nothing is allocated, nothing refused
    assert parameter_count(LLAMA_PRESETS["llama-70b"]) > 68 * 10**9
    monkeypatch.setattr(step, "available_memory", lambda: need)
    assert sum(p.numel() for p in TinyGPT(GPTConfig()).parameters()) * 4 == need
