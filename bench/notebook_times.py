"""Estimate each lesson section's minutes for a learner (reading, predicting, running), its core
and its "Go deeper" part apart, and time the notebooks, each in a fresh kernel, cell by cell.

Targets (the drops of seed 000's learning path, minutes of core per section): 1.1-1.3 6 each,
1.4 7 | 2.1-2.3 7 each, 2.4 6, 2.5 7 | 3.1-3.3 7 each, 3.4 8 | phase 4 18 in all. Stated here for
the lessons the path does not list: 3b.N 5 each (one pitfall, reproduced and fixed), phase 4b 18
in all (phase 4's capstone, on your own model). And every notebook under 60 s of run time on 2
CPU cores.

The reading model, per section (a section starts at a `## N.M` heading; the title, intro and
imports count towards the first section):
- markdown prose at 200 words per minute (code inside markdown counts as words);
- code at 10 s per non-blank line read, `assert` statements left out: the Check's assertions
  are the instrument's, the learner reads what the reveal prints;
- 60 s for each Predict cell (tagged `predict`; in a notebook with no tags, the first code cell
  after a **Predict** text), plus 30 s for each answer after its first;
- the cells run: their measured run time (nbclient's per-cell timestamps; 0 with --no-run).
Reading outputs is not counted. A cell is "Go deeper" when it sits under a markdown heading
whose text says "Go deeper" (JupyterLab shows it collapsed), up to the next heading of the same
or a higher level; the rest is the core, which must fit the drop.
Prints a table per section (drop | core | deeper minutes), a markdown table for the closing
note, then one JSON line.
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
# Seed 000's minutes per section; phase 4 (and 4b) is one 18-minute lesson; 3b: 5 a pitfall.
TARGET_MIN = {"1.1": 6, "1.2": 6, "1.3": 6, "1.4": 7, "2.1": 7, "2.2": 7, "2.3": 7, "2.4": 6,
              "2.5": 7, "3.1": 7, "3.2": 7, "3.3": 7, "3.4": 8, "4": 18, "4b": 18}
PITFALL_TARGET_MIN = 5
SECTION = re.compile(r"^## (\d+[a-z]?\.\d+)\b", re.M)
HEADING = re.compile(r"^(#{1,6})\s+(.*)$", re.M)
DEEPER = "go deeper"


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


def lines_read(source: str) -> int:
    """Non-blank code lines, the lines of `assert` statements left out."""
    lines = [i for i, line in enumerate(source.splitlines(), 1) if line.strip()]
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return len(lines)
    asserts = {n for node in ast.walk(tree) if isinstance(node, ast.Assert)
               for n in range(node.lineno, node.end_lineno + 1)}
    return sum(1 for i in lines if i not in asserts)


def section_of(cell, current: str, phase: str) -> str:
    if cell.cell_type == "markdown" and (m := SECTION.search(cell.source)):
        return m.group(1)
    return current or f"{phase}.1"


def lesson_key(section: str) -> str:
    """The drop a section belongs to: phase 4 and 4b are one lesson each."""
    lesson = section.split(".")[0]
    return lesson if lesson in ("4", "4b") else section


def target_of(key: str) -> float:
    if key.startswith("3b."):
        return PITFALL_TARGET_MIN
    return TARGET_MIN.get(key, 8)


def deeper_flags(nb) -> list[bool]:
    """Per cell: does it sit under a "Go deeper" heading?"""
    flags, level = [], None  # level: that of the Go deeper heading we are under
    for cell in nb.cells:
        headings = HEADING.findall(cell.source) if cell.cell_type == "markdown" else []
        if headings:
            top = min(len(h) for h, _ in headings)
            if level is not None and top <= level:
                level = None
            deeper = [len(h) for h, text in headings if DEEPER in text.lower()]
            if deeper and level is None:
                level = min(deeper)
        flags.append(level is not None)
    return flags


def cell_minutes(cell, after_predict: bool, run_s: float) -> tuple[float, int, int]:
    """(minutes, predicts, answers) for one cell; ``after_predict``: the first code cell after a
    **Predict** text, in a notebook whose Predict cells are not tagged."""
    if cell.cell_type == "markdown":
        return len(cell.source.split()) / WORDS_PER_MIN, 0, 0
    seconds = lines_read(cell.source) * SECONDS_PER_CODE_LINE + run_s
    predicts = answers = 0
    if "predict" in cell.metadata.get("tags", []) or after_predict:
        predicts, answers = 1, answers_in(cell.source)
        seconds += SECONDS_PER_PREDICT + (answers - 1) * SECONDS_PER_EXTRA_ANSWER
    return seconds / 60, predicts, answers


def estimate(path: Path, run_seconds: list[float] | None) -> dict[str, dict]:
    nb = nbformat.read(path, as_version=4)
    phase = path.name.split("_")[0]
    rows: dict[str, dict] = {}
    section, after_predict = "", False
    tagged = any("predict" in c.metadata.get("tags", []) for c in nb.cells)
    for i, (cell, deeper) in enumerate(zip(nb.cells, deeper_flags(nb), strict=True)):
        section = section_of(cell, section, phase)
        row = rows.setdefault(section, {"core": 0.0, "deeper": 0.0, "predicts": 0,
                                        "deeper_predicts": 0, "run_s": 0.0})
        run_s = run_seconds[i] if run_seconds else 0.0
        minutes, predicts, _ = cell_minutes(cell, after_predict, run_s)
        if cell.cell_type in ("markdown", "code"):
            after_predict = (not tagged and cell.cell_type == "markdown"
                             and "**Predict" in cell.source)
        row["deeper" if deeper else "core"] += minutes
        row["deeper_predicts" if deeper else "predicts"] += predicts
        row["run_s"] += run_s
    return rows


def closing_table(rows: dict[str, dict], drops: dict[str, float]) -> str:
    """The markdown table for the closing note: section | drop minutes | core | deeper."""
    lines = ["| section | drop minutes | core | deeper |", "| --- | --- | --- | --- |"]
    for name, row in rows.items():
        key = lesson_key(name)
        drop = f"{target_of(key):g}" + ("" if key == name else f" ({key} in all)")
        lines.append(f"| {name} | {drop} | {row['core']:.1f} | {row['deeper']:.1f} |")
    for key, core in drops.items():
        if key in ("4", "4b"):
            lines.append(f"| {key} (all) | {target_of(key):g} | {core:.1f} | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--solutions", action="store_true", help="time solutions/ as well")
    parser.add_argument("--no-run", action="store_true",
                        help="estimate reading and predicting only (no kernel)")
    parser.add_argument("lessons", nargs="*", help="lesson notebooks (default: notebooks/*)")
    args = parser.parse_args()
    lessons = [Path(p) for p in args.lessons] or sorted((ROOT / "notebooks").glob("*.ipynb"))
    run_s, rows, drops = {}, {}, {}
    print(f"{'section':<8} {'predicts':>9} {'run s':>6} {'drop':>5} {'core':>6} {'deeper':>7}")
    for path in lessons:
        seconds = None
        if not args.no_run:
            seconds = run_cell_seconds(nbformat.read(path, as_version=4), path)
            # the cells' own run time: kernel start-up and shutdown are not the learner's wait
            run_s[f"notebooks/{path.name}"] = round(sum(seconds), 1)
        for name, row in estimate(path, seconds).items():
            rows[name] = row
            key = lesson_key(name)
            drops[key] = drops.get(key, 0.0) + row["core"]
            print(f"{name:<8} {row['predicts']:>4} +{row['deeper_predicts']:<3} "
                  f"{row['run_s']:>6.1f} {target_of(key):>5g} {row['core']:>6.1f} "
                  f"{row['deeper']:>7.1f}", flush=True)
    if args.solutions:
        for path in sorted((ROOT / "solutions").glob("*.ipynb")):
            seconds = run_cell_seconds(nbformat.read(path, as_version=4), path)
            run_s[f"solutions/{path.name}"] = round(sum(seconds), 1)
    for name, seconds in run_s.items():
        verdict = "ok" if seconds < RUN_TARGET_S else "OVER"
        print(f"{name:<52} {seconds:>6.1f} s  {verdict} (target {RUN_TARGET_S:.0f} s)")
    print("\n" + closing_table(rows, drops) + "\n")
    over = {k: round(v, 1) for k, v in drops.items() if v > target_of(k)}
    print(json.dumps({"core_minutes": {k: round(r["core"], 1) for k, r in rows.items()},
                      "deeper_minutes": {k: round(r["deeper"], 1) for k, r in rows.items()},
                      "core_total_minutes": round(sum(drops.values()), 1),
                      "target_minutes": sum(target_of(k) for k in drops),
                      "drops_over_target": over,
                      "notebook_seconds": run_s,
                      "all_under_run_target": all(v < RUN_TARGET_S for v in run_s.values())}))


if __name__ == "__main__":
    main()
