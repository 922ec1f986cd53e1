"""The tape against hand formulas: every byte accounted for, and named after what saved it."""

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ckpt_course.models import GPTConfig, HandTraceNet, TinyGPT
from ckpt_course.tape import Tape, record_tape
from ckpt_course.units import MiB

F32 = 4  # bytes per float32 element


def test_hand_trace_net_is_five_mib():
    net = HandTraceNet(width=512, depth=4)
    x = torch.randn(512, 512)  # does not require grad, yet addmm saves it for the weight grad
    tape = record_tape(net, x)
    # x + four ReLU outputs, 1 MiB each; the first three are also the next addmm's mat1
    assert tape.activation_bytes == 5 * MiB
    acts = [e for e in tape.entries if not e.is_param]
    assert [(e.module, e.label) for e in acts] == [
        ("blocks.0.0", "AddmmBackward0.mat1"),
        *[(f"blocks.{i}.1", "ReluBackward0.result") for i in range(4)],
    ]
    assert [e.times_saved for e in acts] == [1, 2, 2, 2, 1]
    assert acts[1].saved_by == ("ReluBackward0.result", "AddmmBackward0.mat1")
    # weight.t() is a view of the weight: saved as mat2 by blocks 1-3 (block 0's input needs
    # no grad, so its weight is not needed for backward)
    params = [e for e in tape.entries if e.is_param]
    assert [(e.module, e.label, e.shape) for e in params] == [
        (f"blocks.{i}.0", "AddmmBackward0.mat2", (512, 512)) for i in (1, 2, 3)
    ]
    assert tape.param_bytes == 3 * MiB and tape.total_bytes == 8 * MiB
    assert tape.by_module() == {"blocks.0": 2 * MiB, "blocks.1": MiB, "blocks.2": MiB,
                                "blocks.3": MiB}


def _gpt_block(attention, dropout=0.0, B=2, T=16, C=32, H=4):
    cfg = GPTConfig(n_layer=1, d_model=C, n_head=H, seq_len=T, attention=attention,
                    dropout=dropout)
    return TinyGPT(cfg).blocks[0], torch.randn(B, T, C, requires_grad=True)


def test_gpt_block_sdpa_formula():
    B, T, C, H = 2, 16, 32, 4
    block, x = _gpt_block("sdpa")
    tape = record_tape(block, x)
    e, btc = F32, B * T * C
    expected = (
        2 * (btc * e + 2 * B * T * F32)  # ln1, ln2: input, mean and rstd (B, T, 1)
        + btc * e  # qkv: its input (ln1's output)
        + 3 * btc * e  # flash attention: q, k, v are views of one qkv output
        + B * H * T * F32  # ... and a (B, H, T) float32 logsumexp: no T x T matrix
        + btc * e  # ... and its output, also proj's input (a view, no copy)
        + btc * e  # mlp.0: its input (ln2's output)
        + 4 * btc * e  # GELU: its input
        + 4 * btc * e  # mlp.2: its input (GELU's output)
    )  # = 16 BTC e + 16 BT + 4 BHT
    assert tape.activation_bytes == expected == 66560
    qkv = next(e for e in tape.entries if e.attr in ("query", "key", "value"))
    assert qkv.times_saved == 3 and qkv.nbytes == 3 * btc * e
    assert qkv.op == "ScaledDotProductFlashAttentionForCpuBackward0"
    assert not any(e.shape[-2:] == (T, T) for e in tape.entries)


def test_gpt_block_naive_attention_formula():
    B, T, C, H = 2, 16, 32, 4
    block, x = _gpt_block("naive")
    tape = record_tape(block, x)
    e, btc = F32, B * T * C
    expected = (
        2 * (btc * e + 2 * B * T * F32)  # ln1, ln2
        + btc * e  # qkv input
        + 2 * btc * e  # q @ k^T: matmul copies q and k^T into contiguous bmm inputs
        + T * T  # the causal mask, bool
        + B * H * T * T * e  # softmax output, saved again by the second bmm
        + btc * e  # v, copied for the bmm
        + btc * e  # proj input: transpose + reshape copies
        + btc * e + 4 * btc * e + 4 * btc * e  # mlp.0 input, GELU input, mlp.2 input
    )  # = 16 BTC e + B H T^2 e + T^2 + 16 BT
    assert tape.activation_bytes == expected == 74496
    softmax = next(e for e in tape.entries if e.label == "SoftmaxBackward0.result")
    assert softmax.shape == (B, H, T, T) and softmax.times_saved == 2


def test_dropout_adds_float32_masks_on_cpu():
    B, T, C, H = 2, 16, 32, 4
    plain = record_tape(*_gpt_block("naive", dropout=0.0))
    dropped = record_tape(*_gpt_block("naive", dropout=0.1))
    masks = [e for e in dropped.entries if e.label == "MulBackward0.other"]
    assert {e.dtype for e in masks} == {torch.float32}  # 4 bytes/element on CPU, not bool
    assert sorted(e.module for e in masks) == ["attn", "attn.drop", "mlp.3"]
    # two residual masks (B, T, C), the attention mask (B, H, T, T), and the dropped attention
    # matrix that the second bmm now saves instead of the softmax output
    assert dropped.activation_bytes - plain.activation_bytes == (
        2 * B * T * C * F32 + B * H * T * T * F32 + B * H * T * T * F32)
    # with dropout_p > 0, SDPA on CPU leaves flash attention: a T x T matrix is saved again
    sdpa = record_tape(*_gpt_block("sdpa", dropout=0.1))
    assert any(e.shape[-2:] == (T, T) for e in sdpa.entries)


class _SavesTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        y = x.exp()  # ExpBackward0 saves its output y
        z = y * y.t()  # saves y and y.t(), a view of y: one storage saved three times
        return self.lin(z)  # saves z and weight.t(), a view of a parameter


def test_dedup_views_parameters_and_repeats():
    net = _SavesTwice()
    tape = record_tape(net, torch.randn(8, 8, requires_grad=True))
    assert [(e.label, e.times_saved, e.is_param) for e in tape.entries] == [
        ("ExpBackward0.result", 3, False),
        ("AddmmBackward0.mat1", 1, False),
        ("AddmmBackward0.mat2", 1, True),
    ]
    assert tape.entries[0].saved_by == (
        "ExpBackward0.result", "MulBackward0.other", "MulBackward0.self")
    assert tape.activation_bytes == 2 * 8 * 8 * F32  # y and z, once each
    assert tape.param_bytes == 8 * 8 * F32


def test_without_a_model_nothing_is_a_parameter():
    net = _SavesTwice()
    tape = record_tape(lambda x: net(x), torch.randn(8, 8, requires_grad=True))
    assert {e.module for e in tape.entries} == {""}
    assert tape.param_bytes == 0 and tape.activation_bytes == 3 * 8 * 8 * F32


def test_recording_changes_nothing_for_backward():
    net = HandTraceNet(width=16, depth=3)
    x = torch.randn(8, 16)
    tape = record_tape(net.loss, (x, x), model=net)
    tape.output.backward()
    with_tape = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    net.loss((x, x)).backward()
    assert all(torch.equal(a, p.grad) for a, p in zip(with_tape, net.parameters(), strict=True))


def test_checkpointed_region_is_hidden_and_not_recomputed():
    net = HandTraceNet(width=16, depth=3)
    calls = []
    net.blocks[1].register_forward_pre_hook(lambda m, args: calls.append(1))

    def forward(x):
        x = net.blocks[0](x)
        x = checkpoint(net.blocks[1], x, use_reentrant=False)
        return net.blocks[2](x)

    tape = record_tape(forward, torch.randn(8, 16), model=net)
    assert len(calls) == 1  # recording ran the region once and never recomputed it
    assert not any(e.module.startswith("blocks.1") for e in tape.entries)
    # what the checkpoint keeps of its region: the input, saved outside its own hooks
    assert tape.entries[1].saved_by == ("ReluBackward0.result", "checkpoint.input")
    tape.output.sum().backward()
    assert len(calls) == 2  # backward recomputed it


def test_tables_and_rows():
    tape = record_tape(HandTraceNet(width=512, depth=4), torch.randn(512, 512))
    text = str(tape)
    assert "blocks.0.0  AddmmBackward0.mat1   512x512" in text
    assert text.endswith("activations 5.00 MiB in 5 storages; "
                         "parameters 3.00 MiB (not counted as activations)")
    html = tape._repr_html_()
    assert html.startswith("<table>") and html.count("<tr>") == 1 + len(tape.entries)
    rows = tape.to_rows()
    assert rows[0]["op"] == "AddmmBackward0" and rows[0]["dtype"] == "float32"
    assert sum(r["nbytes"] for r in rows if not r["is_param"]) == 5 * MiB


def test_nothing_saved_says_why():
    with torch.no_grad():
        tape = record_tape(HandTraceNet(width=8, depth=2), torch.randn(4, 8))
    assert tape.entries == [] and tape.activation_bytes == 0
    assert "torch.no_grad()" in str(tape)
    assert isinstance(tape, Tape)


def test_bad_input_says_what_to_do():
    with pytest.raises(TypeError, match="callable that runs the forward pass"):
        record_tape(42)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        record_tape(lambda: None, model="net")


def test_a_module_is_in_the_layer_of_its_first_block_number():
    """F26: a Hugging Face model's decoder layers are rows of their own (as blocks.N are), not
    all its wrapper's top module."""
    from ckpt_course.tape import layer_of

    assert layer_of("blocks.2.attn.qkv") == "blocks.2"
    assert layer_of("lm.model.layers.2.mlp.act_fn") == "lm.model.layers.2"
    assert layer_of("lm.transformer.h.11.attn") == "lm.transformer.h.11"
    assert layer_of("lm.lm_head") == "lm"
    assert layer_of("head") == "head" and layer_of("") == ""
