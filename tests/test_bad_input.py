"""Bad input, across the command line and the public API: each gets one line that names the fix,
before any work is done (exit code 2 and no traceback on the command line; ValueError or
TypeError in the API)."""

import subprocess
import sys

import pytest
import torch
from torch import nn

from ckpt_course import estimate, models, plan, policies, sharding, sweeps
from ckpt_course.cli import main
from ckpt_course.costs import ChainCosts, LayerCost, config_costs, measure_costs
from ckpt_course.meter import parse_budget
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
    (["plan", "--budget=-3GiB"], "not understood"),
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
    argv = [a.replace("{tmp}", str(files)) for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and captured.out == ""  # no work was done
    error = captured.err.strip().splitlines()[-1]
    assert error.startswith("ckpt-course") and "error:" in error
    assert fix in error


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
    (lambda: measure_costs(_four_blocks(), 2, times=True, rounds=0), ValueError, "such as 15"),
    (lambda: config_costs("7b", 1, 8, menu=("selective:save=matmul",)), ValueError, "known: mm"),
    (lambda: sharding.per_gpu_bytes(1, 0, 0), ValueError, "whole number >= 1"),
    (lambda: sharding.shard(COSTS, 0), ValueError, "whole number >= 1"),
    (lambda: sharding.min_devices(COSTS, "lots"), ValueError, "not understood"),
    (lambda: measure_recompute(_four_blocks(), _four_blocks().example_batch(2), "bogus"),
     ValueError, "accepted:"),
    (lambda: rank_ops(models.TinyGPT(), batch_size=0), ValueError, "such as 8"),
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
