"""Hand-trace helpers (phase 2): one step of the 4-layer ``HandTraceNet``, traced op by op.

Phase 2 predicts, by hand, what a checkpoint policy keeps and what the step's peak is, then checks
it here to the byte::

    net = hand_trace_net()                    # 4 x (Linear(512) -> ReLU), fixed seed
    t = trace_step(net, "every-2")            # forward + backward of net(x).sum(), x: 512 x 512
    t.saved_bytes, t.peak_bytes               # above the baseline (parameters + x)
    t.peak_phase, t.peak_op, t.peak_layer     # when the peak happened, and in which layer
    t.by_layer()                              # highest live bytes while each layer's backward runs
    t.average_bytes                           # mean live bytes over the step's timeline

Layers are counted from 1, as in prose: layer k is ``net.blocks[k - 1]``.

Why the loss is ``net(x).sum()``: sum's backward saves nothing, and the gradient it hands back is a
one-element tensor of ones *expanded* to the output's shape: a view, 4 bytes. So every MiB in a
trace is an activation, a gradient of one, or a parameter gradient, and the hand formulas stay
whole numbers of MiB plus a few named crumbs (the 4-byte loss and its 4-byte seed gradient, and
the 2 KiB bias gradients). ``mse_loss`` would add its target and, on CPU, an elementwise buffer.

How a live byte gets its layer: the trace is a ``MemoryMeter`` (exact live bytes) that also
writes down, after every aten op, the live bytes and the layer running. In forward, hooks on
each block's submodules say which layer runs and note the autograd nodes its outputs carry.
In backward, ``torch._C._current_autograd_node()`` (what ``torch.autograd.graph`` itself uses)
says which node runs; nodes no layer created (``AccumulateGrad``, ``TBackward0``) belong to the
layer before them. A checkpoint's recompute runs inside the first node that needs a rebuilt
tensor, so it counts under that layer's backward: that is when its memory is live.
"""

from __future__ import annotations

import html
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from .meter import MemoryMeter, time_average
from .models import HandTraceNet
from .policies import applied, parse_policy
from .recompute import measure_recompute
from .step import run_step
from .units import MiB, fmt_bytes, fmt_flops

# Meter categories, as the walk through backward names them.
WALK_PARTS = {"activations": "kept from forward", "temporaries": "made in backward",
              "gradients": "weight gradients done"}
LOSS = "loss"  # the layer label of ops outside every block (the loss and its seed gradient)


def hand_trace_net(depth: int = 4, width: int = 512, relu_first: bool = False,
                   seed: int = 0) -> HandTraceNet:
    """A seeded ``HandTraceNet``. ``relu_first=True`` swaps each block to ReLU -> Linear, a block
    whose last op's output nothing saves (the case where torch's recompute stops early)."""
    with torch.random.fork_rng(devices=[]):  # seeded without touching the global RNG
        torch.manual_seed(seed)
        net = HandTraceNet(width=width, depth=depth)
    if relu_first:
        for block in net.blocks:
            block[0], block[1] = block[1], block[0]
    return net


def hand_input(net: HandTraceNet, batch_size: int = 512, seed: int = 0) -> torch.Tensor:
    """The input ``x``: ``batch_size x width`` fp32 (1 MiB at 512 x 512), on the net's device."""
    x = torch.randn(batch_size, net.width, generator=torch.Generator().manual_seed(seed))
    return x.to(next(net.parameters()).device)


def sum_loss(net):
    """``loss_fn`` for ``train.measure_step``: ``net(batch[0]).sum()`` (see the module doc)."""
    return lambda batch: net(batch[0]).sum()


# ---------------------------------------------------------------- one traced step
@dataclass(frozen=True)
class OpPoint:
    """Live bytes just after one aten op ran (above the baseline)."""

    phase: str  # "forward" or "backward"
    layer: int | str  # 1..L, or LOSS
    node: str  # the autograd node running in backward, e.g. "AddmmBackward0" ("" in forward)
    op: str  # e.g. "aten.addmm"
    live_bytes: int
    event: int = 0  # how many timeline events (allocations and frees) came before it
    categories: dict = field(repr=False, compare=False, default_factory=dict)


@dataclass
class StepTrace:
    """One forward + backward (a ``run_step``), traced op by op. Byte counts are above
    ``baseline_bytes``. Not a ``StepRecord``: it holds a point per op and the layers, and its
    bytes are relative, as the hand trace counts them."""

    policy: str
    baseline_bytes: int  # parameters + x, live before forward
    saved_bytes: int  # what forward left alive for backward (the loss scalar included)
    peak_bytes: int  # highest live bytes in the step
    peak_phase: str
    peak_op: str  # the op whose output made the peak (the last straw, not the cause)
    peak_layer: int | str
    points: list[OpPoint]  # one per aten op, in order
    timeline: list[int]  # live bytes after every allocation and free, in order
    timeline_phases: list[str]
    baseline_categories: dict = field(repr=False, default_factory=dict)
    timeline_seconds: list[float] = field(repr=False, default_factory=list)  # perf_counter

    @property
    def average_bytes(self) -> float:
        """Mean live bytes over the timeline (one point per allocation or free, not per second)."""
        return sum(self.timeline) / len(self.timeline)

    @property
    def time_average_bytes(self) -> float:
        """Mean live bytes per second of the step: each level weighted by how long it lasted."""
        return time_average(self.timeline, self.timeline_seconds)

    @property
    def peak_point(self) -> OpPoint:
        return next(p for p in self.points if p.live_bytes == self.peak_bytes)

    def layer_starts(self) -> dict[int, int]:
        """The timeline event at which each layer's backward begins."""
        out: dict[int, int] = {}
        for p in self.points:
            if p.phase == "backward" and p.layer != LOSS:
                out.setdefault(p.layer, p.event)
        return out

    def by_layer(self) -> dict[int, int]:
        """Highest live bytes while each layer's backward runs (its recompute included), in the
        order backward visits the layers: L, L-1, ..., 1."""
        out: dict[int, int] = {}
        for p in self.points:
            if p.phase == "backward" and p.layer != LOSS:
                out[p.layer] = max(out.get(p.layer, 0), p.live_bytes)
        return out

    def layer_breakdown(self) -> dict[int, dict[str, int]]:
        """What is live at each layer's highest moment in backward (above the baseline), split
        into tensors kept from forward, tensors made in backward (gradients of activations,
        rebuilt activations, this layer's weight gradient) and finished weight gradients."""
        out = {}
        for layer, top in self.by_layer().items():
            point = next(p for p in self.points if p.phase == "backward" and p.layer == layer
                         and p.live_bytes == top)
            above = {c: point.categories[c] - self.baseline_categories.get(c, 0)
                     for c in point.categories}
            out[layer] = {name: above[c] for c, name in WALK_PARTS.items()}
        return out

    def __str__(self) -> str:
        return (f"{self.policy}: saved after forward {fmt_bytes(self.saved_bytes)}, peak "
                f"{fmt_bytes(self.peak_bytes)} ({self.peak_phase}, layer {self.peak_layer}, "
                f"{self.peak_op}), average {fmt_bytes(self.average_bytes)}; above a baseline of "
                f"{fmt_bytes(self.baseline_bytes)}")


class _LayerMeter(MemoryMeter):
    """A ``MemoryMeter`` that also notes, after every op, the live bytes and the layer running."""

    def __init__(self):
        super().__init__(timeline=True)
        self.layer: int | str = LOSS
        self.node_layer: dict = {}  # autograd node -> the layer whose forward created it
        self.points: list[OpPoint] = []
        self.baseline, self.baseline_categories = 0, {}
        self.start = self.end = 0  # the step's first timeline event, and one past its last

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = super().__torch_dispatch__(func, types, args, kwargs)
        node_name = ""
        if self._phase == "backward":
            node = _current_node()
            if node is not None:
                node_name = node.name()
                self.layer = self.node_layer.get(node, self.layer)
        if self._phase is not None:
            self.points.append(OpPoint(self._phase, self.layer, node_name,
                                       str(func.overloadpacket), self.live_bytes - self.baseline,
                                       len(self.timeline) - self.start, self.breakdown()))
        return out

    def reset_peak(self) -> None:
        """The step starts here (``run_step``): what is live now is its baseline."""
        super().reset_peak()
        self.baseline, self.baseline_categories = self.live_bytes, self.breakdown()
        self.start = len(self.timeline)

    @contextmanager
    def phase(self, name: str):
        if name == "backward":
            self.layer = LOSS  # the loss and its seed gradient belong to no layer
        with super().phase(name):
            yield self
        self.end = len(self.timeline)  # the trace ends with the last phase

    def enter_layer(self, k: int):
        def hook(module, args):
            if self._phase == "forward":
                self.layer = k
        return hook

    def leave_layer(self, k: int):
        """Autograd attaches a node to an op's output only after the op returns, so the node is
        read here, from the module's output."""
        def hook(module, args, output):
            if self._phase == "forward" and output.grad_fn is not None:
                self.node_layer.setdefault(output.grad_fn, k)
        return hook


def trace_step(net: HandTraceNet, policy="none", batch_size: int = 512,
               free_grads: bool = False, seed: int = 0) -> StepTrace:
    """Forward and backward of ``net(x).sum()`` under ``policy``, traced op by op.

    ``free_grads=True`` drops each parameter gradient as soon as it is complete, as an optimizer
    that steps inside backward would: gradients then never pile up.
    """
    policy = parse_policy(policy)
    if not isinstance(net, HandTraceNet):
        raise TypeError(f"trace_step traces a HandTraceNet (build one with hand_trace_net()), "
                        f"got {type(net).__name__}")
    x = hand_input(net, batch_size, seed)
    meter = _LayerMeter()
    hooks = [h for k, block in enumerate(net.blocks, start=1) for m in block.modules()
             for h in (m.register_forward_pre_hook(meter.enter_layer(k)),
                       m.register_forward_hook(meter.leave_layer(k)))]
    try:
        with applied(net, policy), meter:
            meter.track(net)
            if free_grads:  # registered after track's hooks, so the meter sees each grad first
                hooks += [p.register_post_accumulate_grad_hook(_drop_grad)
                          for p in net.parameters()]
            record = run_step(net, None, (x,), meter, loss_fn=sum_loss(net), count_batch=True,
                              policy=str(policy))
    finally:
        for h in hooks:
            h.remove()
        meter.untrack()
        net.zero_grad(set_to_none=True)
    baseline = meter.baseline
    events = meter.timeline[meter.start:meter.end]  # forward and backward only
    peak = record.peak_bytes - baseline
    point = next((p for p in meter.points if p.live_bytes == peak), None)
    return StepTrace(
        policy=str(policy), baseline_bytes=baseline, saved_bytes=record.saved_bytes,
        peak_bytes=peak, peak_phase=record.peak_phase,
        peak_op=point.op if point else str(record.peak_op),
        peak_layer=point.layer if point else LOSS, points=meter.points,
        timeline=[e.live_bytes - baseline for e in events],
        timeline_phases=[e.phase for e in events],
        timeline_seconds=[e.seconds for e in events],
        baseline_categories=meter.baseline_categories,
    )


def _current_node():
    """The autograd node running now (private torch API; without it, layers stay unknown)."""
    current = getattr(torch._C, "_current_autograd_node", None)
    return current() if current is not None else None


def _drop_grad(param: torch.Tensor) -> None:
    param.grad = None


def trace_policies(net: HandTraceNet, policies=("none", "full", "every-2"),
                   **kwargs) -> dict[str, StepTrace]:
    """``trace_step`` for each policy on the same net and input, by policy name."""
    return {str(parse_policy(p)): trace_step(net, p, **kwargs) for p in policies}


def compare_variants(variants: dict[str, dict], policies=("none", "full", "every-2")
                     ) -> dict[str, dict[str, StepTrace]]:
    """Trace each policy on each variant of the net. A variant is a dict of ``hand_trace_net``
    arguments (``depth``, ``width``) and ``trace_step`` arguments (``batch_size``,
    ``free_grads``), e.g. ``{"8 layers": {"depth": 8}, "grads freed": {"free_grads": True}}``."""
    net_args = ("depth", "width", "relu_first")
    out = {}
    for name, args in variants.items():
        net = hand_trace_net(**{k: v for k, v in args.items() if k in net_args})
        step_args = {k: v for k, v in args.items() if k not in net_args}
        out[name] = trace_policies(net, policies, **step_args)
    return out


def variant_table(results: dict[str, dict[str, StepTrace]]) -> Table:
    """One row per variant: each policy's peak above baseline, and where none's peak is."""
    rows = Table()
    for name, traces in results.items():
        row = {"variant": name}
        row.update({f"peak {p}": fmt_bytes(t.peak_bytes) for p, t in traces.items()})
        first = next(iter(traces.values()))
        row[f"{first.policy}'s peak at"] = f"layer {first.peak_layer}"
        rows.append(row)
    return rows


# ---------------------------------------------------------------- recompute, by op
def recompute_by_op(net: HandTraceNet, policy, batch_size: int = 512, seed: int = 0) -> dict:
    """What backward re-runs under ``policy``: ``{"ops": {op: count}, "flops": n,
    "forward_flops": n, "step_flops": n}`` (FLOPs of matmuls, as FlopCounterMode counts them).

    ``measure_recompute`` runs ``net.loss`` (MSE against zeros): the loss sits outside every
    checkpointed region and has no matmul, so the counts are those of ``net(x).sum()``."""
    x = hand_input(net, batch_size, seed)
    r = measure_recompute(net, (x, torch.zeros_like(x)), policy, seed)
    return {"ops": dict(sorted(r.ops.items())), "flops": r.flops,
            "forward_flops": r.forward_flops, "step_flops": r.step_flops}


def recompute_table(results: dict[str, dict]) -> Table:
    """One row per ``recompute_by_op`` result: ops re-run, FLOPs, and their share of a forward."""
    return Table(
        {"case": name, "re-run ops": r["ops"], "FLOPs": fmt_flops(r["flops"]),
         "of one forward": f"{r['flops'] / r['forward_flops']:.2f}",
         "of a plain step": f"{r['flops'] / r['step_flops']:.1%}"}
        for name, r in results.items()
    )


# ---------------------------------------------------------------- tables and pictures
class Table(list):
    """A list of row dicts that shows itself as a table (HTML in a notebook, text in print)."""

    def _repr_pretty_(self, printer, cycle):  # IPython's plain-text view: the table, not a list
        printer.text(str(self))

    def _cells(self):
        head = list(self[0]) if self else []
        return head, [[_show(row[h]) for h in head] for row in self]

    def __str__(self):
        head, rows = self._cells()
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                         for r in [head, *rows])

    def _repr_html_(self):
        head, rows = self._cells()
        th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
        trs = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>"
                      for r in rows)
        return f"<table><tr>{th}</tr>{trs}</table>"


def _show(value) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} x{v}" for k, v in value.items()) or "-"
    return str(value)


def trace_table(traces: dict[str, StepTrace]) -> Table:
    """One row per policy: saved after forward, peak (where), average; bytes above baseline."""
    return Table(
        {"policy": name, "saved after forward": fmt_bytes(t.saved_bytes),
         "peak": fmt_bytes(t.peak_bytes), "peak at": f"{t.peak_phase}, layer {t.peak_layer}, "
         f"{t.peak_op}", "average": fmt_bytes(t.average_bytes),
         "average over time": fmt_bytes(t.time_average_bytes)}
        for name, t in traces.items()
    )


def layer_table(traces: dict[str, StepTrace]) -> Table:
    """Rows = layers in backward order, columns = policies: highest live MiB in each layer's
    backward (whole MiB; the rest is KiB of bias gradients and the 8 bytes of loss and seed)."""
    layers = list(next(iter(traces.values())).by_layer())
    return Table(
        {"backward of": f"layer {k}",
         **{name: f"{t.by_layer()[k] // MiB} MiB" for name, t in traces.items()}}
        for k in layers
    )


def plot_timelines(traces: dict[str, StepTrace], axes=None):
    """Live MiB (above baseline) through each step, one panel per policy: forward in blue,
    backward in orange, the average dashed, the peak marked with where it happened."""
    import matplotlib.pyplot as plt

    if axes is None:
        _, axes = plt.subplots(1, len(traces), figsize=(4.2 * len(traces), 3.2), sharey=True,
                               squeeze=False)
        axes = axes[0]
    for ax, (name, t) in zip(axes, traces.items(), strict=True):
        mib = [b / MiB for b in t.timeline]
        for phase, color in (("forward", "tab:blue"), ("backward", "tab:orange")):
            xs = [i for i, p in enumerate(t.timeline_phases) if p == phase]
            ax.step(xs, [mib[i] for i in xs], where="post", color=color, label=phase)
        ax.axhline(t.average_bytes / MiB, ls="--", color="gray",
                   label=f"average {t.average_bytes / MiB:.2f} MiB")
        top = max(range(len(mib)), key=mib.__getitem__)
        ax.plot([top], [mib[top]], "o", color="crimson",
                label=f"peak {mib[top]:.2f} MiB: layer {t.peak_layer}, {t.peak_op}")
        top_mib = max(mib)
        for layer, event in t.layer_starts().items():  # where each layer's backward begins
            ax.axvline(event, color="tab:orange", lw=0.5, alpha=0.5)
            ax.text(event, top_mib * 1.04, f" L{layer}", fontsize=7, color="tab:orange")
        ax.set_title(name)
        ax.set_xlabel("allocation / free events")
        ax.set_ylim(0, top_mib * 1.12)
        ax.legend(fontsize=7, loc="lower right")
    axes[0].set_ylabel("live MiB above parameters + x")
    return axes


def plot_walk(traces: dict[str, StepTrace], axes=None):
    """The walk through backward as stacked bars, one panel per policy: at each layer's highest
    moment, MiB kept from forward, made in backward, and weight gradients already done."""
    import matplotlib.pyplot as plt

    if axes is None:
        _, axes = plt.subplots(1, len(traces), figsize=(3.6 * len(traces), 3), sharey=True,
                               squeeze=False)
        axes = axes[0]
    colors = ("tab:blue", "tab:orange", "tab:green")
    for ax, (name, t) in zip(axes, traces.items(), strict=True):
        parts = t.layer_breakdown()
        labels = [f"L{k}" for k in parts]
        bottom = [0.0] * len(parts)
        for part, color in zip(WALK_PARTS.values(), colors, strict=True):
            heights = [p[part] / MiB for p in parts.values()]
            ax.bar(labels, heights, bottom=bottom, color=color, label=part)
            bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
        ax.set_title(f"{name}: peak {t.peak_bytes / MiB:.2f} MiB")
        ax.set_xlabel("backward of layer")
    axes[0].set_ylabel("live MiB above parameters + x")
    axes[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return axes
