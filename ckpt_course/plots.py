"""Pictures the lessons draw from measurements (matplotlib; each function returns its axes).

- ``breakdown_bars(rows)``: stacked bars of where a training step's memory goes, one bar per
  size or model, categories in the meter's order, an optional limit line (an 80 GB GPU).
- ``timeline(meter)``: live bytes after every allocation and free of a step, forward and backward
  shaded, the peak and the average marked. The shape is the lesson: memory climbs through forward
  as the tape is written and falls through backward as it is read.
- ``batch_sweep_figure(points, budget)``: peak and tokens/s against batch size, per policy.
- ``dial_figure(dial, n)``: the every-N dial measured by ``ckpt_course.sweeps.dial``: saved and
  peak memory, and recompute FLOPs, against N, with sqrt(L) marked; ``dial_slider(dial)`` puts an
  ipywidgets slider on it that redraws from the measurements.

Nothing here measures: every picture draws numbers a ``ckpt_course`` call produced.
"""

from __future__ import annotations

import matplotlib.pyplot as plt

from .meter import CATEGORIES
from .units import GiB, KiB, MiB

COLORS = {
    "parameters": "#4c72b0",
    "gradients": "#55a868",
    "optimizer state": "#8172b2",
    "activations": "#dd8452",
    "temporaries": "#c44e52",
}
PHASE_COLORS = {"forward": "#dd8452", "backward": "#4c72b0", "optimizer": "#8172b2"}


def _unit(largest: float) -> tuple[float, str]:
    for size, name in ((GiB, "GiB"), (MiB, "MiB"), (KiB, "KiB")):
        if largest >= size:
            return size, name
    return 1, "bytes"


def _axes(ax, figsize=(7, 3.5)):
    if ax is None:
        _, ax = plt.subplots(figsize=figsize, layout="constrained")
    return ax


# ---------------------------------------------------------------- stacked bars
def breakdown_bars(rows: dict, ax=None, limit=None, limit_label=None, title=None):
    """``rows``: {bar label: {category: bytes}} (a ``Breakdown.categories`` or
    ``sweeps.estimate_categories(...)``). ``limit``: bytes for a horizontal line."""
    ax = _axes(ax)
    largest = max([sum(c.values()) for c in rows.values()] + [limit or 0])
    size, unit = _unit(largest)
    labels = list(rows)
    xs = range(len(labels))
    bottom = [0.0] * len(labels)
    for category in CATEGORIES:
        heights = [rows[label].get(category, 0) / size for label in labels]
        if any(heights):
            ax.bar(xs, heights, bottom=bottom, label=category, color=COLORS[category])
            bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    ax.set_xticks(xs, [str(label).replace(" ", "\n") for label in labels])  # "B=8 T=64" on 2 lines
    if limit is not None:
        ax.axhline(limit / size, color="black", linestyle="--", linewidth=1)
        ax.annotate(limit_label or "limit", (1, limit / size), xycoords=("axes fraction", "data"),
                    xytext=(-3, 3), textcoords="offset points", ha="right", fontsize=8)
    ax.set_ylabel(unit)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1, 1))
    if title:
        ax.set_title(title, fontsize=10)
    return ax


# ---------------------------------------------------------------- the live-bytes timeline
def _spans(points) -> list[tuple[str, int, int]]:
    """Consecutive runs of the same phase: (phase, first index, last index)."""
    spans = []
    for p in points:
        if spans and spans[-1][0] == p.phase:
            spans[-1][2] = p.index
        else:
            spans.append([p.phase, p.index, p.index])
    return [tuple(s) for s in spans]


def timeline(source, ax=None, title=None, baseline: int | None = None):
    """Live bytes of a measured step against time (one point per allocation or free).

    ``source``: a ``MemoryMeter`` made with ``timeline=True``, anything with a ``.meter``
    (``train.measure_step``'s result) or a list of ``TimelinePoint``. ``baseline`` (bytes): a
    dotted line for what was live before forward (parameters and batch)."""
    points = getattr(getattr(source, "meter", source), "timeline", source)
    if not points:
        raise ValueError("no timeline to draw: measure with MemoryMeter(timeline=True) or "
                         "train.measure_step, which keeps one")
    ax = _axes(ax)
    size, unit = _unit(max(p.live_bytes for p in points))
    xs, ys = [p.index for p in points], [p.live_bytes / size for p in points]
    for phase, start, end in _spans(points):
        if phase in PHASE_COLORS:
            ax.axvspan(start, end, color=PHASE_COLORS[phase], alpha=0.12, label=phase)
    ax.step(xs, ys, where="post", color="black", linewidth=1)
    peak = max(points, key=lambda p: p.live_bytes)
    average = sum(p.live_bytes for p in points) / len(points)
    ax.axhline(average / size, color="gray", linestyle="--", linewidth=1, label="average")
    ax.plot([peak.index], [peak.live_bytes / size], "o", color="#c44e52",
            label=f"peak ({peak.phase or 'outside phases'})")
    if baseline is not None:
        ax.axhline(baseline / size, color="gray", linestyle=":", linewidth=1,
                   label="parameters + batch")
    ax.set_xlabel("allocations and frees, in order")
    ax.set_ylabel(f"live {unit}")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1, 1))
    if title:
        ax.set_title(title, fontsize=10)
    return ax


# ---------------------------------------------------------------- the every-N dial
def dial_figure(dial, n: int | None = None, axes=None, title=None):
    """Left: saved bytes after forward and peak above parameters+batch, against N, with no
    checkpointing as dashed lines. Right: recompute FLOPs against N. sqrt(L) is marked; ``n``
    (the slider's N) is highlighted. Returns the two axes."""
    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(10, 3.5), layout="constrained",
                               gridspec_kw={"width_ratios": [3, 2]})
    mem, flops = axes
    ns = [p.n for p in dial.points]
    size, unit = _unit(max(dial.none.peak_above_baseline, dial.none.saved_bytes))
    peaks = [p.peak_above_baseline / size for p in dial.points]
    saved = [p.saved_bytes / size for p in dial.points]
    mem.plot(ns, peaks, "o-", color="#c44e52", label="peak (above params + batch)")
    mem.plot(ns, saved, "s-", color="#dd8452", label="saved after forward")
    mem.axhline(dial.none.peak_above_baseline / size, color="#c44e52", linestyle="--",
                linewidth=1, label="peak, no checkpointing")
    mem.axhline(dial.none.saved_bytes / size, color="#dd8452", linestyle="--", linewidth=1,
                label="saved, no checkpointing")
    gflops = [p.recompute_flops / 1e9 for p in dial.points]
    flops.bar(ns, gflops, color="#4c72b0")
    for ax in axes:
        ax.axvline(dial.sqrt_n, color="gray", linestyle=":", linewidth=1.5)
        ax.annotate(f"sqrt(L) = {dial.sqrt_n:.2g}", (dial.sqrt_n, 1), xycoords=("data", "axes "
                    "fraction"), xytext=(3, -12), textcoords="offset points", fontsize=8)
        ax.set_xlabel(f"N (blocks per checkpointed segment; L = {dial.n_layers})")
        ax.set_xticks(ns)
    if n is not None:
        p = dial.at(n)
        mem.plot([n], [p.peak_above_baseline / size], "o", markersize=14, fillstyle="none",
                 color="black")
        flops.bar([n], [p.recompute_flops / 1e9], color="#2a3f66")
        mem.set_title(f"every-{n}: peak {p.peak_above_baseline / size:.2f} {unit}, saved "
                      f"{p.saved_bytes / size:.2f} {unit}", fontsize=10)
        flops.set_title(f"recompute +{p.overhead:.0%} of a plain step", fontsize=10)
    elif title:
        mem.set_title(title, fontsize=10)
    mem.set_ylabel(unit)
    mem.set_ylim(bottom=0)
    mem.legend(fontsize=8)
    flops.set_ylabel("recomputed GFLOP")
    return axes


def dial_slider(dial, description: str = "N"):
    """An ipywidgets ``interactive``: an IntSlider over N (1..L) that redraws ``dial_figure`` and
    the live-bytes timeline of every-N from the measurements (nothing is re-run)."""
    try:
        import ipywidgets as widgets
    except ImportError as error:  # only the notebooks need it
        raise ImportError("the slider needs ipywidgets: pip install ipywidgets "
                          "(requirements.txt pins it)") from error
    ns = [p.n for p in dial.points]
    slider = widgets.IntSlider(value=dial.best().n, min=min(ns), max=max(ns), step=1,
                               description=description, continuous_update=False)

    def draw(N):
        fig = plt.figure(figsize=(10, 6.5), layout="constrained")
        top, bottom = fig.subfigures(2, 1)
        dial_figure(dial, N, axes=top.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]}))
        timeline(dial.at(N).timeline, ax=bottom.subplots(), baseline=dial.at(N).baseline_bytes,
                 title=f"every-{N}: live bytes through forward and backward")
        plt.show()

    return widgets.interactive(draw, N=slider)


# ---------------------------------------------------------------- batch size under a budget
def batch_sweep_figure(points, budget=None, axes=None):
    """``compare.batch_sweep``'s points: peak memory against batch size per policy (the budget
    dashed), and tokens/s of the batches that fit."""
    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(10, 3.6), layout="constrained")
    ax_mem, ax_tps = axes
    for policy in dict.fromkeys(p.policy for p in points):
        pts = [p for p in points if p.policy == policy]
        ax_mem.plot([p.batch_size for p in pts], [p.peak_bytes / MiB for p in pts], "o-",
                    label=policy)
        fit = [p for p in pts if p.fits]
        ax_tps.plot([p.batch_size for p in fit], [p.tokens_per_s for p in fit], "o-",
                    label=policy)
    if budget is not None:
        ax_mem.axhline(budget / MiB, color="red", linestyle="--", label="budget")
    ax_mem.set(xscale="log", xlabel="batch size", ylabel="peak memory (MiB)")
    ax_tps.set(xscale="log", xlabel="batch size (only those that fit)", ylabel="tokens / s")
    ax_mem.legend()
    ax_tps.legend()
    return axes


# ---------------------------------------------------------------- lesson 4: the OOM and the plan
def step_timelines(timeline, budget: int, steps=(1, 2), ax=None):
    """``doctor.run_steps(..., timeline=True).timeline`` ((step, live bytes, phase) tuples): live
    MiB of each step from its forward on, one line per step, the budget dashed."""
    ax = _axes(ax, figsize=(9, 3.2))
    for k in steps:
        ax.plot([b / MiB for s, b, phase in timeline if s == k and phase is not None],
                label=f"step {k}")
    ax.axhline(budget / MiB, color="black", ls="--", label="budget")
    ax.set(xlabel="allocations and frees, in order", ylabel="live MiB")
    ax.legend()
    return ax


def oom_bar(oom, budget: int, ax=None):
    """One stacked bar of what was live at an ``OOMReport``: parameters, AdamW state, then each
    block's bytes in order; the budget dashed. Only the blocks are checkpointing's to give back."""
    ax = _axes(ax, figsize=(9, 1.8))
    parts = [("parameters", oom.breakdown.get("parameters", 0)),
             ("AdamW state", oom.breakdown.get("optimizer state", 0)),
             *((name.replace("blocks.", "block "), b)
               for name, b in sorted(oom.by_layer.items(), key=lambda kv: (len(kv[0]), kv[0]))
               if name.startswith("blocks."))]  # blocks.2 before blocks.10
    left = 0.0
    for name, nbytes in parts:
        ax.barh(0, nbytes / MiB, left=left, edgecolor="white")
        ax.text(left + nbytes / MiB / 2, 0, name, ha="center", va="center", fontsize=8,
                rotation=90)
        left += nbytes / MiB
    ax.axvline(budget / MiB, color="black", ls="--")
    ax.set_yticks([])
    ax.set_xlabel("MiB live when it ran out of memory (dashed: budget)")
    return ax


def frontier_figure(frontiers: dict, alternatives: dict | None = None, stars=(), budget=None,
                    ax=None):
    """Recompute (% of a plain step) against predicted peak. ``frontiers``: {label: list of
    ``plan.Prediction``} drawn as step curves (at a budget b the optimum is the point with the
    largest peak <= b); ``alternatives``: {name: Prediction} as grey dots, equal ones sharing a
    label; ``stars``: (Prediction, label) pairs; ``budget`` dashed; the "+33%" rule dotted."""
    ax = _axes(ax, figsize=(8, 4))
    for label, points in frontiers.items():
        points = sorted(points, key=lambda p: p.peak_bytes)
        ax.step([p.peak_bytes / MiB for p in points], [100 * p.overhead for p in points],
                where="post", label=label)
    names: dict[tuple, list[str]] = {}
    for name, p in (alternatives or {}).items():
        names.setdefault((p.peak_bytes / MiB, 100 * p.overhead), []).append(name)
    for xy, same in names.items():
        ax.plot(*xy, "o", color="tab:gray", ms=4)
        ax.annotate(" = ".join(same), xy, fontsize=7, textcoords="offset points", xytext=(4, 3))
    for p, label in stars:
        ax.plot(p.peak_bytes / MiB, 100 * p.overhead, "*", ms=12, label=label)
    if budget is not None:
        ax.axvline(budget / MiB, color="black", ls="--", label="budget")
    ax.axhline(100 / 3, color="tab:red", ls=":", label='the "+33%" rule')
    ax.set(xlabel="predicted peak (MiB)", ylabel="recompute, % of a plain step's FLOPs")
    ax.legend(fontsize=8)
    return ax


def nested_figure(single: dict, nested: dict, ax=None):
    """Forwards re-run against block inputs stored at once: ``single`` {stored: recompute} of the
    single-level frontier as a step curve, ``nested`` {stored: NestedPrediction} as points, the
    single-level minimum dotted (below it only nesting fits)."""
    ax = _axes(ax, figsize=(7, 3.2))
    ks = sorted(single)
    ax.step(ks, [single[k] for k in ks], where="post", label="single level")
    ss = sorted(nested)
    ax.plot(ss, [nested[s].recompute_flops for s in ss], "o-", label="nested")
    ax.axvline(ks[0], color="gray", ls=":", label="single-level minimum")
    ax.set(xlabel="block inputs stored at once", ylabel="forwards re-run", yscale="log")
    ax.legend()
    return ax


# ---------------------------------------------------------------- lessons 3 and 4b
def gpus_figure(per_gpu: dict, budget: int, ax=None, title=None, top_gb: float | None = None):
    """``per_gpu`` {policy: {n GPUs: bytes per GPU}} as lines (GB), the GPU's memory dashed: where
    a line crosses under it, that policy fits on that many GPUs (lesson 3.2). ``top_gb``: the
    y axis's top (few GPUs need far more than one holds)."""
    ax = _axes(ax, figsize=(6, 3.6))
    for policy, by_n in per_gpu.items():
        ns = sorted(by_n)
        ax.plot(ns, [by_n[n] / 1e9 for n in ns], "o-", label=policy)
    ax.axhline(budget / 1e9, color="red", linestyle="--", label=f"{budget / 1e9:.0f} GB")
    ax.set(xlabel="GPUs (FSDP)", ylabel="GB per GPU", title=title)
    ax.set_ylim(0, top_gb)
    ax.legend()
    return ax


def saved_by_length_figure(lengths, saved: dict, ax=None, title="one block, batch 1"):
    """``saved`` {variant: saved bytes per sequence length} on log-log axes (lesson 3.3: naive
    attention's T^2 against SDPA's T)."""
    ax = _axes(ax, figsize=(6, 3.6))
    for name, ys in saved.items():
        ax.loglog(lengths, [y / MiB for y in ys], "o-", label=name)
    ax.set(xlabel="sequence length T", ylabel="saved MiB per layer", title=title)
    ax.legend()
    return ax


def formula_terms_figure(terms: dict, ax=None,
                         xlabel="MiB per layer (bf16, batch 1, sequence 4096)"):
    """``hf.formula_terms`` by name: the paper's bytes and the measured ones per term, side by
    side on a symlog axis (lesson 4b.2: where a real layer keeps more or less than the formula)."""
    names = list(terms)
    ax = _axes(ax, figsize=(8, 0.45 * len(names) + 1))
    rows = range(len(names))
    ax.barh([r + 0.2 for r in rows], [terms[n].paper / MiB for n in names], 0.4,
            label="Korthikanti et al., sbh(34 + 5as/h)")
    ax.barh([r - 0.2 for r in rows], [terms[n].measured / MiB for n in names], 0.4,
            label="measured")
    ax.set_yticks(list(rows), names)
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlabel(xlabel)
    ax.invert_yaxis()
    ax.legend(loc="lower right")
    return ax


# ---------------------------------------------------------------- lesson 3b
def loss_curves(losses: dict, ax=None):
    """{policy: losses per step} as lines against the step number, from 1 (lesson 3b.3: a
    recompute without the RNG replayed drifts away from the plain run)."""
    ax = _axes(ax, figsize=(6, 3))
    for policy, ls in losses.items():
        ax.plot(range(1, len(ls) + 1), ls, "o-", label=policy, alpha=0.7)
    ax.set(xlabel="step", ylabel="loss")
    ax.legend()
    return ax


def budget_figure(kept: dict, ax=None):
    """``torch.compile``'s bytes kept for backward at each ``activation_memory_budget`` {budget:
    bytes}, next to budget x the default (budget 1): lesson 3b.4."""
    ax = _axes(ax, figsize=(6, 3))
    budgets = sorted(kept, reverse=True)
    ax.plot(budgets, [kept[b] / KiB for b in budgets], "o-", label="compile keeps")
    ax.plot(budgets, [b * kept[1.0] / KiB for b in budgets], "--", label="budget x default")
    ax.set(xlabel="activation_memory_budget", ylabel="KiB kept for backward")
    ax.legend()
    return ax
