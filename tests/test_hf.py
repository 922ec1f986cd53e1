"""Bring your own model: shipped Hugging Face configs, built small for real and full size on fake
tensors, under the course's planner; the plan handed back as transformers settings."""

import copy

import pytest
import torch
from torch import nn

from ckpt_course import hf
from ckpt_course.cli import main
from ckpt_course.costs import measure_costs
from ckpt_course.estimate import parameter_count as preset_count
from ckpt_course.models import llama_config
from ckpt_course.plan import all_placements, checkpointed, measure_peaks, predict
from ckpt_course.policies import Segments, applied

# Published parameter counts (model cards / safetensors index of each release).
PUBLISHED = {
    "gpt2": 124_439_808,
    "llama-3.2-1b": 1_235_814_400,
    "llama-3.1-8b": 8_030_261_248,
    "llama-3.1-70b": 70_553_706_496,
    "mistral-7b": 7_241_732_096,
    "qwen2.5-7b": 7_615_616_512,
}


def test_every_published_model_is_shipped():
    assert sorted(PUBLISHED) == hf.config_names()


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_full_size_on_fake_tensors_has_the_published_parameter_count(name):
    assert hf.parameter_count(name) == PUBLISHED[name]


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_small_real_instance_trains_under_a_course_policy(name):
    model = hf.build(hf.small_config(hf.load_config(name), n_layer=2, seq_len=32))
    assert len(model.blocks) == 2 and model.blocks[0].__class__.__name__.endswith(
        ("DecoderLayer", "Block"))
    batch = model.example_batch(2, 16, torch.Generator().manual_seed(0))
    plain = model.loss(batch)
    plain.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with applied(model, "full"):
        again = model.loss(batch)
        again.backward()
    assert torch.equal(plain, again)
    assert all(torch.allclose(g, p.grad) for g, p in zip(grads, model.parameters(), strict=True))


# The preset names say which real model each is: Llama 2's published counts.
@pytest.mark.parametrize("preset, published", [
    ("7b", 6_738_415_616), ("13b", 13_015_864_320), ("70b", 68_976_648_192)])
def test_llama_presets_are_llama_2(preset, published):
    assert preset_count(llama_config(preset)) == published
    assert published != PUBLISHED["llama-3.1-70b"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama-3.1-8b", "gpt2"])
def test_predicted_peak_is_the_meters_for_every_placement(name):
    model = hf.build(hf.small_config(hf.load_config(name), n_layer=4, seq_len=32))
    costs = measure_costs(model, 2, 32)
    for placement in all_placements(4):
        policy = Segments(checkpointed(placement))
        assert predict(costs, placement).peak_bytes == measure_peaks(
            model, policy, batch_size=2, seq_len=32)[-1], policy


@pytest.mark.parametrize("placement, kind", [
    ("full", "transformers"), ("every-2", "transformers"), ("segments:1,3", "check_fn"),
    ("segments:0-1", "transformers")])  # a 2-block segment: the closest per-layer one
def test_the_handed_back_code_applied_peaks_where_predicted(placement, kind):
    model = hf.build(hf.small_config(hf.load_config("llama-3.2-1b"), n_layer=4, seq_len=32))
    handed = hf.handback(placement, 4, costs=measure_costs(model, 2, 32))
    assert handed.kind == kind
    predicted, measured = hf.verify_handback(model, handed, 2, 32)
    assert predicted == measured
    none = predict(measure_costs(model, 2, 32), "none").peak_bytes
    assert measured < none  # it did checkpoint


def test_every_n_layers_is_what_transformers_checkpoints():
    model = hf.build(hf.small_config(hf.load_config("llama-3.1-8b"), n_layer=4, seq_len=32))
    hf.handback("segments:0,2", 4).apply(model)
    assert [layer.gradient_checkpointing for layer in model.blocks] == [True, False, True, False]


class _Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.stack = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))
        self.heads = nn.ModuleList([nn.Linear(8, 16)])


def test_blocks_of_any_module_and_an_explicit_override():
    model = _Stack()
    assert hf.find_decoder_layers(model) is model.stack
    assert hf.find_decoder_layers(model, "heads") is model.heads
    with pytest.raises(ValueError, match="no repeated blocks"):
        hf.find_decoder_layers(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="not a non-empty nn.ModuleList"):
        hf.find_decoder_layers(model, "embed")


def test_plan_command_hands_back_a_transformers_call(capsys):
    assert main(["plan", "--hf-config", "llama-3.2-1b", "--batch", "1", "--seq", "8192",
                 "--budget", "24GiB"]) == 0
    out = capsys.readouterr().out
    assert "16 blocks" in out and "In transformers:" in out
    assert "every_n_layers=1" in out  # full: every layer checkpointed


# ---------------------------------------------------------------- the formula, term by term
def small_tape(name, fake=False, dtype=torch.float32, b=2, s=32):
    cfg = hf.small_config(hf.load_config(name), n_layer=1, seq_len=s)
    return cfg, hf.layer_tape(cfg, b, s, dtype, fake=fake)


@pytest.mark.parametrize("name", ["gpt2", "llama-3.1-8b", "qwen2.5-7b"])
def test_fake_tensors_save_what_the_real_run_saves(name):
    # transformers takes fake tensors for a trace: an s x s mask and repeated K/V, unless told
    _, real = small_tape(name)
    _, fake = small_tape(name, fake=True)
    assert [(e.label, e.shape) for e in fake.entries] == [(e.label, e.shape) for e in real.entries]
    assert fake.activation_bytes == real.activation_bytes


def test_formula_terms_split_a_gpt2_tape_and_add_up_to_the_paper():
    b, s = 2, 32
    cfg, tape = small_tape("gpt2", b=b, s=s)
    h, a = cfg.hidden_size, cfg.num_attention_heads
    terms = {t.name: t for t in hf.formula_terms(tape, cfg, b, s)}
    assert sum(t.paper for t in terms.values()) == s * b * h * (34 + 5 * a * s // h)
    assert sum(t.measured for t in terms.values()) == tape.activation_bytes
    sbh = s * b * h
    # where GPT-2 does what the paper assumes, a term is the paper's at 4 bytes, not 2
    for name in ("norm inputs", "QKV projection input", "Q, K, V", "MLP input",
                 "attention output (out-projection input)", "MLP second linear input"):
        assert terms[name].measured == 2 * terms[name].paper, name
    assert terms["dropout masks"].measured == 0  # dropout off
    softmax = terms["softmax output, its dropout mask and output"]
    assert softmax.measured == 4 * a * s * b  # SDPA keeps only logsumexp, no s x s tensor
    assert terms["activation function (GeLU input)"].measured == 4 * (4 * 4 * sbh)  # gelu_new


def test_formula_terms_of_a_llama_layer_show_gqa_swiglu_and_rmsnorm():
    b, s = 2, 32
    cfg, tape = small_tape("llama-3.1-8b", b=b, s=s)
    h, a, kv, i = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                   cfg.intermediate_size)
    terms = {t.name: t for t in hf.formula_terms(tape, cfg, b, s)}
    assert sum(t.measured for t in terms.values()) == tape.activation_bytes
    assert terms["Q, K, V"].measured == 4 * s * b * (h + 2 * h * kv // a)  # grouped K, V
    assert terms["activation function (GeLU input)"].measured == 3 * 4 * s * b * i  # SwiGLU
    assert terms["MLP second linear input"].measured == 4 * s * b * i
    assert terms["norm inputs"].measured == 2 * 2 * 4 * s * b * h  # input and normalised input


# ---------------------------------------------------------------- the handed-back code, run
# where each shipped model keeps its decoder layers (read off the transformers source)
LAYERS = {"gpt2": "transformer.h", "llama-3.2-1b": "model.layers", "llama-3.1-8b": "model.layers",
          "llama-3.1-70b": "model.layers", "mistral-7b": "model.layers",
          "qwen2.5-7b": "model.layers"}


def test_every_shipped_config_has_its_layers_named():
    assert sorted(LAYERS) == hf.config_names()


def _wrapped(model):
    """Which decoder layers the handed-back code checkpointed (wrapped or flagged)."""
    return [k for k, layer in enumerate(model.blocks)
            if type(layer).__name__ == "CheckpointWrapper"
            or getattr(layer, "gradient_checkpointing", False)]


@pytest.mark.parametrize("name", [  # GPT-2 and one Llama (both block lists) in check-fast
    n if n in ("gpt2", "llama-3.2-1b") else pytest.param(n, marks=pytest.mark.slow)
    for n in sorted(LAYERS)])
def test_the_handed_back_code_runs_on_every_shipped_config(name):
    config = hf.load_config(name)
    model = hf.build(hf.small_config(config, n_layer=4, seq_len=32))
    costs = measure_costs(model, 2, 32)
    handed = hf.handback("segments:1,3", 4, config, costs)
    assert handed.kind == "check_fn" and f"model.{LAYERS[name]}[i]" in handed.code
    predicted, measured = hf.verify_handback(model, handed, 2, 32)
    assert predicted == measured < predict(costs, "none").peak_bytes
    plain = hf.handback("segments:1,3", 4, None, costs)  # no config: found by layer class
    assert "GradientCheckpointingLayer" in plain.code
    assert hf.verify_handback(model, plain, 2, 32) == (predicted, measured)


@pytest.mark.slow
def test_the_code_plan_prints_for_gpt2_runs_on_a_small_gpt2(capsys):
    # 12 GiB: the plan keeps some of GPT-2's 12 blocks plain; the code wraps the others
    assert main(["plan", "--hf-config", "gpt2", "--batch", "8", "--seq", "1024",
                 "--budget", "12GiB"]) == 0
    code = capsys.readouterr().out.split("In transformers:\n")[1]
    assert "model.transformer.h[i]" in code and "model.model.layers" not in code
    model = hf.build(hf.small_config(hf.load_config("gpt2"), n_layer=12, seq_len=32))
    costs = measure_costs(model, 2, 32)
    fresh = copy.deepcopy(model)
    exec(compile(code, "<printed>", "exec"), {"model": fresh.lm})
    chosen = _wrapped(fresh)
    assert 0 < len(chosen) < 12
    from ckpt_course.plan import placement_from_checkpointed

    placement = placement_from_checkpointed(12, [(k, k + 1) for k in chosen])
    assert measure_peaks(fresh, "none", batch_size=2, seq_len=32)[-1] == predict(
        costs, placement).peak_bytes


def test_the_note_says_when_no_per_layer_placement_peaks_as_low(capsys):
    # 6 GiB: the plan's 2-block segments peak lower than checkpointing every layer alone
    assert main(["plan", "--hf-config", "gpt2", "--batch", "8", "--seq", "1024",
                 "--budget", "6GiB"]) == 0
    out = capsys.readouterr().out.split("In transformers:\n")[1]
    assert "no per-layer placement peaks as low" in out and "every_n_layers=1" in out
    assert "peaks no higher" not in out


def test_a_selective_or_offloaded_layer_is_handed_back_whole_with_a_note():
    handed = hf.handback("menu:0..1=selective:save=sdpa,2..3=offload", 4)
    assert "whole layers only" in handed.note and "offload, selective:save=sdpa" in handed.note
    assert handed.kind == "transformers" and handed.expressed == hf.handback("full", 4).expressed
    assert hf.handback("full", 4).note == ""


def test_gpt2_with_eager_attention_is_refused_naming_sdpa():
    """GPT-2's eager attention builds a float causal mask in its forward and passes it to every
    layer: its life is decided by the layers and checkpoints that keep it, which the planner
    does not predict (R4: every placement was one mask low); it says how to build it instead."""
    model = hf.build(hf.small_config(hf.load_config("gpt2"), n_layer=2, seq_len=16),
                     attn="eager")
    with pytest.raises(ValueError, match=r"a tensor the model makes in its forward .* build "
                                         r"the model with attn='sdpa'") as err:
        measure_costs(model, 2)
    assert "\n" not in str(err.value)
