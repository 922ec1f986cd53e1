"""A figure that updates while policies train: peak memory against recompute FLOPs and step time.

Plug it into ``train(..., on_step=)`` (or let ``compare(..., live=True)`` do it)::

    live = LivePlot(policies=["none", "full"], steps=5, budget=64 * MiB)
    for policy in ["none", "full"]:
        train(TinyGPT(cfg), policy, steps=5, on_step=live)
    live.close()                      # shows the final static figure (kept in live.figure)

Two panels, one series per policy, one point per step: peak memory (y) against the FLOPs that
backward recomputes (left) and against the step time (right), with the budget as a red line. The
title says where the run is ("full: policy 2/2, step 3/5").

How it shows itself:
- In JupyterLab (an IPython kernel with a frontend), the figure is shown once with a display
  handle (``IPython.display.display(png, display_id=True)``) and redrawn in place with
  ``handle.update(png)``. The figure is a plain ``matplotlib.figure.Figure``, not a pyplot one,
  so the inline backend does not show it a second time when the cell ends.
- Headless (a script, a test, nbval or nbclient under pytest, ``CKPT_COURSE_HEADLESS=1``, or the
  Agg backend) nothing is drawn while steps run; ``close()`` draws once and, in a kernel, shows
  the final static figure.

Drawing costs time the training does not get, so redraws are throttled by time: a redraw
happens only when the drawing done so far is under ``max_share`` of the wall clock since the plot
was made (3% by default), and at least ``min_interval_s`` after the last one. The figure thus
refreshes about once a second; ``bench/live_overhead.py`` measures what it costs.
"""

from __future__ import annotations

import io
import os
import time

import matplotlib
from matplotlib.figure import Figure

from .meter import parse_budget
from .policies import parse_policy
from .step import check_steps
from .units import MiB, check_positive_int, fmt_bytes, shown

HEADLESS_ENV = "CKPT_COURSE_HEADLESS"


def in_kernel() -> bool:
    """Are we inside an IPython kernel (JupyterLab, nbclient, nbval), not a terminal?"""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def is_headless() -> bool:
    """True when nobody can watch a figure update: no kernel, a test run, or asked to be."""
    if os.environ.get(HEADLESS_ENV, "") not in ("", "0"):
        return True
    if "PYTEST_VERSION" in os.environ or "PYTEST_CURRENT_TEST" in os.environ:
        return True  # nbval and nbclient start their kernels from pytest, which sets these
    if matplotlib.get_backend().lower() == "agg":
        return True
    return not in_kernel()


class LivePlot:
    """``on_step`` callback that plots each ``StepRecord``; ``close()`` returns the final figure.

    ``policies`` and ``steps`` (per policy) only feed the progress title. ``mode``: "auto" (live
    in a notebook, static when headless), "live" (redraw while running; outside a kernel each
    redraw renders a PNG in memory, the same work a notebook does, so benchmarks stay honest)
    or "static" (draw once, at ``close()``).
    """

    def __init__(self, policies=None, steps: int | None = None, budget=None, title: str = "",
                 mode: str = "auto", min_interval_s: float = 0.3, max_share: float = 0.03,
                 clock=time.perf_counter):
        if mode not in ("auto", "live", "static"):
            raise ValueError(f"mode must be 'auto', 'live' or 'static', not {mode!r}")
        if not 0 < max_share < 1:
            raise ValueError(f"max_share is a share of the wall clock, in (0, 1): {max_share}")
        if isinstance(policies, str):
            raise TypeError(f"policies is a list of policies, not the str {shown(policies)}: "
                            f"write e.g. ['none', 'full']")
        self.policies = ([str(parse_policy(p)) for p in policies] if policies is not None
                         else [])
        if steps is not None:
            check_steps(check_positive_int("steps", steps))
        self.steps, self.title = steps, title
        self.budget = None if budget is None else parse_budget(budget)
        self.live = mode == "live" or (mode == "auto" and not is_headless())
        self.min_interval_s, self.max_share = min_interval_s, max_share
        self.points: dict[str, list[tuple]] = {}  # policy -> [(recompute_flops, time_s, peak)]
        self.peaks: dict[str, int] = {}  # policy -> last known peak bytes
        self.current: tuple[str, int] | None = None  # (policy, steps seen for it)
        self.redraws = 0
        self.draw_seconds = 0.0
        self._last_cost = 0.0  # seconds the last redraw took
        self.clock = clock  # seconds; tests pass a fake clock, so no test reads a real one
        self._start = self._last_draw = clock()
        self._handle = None
        self._closed = False
        self.figure = Figure(figsize=(10, 4))  # a fixed layout: constrained costs 40% per redraw
        self.figure.subplots_adjust(left=0.07, right=0.98, bottom=0.13, top=0.9, wspace=0.06)
        self.axes = self.figure.subplots(1, 2, sharey=True)

    # ------------------------------------------------------------------ feeding it
    def __call__(self, record) -> None:
        self.add(record)

    def add(self, record) -> None:
        """One step's record (a ``StepRecord`` or anything with its fields). A record without a
        peak (an unmetered, timed step) takes the policy's last measured peak."""
        if not all(hasattr(record, name) for name in ("policy", "time_s")):
            raise TypeError(f"LivePlot.add takes a step's record (a StepRecord, as train's "
                            f"on_step passes it), got {type(record).__name__} {shown(record)}")
        policy = str(record.policy)
        if policy not in self.policies:
            self.policies.append(policy)
        peak = getattr(record, "peak_bytes", None)
        if peak is not None:
            self.peaks[policy] = peak
        points = self.points.setdefault(policy, [])
        points.append((getattr(record, "recompute_flops", None), record.time_s,
                       self.peaks.get(policy)))
        self.current = (policy, len(points))
        if self.live and self._due(self.clock()):
            self._show()

    def _due(self, now: float) -> bool:
        """Time for a redraw? Not before ``min_interval_s`` since the last one, and only if
        drawing, this redraw included (guessed to cost what the last one did), stays within
        ``max_share`` of the time since the plot was made."""
        expected = self.draw_seconds + self._last_cost
        return (now - self._last_draw >= self.min_interval_s
                and expected <= self.max_share * (now - self._start))

    def progress(self) -> str:
        """'full: policy 2/3, step 4/8' (the step count is per policy)."""
        if self.current is None:
            return "waiting for the first step"
        policy, seen = self.current
        k, n = self.policies.index(policy) + 1, len(self.policies)
        steps = f"step {seen}/{self.steps}" if self.steps else f"step {seen}"
        return f"{policy}: policy {k}/{n}, {steps}"

    def close(self) -> None:
        """Draw the final figure; in a kernel show it (once, or as the last live update).
        Returns nothing, so a cell ending in ``live.close()`` does not show it twice; the
        figure stays in ``live.figure``."""
        if not self._closed:
            self._closed = True
            self.draw(final=True)
            if self._handle is not None:
                self._handle.update(self._image())
            elif in_kernel():
                from IPython.display import display

                display(self._image())

    # ------------------------------------------------------------------ drawing
    def _image(self):
        """The figure as a PNG image object (IPython's own Image when IPython is there). PNG
        bytes display the same in every frontend, whatever matplotlib backend is active."""
        buffer = io.BytesIO()
        self.figure.savefig(buffer, format="png", dpi=80)
        try:
            from IPython.display import Image
        except ImportError:
            return buffer.getvalue()
        return Image(data=buffer.getvalue(), format="png")

    def _show(self) -> None:
        start = self.clock()
        self.draw()
        image = self._image()  # rendered here even without a frontend, so benchmarks are honest
        if in_kernel():
            from IPython.display import display

            if self._handle is None:
                self._handle = display(image, display_id=True)
            else:
                self._handle.update(image)
        self._last_draw = self.clock()
        self.redraws += 1
        self._last_cost = self._last_draw - start
        self.draw_seconds += self._last_cost

    def draw(self, final: bool = False) -> Figure:
        """Redraw both panels from the points so far."""
        left, right = self.axes
        for ax in self.axes:
            ax.clear()
        colors = matplotlib.colormaps["tab10"]
        for i, policy in enumerate(self.policies):
            pts = [p for p in self.points.get(policy, []) if p[2] is not None]
            color = colors(i % 10)
            flops = [(f / 1e9, m / MiB) for f, _, m in pts if f is not None]
            if flops:
                left.scatter(*zip(*flops, strict=True), color=color, label=policy, alpha=0.7)
            if pts:
                right.scatter([t * 1e3 for _, t, _ in pts], [m / MiB for *_, m in pts],
                              color=color, label=policy, alpha=0.7)
        left.set(xlabel="recomputed GFLOP per step", ylabel="peak memory (MiB)")
        right.set(xlabel="step time (ms)")
        if self.budget is not None:
            for ax in self.axes:
                ax.axhline(self.budget / MiB, color="red", linestyle="--", linewidth=1)
            left.text(0.01, self.budget / MiB, f" budget {fmt_bytes(self.budget)}", color="red",
                      va="bottom", transform=left.get_yaxis_transform())
        if any(self.points.values()):
            right.legend(loc="best", fontsize="small")
        status = "done" if final else self.progress()
        self.figure.suptitle(f"{self.title + ' · ' if self.title else ''}{status}")
        return self.figure
