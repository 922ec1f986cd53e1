import subprocess
import sys
from pathlib import Path

import pytest

from ckpt_course.cli import main


def test_tape_prints_the_hand_trace_ledger(capsys):
    assert main(["tape", "--model", "hand-trace"]) == 0
    out = capsys.readouterr().out
    assert "AddmmBackward0.mat1" in out and "5.00 MiB" in out


def test_train_prints_one_row_per_step(capsys):
    assert (
        main(
            [
                "train",
                "--model",
                "gpt",
                "--layers",
                "2",
                "--batch",
                "2",
                "--seq",
                "16",
                "--policy",
                "every-2",
                "--steps",
                "2",
            ]
        )
        == 0
    )
    rows = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()[:1].isdigit()]
    assert len(rows) == 2


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["train", "--policy", "every-0"], "accepted"),
        (["train", "--steps", "0"], "at least 1"),
        (["train", "--steps", "many"], "whole number"),
        (["tape", "--model", "resnet"], "invalid choice"),
        (["compare", "--policies", "bogus"], "accepted"),
        (["compare", "--steps", "-1"], "compare"),
    ],
)
def test_bad_arguments_give_a_usage_error(argv, fragment, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "usage: ckpt-course" in err and fragment in err


@pytest.mark.slow
def test_console_script_is_installed():
    script = Path(sys.executable).parent / "ckpt-course"
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "tape" in done.stdout and "train" in done.stdout


def test_reset_exercises_moves_edited_work_aside_and_restores_the_stub(tmp_path, capsys):
    import shutil

    root = Path(__file__).resolve().parents[1]
    shutil.copytree(
        root / "exercises", tmp_path / "exercises", ignore=shutil.ignore_patterns("backups")
    )
    exercise = tmp_path / "exercises" / "1_why_activations.ipynb"
    pristine = exercise.read_text()
    edited = pristine.replace("raise NotImplementedError", "return 42  # my answer")
    exercise.write_text(edited)
    src, folder = str(tmp_path / "exercises" / "src"), str(tmp_path / "exercises")
    assert main(["reset-exercises", "1_why_activations", "--src", src, "--exercises", folder]) == 0
    backups = list((tmp_path / "exercises" / "backups").glob("1_why_activations-*.ipynb"))
    assert len(backups) == 1 and backups[0].read_text() == edited  # the learner's work, whole
    assert exercise.read_text() == pristine
    assert "moved to" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:
        main(["reset-exercises", "9_nope", "--src", src, "--exercises", folder])
    assert stop.value.code == 2


def test_a_policy_the_planner_prints_works_in_every_command(capsys, tmp_path):
    """``plan`` prints a segments or menu policy; ``train``, ``compare`` and ``train()`` take it
    back."""
    from ckpt_course.costs import MENU, measure_costs
    from ckpt_course.models import build_model
    from ckpt_course.plan import predict
    from ckpt_course.train import train

    size = ["--model", "gpt", "--layers", "3", "--batch", "4", "--seq", "32"]
    costs = measure_costs(build_model("gpt", 3), 4, 32, menu=MENU)
    full, none = predict(costs, "full").peak_bytes, predict(costs, "none").peak_bytes
    assert main(["plan", *size, "--budget", str((full + none) // 2)]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("Optimal: "))
    policy = line.split()[1]
    assert policy.startswith(("segments:", "menu:")) and policy not in ("segments:none",
                                                                         "menu:none")
    assert main(["train", *size, "--steps", "1", "--policy", policy]) == 0
    assert main(["compare", "--layers", "3", "--width", "32", "--heads", "2", "--seq", "8",
                 "--batch", "2", "--steps", "1", "--policies", f"none,{policy}",
                 "--out", str(tmp_path / "compare.png")]) == 0
    assert policy in capsys.readouterr().out
    record = train(build_model("gpt", 3), policy, steps=1, batch_size=4, seq_len=32,
                   progress=False)[0]
    assert record.recompute_flops == predict(costs, policy).recompute_flops


def test_two_resets_in_a_row_keep_both_edits(tmp_path, capsys):
    """However fast they follow each other (the same second, often), no backup replaces
    another."""
    import shutil

    root = Path(__file__).resolve().parents[1]
    src = tmp_path / "exercises" / "src"
    src.mkdir(parents=True)
    shutil.copy(root / "exercises" / "src" / "1_why_activations.py", src)
    args = ["--src", str(src), "--exercises", str(tmp_path / "exercises")]
    assert main(["reset-exercises", *args]) == 0
    exercise = tmp_path / "exercises" / "1_why_activations.ipynb"
    pristine = exercise.read_text()
    edits = []
    for answer in ("return 1  # first", "return 2  # second"):
        exercise.write_text(pristine.replace("raise NotImplementedError", answer, 1))
        edits.append(exercise.read_text())
        assert main(["reset-exercises", *args]) == 0
    backups = sorted((tmp_path / "exercises" / "backups").iterdir())
    assert sorted(b.read_text() for b in backups) == sorted(edits)
    assert exercise.read_text() == pristine
