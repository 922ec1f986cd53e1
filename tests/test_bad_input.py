"""Bad input, across the command line and the public API: each gets one line that names the fix,
before any work is done (exit code 2 and no traceback on the command line; ValueError or
TypeError in the API)."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from ckpt_course import estimate, hf, models, plan, policies, sharding, sweeps
from ckpt_course.cli import main
from ckpt_course.costs import ChainCosts, LayerCost, config_costs, measure_costs
from ckpt_course.meter import MemoryMeter, parse_budget
from ckpt_course.ranking import rank_ops
from ckpt_course.recompute import measure_recompute

NO_CUDA = not torch.cuda.is_available()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A file where a folder is expected, and a folder where a file is."""
    root = tmp_path_factory.mktemp("bad")
    (root / "a_file").write_text("not a folder")
    (root / "a_folder").mkdir()
    (root / "x.ipynb").write_text("{}")
    (root / "vit.json").write_text('{"model_type": "vit"}')  # no decoder layers
    return root


# argv (with {tmp} for the fixture's folder) -> a fragment of the one-line error
CLI = [
    (["train", "--steps", "0"], "at least 1 (such as 8)"),
    (["train", "--steps", "-1"], "at least 1 (such as 8)"),
    (["train", "--steps", "2.5"], "whole number such as 8"),
    (["train", "--steps", "many"], "whole number such as 8"),
    (["train", "--batch", "0"], "at least 1"),
    (["train", "--batch", "x"], "whole number"),
    (["train", "--layers", "0"], "at least 1"),
    (["train", "--seq", "0"], "at least 1"),
    (["train", "--model", "llama-tiny", "--seq", "200"], "use --seq 128 or less"),
    (["train", "--model", "gpt", "--seq", "500"], "use --seq 128 or less"),
    (["train", "--model", "hand-trace", "--seq", "8"], "drop --seq"),
    (["train", "--policy", "every-0"], "integer >= 1"),
    (["train", "--policy", "bogus"], "accepted: none, full"),
    (["train", "--policy", "segments:a-b"], "'segments:0-2,5..7'"),
    (["train", "--policy", "segments:3-1"], "first block first"),
    (["train", "--policy", "segments:"], "name the blocks"),
    (["train", "--policy", "segments:1;preserve_rng_state=maybe"], "';preserve_rng_state=False'"),
    (["train", "--policy", "selective:save=matmul"], "known: mm, sdpa"),
    (["train", "--policy", "selective:keep=mm"], "accepted:"),
    (["train", "--layers", "2", "--policy", "segments:0-5"], "name blocks below 2"),
    (["train", "--dropout", "1.5"], "probability in [0, 1)"),
    (["train", "--dropout", "x"], "probability in [0, 1)"),
    (["train", "--model", "hand-trace", "--dropout", "0.1"], "leave dropout at 0"),
    (["train", "--device", "tpu"], "cpu, cuda or cuda:N"),
    pytest.param(["train", "--device", "cuda"], "use --device cpu",
                 marks=pytest.mark.skipif(not NO_CUDA, reason="CUDA is there")),
    (["train", "--device", "cuda:99"], "cuda"),
    (["tape", "--model", "resnet"], "invalid choice"),
    (["tape", "--batch", "0"], "at least 1"),
    (["tape", "--model", "llama-tiny", "--seq", "129"], "use --seq 128 or less"),
    (["compare", "--policies", "bogus"], "accepted:"),
    (["compare", "--policies", "none,none"], "each policy once"),
    (["compare", "--policies", ","], "at least one policy"),
    (["compare", "--steps", "-1"], "at least 1"),
    (["compare", "--heads", "3"], "e.g. --heads 4"),
    (["compare", "--width", "0"], "at least 1"),
    (["compare", "--out", "{tmp}/missing/plot.png"], "create it first"),
    (["compare", "--out", "{tmp}/plot.jpg"], "a .png file name"),
    (["compare", "--out", "{tmp}/a_folder"], "a .png file name"),
    (["compare", "--budget", "lots"], "not understood"),
    pytest.param(["compare", "--device", "cuda"], "use --device cpu",
                 marks=pytest.mark.skipif(not NO_CUDA, reason="CUDA is there")),
    (["plan", "--config", "7b", "--layers", "2", "--budget", "80GiB"], "drop --layers"),
    (["plan", "--budget", "lots"], "not understood"),
    (["plan", "--budget", "1M"], "'1MiB'"),
    (["plan", "--config", "7b", "--budget", "80GiB", "--micro-batches", "2"],
     "drop --micro-batches"),
    (["plan", "--budget", "1GiB", "--micro-batches", "0"], "at least 1"),
    (["plan", "--budget=-3GiB"], "positive"),
    (["plan", "--budget", "0"], "positive"),
    (["plan", "--config", "90b", "--budget", "1GiB"], "choose one of"),
    (["plan", "--model", "gpt"], "required: --budget"),
    (["plan", "--config", "7b", "--seq", "5000", "--budget", "80GiB"], "--seq 4096 or less"),
    (["plan", "--model", "gpt", "--dtype", "fp16", "--budget", "1GiB"], "drop --dtype"),
    (["plan", "--devices", "0", "--budget", "1GiB"], "at least 1"),
    (["plan", "--model", "llama-tiny", "--seq", "200", "--budget", "1GiB"], "--seq 128 or less"),
    (["plan", "--model", "gpt", "--config", "7b", "--budget", "1GiB"], "not allowed with"),
    (["plan", "--config", "7b", "--objective", "time", "--budget", "80GiB"],
     "use --objective flops"),
    (["plan", "--objective", "fast", "--budget", "1GiB"], "invalid choice"),
    (["train", "--policy", "menu:0-1=full,1=offload"], "not overlap"),
    (["train", "--policy", "menu:2=offload,0=full"], "ordered"),
    (["train", "--layers", "2", "--policy", "menu:0-5=full"], "name blocks below 2"),
    (["train", "--layers", "2", "--policy", "menu:0-1=full(0-4)"], "must lie inside 0-1"),
    (["train", "--policy", "menu:0=sqrt"], "full, selective:... or offload"),
    (["train", "--policy", "menu:0=selective:save=matmul"], "known: mm, sdpa"),
    (["train", "--policy", "menu:0"], "names no option"),
    (["train", "--policy", "menu:0-3=full(0-1"], "unbalanced parentheses"),
    (["train", "--policy", "menu:0-3=full0-1"], "in parentheses after full"),
    (["train", "--policy", "menu:0..3=full(0-1)"], "nest one span"),
    (["train", "--policy", "menu:0-3=full(0..1)"], "one span 'a-b'"),
    (["train", "--policy", "menu:0-3=full(0-1,1-2)"], "not overlap"),
    (["train", "--policy", "menu:0-1=offload(0)"], "accepted:"),
    (["compare", "--policies", "none,menu:x=full"], "inclusive block numbers"),
    (["doctor", "--budget", "lots"], "not understood"),
    (["doctor", "--steps", "0", "--budget", "1MiB"], "at least 1"),
    (["doctor", "--seq", "999", "--budget", "1MiB"], "--seq 128 or less"),
    (["build-exercises", "--exercises", "{tmp}/a_file"], "is a file, not a folder"),
    (["build-exercises", "--solutions", "{tmp}/a_file"], "is a file, not a folder"),
    (["build-exercises", "--src", "{tmp}/missing"], "check the path"),
    (["reset-exercises", "--src", "{tmp}/missing"], "check the path"),
    (["reset-exercises", "--exercises", "{tmp}/a_file"], "is a file, not a folder"),
    (["grade", "{tmp}/x.ipynb", "--csv", "{tmp}/missing/x.csv"], "create it first"),
    (["grade", "{tmp}/x.ipynb", "--json", "{tmp}/missing/x.json"], "create it first"),
    (["grade", "{tmp}/x.ipynb", "--csv", "{tmp}/x.txt"], "a .csv file name"),
    (["grade", "{tmp}/x.ipynb", "--timeout", "0"], "positive number of seconds"),
    (["grade", "{tmp}/x.ipynb", "--jobs", "0"], "at least 1"),
    (["grade", "{tmp}/x.ipynb", "--exercises", "{tmp}/missing"], "check the path"),
    ([], "required: command"),
    (["plan", "--hf-config", "llama-9000", "--budget", "1GiB"], "give a config.json path"),
    (["plan", "--hf-config", "{tmp}/a_file", "--budget", "1GiB"], "is not valid JSON"),
    (["plan", "--hf-config", "{tmp}/x.ipynb", "--budget", "1GiB"], "has no \"model_type\""),
    (["plan", "--hf-config", "{tmp}/vit.json", "--budget", "1GiB"], "repeated decoder layers"),
    (["plan", "--hf-config", "gpt2", "--seq", "2048", "--budget", "1GiB"], "--seq 1024 or less"),
    (["doctor", "--hf-config", "gpt2", "--seq", "2048"], "--seq 1024 or less"),
]


@pytest.mark.parametrize("argv, fix", CLI)
def test_the_command_line_refuses_bad_input_in_one_line(argv, fix, files, capsys):
    assert fix in _refused(argv, files, capsys)


def _refused(argv, files, capsys) -> str:
    """Run the command (``{tmp}`` is the test's folder); it must exit 2 with nothing printed to
    stdout (no work was done) and no traceback: its one error line."""
    argv = [a.replace("{tmp}", str(files)) for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and captured.out == ""  # no work was done
    error = captured.err.strip().splitlines()[-1]
    assert error.startswith("ckpt-course") and "error:" in error
    return error


def _four_blocks():
    return models.HandTraceNet(width=8, depth=4)


COSTS = ChainCosts((LayerCost.simple(1, 2, 1),) * 4)

# (call, exception, fragment of the message)
API = [
    (lambda: policies.parse_policy(2), TypeError, "a Policy or a string"),
    (lambda: policies.parse_policy("every-0"), ValueError, "integer >= 1"),
    (lambda: policies.parse_policy("segments:1-x"), ValueError, "inclusive block numbers"),
    (lambda: policies.EveryK(0), ValueError, "K >= 1"),
    (lambda: policies.EveryK(1.5), ValueError, "K >= 1"),
    (lambda: policies.EveryK(True), ValueError, "K >= 1"),
    (lambda: policies.Segments(((0, 3), (2, 4))), ValueError, "not overlap"),
    (lambda: policies.Segments((("a", 1),)), ValueError, "e.g. ((0, 3), (5, 6))"),
    (lambda: policies.Segments(((0, 1),), preserve_rng_state="no"), TypeError, "True or False"),
    (lambda: policies.Selective(("matmul",)), ValueError, "known: mm"),
    (lambda: policies.Selective(("mm",), "keep"), ValueError, "'save' or 'recompute'"),
    (lambda: policies.apply_policy(_four_blocks(), "segments:0-9"), ValueError,
     "name blocks below 4"),
    (lambda: policies.apply_policy(nn.Linear(2, 2), "full"), ValueError, "pass blocks="),
    (lambda: sweeps.CheckpointBlocks(()), ValueError, "non-empty tuple of block numbers"),
    (lambda: models.build_model("resnet"), ValueError, "choose one of"),
    (lambda: models.build_model("gpt", n_layer=0), ValueError, "such as 8"),
    (lambda: models.build_model("gpt", n_layer=2.5), TypeError, "pass an int"),
    (lambda: models.build_model("gpt", dropout=1.5), ValueError, "[0, 1)"),
    (lambda: models.build_model("llama-tiny", d_model=64), ValueError, "give only n_layer"),
    (lambda: models.TinyGPT().example_batch(0), ValueError, "such as 8"),
    (lambda: models.TinyGPT().example_batch(2.5), TypeError, "pass an int"),
    (lambda: models.TinyGPT().example_batch(2, seq_len=999), ValueError, "use seq_len <= 128"),
    (lambda: models.HandTraceNet().example_batch(-1), ValueError, "such as 8"),
    (lambda: models.Llama(models.llama_config("llama-tiny")).example_batch(1, 200), ValueError,
     "use seq_len <= 128"),
    (lambda: models.Llama(models.llama_config("llama-tiny"))(torch.zeros(1, 200, dtype=int)),
     ValueError, "use at most 128 tokens"),
    (lambda: models.TinyGPT()(torch.zeros(1, 200, dtype=int)), ValueError,
     "use at most 128 tokens"),
    (lambda: models.llama_config("90b"), ValueError, "choose one of"),
    (lambda: config_costs("90b", 1, 8), ValueError, "choose one of"),
    (lambda: config_costs("7b", 0, 8), ValueError, "such as 8"),
    (lambda: config_costs("7b", 1, 10**6), ValueError, "dataclasses.replace(cfg, seq_len="),
    (lambda: estimate.model_memory("7b", 1, 8), TypeError, "llama_config('70b')"),
    (lambda: estimate.model_memory(models.llama_config("7b"), 1.5, 8), TypeError, "pass an int"),
    (lambda: parse_budget("lots"), ValueError, "not understood"),
    (lambda: plan.optimal(COSTS, "lots"), ValueError, "not understood"),
    (lambda: plan.predict(COSTS, "selective:save=mm"), ValueError, "whole-block"),
    (lambda: plan.predict(COSTS, ((0, 1, True),)), ValueError, "the model has 4"),
    (lambda: plan.predict(COSTS, "segments:0-7"), ValueError, "name blocks below 4"),
    (lambda: plan.every_k_placement(4, 0), ValueError, "K >= 1"),
    (lambda: plan.placement_from_checkpointed(4, [(3, 1)]), ValueError, "ordered, disjoint"),
    (lambda: policies.Menu((("a", 1, "full", ()),)), ValueError, "whole block numbers"),
    (lambda: policies.Menu(((0, 1, "full"),)), ValueError, "(start, stop, option, children)"),
    (lambda: policies.Menu(((0, 2, "offload", ()),)), ValueError, "write 0..1=offload"),
    (lambda: policies.Menu(((0, 1, "none", ()),)), ValueError, "full, selective:... or offload"),
    (lambda: plan.predict(COSTS, "menu:2-7=full"), ValueError, "name blocks below 4"),
    (lambda: plan.predict(COSTS, "menu:0-3=full(0-1)"), ValueError, "nested_optimal"),
    (lambda: plan.predict(COSTS, "menu:0=offload"), ValueError, "measure_costs(..., menu=MENU)"),
    (lambda: plan.optimal(COSTS, 100, objective="fast"), ValueError, "'time' or 'flops'"),
    (lambda: plan.optimal(COSTS, 100, objective="time"), ValueError, "times=True"),
    (lambda: plan.make_plan(COSTS, 100, objective=3), ValueError, "'time' or 'flops'"),
    (lambda: plan.nested_optimal(COSTS, "lots"), ValueError, "not understood"),
    (lambda: plan.nested_optimal(COSTS, -1), ValueError, "positive number of bytes"),
    (lambda: plan.simulate_nested(COSTS, ((0, 9, ()),)), ValueError, "covering blocks 0..3"),
    (lambda: plan.simulate_nested(COSTS, ((0, 4, ((3, 1, ()),)),)), ValueError,
     "covering blocks 0..3"),
    (lambda: measure_costs(_four_blocks(), 2, menu="offload"), TypeError, "a tuple of one-block"),
    (lambda: measure_costs(_four_blocks(), 2, menu=("full",)), ValueError, "a tuple of one-block"),
    (lambda: measure_costs(_four_blocks(), 2, menu=("bogus",)), ValueError, "accepted:"),
    (lambda: measure_costs(_four_blocks(), 0), ValueError, "batch_size must be >= 1"),
    (lambda: measure_costs(_four_blocks(), 2.0), TypeError, "pass an int"),
    (lambda: measure_costs(_four_blocks(), 2, times=True, rounds=0), ValueError, "such as 15"),
    (lambda: config_costs("7b", 1, 8, menu=("selective:save=matmul",)), ValueError, "known: mm"),
    (lambda: sharding.per_gpu_bytes(1, 0, 0), ValueError, "whole number >= 1"),
    (lambda: sharding.shard(COSTS, 0), ValueError, "whole number >= 1"),
    (lambda: sharding.min_devices(COSTS, "lots"), ValueError, "not understood"),
    (lambda: measure_recompute(_four_blocks(), _four_blocks().example_batch(2), "bogus"),
     ValueError, "accepted:"),
    (lambda: rank_ops(models.TinyGPT(), batch_size=0), ValueError, "batch_size=8"),
]


@pytest.mark.parametrize("call, error, fix", API)
def test_the_api_refuses_bad_input_with_the_fix(call, error, fix):
    with pytest.raises(error) as info:
        call()
    message = str(info.value)
    assert fix in message and "\n" not in message


@pytest.mark.slow
@pytest.mark.parametrize("argv, fix", [
    (["train", "--model", "llama-tiny", "--seq", "200"], "use --seq 128 or less"),
    (["plan", "--config", "7b", "--layers", "2", "--budget", "80GiB"], "drop --layers"),
])
def test_a_real_process_exits_2_with_one_line(argv, fix):
    done = subprocess.run([sys.executable, "-m", "ckpt_course.cli", *argv], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr and done.stdout == ""
    assert fix in done.stderr.strip().splitlines()[-1]


def test_there_are_at_least_sixty_bad_inputs():
    assert len(CLI) + len(API) >= 60


# ================================================================ issue 17: HF configs and the API
# Hugging Face configs: a shipped config.json with some fields changed, written to a folder
# made once per session.
_HF_DIR = []


def _hf(base: str, **changes) -> str:
    """The path of ``base``'s shipped config.json with ``changes`` (None deletes a key)."""
    import json
    import tempfile
    from pathlib import Path

    if not _HF_DIR:
        _HF_DIR.append(Path(tempfile.mkdtemp(prefix="hf-bad-")))
    values = json.loads((hf.CONFIG_DIR / f"{base}.json").read_text())
    for key, value in changes.items():
        if value is _DROP:
            values.pop(key, None)
        else:
            values[key] = value
    path = _HF_DIR[0] / f"{base}-{len(list(_HF_DIR[0].iterdir()))}.json"
    path.write_text(json.dumps(values))
    return str(path)


_DROP = object()
LLAMA, GPT2 = "llama-3.2-1b", "gpt2"

# (base, changes) -> a fragment of the one-line error from hf.load_config
HF_CONFIGS = [
    # num_hidden_layers / n_layer: wrong types, zero, negative, beyond the bound
    ((LLAMA, {"num_hidden_layers": "sixteen"}), "num_hidden_layers must be a whole number"),
    ((LLAMA, {"num_hidden_layers": 2.5}), "without quotes or a decimal point"),
    ((LLAMA, {"num_hidden_layers": 16.0}), "num_hidden_layers must be a whole number"),
    ((LLAMA, {"num_hidden_layers": True}), "num_hidden_layers must be a whole number"),
    ((LLAMA, {"num_hidden_layers": None}), "num_hidden_layers must be a whole number"),
    ((LLAMA, {"num_hidden_layers": [16]}), "num_hidden_layers must be a whole number"),
    ((LLAMA, {"num_hidden_layers": 0}), "num_hidden_layers must be >= 1"),
    ((LLAMA, {"num_hidden_layers": -3}), "num_hidden_layers must be >= 1"),
    ((LLAMA, {"num_hidden_layers": 10**6}), "at most 256"),
    ((LLAMA, {"num_hidden_layers": 257}), "at most 256"),
    ((GPT2, {"n_layer": "sixteen"}), "n_layer must be a whole number"),
    ((GPT2, {"n_layer": 2.5}), "n_layer must be a whole number"),
    ((GPT2, {"n_layer": True}), "n_layer must be a whole number"),
    ((GPT2, {"n_layer": 0}), "n_layer must be >= 1"),
    ((GPT2, {"n_layer": -12}), "n_layer must be >= 1"),
    ((GPT2, {"n_layer": 10**6}), "n_layer 1,000,000 is beyond"),
    ((GPT2, {"num_hidden_layers": "x", "n_layer": _DROP}), "num_hidden_layers must be a whole"),
    # heads
    ((LLAMA, {"num_attention_heads": 0}), "num_attention_heads must be >= 1"),
    ((LLAMA, {"num_attention_heads": -32}), "num_attention_heads must be >= 1"),
    ((LLAMA, {"num_attention_heads": "32"}), "num_attention_heads must be a whole number"),
    ((LLAMA, {"num_attention_heads": 32.5}), "num_attention_heads must be a whole number"),
    ((LLAMA, {"num_attention_heads": False}), "num_attention_heads must be a whole number"),
    ((LLAMA, {"num_attention_heads": 30}), "hidden_size 2048 is not a multiple of"),
    ((LLAMA, {"num_attention_heads": 3000, "num_key_value_heads": 1}), "not a multiple"),
    ((GPT2, {"n_head": 0}), "n_head must be >= 1"),
    ((GPT2, {"n_head": 7}), "n_embd 768 is not a multiple of n_head 7"),
    ((GPT2, {"n_head": "twelve"}), "n_head must be a whole number"),
    # key/value heads
    ((LLAMA, {"num_key_value_heads": 5}), "num_key_value_heads 5 does not divide"),
    ((LLAMA, {"num_key_value_heads": 3}), "use a divisor such as 2"),
    ((LLAMA, {"num_key_value_heads": 64}), "num_key_value_heads 64 does not divide"),
    ((LLAMA, {"num_key_value_heads": 0}), "num_key_value_heads must be >= 1"),
    ((LLAMA, {"num_key_value_heads": -8}), "num_key_value_heads must be >= 1"),
    ((LLAMA, {"num_key_value_heads": 8.0}), "num_key_value_heads must be a whole number"),
    ((LLAMA, {"num_key_value_heads": "8"}), "num_key_value_heads must be a whole number"),
    # width
    ((LLAMA, {"hidden_size": 2050}), "hidden_size 2050 is not a multiple of num_attention"),
    ((LLAMA, {"hidden_size": 0}), "hidden_size must be >= 1"),
    ((LLAMA, {"hidden_size": -2048}), "hidden_size must be >= 1"),
    ((LLAMA, {"hidden_size": "2048"}), "hidden_size must be a whole number"),
    ((LLAMA, {"hidden_size": 2**18}), "hidden_size 262,144 is beyond"),
    ((GPT2, {"n_embd": 2050}), "n_embd 2050 is not a multiple of n_head 12"),
    ((GPT2, {"n_embd": 0}), "n_embd must be >= 1"),
    ((GPT2, {"n_embd": 767.5}), "n_embd must be a whole number"),
    # MLP
    ((LLAMA, {"intermediate_size": 0}), "intermediate_size must be >= 1"),
    ((LLAMA, {"intermediate_size": -1}), "intermediate_size must be >= 1"),
    ((LLAMA, {"intermediate_size": "8192"}), "intermediate_size must be a whole number"),
    ((LLAMA, {"hidden_size": 1024, "intermediate_size": 1024 * 65}), "more than 64 x hidden"),
    ((GPT2, {"n_inner": 0}), "n_inner must be >= 1"),
    ((GPT2, {"n_inner": 3072.0}), "n_inner must be a whole number"),
    # vocabulary, positions, head_dim
    ((LLAMA, {"vocab_size": 0}), "vocab_size must be >= 1"),
    ((LLAMA, {"vocab_size": -5}), "vocab_size must be >= 1"),
    ((LLAMA, {"vocab_size": "128256"}), "vocab_size must be a whole number"),
    ((LLAMA, {"vocab_size": 2**23}), "vocab_size 8,388,608 is beyond"),
    ((GPT2, {"vocab_size": 0}), "vocab_size must be >= 1"),
    ((LLAMA, {"max_position_embeddings": 0}), "max_position_embeddings must be >= 1"),
    ((LLAMA, {"max_position_embeddings": 2**26}), "max_position_embeddings 67,108,864 is"),
    ((LLAMA, {"max_position_embeddings": 4096.0}), "max_position_embeddings must be a whole"),
    ((GPT2, {"n_positions": 0}), "n_positions must be >= 1"),
    ((GPT2, {"n_positions": -1024}), "n_positions must be >= 1"),
    ((LLAMA, {"head_dim": 0}), "head_dim must be >= 1"),
    ((LLAMA, {"head_dim": 64.0}), "head_dim must be a whole number"),
    # architectures that are not (supported) causal LMs, by name
    ((LLAMA, {"model_type": "bert"}), "model_type 'bert' is not a supported causal LM"),
    ((LLAMA, {"model_type": "t5"}), "model_type 't5' is not a supported causal LM"),
    ((LLAMA, {"model_type": "vit"}), "use one of gpt2, llama, mistral, qwen2"),
    ((LLAMA, {"model_type": "LLAMA"}), "use one of gpt2, llama, mistral, qwen2"),
    ((LLAMA, {"model_type": ""}), "model_type '' is not a supported"),
    ((LLAMA, {"model_type": 5}), "model_type 5 is not a supported"),
    ((LLAMA, {"model_type": ["llama"]}), "model_type ['llama'] is not a supported"),
    ((LLAMA, {"model_type": None}), "model_type None is not a supported"),
    ((LLAMA, {"model_type": "gpt_neox"}), "model_type 'gpt_neox' is not a supported"),
    ((LLAMA, {"model_type": _DROP}), "has no \"model_type\""),
    # other fields transformers itself checks: its error, in one line
    ((LLAMA, {"rms_norm_eps": "small"}), "rms_norm_eps"),
    ((LLAMA, {"tie_word_embeddings": "maybe"}), "tie_word_embeddings"),
    ((LLAMA, {"rope_scaling": "x"}), "rope_parameters"),
    ((LLAMA, {"head_dim": 7}), "RoPE requires an even rotary dimension"),
    # fields transformers reads only when it builds the model: a trial build on fake tensors
    ((LLAMA, {"rope_theta": "x"}), "transformers cannot build this config (TypeError"),
    ((LLAMA, {"hidden_act": "bogus"}), "(KeyError: 'bogus'): fix that field"),
    ((GPT2, {"activation_function": "bogus"}), "(KeyError: 'bogus')"),
    ((GPT2, {"resid_pdrop": 2.0}), "dropout probability has to be between 0 and 1"),
    ((LLAMA, {"torch_dtype": "int8"}), "cannot be instantiated under `dtype=torch.int8`"),
]


@pytest.mark.parametrize("case, fix", HF_CONFIGS)
def test_every_bad_hf_config_gets_one_line_naming_the_field(case, fix):
    path = _hf(case[0], **case[1])
    with pytest.raises(ValueError) as info:
        hf.load_config(path)
    message = str(info.value)
    assert fix in message and "\n" not in message and len(message) < 400


def _changed(name, **values):
    """A loaded config, then changed in place (as a notebook might), bypassing the file check."""
    config = hf.load_config(name)
    for key, value in values.items():
        object.__setattr__(config, key, value)
    return config


def _gpt():
    return models.TinyGPT(models.GPTConfig(n_layer=2, d_model=32, n_head=2, seq_len=16))


def _frozen():
    model = _gpt()
    model.requires_grad_(False)
    return model


def _step(model=None, batch="make", optimizer="make", meter=None, **kwargs):
    from ckpt_course.step import make_batch, make_optimizer, run_step

    model = model or _gpt()
    batch = make_batch(model, 2) if batch == "make" else batch
    optimizer = make_optimizer(model) if optimizer == "make" else optimizer
    return run_step(model, optimizer, batch, meter, **kwargs)


def _make_optimizer(*args, **kwargs):
    from ckpt_course.step import make_optimizer

    return make_optimizer(*args, **kwargs)


def _deep_menu(depth):
    """A menu whose one checkpoint nests ``depth`` levels: 0..depth+1, 0..depth, ..., 0..1."""
    children = ()
    for stop in range(2, depth + 2):
        children = ((0, stop, children),)
    return policies.Menu(((0, depth + 2, "full", children),))


def _train(**kwargs):
    from ckpt_course.train import train

    return train(kwargs.pop("model", None) or _gpt(), steps=kwargs.pop("steps", 1),
                 batch_size=kwargs.pop("batch_size", 2), progress=kwargs.pop("progress", False),
                 **kwargs)


def _compare(policies_, **kwargs):
    from ckpt_course.compare import compare

    return compare(models.GPTConfig(n_layer=2, d_model=32, n_head=2, seq_len=16), policies_,
                   live=False, **kwargs)


def _grads(policy, **kwargs):
    from ckpt_course.train import check_gradients

    return check_gradients(_gpt(), policy, **kwargs)


def _measure(**kwargs):
    from ckpt_course.train import measure_step

    return measure_step(_gpt(), **kwargs)


HUGE_BATCH = 2_000_000  # 32M tokens: 1 GiB of token ids and targets, 370 GiB for the step


def _doctor(**kwargs):
    from ckpt_course.doctor import doctor

    return doctor(_gpt(), "1GiB", **kwargs)


def _timeline(**kwargs):
    from ckpt_course.memviz import step_timeline

    return step_timeline(_gpt(), "none", **kwargs)


# (call, exception, fragment of the one-line message)
API_17 = [
    # HF configs given as objects, or changed after loading: checked wherever they enter
    (lambda: hf.build(_changed(GPT2, n_layer=0)), ValueError, "n_layer must be >= 1"),
    (lambda: hf.parameter_count(_changed(LLAMA, num_hidden_layers=-1)), ValueError, ">= 1"),
    (lambda: hf.hf_config_costs(_changed(LLAMA, hidden_size=2050), 1, 8), ValueError,
     "not a multiple of num_attention_heads 32"),
    (lambda: hf.small_model(_changed(LLAMA, num_key_value_heads=5)), ValueError,
     "does not divide"),
    (lambda: hf.build(_changed(GPT2, vocab_size=0)), ValueError, "vocab_size must be >= 1"),
    (lambda: hf.load_config(_changed(LLAMA, num_hidden_layers=10**6)), ValueError,
     "at most 256"),
    (lambda: hf.load_config(5), TypeError, "a shipped name"),
    (lambda: hf.load_config(None), TypeError, "a shipped name"),
    (lambda: hf.load_config(""), ValueError, "unknown model config ''"),
    (lambda: hf.load_config("../hf_configs/gpt2"), ValueError, "give a config.json path"),
    (lambda: hf.load_config("/nonexistent/config.json"), ValueError, "give a config.json path"),
    # hf_config_costs and small_model arguments
    (lambda: hf.hf_config_costs(GPT2, 1, 8, dtype="int8"), ValueError, "'bf16', 'fp16', 'fp32'"),
    (lambda: hf.hf_config_costs(GPT2, 1, 8, dtype=torch.int64), ValueError, "torch.bfloat16"),
    (lambda: hf.hf_config_costs(GPT2, 1, 8, dtype=2), ValueError, "torch.bfloat16"),
    (lambda: hf.hf_config_costs(GPT2, 1, 8, master_weights="yes"), TypeError, "True or False"),
    (lambda: hf.hf_config_costs(GPT2, 0, 8), ValueError, "batch_size must be >= 1"),
    (lambda: hf.hf_config_costs(GPT2, 1, 2.5), TypeError, "seq_len is a whole number"),
    (lambda: hf.hf_config_costs(GPT2, 1, 2048), ValueError, "use seq_len <= 1024"),
    (lambda: hf.small_model(GPT2, 0), ValueError, "n_layer must be >= 1"),
    (lambda: hf.small_model(GPT2, 4, 0), ValueError, "batch_size must be >= 1"),
    (lambda: hf.small_model(GPT2, 4, 4, 0), ValueError, "seq_len must be >= 1"),
    (lambda: hf.small_model(GPT2, -1), ValueError, "n_layer must be >= 1"),
    (lambda: hf.small_model(GPT2, 2.5), TypeError, "n_layer is a whole number"),
    (lambda: hf.small_model(GPT2, 300), ValueError, "at most 256"),
    (lambda: hf.small_model(GPT2, 4, 4096, 64), ValueError, "use a smaller batch or sequence"),
    (lambda: hf.small_model(GPT2, 4, 4, 2048), ValueError, "use --seq 1024 or less"),
    (lambda: hf.small_config(hf.load_config(GPT2), width=63), ValueError, "multiple of n_head"),
    (lambda: hf.small_config(hf.load_config(GPT2), n_layer=0), ValueError, ">= 1"),
    # train
    (lambda: _train(lr=math.inf), ValueError, "lr must be a finite number >= 0"),
    (lambda: _train(lr=-math.inf), ValueError, "lr must be a finite number >= 0"),
    (lambda: _train(lr=math.nan), ValueError, "lr must be a finite number >= 0"),
    (lambda: _train(lr=-0.1), ValueError, "use e.g. lr=1e-3"),
    (lambda: _train(lr="0.1"), TypeError, "lr must be a number such as 1e-3"),
    (lambda: _train(lr=None), TypeError, "lr must be a number"),
    (lambda: _train(lr=True), TypeError, "lr must be a number"),
    (lambda: _train(lr=1j), TypeError, "lr must be a number"),
    (lambda: _train(seed="x"), TypeError, "seed must be a whole number"),
    (lambda: _train(seed=1.5), TypeError, "seed must be a whole number"),
    (lambda: _train(seed=-1), ValueError, "seed must be in 0 .. 2**63 - 1"),
    (lambda: _train(seed=2**64), ValueError, "a 65-bit number"),
    (lambda: _train(seed=None), TypeError, "seed must be a whole number"),
    (lambda: _train(batch_size=2**40), ValueError, "use a smaller batch_size"),
    (lambda: _train(batch_size=2**62), ValueError, "more than this machine's memory"),
    (lambda: _train(batch_size=0), ValueError, "batch_size must be a positive whole number"),
    (lambda: _train(batch_size="8"), ValueError, "batch_size=8"),
    (lambda: _train(steps=2.5), ValueError, "steps must be a positive whole number"),
    (lambda: _train(steps=0), ValueError, "steps=3"),
    (lambda: _train(on_step="x"), TypeError, "on_step must be a function"),
    (lambda: _train(on_step=5), TypeError, "pass e.g. on_step=print"),
    (lambda: _train(measure_memory=False, budget=1), ValueError, "keep measure_memory=True"),
    (lambda: _train(measure_memory=False, budget="1MiB"), ValueError, "or drop the budget"),
    (lambda: _train(budget=10**400), ValueError, "more bytes than any machine has"),
    (lambda: _train(budget=-1), ValueError, "a positive number of bytes"),
    (lambda: _train(budget=True), TypeError, "a positive number of bytes"),
    (lambda: _train(model=_frozen()), ValueError, "every parameter of TinyGPT is frozen"),
    (lambda: _train(policy="segments:0-5"), ValueError, "name blocks below 2"),
    (lambda: _train(policy="menu:0-4=full"), ValueError, "name blocks below 2"),
    (lambda: _train(policy=policies.Nested(((0, 1, ()),))), ValueError, "only inside a menu"),
    (lambda: _train(policy=5), TypeError, "a Policy or a string"),
    (lambda: _train(seq_len=999), ValueError, "use seq_len <= 16"),
    (lambda: _train(device="tpu"), ValueError, "use 'cpu' or 'cuda'"),
    # run_step
    (lambda: _step(batch=[]), ValueError, "batch is an empty list of micro-batches"),
    (lambda: _step(batch=None), TypeError, "batch must be a tuple of tensors"),
    (lambda: _step(batch=5), TypeError, "such as make_batch(model, 8)"),
    (lambda: _step(batch="tokens"), TypeError, "batch must be a tuple of tensors"),
    (lambda: _step(batch=()), ValueError, "not a tuple of tensors"),
    (lambda: _step(batch=[(), ()]), ValueError, "not a tuple of tensors"),
    (lambda: _step(batch=[5]), ValueError, "batch holds 5"),
    (lambda: _step(batch=([1, 2],)), ValueError, "first tensor must hold at least one sample"),
    (lambda: _step(batch=(torch.tensor(3),)), ValueError, "of shape ()"),
    (lambda: _step(batch=(torch.zeros(0, 16, dtype=torch.long),)), ValueError,
     "of shape (0, 16)"),
    (lambda: _step(optimizer="adamw"), TypeError, "optimizer must be a torch optimizer"),
    (lambda: _step(optimizer=5), TypeError, "such as make_optimizer(model)"),
    (lambda: _step(optimizer=torch.optim.AdamW), TypeError, "or None for no optimizer step"),
    (lambda: _step(meter=MemoryMeter(budget=1)), ValueError, "the meter is not entered"),
    (lambda: _step(meter=MemoryMeter()), ValueError, "run the step inside `with meter:`"),
    # measure_step and check_gradients
    (lambda: _measure(batch=()), ValueError, "not a tuple of tensors"),
    (lambda: _measure(batch=[]), ValueError, "not a tuple of tensors"),
    (lambda: _measure(batch=5), TypeError, "batch must be a tuple of tensors"),
    (lambda: _measure(seed="x"), TypeError, "seed must be a whole number"),
    (lambda: _measure(policy="menu:0-1=full(0-5)"), ValueError, "must lie inside 0-1"),
    (lambda: _measure(policy="segments:7"), ValueError, "name blocks below 2"),
    (lambda: _grads(policies.Nested(((0, 9, ()),))), ValueError, "runs only inside a menu"),
    (lambda: _grads(policies.Nested(((0, 1, ()),))), ValueError, "write 'menu:0-1=full(0-1)'"),
    (lambda: _grads(policies.Menu(((0, 6, "full", ((0, 3, ()),)),))), ValueError,
     "name blocks below 2"),
    (lambda: _grads("menu:0-1=full(0-5)"), ValueError, "must lie inside 0-1"),
    (lambda: _grads("full", seed=-5), ValueError, "seed must be in 0"),
    (lambda: _grads("full", batch_size=0), ValueError, "batch_size must be a positive"),
    (lambda: _grads("full", seq_len=0), ValueError, "seq_len=64"),
    # compare
    (lambda: _compare(("none", "full"), steps=2.5), TypeError, "steps is a whole number"),
    (lambda: _compare(("none", "full"), steps=0), ValueError, "steps must be >= 1"),
    (lambda: _compare(("none", "full"), steps="6"), TypeError, "steps is a whole number"),
    (lambda: _compare(("none", "full"), memory_steps=0), ValueError, "memory_steps must be >= 1"),
    (lambda: _compare("none,full"), TypeError, "write ['none', 'full']"),
    (lambda: _compare("full"), TypeError, "write ['full']"),
    (lambda: _compare(policies.EveryK(2)), TypeError, "write ['every-2']"),
    (lambda: _compare(5), TypeError, "policies is a list such as ['none', 'full']"),
    (lambda: _compare([]), ValueError, "give at least one policy"),
    (lambda: _compare(["none", "none"]), ValueError, "each policy once"),
    (lambda: _compare(["none", "bogus"]), ValueError, "unknown policy 'bogus'"),
    (lambda: _compare(["none"], seed="x"), TypeError, "seed must be a whole number"),
    (lambda: _compare(["none"], lr=math.inf), ValueError, "lr must be a finite number"),
    (lambda: _compare(["none"], batch_size=0), ValueError, "batch_size must be >= 1"),
    (lambda: _compare(["none"], budget="lots"), ValueError, "not understood"),
    # the planner's costs
    (lambda: plan.make_plan(None, 100), TypeError, "costs must be a ChainCosts"),
    (lambda: plan.make_plan("7b", "80GiB"), TypeError, "config_costs('7b', 1, 4096)"),
    (lambda: plan.make_plan(5, 100), TypeError, "got int"),
    (lambda: plan.optimal(None, 100), TypeError, "costs must be a ChainCosts"),
    (lambda: plan.predict(None, "full"), TypeError, "from measure_costs(model, batch_size)"),
    (lambda: plan.nested_optimal([1, 2], 100), TypeError, "got list"),
    # policy text: digits that are not ASCII, sizes without end, empty items, deep nesting
    (lambda: policies.parse_policy("segments:²"), ValueError, "write inclusive block numbers"),
    (lambda: policies.parse_policy("segments:0-²"), ValueError, "'segments:0-2,5..7'"),
    (lambda: policies.parse_policy("segments:٣"), ValueError, "write inclusive block numbers"),
    (lambda: policies.parse_policy("every-²"), ValueError, "integer >= 1"),
    (lambda: policies.parse_policy("every-٣"), ValueError, "integer >= 1"),
    (lambda: policies.parse_policy("menu:²=full"), ValueError, "inclusive block numbers"),
    (lambda: policies.parse_policy("menu:0-1=full(0-²)"), ValueError, "not '0-²'"),
    (lambda: policies.parse_policy("segments:0..999999999"), ValueError, "beyond any model"),
    (lambda: policies.parse_policy("segments:5-99999999999"), ValueError, "beyond any model"),
    (lambda: policies.parse_policy("menu:0..999999999=offload"), ValueError,
     "beyond any model"),
    (lambda: policies.parse_policy("menu:0-1=full" + "(0-1" * 2000 + ")" * 2000), ValueError,
     "at most 32 levels deep"),
    (lambda: policies.parse_policy("menu:0-1=full" + "(0" * 40 + ")" * 40), ValueError,
     "at most 32 levels deep"),
    (lambda: policies.parse_policy("every-" + "9" * 400), ValueError, "bad policy '"),
    (lambda: policies.parse_policy("every-100000"), ValueError, "use e.g. every-2"),
    (lambda: policies.parse_policy("menu:0-3=full(((((((((0-1)))))))))"), ValueError,
     "names its blocks before its parentheses"),
    (lambda: policies.parse_policy("menu:0-3=full((0-1))"), ValueError, "not full((0-1))"),
    # policy objects: malformed children, too deep, beyond the model
    (lambda: policies.Menu(((0, 1, "full", (5,)),)), ValueError,
     "(start, stop, children) with whole block numbers"),
    (lambda: policies.Menu(((0, 2, "full", ((0, 1),)),)), ValueError, "such as (0, 2, ())"),
    (lambda: policies.Menu(((0, 2, "full", (("a", 1, ()),)),)), ValueError, "got ('a', 1, ())"),
    (lambda: policies.Menu(((0, 2, "full", ((True, 1, ()),)),)), ValueError,
     "whole block numbers"),
    (lambda: policies.Menu(((0, 4, "full", ((0, 2, ()), (1, 3, ()))),)), ValueError,
     "not overlap"),
    (lambda: policies.Menu(((0, 4, "full", ((0, 2, "x"),)),)), ValueError,
     "a tuple of (start, stop, children) tuples"),
    (lambda: _deep_menu(2000), ValueError, "at most 32 levels deep"),
    (lambda: policies.Nested((5,)), ValueError, "(start, stop, children)"),
    (lambda: policies.Nested(((2, 1, ()),)), ValueError, "ordered and not overlap"),
    (lambda: policies.Nested(((-1, 1, ()),)), ValueError, "start at block 0 or later"),
    (lambda: policies.apply_policy(_gpt(), policies.Nested(((0, 1, ()),))), ValueError,
     "only inside a menu"),
    # budgets beyond a float
    (lambda: parse_budget(10**400), ValueError, "a 1329-bit number"),
    (lambda: parse_budget(-10**400), ValueError, "more bytes than any machine has"),
    (lambda: parse_budget(10**5000), ValueError, "a 16610-bit number"),
    (lambda: parse_budget(2**64), ValueError, "a 65-bit number"),
    (lambda: parse_budget(math.inf), ValueError, "or None for no budget"),
    (lambda: parse_budget(math.nan), ValueError, "or None for no budget"),
    (lambda: plan.make_plan(COSTS, 10**400), ValueError, "more bytes than any machine has"),
    # more of the HF surface: handback, verify_handback, layer_tape, the wrapper
    (lambda: hf.handback("full", 0), ValueError, "n must be >= 1"),
    (lambda: hf.handback("menu:0=full,prefix=full", 4), ValueError, "trunk=False"),
    (lambda: hf.handback("menu:0=full,suffix=full", 4), ValueError, "trunk=False"),
    (lambda: hf.handback("full", "4"), TypeError, "n is a whole number"),
    (lambda: hf.handback("segments:0-9", 4), ValueError, "name blocks below 4"),
    (lambda: hf.handback("segments:1,3", 4, 5), ValueError, "'transformer.h' or 'model.layers'"),
    (lambda: hf.handback("segments:1,3", 4, ""), ValueError, "as a path such as"),
    (lambda: hf.handback("segments:1,3", 4, "model.layers[0]"), ValueError, "as a path such"),
    (lambda: hf.handback("segments:0-1", 4, None, 5), TypeError, "costs must be a ChainCosts"),
    (lambda: hf.verify_handback(hf.small_model(GPT2, 2)[0], "x"), TypeError, "and a Handback"),
    (lambda: hf.verify_handback(_gpt(), hf.handback("full", 2)), TypeError,
     "the HFCausalLM that build() made"),
    (lambda: hf.layer_tape(GPT2, 0, 8), ValueError, "batch_size must be >= 1"),
    (lambda: hf.layer_tape(GPT2, 1, 10**6), ValueError, "pass fake=True, or fewer"),
    (lambda: hf.layer_tape("llama-3.1-70b", 1, 8), ValueError, "pass fake=True"),
    (lambda: hf.layer_tape(GPT2, 1, 8, dtype="int8"), ValueError, "torch.bfloat16"),
    (lambda: hf.find_decoder_layers(_gpt(), 5), TypeError, "dotted path of the block list"),
    (lambda: hf.find_decoder_layers(_gpt(), "no.such"), ValueError, "has no submodule 'no.such'"),
    (lambda: hf.HFCausalLM(5), TypeError, "build one with hf.build(config)"),
    (lambda: hf.build(hf.small_config(hf.load_config(GPT2), 2), attn="bogus"), ValueError,
     "attn is 'sdpa' or 'eager'"),
    (lambda: hf.small_config(hf.load_config(GPT2), vocab=10**9), ValueError,
     "use a smaller vocab"),
    (lambda: hf.small_config(hf.load_config(GPT2), width=10**5), ValueError,
     "use a smaller width"),
    (lambda: hf.small_config(hf.load_config(GPT2), n_head=128), ValueError,
     "use a smaller n_head"),
    (lambda: hf.small_config(hf.load_config(GPT2), seq_len=10**6), ValueError,
     "use a smaller seq_len"),
    # more of run_step, train and the optimizer
    (lambda: _step(step="x"), ValueError, "step must be a positive whole number"),
    (lambda: _step(step=0), ValueError, "e.g. step=1"),
    (lambda: _step(loss_fn="x"), TypeError, "loss_fn is a function of the batch"),
    (lambda: _step(guard="x"), TypeError, "guard is True or False"),
    (lambda: _step(count_batch=1), TypeError, "count_batch is True or False"),
    (lambda: _train(count_recompute="x"), TypeError, "count_recompute is True or False"),
    (lambda: _train(measure_memory="yes"), TypeError, "measure_memory is True or False"),
    (lambda: _train(progress=None), TypeError, "progress is True or False"),
    (lambda: _make_optimizer(None), TypeError, "pass e.g. make_optimizer(model)"),
    (lambda: _make_optimizer(5), TypeError, "a model or its parameters"),
    (lambda: _make_optimizer(_gpt(), lr="fast"), TypeError, "lr must be a number"),
    # the handed-back code's block list
    (lambda: hf.handback("segments:1,3", 4, layers=nn.Linear(2, 2)), ValueError,
     "no repeated blocks"),
    (lambda: hf.layers_path(_changed(GPT2, n_layer=0)), ValueError, "n_layer must be >= 1"),
    # a batch whose data fits (1 GiB) but whose step could not (about 370 GiB for this net): refused
    # from the model's size before the first tensor of the step is made
    *[(call, ValueError, "for one training step, more than the") for call in (
        lambda: _train(batch_size=HUGE_BATCH),
        lambda: _measure(batch_size=HUGE_BATCH),
        lambda: _grads("full", batch_size=HUGE_BATCH),
        lambda: _compare(["none"], steps=1, batch_size=HUGE_BATCH),
        lambda: sweeps.step_breakdown(_gpt(), batch_size=HUGE_BATCH),
        lambda: plan.measure_peaks(_gpt(), batch_size=HUGE_BATCH),
        lambda: _doctor(batch_size=HUGE_BATCH),
        lambda: _timeline(batch_size=HUGE_BATCH))],
    (lambda: _train(batch_size=HUGE_BATCH), ValueError, "use a smaller batch_size or seq_len"),
    (lambda: _train(model=models.build_model("hand-trace"), batch_size=10**7), ValueError,
     "use a smaller batch_size"),
]


@pytest.mark.parametrize("call, error, fix", API_17)
def test_the_api_of_issue_17_refuses_bad_input_with_the_fix(call, error, fix):
    with pytest.raises(error) as info:
        call()
    message = str(info.value)
    assert fix in message, message
    assert "\n" not in message and len(message) < 600


# (call, check of its result): inputs that look wrong but have a right answer
RESULTS_17 = [
    # a dtype by its command-line name is the dtype
    (lambda: hf.hf_config_costs(GPT2, 1, 8, dtype="bf16").param_bytes,
     lambda got: got == 2 * 124_439_808),  # GPT-2's published parameter count, 2 B each
    (lambda: hf.as_dtype("FP32"), lambda got: got is torch.float32),
    # the smallest small instance is what was asked for, not the defaults
    (lambda: hf.small_model(GPT2, 1, 1, 1),
     lambda got: (len(got[0].blocks), got[1], got[2]) == (1, 1, 1)),
    # optional fields left out or null take transformers' defaults
    (lambda: hf.load_config(_hf(GPT2, n_inner=None)).n_inner, lambda got: got is None),
    (lambda: hf.load_config(_hf(LLAMA, num_key_value_heads=None)).num_key_value_heads,
     lambda got: got == 32),
    (lambda: hf.load_config(_hf(LLAMA, num_hidden_layers=256)).num_hidden_layers,
     lambda got: got == 256),
    # the layer count of a deep config comes without building every layer
    (lambda: hf.parameter_count(_hf(LLAMA, num_hidden_layers=256)),
     # embedding and final norm, then 256 layers: q, o 2048^2; k, v 2048 x 512; MLP 3 x
     # 2048 x 8192; two norms
     lambda got: got == 128256 * 2048 + 2048 + 256 * (2 * 2048**2 + 2 * 2048 * 512
                                                      + 3 * 2048 * 8192 + 2 * 2048)),
    # the block list of each shipped architecture, found in the model
    (lambda: hf.layers_path(hf.load_config(GPT2)), lambda got: got == "transformer.h"),
    (lambda: hf.layers_path(hf.load_config("qwen2.5-7b")), lambda got: got == "model.layers"),
    # a learning rate of 0 trains nothing (AdamW's decay is lr x weight decay)
    (lambda: _lr_zero_changes_nothing(), lambda got: got is True),
    # seeds at the ends of the range
    (lambda: len(_train(seed=0)), lambda got: got == 1),
    (lambda: len(_train(seed=2**63 - 1)), lambda got: got == 1),
    # an empty item in a segments list is skipped; the largest bounded block is accepted
    (lambda: str(policies.parse_policy("segments:0,,1")), lambda got: got == "segments:0,1"),
    # ... and in a menu, as in a segments list (the two grammars agree)
    *[(lambda text=text: policies.parse_policy(text),
       lambda got: got == policies.parse_policy("menu:0=full,1=full"))
      for text in ("menu:0=full,,1=full", "menu:0=full,1=full,", "menu:,0=full,1=full")],
    (lambda: policies.parse_policy("menu:0=selective:save=mm,,sdpa"),
     lambda got: got == policies.parse_policy("menu:0=selective:save=mm,sdpa")),
    (lambda: policies.parse_policy("segments:99999").ranges, lambda got: got == ((99999, 100000),)),
    # 32 levels of nesting is the bound, not an error
    (lambda: len(str(_deep_menu(31))), lambda got: got > 100),
    # a budget as large as the planner can hold is still a budget; a fraction above 1 KiB is
    # rounded down to whole bytes (1.5 bytes is refused: test_planner_refusals)
    (lambda: parse_budget(2**63 - 1), lambda got: got == 2**63 - 1),
    (lambda: parse_budget("2000.5B"), lambda got: got == 2000),
    (lambda: parse_budget(3.2 * 2**20), lambda got: got == 3355443),
    # a micro-batch list is the caller's after the step
    (lambda: _list_after_step(), lambda got: got == 2),
]


def _lr_zero_changes_nothing() -> bool:
    model = _gpt()
    before = [p.detach().clone() for p in model.parameters()]
    _train(model=model, lr=0.0, steps=2)
    return all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def _list_after_step() -> int:
    from ckpt_course.step import make_batch

    model = _gpt()
    batch = make_batch(model, 4)
    parts = [tuple(t[:2] for t in batch), tuple(t[2:] for t in batch)]
    _step(model, parts)
    return len(parts)


@pytest.mark.parametrize("call, check", RESULTS_17)
def test_inputs_that_look_wrong_but_have_a_right_answer_get_it(call, check):
    assert check(call())


# the command line: --hf-config files with bad values, --model next to --hf-config
HF_CLI = [
    (["plan", "--hf-config", (GPT2, {"n_layer": "sixteen"}), "--budget", "1GiB"],
     "n_layer must be a whole number"),
    (["plan", "--hf-config", (GPT2, {"n_layer": 2.5}), "--budget", "1GiB"],
     "n_layer must be a whole number"),
    (["plan", "--hf-config", (GPT2, {"n_layer": True}), "--budget", "1GiB"],
     "n_layer must be a whole number"),
    (["plan", "--hf-config", (GPT2, {"n_layer": 0}), "--budget", "1GiB"], "n_layer must be >= 1"),
    (["plan", "--hf-config", (GPT2, {"n_layer": -2}), "--budget", "1GiB"],
     "n_layer must be >= 1"),
    (["plan", "--hf-config", (GPT2, {"n_layer": 10**6}), "--budget", "1GiB"], "at most 256"),
    (["plan", "--hf-config", (LLAMA, {"hidden_size": 2050}), "--budget", "1GiB"],
     "use e.g. hidden_size 2048"),
    (["plan", "--hf-config", (LLAMA, {"num_attention_heads": 0}), "--budget", "1GiB"],
     "num_attention_heads must be >= 1"),
    (["plan", "--hf-config", (LLAMA, {"num_key_value_heads": 5}), "--budget", "1GiB"],
     "does not divide num_attention_heads 32"),
    (["plan", "--hf-config", (LLAMA, {"vocab_size": 0}), "--budget", "1GiB"],
     "vocab_size must be >= 1"),
    (["plan", "--hf-config", (LLAMA, {"hidden_size": 0}), "--budget", "1GiB"],
     "hidden_size must be >= 1"),
    (["plan", "--hf-config", (LLAMA, {"intermediate_size": 0}), "--budget", "1GiB"],
     "intermediate_size must be >= 1"),
    (["plan", "--hf-config", (LLAMA, {"max_position_embeddings": 0}), "--budget", "1GiB"],
     "max_position_embeddings must be >= 1"),
    (["plan", "--hf-config", (LLAMA, {"model_type": "t5"}), "--budget", "1GiB"],
     "model_type 't5' is not a supported causal LM"),
    (["plan", "--hf-config", (LLAMA, {"model_type": "bert"}), "--budget", "1GiB"],
     "use one of gpt2, llama, mistral, qwen2"),
    (["doctor", "--hf-config", (GPT2, {"n_head": 0})], "n_head must be >= 1"),
    (["doctor", "--hf-config", (LLAMA, {"num_hidden_layers": "16"})],
     "num_hidden_layers must be a whole number"),
    (["trace", "--hf-config", (LLAMA, {"num_key_value_heads": 3}), "--html", "{tmp}/t.html"],
     "use a divisor such as 2"),
    (["trace", "--hf-config", (GPT2, {"model_type": "bert"}), "--html", "{tmp}/t.html"],
     "not a supported causal LM"),
    (["doctor", "--hf-config", GPT2, "--model", "gpt"], "--model and --hf-config both name"),
    (["doctor", "--hf-config", GPT2, "--model", "llama-tiny", "--budget", "1MiB"],
     "drop one of them"),
    (["trace", "--hf-config", GPT2, "--model", "gpt", "--html", "{tmp}/t.html"],
     "--model and --hf-config both name the model"),
    (["trace", "--model", "hand-trace", "--hf-config", GPT2, "--html", "{tmp}/t.html"],
     "drop one of them"),
    (["doctor", "--hf-config", GPT2, "--layers", "300"], "use fewer layers"),
    (["doctor", "--hf-config", GPT2, "--batch", "2000", "--seq", "64"],
     "use a smaller batch or sequence"),
]


@pytest.mark.parametrize("argv, fix", HF_CLI)
def test_hf_config_options_are_checked_in_one_line(argv, fix, files, capsys):
    argv = [_hf(a[0], **a[1]) if isinstance(a, tuple) else a.replace("{tmp}", str(files))
            for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and captured.out == ""
    assert fix in captured.err.strip().splitlines()[-1]
    assert not (files / "t.html").exists()  # refused before any work


def test_issue_17_adds_at_least_170_bad_inputs():
    assert len(HF_CONFIGS) + len(API_17) + len(RESULTS_17) + len(HF_CLI) >= 170


def test_a_step_is_refused_from_the_machines_free_memory_before_any_work(monkeypatch):
    """The guard reads the machine's free memory (given here): a step guessed above it is
    refused, the same step below it runs, and where the free memory is unknown nothing is
    refused. The guess: 16 B per parameter plus 4 B x tokens x (32 x width x layers + 4 x vocab)."""
    from ckpt_course import step
    from ckpt_course.train import train

    model = _gpt()  # 2 layers of width 32, vocabulary 256: 18,688 + 2,048 x 16 per token
    params = sum(p.numel() for p in model.parameters())
    need = 16 * params + 4 * 2 * 16 * (32 * 32 * 2 + 4 * 256)
    assert step.model_step_bytes(model, 2 * 16) == need
    monkeypatch.setattr(step, "available_memory", lambda: need - 1)
    with pytest.raises(ValueError, match="TinyGPT at batch_size 2 needs about"):
        train(model, steps=1, batch_size=2, progress=False)
    monkeypatch.setattr(step, "available_memory", lambda: need)
    assert len(train(model, steps=1, batch_size=2, progress=False)) == 1
    monkeypatch.setattr(step, "available_memory", lambda: None)
    assert len(train(model, steps=1, batch_size=2, progress=False)) == 1


# ---------------------------------------------------------------- a tester's findings (h5)
SOURCES = str(Path(__file__).resolve().parents[1] / "exercises" / "src")
LONG = "a" * 300  # one name longer than the file system's 255 bytes
CLI_FINDINGS = [
    # F1: a number of hundreds of digits is named by its length, never echoed
    (["train", "--layers", "1" * 5000], "got a 5000-digit number"),
    (["train", "--layers", "1" + "0" * 400], "got a 401-digit number"),
    (["train", "--policy", "every-" + "9" * 400], "K in every-K must be"),
    (["train", "--policy", "every-100000"], "use e.g. every-2"),
    # F3: a name too long for the file system, for every kind of output path
    (["trace", "--html", f"{{tmp}}/{LONG}.html"], "choose a shorter name"),
    (["compare", "--out", f"{LONG}.png"], "more than the file system's 255"),
    (["grade", "x.ipynb", "--csv", f"{LONG}.csv"], "choose a shorter name"),
    (["grade", "x.ipynb", "--feedback", f"{{tmp}}/{LONG}"], "choose a shorter name"),
    (["sync-course", "--into", f"{{tmp}}/{LONG}"], "choose a shorter name"),
    # F4: trace's snapshot beside the page is checked as the page is, --force or not
    (["trace", "--model", "hand-trace", "--layers", "1", "--html", "{tmp}/pk/y.html", "--force"],
     "the snapshot beside --html: {tmp}/pk/y.pickle is a folder"),
    # F5: more of the system's folders
    (["trace", "--html", "/var/x.html"], "is in a system folder"),
    (["trace", "--html", "/opt/x.html"], "is in a system folder"),
    (["trace", "--html", "/run/x.html"], "is in a system folder"),
    (["compare", "--out", "/var/log/x.png"], "is in a system folder"),
    # F6, F12: budgets below a byte or beyond what the planner holds, refused where parsed
    (["plan", "--config", "70b", "--budget", "0.5B"], "--budget: budget must be at least 1"),
    (["plan", "--config", "70b", "--budget", "1" + "0" * 400], "got a 401-digit number"),
    (["plan", "--config", "tiny", "--budget", str(2**64)], "argument --budget: budget must be at"),
    (["plan", "--config", "tiny", "--budget", str(2**63)], "at most 8 EiB"),
    (["plan", "--config", "tiny", "--budget", "8589934592GiB"], "at most 8 EiB"),
    (["plan", "--config", "tiny", "--budget", "8388608TiB"], "at most 8 EiB"),
    # F9: a grading time limit no worker can start in
    (["grade", "x.ipynb", "--timeout", "0.001"], "at least 1 second"),
    (["grade", "x.ipynb", "--timeout", "1e-300"], "at least 1 second"),
    # F10: build and reset write into folders of their own, never a system one or the sources
    (["build-exercises", "--src", SOURCES, "--solutions", "/etc/sol", "--exercises",
      "{tmp}/ex"], "is in a system folder"),
    (["reset-exercises", "--src", SOURCES, "--exercises", "/etc/ex"], "is in a system folder"),
    (["build-exercises", "--src", SOURCES, "--solutions", "{tmp}/same", "--exercises",
      "{tmp}/same"], "--solutions and --exercises are the same folder"),
    (["build-exercises", "--src", SOURCES, "--solutions", SOURCES, "--exercises", "{tmp}/e"],
     "--src and --solutions are the same folder"),
    (["build-exercises", "--src", SOURCES, "--solutions", "{tmp}/s", "--exercises", SOURCES],
     "--src and --exercises are the same folder"),
    (["reset-exercises", "--src", SOURCES, "--exercises", SOURCES],
     "--src and --exercises are the same folder"),
    # F11: a copy inside a copy
    (["sync-course", "--into", "{tmp}/copy/notebooks"], "is inside your copy"),
]


@pytest.mark.parametrize("argv, fix", CLI_FINDINGS)
def test_the_testers_command_lines_get_one_line_before_any_work(argv, fix, files, capsys):
    from ckpt_course.workcopy import MANIFEST

    (files / "pk" / "y.pickle").mkdir(parents=True, exist_ok=True)
    (files / "copy" / "notebooks").mkdir(parents=True, exist_ok=True)
    (files / "copy" / MANIFEST).write_text('{"version": 1, "files": {}}')
    before = sorted(p.name for p in files.rglob("*"))
    error = _refused(argv, files, capsys)
    assert len(error) < 400 and fix.replace("{tmp}", str(files)) in error
    assert sorted(p.name for p in files.rglob("*")) == before  # nothing written


class _MyNet(nn.Module):
    """A learner's own model: blocks, but none of the course's protocol."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def _auto(budget):
    from ckpt_course.auto import auto_checkpoint

    return auto_checkpoint(_MyNet(), budget, batch=torch.randn(2, 4))


API_FINDINGS = [
    # F6, F12: the budget, where it is parsed
    (lambda: parse_budget(0.5), ValueError, "at least 1 byte"),
    (lambda: parse_budget("0.5B"), ValueError, "at least 1 byte"),
    (lambda: parse_budget(2**63), ValueError, "at most 8 EiB"),
    (lambda: parse_budget("1" + "0" * 400), ValueError, "a 401-digit number"),
    (lambda: _auto(2**63), ValueError, "at most 8 EiB"),
    (lambda: plan.optimal(config_costs("tiny", 1, 8), 2**63), ValueError, "at most 8 EiB"),
    # F16: no run of days
    (lambda: _train(steps=10**9), ValueError, "steps must be at most 10,000"),
    (lambda: _train(steps=10**400), ValueError, "a 1329-bit number"),
    (lambda: _compare(["none"], steps=10**9), ValueError, "steps must be at most 10,000"),
    (lambda: _compare(["none"], memory_steps=10**5), ValueError, "at most 10,000"),
    (lambda: _doctor(steps=10**9), ValueError, "steps must be at most 10,000"),
    # F17: a key with no table reads as a sentence
    (lambda: _reveal_unknown(), KeyError, "a Predict key looks like '2.2/rerun-order'"),
    # F18: the course's protocol, named before any work, by compare too
    (lambda: _compare_model(_MyNet()), ValueError, "_MyNet lacks example_batch, loss"),
    # F19
    (lambda: _step(optimizer=_gpt()), TypeError, "optimizer is the model TinyGPT"),
    (lambda: hf.small_model(GPT2, 1, 1, 10**6), ValueError, "seq_len=1024 in Python"),
    (lambda: hf.small_model(GPT2, 300), ValueError, "n_layer=8 in Python"),
    (lambda: _train(device="cpu:1"), ValueError, "torch has one CPU device"),
    # F23, F24: config.json files
    (lambda: hf.load_config(_raw_json("[" * 100_000 + "]" * 100_000)), ValueError,
     "nested thousands of levels deep"),
    (lambda: hf.load_config(_hf(LLAMA, rms_norm_eps=-1)), ValueError,
     "rms_norm_eps -1 must be a small positive number"),
    (lambda: hf.load_config(_hf(LLAMA, rms_norm_eps=math.nan)), ValueError,
     "use e.g. \"rms_norm_eps\": 1e-05"),
    (lambda: hf.load_config(_hf(GPT2, layer_norm_epsilon="small")), ValueError,
     "layer_norm_epsilon 'small' must be"),
    (lambda: hf.load_config(_hf(LLAMA, vocab_size=_DROP)), ValueError, "no vocab_size"),
    # F25: the live plot and the meter's track take what the rest of the course takes
    (lambda: _live(budget=-1), ValueError, "a positive number of bytes"),
    (lambda: _live(steps=0), ValueError, "steps must be >= 1"),
    (lambda: _live(steps=10**9), ValueError, "steps must be at most 10,000"),
    (lambda: _live(policies="none"), TypeError, "not the str 'none'"),
    (lambda: _live(policies=["bogus"]), ValueError, "unknown policy 'bogus'"),
    (lambda: _live().add(None), TypeError, "LivePlot.add takes a step's record"),
    (lambda: _live()(5), TypeError, "got int 5"),
    (lambda: MemoryMeter().track(5), TypeError, "track takes a model (an nn.Module)"),
    (lambda: MemoryMeter().track(_gpt(), "adamw"), TypeError, "track's optimizer is a torch"),
]


def _live(**kwargs):
    from ckpt_course.live import LivePlot

    return LivePlot(mode="static", **kwargs)


def test_a_live_plots_budget_is_read_as_every_budget_is():
    """F25: '64MiB', as everywhere else in the course."""
    assert _live(budget="64MiB").budget == 64 * 2**20


def _raw_json(text: str, prefix: bytes = b"") -> str:
    import tempfile

    with tempfile.NamedTemporaryFile("wb", suffix=".json", delete=False) as f:
        f.write(prefix + text.encode())
    return f.name


def test_a_config_json_with_a_byte_order_mark_is_read():
    """F24: a config.json saved by a Windows editor (a UTF-8 BOM) is the same config."""
    text = (hf.CONFIG_DIR / f"{GPT2}.json").read_text()
    config = hf.load_config(_raw_json(text, prefix=b"\xef\xbb\xbf"))
    assert config.n_layer == hf.load_config(GPT2).n_layer == 12


def _reveal_unknown():
    from ckpt_course.reveal import reveal

    reveal(3, 4, key="nope")


def _compare_model(model):
    from ckpt_course.compare import compare

    return compare(model, ["none"], live=False)


@pytest.mark.parametrize("call, error, fix", API_FINDINGS)
def test_the_testers_api_calls_get_one_line_with_the_fix(call, error, fix):
    with pytest.raises(error) as info:
        call()
    message = str(info.value)
    assert message.startswith(fix) or fix in message, message
    assert "\n" not in message and len(message) < 400 and not message.startswith("'")


def test_a_huge_prediction_gets_one_line_with_its_size():
    """F17: 10**400 typed into a Predict: the reveal shows its size and says why, no traceback;
    nan gets no meaningless gap."""
    from ckpt_course.reveal import format_reveal

    text = format_reveal(10**400, 12.0, 12.0, what="x", unit="MiB")
    assert text.splitlines() == [
        "x: yours a 1329-bit number MiB | derivation 12 MiB | measured 12 MiB",
        "  the answer is a number; yours is a 1329-bit number, which no measurement gives"]
    assert "off by" not in format_reveal(math.nan, 12.0, 12.0, what="x", unit="MiB")


def test_there_are_the_testers_bad_inputs():
    assert len(CLI_FINDINGS) + len(API_FINDINGS) >= 45


def test_a_build_that_would_replace_an_edited_notebook_writes_nothing(tmp_path):
    """F27: a hand-edited solution is protected as an edited exercise is, and the build checks
    every notebook before it writes the first: refused in one line, no file changed."""
    import shutil

    import nbformat

    from ckpt_course import authoring

    src = tmp_path / "src"
    shutil.copytree(Path(__file__).parent / "fixtures" / "src", src)
    sol, ex = tmp_path / "sol", tmp_path / "ex"
    authoring.build_all(src, sol, ex)
    edited = sorted(sol.glob("*.ipynb"))[-1]  # the last one built: the others come first
    nb = nbformat.read(edited, as_version=4)
    nb.cells[0].source += "\nmy note"
    nbformat.write(nb, edited)
    for source in src.glob("*.py"):  # every source changed: every notebook is to be rewritten
        source.write_text(source.read_text() + "\n# changed\n")
    files = sorted(sol.glob("*")) + sorted(ex.glob("*"))
    before = {f: f.read_bytes() for f in files}
    with pytest.raises(authoring.AuthoringError, match=rf"{edited.name} has edits") as info:
        authoring.build_all(src, sol, ex)
    assert "\n" not in str(info.value) and "--force" in str(info.value)
    assert {f: f.read_bytes() for f in files} == before
    assert authoring.build_all(src, sol, ex, force=True)  # --force: rebuilt
