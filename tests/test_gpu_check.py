"""The CPU side of `make gpu-check` (bench/gpu_check.py): what can be checked without a GPU.

On a machine without CUDA the command must claim nothing and exit 0; the GPU sizes the lessons
ask `sized` for must build and fit one modern GPU (checked on fake tensors, no memory used).
"""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from ckpt_course.estimate import model_memory
from ckpt_course.models import GPTConfig

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
sys.modules["gpu_check"] = gpu_check  # dataclasses look their module up there
spec.loader.exec_module(gpu_check)

LESSONS = sorted((ROOT / "notebooks").glob("*.ipynb"))
ONE_GPU = 80 * 10**9  # one modern data-centre GPU (an A100/H100 80 GB); the H200 has more


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: run make gpu-check")
def test_without_cuda_it_claims_nothing_and_exits_0(capsys):
    assert gpu_check.main([]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert "needs a CUDA GPU" in out[0] and "Nothing was checked" in out[0]
    assert json.loads(out[-1]) == {"gpu": None, "checked": 0, "passed": None}


def test_gpu_sizes_are_read_from_the_lessons():
    found = {p.name: gpu_check.gpu_values(p) for p in LESSONS}
    configs = [v for values in found.values() for v in values if isinstance(v, GPTConfig)]
    assert configs, "the lessons ask sized() for GPU-size GPT configs"
    lesson_4 = gpu_check.gpu_values(gpu_check.LESSON_4)
    assert any(isinstance(v, GPTConfig) for v in lesson_4) and any(
        isinstance(v, int) for v in lesson_4), "gpu-check trains lesson 4's GPU-size model"


@pytest.mark.parametrize("lesson", LESSONS, ids=lambda p: p.stem)
def test_every_gpu_size_config_builds_and_fits_one_gpu(lesson):
    values = gpu_check.gpu_values(lesson)
    batch = max((v for v in values if isinstance(v, int) and v > 1), default=16)
    for cfg in (v for v in values if isinstance(v, GPTConfig)):
        estimate = model_memory(cfg, batch, cfg.seq_len, dtype=torch.float32)
        assert estimate.activations["none"] > 0
        assert estimate.total("none") < ONE_GPU / 4, (
            f"{lesson.name}: {cfg} at batch {batch} needs {estimate.total('none') / 1e9:.1f} GB "
            "without checkpointing: too big to run in a lesson on one GPU")


@pytest.fixture
def tiny_cpu_setup(monkeypatch):
    """The GPU checks' own logic on a tiny CPU model: what differs on CUDA is only the device."""
    setup = {"device": "cpu", "config": GPTConfig(n_layer=4, d_model=32, n_head=2, seq_len=32,
                                                  dropout=0.1), "batch": 4}
    monkeypatch.setattr(gpu_check, "SETUP", setup)


def test_gradient_rows_on_cpu_are_bit_identical(tiny_cpu_setup):
    rows = gpu_check.check_gradients_per_policy()
    assert [r.check for r in rows] == [f"gradients ({p})" for p in gpu_check.POLICIES[1:]]
    assert all(r.ok and r.figures["equal"] and r.detail == "bit-identical" for r in rows)


def test_offload_row_moves_the_same_bytes_both_ways(tiny_cpu_setup):
    (row,) = gpu_check.check_offload()
    assert row.ok, row.detail
    # on CPU the "GPU" path is the host store itself, so both counts are the same run's
    assert row.figures["bytes_to_host"] == row.figures["cpu_bytes_to_host"] > 0


def test_doctor_row_finds_the_oom_and_a_fix_that_fits(tiny_cpu_setup):
    (row,) = gpu_check.check_doctor()
    assert row.ok, row.detail
    assert row.figures["fix"] != "none"


def test_step_time_rows_cover_every_policy_and_the_repeat(tiny_cpu_setup):
    rows = gpu_check.check_step_times(rounds=2)
    names = [r.check for r in rows]
    assert names == [f"step time ({p})" for p in gpu_check.POLICIES] + [
        "step time: plain measured twice"]
    assert all(r.figures["ratio"] > 0 for r in rows)


def test_a_broken_check_becomes_a_failed_row_not_a_crash(tiny_cpu_setup, monkeypatch, tmp_path):
    def broken():
        raise RuntimeError("CUDA error: an illegal memory access\nmore lines")

    monkeypatch.setattr(gpu_check, "check_meter_vs_allocator", broken)
    monkeypatch.setattr(gpu_check, "check_snapshot", lambda out: [])
    for name in ("check_doctor", "check_offload", "check_gradients_per_policy",
                 "check_step_times"):
        monkeypatch.setattr(gpu_check, name, lambda: [])
    rows = gpu_check.run_all(tmp_path, notebooks=False)
    assert [(r.check, r.ok, r.detail) for r in rows] == [
        ("broken", False, "RuntimeError: CUDA error: an illegal memory access")]
