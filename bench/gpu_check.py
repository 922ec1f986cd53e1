"""`make gpu-check`: every CUDA path of the course, run on this machine's GPU, in one table.

The course promises that on a CUDA GPU the same calls that give exact, device-independent byte
counts on a CPU also report the allocator's figures, offload through `save_on_cpu`, hit a real
out-of-memory error, and time the policies on real hardware. This script checks each claim:

- notebooks: every lesson and solution notebook under nbval, at the GPU sizes, each under 60 s;
- meter vs allocator: the meter's live tensor bytes <= `max_memory_allocated` <= `memory_reserved`,
  with the gaps (block rounding, cuBLAS workspace, the caching allocator's free blocks);
- doctor: a real OOM under `torch.cuda.set_per_process_memory_fraction`, and its fix fitting;
- offload: bytes moved by `save_on_cpu` against the CPU path's host store, and the time it adds;
- gradients: bit-identical to no policy per policy, or within a stated tolerance where a CUDA
  kernel (SDPA's backward, atomics) is not deterministic;
- step times: each policy's median step time over a plain step, interleaved (the "+33%" claim);
- snapshot: one `torch.cuda.memory._record_memory_history` snapshot of a checkpointed step, as
  memory_viz HTML.

Without CUDA it says so and exits 0, claiming nothing. Prints a table, then one JSON line.
Run: .venv/bin/python bench/gpu_check.py [--out DIR] [--skip-notebooks]
"""

from __future__ import annotations

import argparse
import ast
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_TARGET_S = 60.0
POLICIES = ("none", "full", "every-2", "selective:save=mm,sdpa", "offload")
GRAD_RTOL = 1e-5  # relative to the largest gradient entry, for kernels that are not deterministic


@dataclass
class Row:
    check: str
    ok: bool
    detail: str
    figures: dict = field(default_factory=dict)


# ---------------------------------------------------------------- what runs without a GPU
def gpu_sizes_in(notebook: Path) -> list[str]:
    """The `gpu=` sides of every `sized(cpu=..., gpu=...)` call in a notebook, as source text.

    The GPU sizes are written once, in the lessons; this reads them from there, so the CPU-side
    test (tests/test_gpu_check.py) can build every GPU-size config on fake tensors."""
    import nbformat

    found = []
    for cell in nbformat.read(notebook, as_version=4).cells:
        if cell.cell_type != "code":
            continue
        try:
            tree = ast.parse(cell.source)
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "sized":
                gpu = [k.value for k in node.keywords if k.arg == "gpu"] or node.args[1:2]
                found += [ast.unparse(g) for g in gpu]
    return found


def no_gpu_message() -> str:
    build = torch.version.cuda or "none (a CPU build)"
    return (f"gpu-check needs a CUDA GPU: torch {torch.__version__} sees none here (CUDA build: "
            f"{build}). Nothing was checked; run `make gpu-check` on a machine with one.")


# ---------------------------------------------------------------- the GPU checks
def gpu_values(notebook: Path) -> list:
    """The lesson's GPU sizes as values: configs and batch sizes (see `gpu_sizes_in`)."""
    from ckpt_course.models import GPTConfig

    return [eval(text, {"GPTConfig": GPTConfig, "torch": torch}) for text in gpu_sizes_in(notebook)]


LESSON_4 = ROOT / "notebooks" / "4_diagnose_a_real_oom.ipynb"


def lesson_setup():
    """Lesson 4's tiny GPT config and batch size at the GPU sizes it asks `sized` for."""
    from ckpt_course.models import GPTConfig

    values = gpu_values(LESSON_4)
    return (next(v for v in values if isinstance(v, GPTConfig)),
            max(v for v in values if isinstance(v, int)))


# What the checks run on: lesson 4's GPU sizes on CUDA. Tests swap in a tiny CPU setup, so every
# check's logic also runs (and is tested) on a machine without a GPU.
SETUP = {"device": "cuda", "config": None, "batch": None}


def _lesson_model(n_layer=None):
    from dataclasses import replace

    from ckpt_course.models import TinyGPT

    cfg, batch = SETUP["config"], SETUP["batch"]
    if cfg is None:
        cfg, batch = lesson_setup()
    torch.manual_seed(0)
    return TinyGPT(replace(cfg, n_layer=n_layer or cfg.n_layer)).to(SETUP["device"]), batch


def _sync():
    if torch.device(SETUP["device"]).type == "cuda":
        torch.cuda.synchronize()


def check_notebooks() -> list[Row]:
    rows = []
    for folder in ("notebooks", "solutions"):
        for path in sorted((ROOT / folder).glob("*.ipynb")):
            start = time.perf_counter()
            proc = subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval-lax",
                 "--nbval-current-env", str(path)], cwd=ROOT, capture_output=True, text=True)
            seconds = time.perf_counter() - start
            ok = proc.returncode == 0 and seconds < NOTEBOOK_TARGET_S
            tail = proc.stdout.strip().splitlines()[-1:] or ["(no output)"]
            rows.append(Row(f"nbval {folder}/{path.name}", ok, f"{seconds:.1f} s; {tail[0]}",
                            {"seconds": round(seconds, 1)}))
    return rows


def check_meter_vs_allocator() -> list[Row]:
    from ckpt_course.train import train

    rows = []
    for policy in ("none", "full"):
        model, batch = _lesson_model()
        torch.cuda.empty_cache()
        record = train(model, policy, steps=2, batch_size=batch, progress=False)[-1]
        reserved = torch.cuda.memory_reserved()
        meter, allocated = record.peak_bytes, record.cuda_peak_bytes
        ok = meter <= allocated <= reserved
        rows.append(Row(
            f"meter <= allocator ({policy})", ok,
            f"meter {meter / 2**20:.1f} MiB, max_allocated {allocated / 2**20:.1f} MiB "
            f"(+{allocated / meter - 1:.1%}: 512-byte blocks, cuBLAS workspace), reserved "
            f"{reserved / 2**20:.1f} MiB (the caching allocator's free blocks)",
            {"meter": meter, "max_allocated": allocated, "reserved": reserved}))
    return rows


def check_doctor() -> list[Row]:
    from ckpt_course.doctor import doctor
    from ckpt_course.train import train

    model, batch = _lesson_model()
    record = train(model, "none", steps=2, batch_size=batch, progress=False)[-1]
    plain = record.cuda_peak_bytes or record.peak_bytes  # the meter's on CPU
    budget = int(0.7 * plain)
    report = doctor(model, budget, batch_size=batch, timing=False)
    oomed = report.run.oom is not None
    fixed = report.verification is not None and report.verification.run.fits
    fix = report.fix.policy if report.fix else "none"
    return [Row("doctor: real OOM, then the fix fits", oomed and fixed,
                f"budget {budget / 2**20:.0f} MiB (0.7x the plain peak): OOM {oomed}, "
                f"prescribed {fix}, fits {fixed}", {"budget": budget, "fix": fix})]


def _timed_step(model, batch, policy) -> tuple[float, object]:
    from ckpt_course.policies import applied

    with applied(model, policy) as handle:
        _sync()
        start = time.perf_counter()
        model.loss(batch).backward()
        _sync()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start, handle.stats


def _batch(model, size):
    generator = torch.Generator().manual_seed(0)
    return tuple(t.to(SETUP["device"]) for t in model.example_batch(size, generator=generator))


def check_offload() -> list[Row]:
    from ckpt_course.policies import applied

    model, size = _lesson_model()
    batch = _batch(model, size)
    _timed_step(model, batch, "none")  # warm-up: kernels, cuBLAS handles
    times = {"none": [], "offload": []}
    stats = None
    for _ in range(5):
        for policy in times:
            seconds, moved = _timed_step(model, batch, policy)
            times[policy].append(seconds)
            if policy == "offload":
                stats = (moved.bytes_to_host, moved.bytes_to_device)
    cpu_model = model.cpu()
    with applied(cpu_model, "offload") as handle:
        cpu_model.loss(tuple(t.cpu() for t in batch)).backward()
        cpu_bytes = handle.stats.bytes_to_host
    ratio = statistics.median(times["offload"]) / statistics.median(times["none"])
    ok = stats is not None and stats[0] == stats[1] > 0
    return [Row("offload via save_on_cpu", ok,
                f"to host {stats[0] / 2**20:.1f} MiB and back {stats[1] / 2**20:.1f} MiB "
                f"(the CPU host store moves {cpu_bytes / 2**20:.1f} MiB: other attention "
                f"kernels save other tensors); step {ratio:.2f}x a plain one",
                {"bytes_to_host": stats[0], "cpu_bytes_to_host": cpu_bytes,
                 "time_ratio": round(ratio, 3)})]


def check_gradients_per_policy() -> list[Row]:
    from ckpt_course.train import check_gradients

    model, _ = _lesson_model(n_layer=4)
    rows = []
    for policy in POLICIES[1:]:
        result = check_gradients(model, policy)
        scale = max(p.grad.abs().max().item() if p.grad is not None else 0.0
                    for p in model.parameters()) or 1.0
        within = result.max_abs_diff <= GRAD_RTOL * max(scale, 1.0)
        verdict = "bit-identical" if result.equal else (
            f"max |diff| {result.max_abs_diff:.2e}: a non-deterministic kernel; within "
            f"{GRAD_RTOL:g} relative" if within else f"max |diff| {result.max_abs_diff:.2e}")
        rows.append(Row(f"gradients ({policy})", result.equal or within, verdict,
                        {"equal": result.equal, "max_abs_diff": result.max_abs_diff}))
    return rows


def check_step_times(rounds: int = 7) -> list[Row]:
    model, size = _lesson_model()
    batch = _batch(model, size)
    for policy in POLICIES:
        _timed_step(model, batch, policy)  # warm-up
    times = {p: [] for p in POLICIES}
    for _ in range(rounds):  # interleaved: A B C A B C ...
        for policy in POLICIES:
            times[policy].append(_timed_step(model, batch, policy)[0])
    again = [_timed_step(model, batch, "none")[0] for _ in range(rounds)]
    base = statistics.median(times["none"])
    repeat = statistics.median(again) / base
    rows = [Row(f"step time ({p})", True, f"{statistics.median(t) / base:.2f}x a plain step",
                {"ratio": round(statistics.median(t) / base, 3)}) for p, t in times.items()]
    rows.append(Row("step time: plain measured twice", abs(repeat - 1) < 0.1,
                    f"{repeat:.2f}x (within 10% means the ratios above are not noise)",
                    {"ratio": round(repeat, 3)}))
    return rows


def check_snapshot(out: Path) -> list[Row]:
    from torch.cuda._memory_viz import trace_plot

    model, size = _lesson_model()
    batch = _batch(model, size)
    torch.cuda.memory._record_memory_history(max_entries=200_000)
    try:
        _timed_step(model, batch, "full")
        snapshot = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "checkpointed_step_memory.html"
    path.write_text(trace_plot(snapshot))
    return [Row("memory snapshot", path.stat().st_size > 0, str(path.relative_to(ROOT)
                                                                   if path.is_relative_to(ROOT)
                                                                   else path))]


def run_all(out: Path, notebooks: bool) -> list[Row]:
    rows = []
    steps = [check_meter_vs_allocator, check_doctor, check_offload, check_gradients_per_policy,
             check_step_times, lambda: check_snapshot(out)]
    if notebooks:
        steps.insert(0, check_notebooks)
    for step in steps:
        try:
            rows += step()
        except Exception as error:  # one broken path must not hide the others
            name = getattr(step, "__name__", "snapshot").removeprefix("check_")
            rows.append(Row(name, False, f"{type(error).__name__}: {error}".splitlines()[0]))
    return rows


def print_table(rows: list[Row]) -> None:
    width = max(len(r.check) for r in rows)
    print(f"{'check':<{width}}  ok    detail")
    for r in rows:
        print(f"{r.check:<{width}}  {'yes' if r.ok else 'NO':<4}  {r.detail}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out",
                        help="where the memory snapshot goes (default bench/out)")
    parser.add_argument("--skip-notebooks", action="store_true", help="skip the nbval runs")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(no_gpu_message())
        print(json.dumps({"gpu": None, "checked": 0, "passed": None}))
        return 0
    print(f"GPU: {torch.cuda.get_device_name()} (torch {torch.__version__}, CUDA "
          f"{torch.version.cuda})", flush=True)
    rows = run_all(args.out, not args.skip_notebooks)
    print_table(rows)
    print(json.dumps({"gpu": torch.cuda.get_device_name(), "checked": len(rows),
                      "passed": sum(r.ok for r in rows),
                      "rows": {r.check: r.figures or r.ok for r in rows}}))
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
