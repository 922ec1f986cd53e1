"""Time each lesson (and solution) notebook's execution on this machine, in a fresh kernel.

Target: each lesson notebook under 60 s on a 2-core CPU. Prints a table, then one JSON line.
Run: .venv/bin/python bench/notebook_times.py [--solutions]
"""

import argparse
import json
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
TARGET_S = 60.0


def run_seconds(path: Path) -> float:
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    start = time.perf_counter()
    client.execute()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--solutions", action="store_true", help="time solutions/ as well")
    args = parser.parse_args()
    folders = ["notebooks"] + (["solutions"] if args.solutions else [])
    paths = [p for folder in folders for p in sorted((ROOT / folder).glob("*.ipynb"))]
    times = {}
    print(f"{'notebook':<52} {'seconds':>8}  target {TARGET_S:.0f} s")
    for path in paths:
        name = f"{path.parent.name}/{path.name}"
        times[name] = run_seconds(path)
        verdict = "ok" if times[name] < TARGET_S else "OVER"
        print(f"{name:<52} {times[name]:>8.1f}  {verdict}", flush=True)
    print(json.dumps({"notebook_seconds": {k: round(v, 1) for k, v in times.items()},
                      "all_under_target": all(v < TARGET_S for v in times.values())}))


if __name__ == "__main__":
    main()
