"""One training step's memory timeline: a page that works offline, and memory_viz's snapshot.

    timeline = step_timeline(model, "full", batch_size=8)
    timeline.peak_bytes                  # the meter's exact peak
    html = timeline_page(timeline)       # self-contained HTML: no network needed to view it
    timeline.snapshot                    # pickle bytes that PyTorch's memory_viz opens
    # or: ckpt-course trace --html step.html   (writes step.html and step.pickle)

The page is drawn by plotly (pinned in requirements.txt) with plotly.js embedded in the file, so
it opens offline: every allocation and free of the step in order, live bytes stacked by the
meter's categories, the forward, backward and optimizer phases shaded, zoom by dragging (double
click resets), and a hover on any point names the op, the phase, the category and the bytes. The
meter's exact peak is marked. The numbers are ``MemoryMeter``'s (live tensor storages, exact on
any device), recorded by a meter that also notes each event; nothing is estimated.

For PyTorch's own viewer, the same step also runs under ``torch.profiler`` (profile_memory) and its
allocations become the snapshot that https://pytorch.org/memory_viz opens (drag the .pickle onto
it; it works for CPU runs as for CUDA ones, each allocation with its Python stack). Those bytes
are the allocator's, so they may round up and include blocks the meter does not count.
"""

from __future__ import annotations

import html as html_escape
import os
import pickle
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .meter import CATEGORIES, MemoryMeter
from .policies import applied, parse_policy
from .step import check_run, make_batch, make_optimizer, run_step
from .units import KiB, MiB, fmt_bytes

MEMORY_VIZ_URL = "https://pytorch.org/memory_viz"
BEFORE_STEP = "(there before the step)"  # the op named for parameters and optimizer state


class Event(NamedTuple):
    """One allocation (``nbytes`` > 0) or free (< 0) of a tensor storage, as the meter saw it."""

    index: int
    nbytes: int
    live_bytes: int  # after the event
    op: str  # the aten op that made the storage
    phase: str  # forward, backward, optimizer, or "between phases"
    category: str
    breakdown: tuple  # live bytes per category (meter.CATEGORIES order), after the event


class _EventMeter(MemoryMeter):
    """A ``MemoryMeter`` that also notes every allocation and free with its op and category.
    Counting stays the meter's own (this only listens), so its peak is the meter's peak."""

    def __init__(self):
        super().__init__()
        self.events: list[Event] = []
        self._op = BEFORE_STEP
        self._made_by: dict[int, str] = {}  # storage key -> the op that made it

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self._op = str(func.overloadpacket.__name__)
        try:
            return super().__torch_dispatch__(func, types, args, kwargs)
        finally:
            self._op = "(no op: a gradient hook or Python code)"

    def track(self, model=None, optimizer=None):
        self._op = BEFORE_STEP
        return super().track(model, optimizer)

    def _add(self, storage, key, category):
        ref = super()._add(storage, key, category)
        self._made_by[key] = self._op
        self._note(ref.nbytes, self._op, category)
        return ref

    def _forget(self, ref) -> bool:
        gone = super()._forget(ref)
        if gone:
            self._note(-ref.nbytes, self._made_by.pop(ref.key, "?"), ref.category)
        return gone

    def _note(self, nbytes: int, op: str, category: str) -> None:
        self.events.append(Event(len(self.events), nbytes, self.live_bytes, op,
                                 self._phase or "between phases", category,
                                 tuple(self._bytes[c] for c in CATEGORIES)))


@dataclass
class StepTimeline:
    """One AdamW step's memory, event by event, and memory_viz's snapshot of the same step."""

    title: str
    events: list[Event]
    peak_bytes: int  # the meter's exact peak
    snapshot: bytes  # pickle of the profiler's allocations, for pytorch.org/memory_viz

    @property
    def peak_event(self) -> Event:
        """The first event at the meter's peak."""
        return next(e for e in self.events if e.live_bytes == self.peak_bytes)


def step_timeline(model, policy="none", batch_size: int = 8, seq_len: int | None = None,
                  seed: int = 0) -> StepTimeline:
    """Three identical AdamW steps of ``model`` under ``policy``: the first creates AdamW's state,
    as in a real run; the second runs under ``torch.profiler`` for the snapshot; the third under
    the event meter for the page (the profiler and the meter would otherwise see each other)."""
    device = check_run(model, batch_size=batch_size, seq_len=seq_len)
    policy = parse_policy(policy)
    batch = make_batch(model, batch_size, seq_len, torch.Generator().manual_seed(seed), device)
    optimizer = make_optimizer(model)
    with applied(model, policy):
        run_step(model, optimizer, batch)  # step 1: AdamW's state appears
        snapshot = _profiled_snapshot(model, optimizer, batch, device)
        meter = _EventMeter()
        with meter:
            meter.track(model, optimizer)
            meter.events.clear()  # what was there before the step is where the page starts
            run_step(model, optimizer, batch, meter)
            events = list(meter.events)  # frees after the step are not part of it
        meter.untrack()
    model.zero_grad(set_to_none=True)
    name = getattr(getattr(model, "cfg", None), "name", None) or type(model).__name__
    title = f"One AdamW step of {name} under {policy}, batch {batch_size}"
    return StepTimeline(title, events, meter.peak_bytes, snapshot)


def _profiled_snapshot(model, optimizer, batch, device) -> bytes:
    """One step under torch.profiler, as the pickle that memory_viz opens (the same data torch's
    ``profile_plot`` embeds in its page, which loads its viewer from the web)."""
    from torch.cuda._memory_viz import _profile_to_snapshot

    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with _native_stderr_silenced(), torch.profiler.profile(
            activities=activities, profile_memory=True, record_shapes=True,
            with_stack=True) as profile:
        run_step(model, optimizer, batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pickle.dumps(_profile_to_snapshot(profile))


@contextmanager
def _native_stderr_silenced():
    """The profiler's C++ side prints start/stop lines and a warning about blocks allocated before
    it started (AdamW's state) straight to file descriptor 2; a learner would read them as
    errors. Python's own errors are unaffected: they are raised, and printed after this."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no real descriptor 2 (some notebook hosts)
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


# ---------------------------------------------------------------- the page
def _unit(peak: int) -> tuple[int, str]:
    return (MiB, "MiB") if peak >= MiB else (KiB, "KiB")


def _hover(e: Event) -> str:
    verb = "allocated" if e.nbytes > 0 else "freed"
    return (f"<b>{e.op}</b> ({e.phase})<br>{verb} {fmt_bytes(abs(e.nbytes))} of {e.category}"
            f"<br>live: {fmt_bytes(e.live_bytes)} ({e.live_bytes:,} B)")


def _phase_spans(events: list[Event]) -> list[tuple[str, int, int]]:
    """(phase, first index, last index) of each run of events in one phase."""
    spans: list[list] = []
    for e in events:
        if spans and spans[-1][0] == e.phase:
            spans[-1][2] = e.index
        else:
            spans.append([e.phase, e.index, e.index])
    return [tuple(s) for s in spans if s[0] != "between phases"]


def timeline_figure(timeline: StepTimeline):
    """The plotly figure of ``timeline``: stacked categories, the total with its hover, the
    phases, and the meter's peak marked."""
    import plotly.graph_objects as go

    events = timeline.events
    scale, unit = _unit(timeline.peak_bytes)
    x = [e.index for e in events]
    fig = go.Figure()
    for i, category in enumerate(CATEGORIES):
        fig.add_trace(go.Scatter(x=x, y=[e.breakdown[i] / scale for e in events], name=category,
                                 mode="lines", line={"width": 0}, stackgroup="live",
                                 hoverinfo="skip"))
    fig.add_trace(go.Scatter(x=x, y=[e.live_bytes / scale for e in events], name="live (total)",
                             mode="lines", line={"color": "black", "width": 1},
                             text=[_hover(e) for e in events],
                             hovertemplate="%{text}<extra></extra>"))
    for phase, first, last in _phase_spans(events):
        fig.add_vrect(x0=first, x1=last, fillcolor="grey", opacity=0.06, line_width=0,
                      annotation_text=phase, annotation_position="top left")
    peak = timeline.peak_event
    fig.add_trace(go.Scatter(x=[peak.index], y=[peak.live_bytes / scale], name="peak",
                             mode="markers", marker={"color": "red", "size": 10},
                             text=[_hover(peak)], hovertemplate="%{text}<extra>peak</extra>"))
    fig.add_annotation(x=peak.index, y=peak.live_bytes / scale, showarrow=True, arrowhead=2,
                       text=f"peak {fmt_bytes(timeline.peak_bytes)} ({peak.op}, {peak.phase})",
                       font={"color": "red"}, ax=0, ay=-25)
    fig.update_layout(title=timeline.title, hovermode="closest", template="plotly_white",
                      xaxis_title="allocations and frees, in order (drag to zoom, double-click "
                                  "to reset)",
                      yaxis_title=f"live tensor memory ({unit})", legend_title="category",
                      yaxis_range=[0, 1.25 * timeline.peak_bytes / scale])
    return fig


def timeline_page(timeline: StepTimeline, snapshot_name: str | None = None) -> str:
    """``timeline`` as one self-contained HTML page (plotly.js inside: it opens offline)."""
    page = timeline_figure(timeline).to_html(
        include_plotlyjs=True, full_html=True, div_id="memory-timeline",
        config={"displaylogo": False, "scrollZoom": True})
    note = (f"<p style=\"font-family:sans-serif\">Exact live tensor bytes from the course's "
            f"MemoryMeter; peak {fmt_bytes(timeline.peak_bytes)} "
            f"({timeline.peak_bytes:,} bytes).")
    if snapshot_name:
        note += (f" PyTorch's own viewer: drag <code>{html_escape.escape(snapshot_name)}</code> "
                 f"onto {MEMORY_VIZ_URL} (allocator bytes, with Python stacks).")
    return page.replace("</body>", note + "</p>\n</body>", 1)
