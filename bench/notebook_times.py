"""Estimate each lesson section's time for a learner (reading, predicting, running) and time the
notebooks, each in a fresh kernel, cell by cell.

Targets: the learning path's minutes per lesson (seed 000: 6, 6, 6, 7 | 7, 7, 7, 6, 7 | 7, 7, 7, 8
| 18 for the whole capstone notebook), and every notebook under 60 s of run time on 2 CPU cores.

The estimate per section (a section starts at a `## N.M` heading; the notebook's title, intro and
imports count towards its first section), with these constants:
- markdown prose at 200 words per minute (code inside markdown counts as words);
- code at 10 s per non-blank line: a learner reads code more slowly than prose;
- 60 s for each Predict cell (tagged `predict`, else the first code cell after a **Predict**
  text), plus 30 s for each answer after its first;
- the measured run time of the section's code cells (nbclient's per-cell timestamps).
Reading outputs is not counted.
Prints a table per section, then one JSON line.
Run: .venv/bin/python bench/notebook_times.py [--solutions] [--no-run]
"""

import argparse
import ast
import json
import re
from datetime import datetime
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
RUN_TARGET_S = 60.0
WORDS_PER_MIN = 200
SECONDS_PER_CODE_LINE = 10
SECONDS_PER_PREDICT = 60
SECONDS_PER_EXTRA_ANSWER = 30
# Seed 000's minutes per lesson; the capstone (phase 4) is one 18-minute lesson.
TARGET_MIN = {"1.1": 6, "1.2": 6, "1.3": 6, "1.4": 7, "2.1": 7, "2.2": 7, "2.3": 7, "2.4": 6,
              "2.5": 7, "3.1": 7, "3.2": 7, "3.3": 7, "3.4": 8, "4": 18}
SECTION = re.compile(r"^## (\d+[a-z]?\.\d+)\b", re.M)


def run_cell_seconds(nb, path: Path) -> list[float]:
    """Execute in a fresh kernel; return each cell's run time (0 for markdown)."""
    client = NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    seconds = []
    for cell in nb.cells:
        timing = cell.metadata.get("execution", {})
        start, end = timing.get("iopub.execute_input"), timing.get("shell.execute_reply")
        seconds.append((stamp(end) - stamp(start)) if start and end else 0.0)
    return seconds


def stamp(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def answers_in(source: str) -> int:
    """How many answers a Predict cell asks for (its `my_*` names; 1 in untagged lessons)."""
    tree = ast.parse(source)
    names = [t.id for n in tree.body if isinstance(n, ast.Assign)
             for t in n.targets if isinstance(t, ast.Name) and t.id.startswith("my_")]
    return max(1, len(names))


def section_of(cell, current: str, phase: str) -> str:
    if cell.cell_type == "markdown" and (m := SECTION.search(cell.source)):
        return m.group(1)
    return current or f"{phase}.1"


def lesson_key(section: str) -> str:
    return "4" if section.startswith("4.") else section  # the capstone is one lesson


def estimate(path: Path, run_seconds: list[float] | None) -> dict[str, dict]:
    nb = nbformat.read(path, as_version=4)
    phase = path.name.split("_")[0]
    rows: dict[str, dict] = {}
    section, after_predict = "", False
    for i, cell in enumerate(nb.cells):
        section = section_of(cell, section, phase)
        row = rows.setdefault(section, {"words": 0, "code_lines": 0, "predicts": 0,
                                        "answers": 0, "run_s": 0.0})
        if cell.cell_type == "markdown":
            row["words"] += len(cell.source.split())
            after_predict = "**Predict" in cell.source
        elif cell.cell_type == "code":
            row["code_lines"] += sum(1 for line in cell.source.splitlines() if line.strip())
            # tagged, or (in untagged notebooks) the first code cell after a **Predict** text
            if "predict" in cell.metadata.get("tags", []) or after_predict:
                row["predicts"] += 1
                row["answers"] += answers_in(cell.source)
            after_predict = False
            if run_seconds:
                row["run_s"] += run_seconds[i]
    for row in rows.values():
        extra = max(0, row["answers"] - row["predicts"])
        row["minutes"] = (row["words"] / WORDS_PER_MIN
                          + (row["code_lines"] * SECONDS_PER_CODE_LINE
                             + row["predicts"] * SECONDS_PER_PREDICT
                             + extra * SECONDS_PER_EXTRA_ANSWER + row["run_s"]) / 60)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--solutions", action="store_true", help="time solutions/ as well")
    parser.add_argument("--no-run", action="store_true",
                        help="estimate reading and predicting only (no kernel)")
    args = parser.parse_args()
    lessons = sorted((ROOT / "notebooks").glob("*.ipynb"))
    run_s, sections, lesson_min = {}, {}, {}
    print(f"{'section':<8} {'words':>6} {'lines':>6} {'predicts':>9} {'run s':>6} {'min':>6}"
          f" {'target':>7}")
    for path in lessons:
        seconds = None
        if not args.no_run:
            nb = nbformat.read(path, as_version=4)
            seconds = run_cell_seconds(nb, path)
            # the cells' own run time: kernel start-up and shutdown are not the learner's wait
            run_s[f"notebooks/{path.name}"] = round(sum(seconds), 1)
        for name, row in estimate(path, seconds).items():
            sections[name] = round(row["minutes"], 1)
            key = lesson_key(name)
            lesson_min[key] = lesson_min.get(key, 0.0) + row["minutes"]
            target = TARGET_MIN.get(name, "")
            print(f"{name:<8} {row['words']:>6} {row['code_lines']:>6} "
                  f"{row['predicts']:>5} ({row['answers']}) {row['run_s']:>6.1f} "
                  f"{row['minutes']:>6.1f} {target:>7}", flush=True)
    if "4" in lesson_min:
        print(f"{'4 (all)':<8} {'':>6} {'':>6} {'':>9} {'':>6} {lesson_min['4']:>6.1f} "
              f"{TARGET_MIN['4']:>7}")
    if args.solutions:
        for path in sorted((ROOT / "solutions").glob("*.ipynb")):
            seconds = run_cell_seconds(nbformat.read(path, as_version=4), path)
            run_s[f"solutions/{path.name}"] = round(sum(seconds), 1)
    for name, seconds in run_s.items():
        verdict = "ok" if seconds < RUN_TARGET_S else "OVER"
        print(f"{name:<52} {seconds:>6.1f} s  {verdict} (target {RUN_TARGET_S:.0f} s)")
    over = {k: round(v, 1) for k, v in lesson_min.items() if v > TARGET_MIN.get(k, 8)}
    print(json.dumps({"section_minutes": sections,
                      "total_minutes": round(sum(lesson_min.values()), 1),
                      "target_minutes": sum(TARGET_MIN.values()),
                      "lessons_over_target": over,
                      "notebook_seconds": run_s,
                      "all_under_run_target": all(v < RUN_TARGET_S for v in run_s.values())}))


if __name__ == "__main__":
    main()
