"""What the grader's tests share: the self-test exercise built into a course folder,
learners' notebooks made from it, and the course's own exercises graded in one class run."""

import shutil
from pathlib import Path

import nbformat
import pytest

from ckpt_course import authoring
from ckpt_course.authoring import tagged_name

FIXTURES = Path(__file__).parent / "fixtures" / "src"
CHECKS = ["0.1-bytes", "0.2-tape", "0.3-double"]
POINTS = {"0.1-bytes": 2.0, "0.2-tape": 1.0, "0.3-double": 1.0}
RIGHT = {"0.1-bytes": "def predicted_bytes(batch, width):\n    return 4 * batch * width",
         "0.2-tape": "def saved_tensor_count(layers):\n    return 2 * layers",
         "0.3-double": "def doubled(x):\n    return 2 * x"}
STUB = "raised NotImplementedError: Exercise {}: replace this line with your answer"


def build_course(root: Path) -> Path:
    """tests/fixtures/src/*.py built into root/exercises (with src/) and root/solutions."""
    (root / "exercises").mkdir(parents=True)
    shutil.copytree(FIXTURES, root / "exercises" / "src")
    authoring.build_all(root / "exercises" / "src", root / "solutions", root / "exercises")
    return root


def learner(course: Path, answers=(), drop=(), checks=(), stem="0_selftest"):
    """The pristine exercise with answers filled in, cells dropped (by tag), checks rewritten."""
    nb = nbformat.read(course / "exercises" / f"{stem}.ipynb", as_version=4)
    answers, checks = dict(answers), dict(checks)
    kept = []
    for cell in nb.cells:
        if set(cell.metadata.get("tags", [])) & set(drop):
            continue
        if tagged_name(cell, "answer") in answers:
            cell.source = answers[tagged_name(cell, "answer")]
        if tagged_name(cell, "check") in checks:
            cell.source = checks[tagged_name(cell, "check")]
        kept.append(cell)
    nb.cells = kept
    return nb


def save(nb, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


def results(card) -> dict[str, float]:
    return {c.name: c.earned for c in card.checks}


def hints(card) -> dict[str, str]:
    return {c.name: c.hint for c in card.checks}


# ---------------------------------------------------------------- the course's own exercises
ROOT = Path(__file__).resolve().parents[1]
COURSE_CLASS = "course-class"
# Every test that reads the class run (the `course_class` fixture) carries this: under
# pytest-xdist they run on one worker, so the class is graded once (tests/conftest.py).
reads_course_class = pytest.mark.xdist_group(COURSE_CLASS)


def rule(target):
    return f"rule broken: this exercise's answers may not use {target}"


BUILD_IT = {  # exercise: ({answer: source}, {check: the rule its hint must name})
    "1_why_activations": (
        {"1.3-by-hand": "import torch.utils.checkpoint\nclass MyCheckpoint:\n"
                        "    @staticmethod\n    def apply(block, x):\n"
                        "        return torch.utils.checkpoint.checkpoint(block, x, "
                        "use_reentrant=False)",
         "1.4-pick-n": "def pick_n(n_layers, activation_bytes, budget):\n"
                       "    return max(n for n in range(1, n_layers + 1)\n"
                       "               if checks._dial_peak(n_layers, n) * activation_bytes"
                       " <= budget)"},
        {"1.3-by-hand": rule("torch.utils.checkpoint"),
         "1.4-pick-n": rule("ckpt_course.checks.phase1")}),
    "2_hand_trace": (
        {"2.1-tape": "from ckpt_course.tape import record_tape\n"
                     "def predict_tape(batch, width, depth):\n"
                     "    record_tape(None, ())\n    return {}",
         "2.4-peak": "import ckpt_course.trace as t\n"
                     "def predict_peak(free_grads, batch, width, depth):\n"
                     "    t.trace_step(None, 'none', batch_size=batch)\n    return {}",
         "2.2-every2": "def every2_saved_bytes(batch, width, depth):\n"
                       "    from ckpt_course.pitfalls import saved_for_backward\n"
                       "    return saved_for_backward(None, None)"},
        {"2.1-tape": rule("ckpt_course.tape"), "2.4-peak": rule("ckpt_course.trace"),
         "2.2-every2": rule("ckpt_course.pitfalls")}),
    "3_choosing_a_policy": (
        {"3.2-offload": "import weakref, torch\ndef offload_hooks(host, params):\n"
                        "    from ckpt_course.checks import probes\n"
                        "    return probes.reference_offload_hooks(host, params)",
         "3.2-per-gpu": "def per_gpu_bytes(n_params, n_gpus, activation_bytes):\n"
                        "    from ckpt_course.sharding import per_gpu_bytes as solved\n"
                        "    return solved(n_params, n_gpus, activation_bytes)",
         "3.3-attention": "def naive_extra_bytes(batch, heads, seq, dropout):\n"
                          "    from ckpt_course.estimate import layer_activation_bytes\n"
                          "    return layer_activation_bytes(None, batch, seq, None)"},
        {"3.2-offload": rule("ckpt_course.checks.references"),
         "3.2-per-gpu": rule("ckpt_course.sharding:per_gpu_bytes"),
         "3.3-attention": rule("ckpt_course.estimate:layer_activation_bytes")}),
    "4_prescribe_a_policy": (
        {"4.1-peak": "from ckpt_course import plan\nfrom ckpt_course.checks import probes\n"
                     "def chain_peak(chain, placement):\n"
                     "    return plan.predict(probes.chain_costs(chain), "
                     "[tuple(s) for s in placement]).peak_bytes",
         "4.2-planner": "import sys\ndef plan_placement(chain, budget):\n"
                        "    return sys.modules['ckpt_course.plan'].optimal(None, budget)",
         "4.3-capstone": "import gc, types\ndef my_policy(chain, budget):\n"
                         "    f = next(o for o in gc.get_objects() if type(o) is "
                         "types.FunctionType and o.__name__ == 'optimal')\n"
                         "    return str(f(None, budget).policy)"},
        {"4.1-peak": rule("ckpt_course.checks"), "4.2-planner": rule("ckpt_course.plan"),
         "4.3-capstone": rule("ckpt_course.plan")}),
    "4b_your_model": (
        {"4b-layer": "def layer_bytes(hidden, heads, kv_heads, intermediate, seq, batch, d):\n"
                     "    return hf.hf_config_costs(None, batch, seq)"},
        {"4b-layer": rule("ckpt_course.hf:hf_config_costs")}),
}


def course_class(root: Path):
    """The course's own exercises graded in ONE class run (the grader's processes start once):
    each solution and each untouched exercise (tests/test_exercises.py), and per exercise a
    notebook whose answers break its build-it rules (BUILD_IT, tests/test_grading_attacks.py).
    -> ({(kind, stem): scorecard}, whether every file was left unchanged); kind is "solutions",
    "exercises" or "build-it"."""
    from ckpt_course.grading import grade

    paths = {}
    for folder in ("solutions", "exercises"):
        for source in sorted((ROOT / "exercises" / "src").glob("*.py")):
            copy = root / folder / f"{source.stem}.ipynb"
            copy.parent.mkdir(parents=True, exist_ok=True)
            copy.write_bytes((ROOT / folder / copy.name).read_bytes())
            paths[(folder, source.stem)] = copy
    for stem, (answers, _) in BUILD_IT.items():
        nb = nbformat.read(ROOT / "exercises" / f"{stem}.ipynb", as_version=4)
        for cell in nb.cells:
            cell.source = answers.get(tagged_name(cell, "answer"), cell.source)
        paths[("build-it", stem)] = save(nb, root / "build-it" / stem / f"{stem}.ipynb")
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in paths.values()}
    cards = grade(list(paths.values()), ROOT / "exercises", timeout=120, jobs=2)
    unchanged = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in paths.values()} == before
    return dict(zip(paths, cards, strict=True)), unchanged
