"""Benchmark: the 70B plan command's wall time and max RSS (target: <= 10 s, <= 1 GiB).

    .venv/bin/python bench/hf_plan.py
Runs ``ckpt-course plan --hf-config llama-3.1-70b --batch 1 --seq 4096 --budget 80GiB --devices 8``
in a fresh process (fake tensors: nothing allocated) and reads its peak RSS from os.wait4.
"""

import os
import subprocess
import sys
import time

ARGV = ["plan", "--hf-config", "llama-3.1-70b", "--batch", "1", "--seq", "4096",
        "--budget", "80GiB", "--devices", "8"]


def main() -> int:
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "ckpt_course.cli", *ARGV],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"})
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    rss_gib = usage.ru_maxrss * 1024 / 2**30  # ru_maxrss is in KiB on Linux
    print(f"ckpt-course {' '.join(ARGV)}\n  exit {os.waitstatus_to_exitcode(status)}, "
          f"wall {wall:.2f} s, max RSS {rss_gib:.2f} GiB "
          f"({'within' if wall <= 10 and rss_gib <= 1 else 'OVER'} the 10 s / 1 GiB target)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
