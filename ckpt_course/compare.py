"""Choosing a policy: memory, recompute and time of several policies on the same model.

``compare(GPTConfig(), ["none", "full", "offload"])`` answers "what does each policy cost?" in one
table: peak bytes, saved bytes, recompute FLOPs, offload traffic, median step time and its ratio to
``none``. Memory and time are measured in *separate* runs, because measuring memory slows a step:

- memory: a short metered run per policy (``train(..., measure_memory=True)``), exact bytes;
  ``budget=`` makes a policy that does not fit raise ``OutOfMemoryError``, reported as "OOM";
- time: unmetered steps, interleaved across policies (none full offload none full offload ...)
  after one warm-up round, so that a busy machine slows all policies alike; medians.

The other tools of the lesson live here too: ``measure_split`` (forward, backward and optimizer
time of a step), ``batch_sweep`` (tokens/s against batch size under a memory budget),
``layer_memory`` (what one block of a big config keeps under a policy, on fake tensors). Ranking
ops for selective checkpointing lives in ``ranking.py`` (re-exported here for the lessons).
"""

from __future__ import annotations

import copy
import html
import statistics
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from .meter import MemoryMeter, parse_budget
from .models import GPTBlock, GPTConfig, Llama, LlamaBlock, LlamaConfig, TinyGPT
from .policies import Offload, Policy, applied, parse_policy
from .ranking import OpCost, format_ranking, rank_ops, selective_from_ranking  # noqa: F401
from .recompute import measure_recompute
from .step import (
    StepRecord,
    batch_tokens,
    check_learning_rate,
    check_run,
    check_seed,
    check_steps,
    make_batch,
    make_optimizer,
    run_step,
)
from .train import train
from .units import MiB, check_positive_int, fmt_bytes, fmt_flops

DEFAULT_POLICIES = ("none", "full", "every-2", "selective:save=mm,sdpa", "offload")


# ---------------------------------------------------------------- models and steps
def make_model(model_or_config, seed: int = 0, device=None) -> nn.Module:
    """A course model from a config (built with ``seed``), or a copy of the model given."""
    if isinstance(model_or_config, nn.Module):
        model = copy.deepcopy(model_or_config)
    elif isinstance(model_or_config, (GPTConfig, LlamaConfig)):
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            cls = TinyGPT if isinstance(model_or_config, GPTConfig) else Llama
            model = cls(model_or_config)
    else:
        raise TypeError(f"expected a course model or a GPTConfig/LlamaConfig, got "
                        f"{type(model_or_config).__name__}")
    return model.to(device) if device is not None else model


def _batch(model, batch_size, seq_len, seed, device):
    return make_batch(model, batch_size, seq_len, torch.Generator().manual_seed(seed), device)


def _device(model) -> torch.device:
    return next(model.parameters()).device


class _Runner:
    """One model copy under one policy, with its own AdamW: unmetered, timed steps."""

    def __init__(self, model, policy, batch, lr=1e-3):
        self.model, self.policy, self.batch = model.train(), policy, batch
        self.optimizer = make_optimizer(model, lr)
        self.handle = applied(model, policy)
        self.handle.__enter__()
        self.times: list[float] = []
        self.forward_times: list[float] = []  # the forward phase of each timed step
        self.last: StepRecord | None = None

    def step(self) -> float:
        self.last = run_step(self.model, self.optimizer, self.batch, policy=str(self.policy))
        return self.last.time_s

    def close(self) -> None:
        self.handle.__exit__(None, None, None)


def _interleaved(runners, rounds: int, on_step=None) -> None:
    """One warm-up step each, then ``rounds`` rounds of one step per runner, in turn."""
    for runner in runners:
        runner.step()
    for r in range(rounds):
        for runner in runners:
            runner.times.append(runner.step())
            runner.forward_times.append(runner.last.phase_s["forward"])
            if on_step is not None:
                on_step(runner, r)


# ---------------------------------------------------------------- compare
@dataclass
class PolicyResult:
    """One policy's row. ``peak_bytes`` is None when the policy did not fit the budget."""

    policy: str
    fits: bool
    peak_bytes: int | None  # highest live bytes in the metered steps (optimizer state included)
    saved_bytes: int | None  # live bytes forward left for backward
    recompute_flops: int  # FLOPs backward spends re-running forward
    step_flops: int  # FLOPs of a plain forward + backward
    offload_bytes: int  # bytes copied to host and back in one step (offload policies)
    step_time_s: float | None  # median of the timed, unmetered steps
    time_ratio: float | None = None  # step_time_s / the reference policy's
    tokens_per_s: float | None = None
    times_s: list[float] = field(default_factory=list, repr=False)
    forward_time_s: float | None = None  # median forward phase of the timed steps

    @property
    def recompute_share(self) -> float:
        """Recompute FLOPs / a plain step's FLOPs (the textbook's 1/3 for a whole forward)."""
        return self.recompute_flops / self.step_flops if self.step_flops else 0.0


@dataclass(repr=False)
class Comparison:
    """What ``compare`` returns: one ``PolicyResult`` per policy, as measured. Prints as a table
    (HTML in a notebook); ``rows()`` gives plain dicts, ``plot()`` a figure."""

    results: list[PolicyResult]
    batch_size: int
    seq_len: int
    budget: float | None
    reference: str  # the policy the time ratios divide by
    rounds: int
    live: object = field(default=None, repr=False)  # the LivePlot, when live=True

    def __getitem__(self, policy) -> PolicyResult:
        name = str(parse_policy(policy))
        for r in self.results:
            if r.policy == name:
                return r
        raise KeyError(f"{name!r} was not compared; compared: {[r.policy for r in self.results]}")

    def round_ratios(self, policy) -> list[float]:
        """The policy's step time over the reference's, round by round: the rounds are
        interleaved, so each pair ran under the same load."""
        mine, ref = self[policy].times_s, self[self.reference].times_s
        return [a / b for a, b in zip(mine, ref, strict=True)]

    def spread(self, policy) -> str:
        """The time ratio as a lesson prints it: the median, then the rounds' range."""
        r = self.round_ratios(policy)
        return (f"median {self[policy].time_ratio:.2f}x {self.reference}, rounds {min(r):.2f}x "
                f"to {max(r):.2f}x ({len(r)} interleaved rounds)")

    def rows(self) -> list[dict]:
        """One plain dict per policy (for pandas, JSON or a test)."""
        return [{k: v for k, v in asdict(r).items() if k != "times_s"} for r in self.results]

    def _table(self) -> tuple[list[str], list[list[str]]]:
        head = ["policy", "peak", "saved", "recompute", "of step FLOPs", "offloaded",
                "step time", f"vs {self.reference}", "tokens/s"]
        rows = []
        for r in self.results:
            t = "-" if r.step_time_s is None else f"{r.step_time_s * 1e3:.1f} ms"
            rows.append([
                r.policy, fmt_bytes(r.peak_bytes) if r.fits else "OOM",
                "-" if r.saved_bytes is None else fmt_bytes(r.saved_bytes),
                fmt_flops(r.recompute_flops), f"{r.recompute_share:+.0%}",
                fmt_bytes(r.offload_bytes) if r.offload_bytes else "-", t,
                "-" if r.time_ratio is None else f"{r.time_ratio:.2f}x",
                "-" if r.tokens_per_s is None else f"{r.tokens_per_s:,.0f}",
            ])
        return head, rows

    def _caption(self) -> str:
        budget = f", budget {fmt_bytes(self.budget)}" if self.budget is not None else ""
        return (f"batch {self.batch_size} x seq {self.seq_len}{budget}; step time: median of "
                f"{self.rounds} interleaved unmetered steps")

    def __str__(self) -> str:
        head, rows = self._table()
        widths = [max(len(x[i]) for x in [head, *rows]) for i in range(len(head))]
        lines = ["  ".join(c.rjust(w) if i else c.ljust(w)
                           for i, (c, w) in enumerate(zip(row, widths, strict=True)))
                 for row in [head, *rows]]
        return "\n".join([*lines, self._caption()])

    __repr__ = __str__

    def _repr_html_(self) -> str:
        head, rows = self._table()
        th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
        trs = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>"
                      for r in rows)
        return f"<table><tr>{th}</tr>{trs}</table><p>{html.escape(self._caption())}</p>"

    def plot(self):
        """Peak memory against recompute FLOPs and against median step time, one point each."""
        from matplotlib.figure import Figure

        fig = Figure(figsize=(10, 4), layout="constrained")
        left, right = fig.subplots(1, 2, sharey=True)
        markers = "osD^vP*X"
        for i, r in enumerate(self.results):
            if not r.fits:
                continue
            style = dict(color=f"C{i % 10}", marker=markers[i % len(markers)], s=60, alpha=0.8)
            y = r.peak_bytes / MiB
            left.scatter(r.recompute_flops / 1e9, y, label=r.policy, **style)
            if r.step_time_s is not None:
                right.scatter(r.step_time_s * 1e3, y, **style)
        if any(r.fits for r in self.results):
            left.legend(fontsize="small")
        left.set(xlabel="recomputed GFLOP per step", ylabel="peak memory (MiB)")
        right.set(xlabel="median step time (ms)")
        if self.budget is not None:
            for ax in (left, right):
                ax.axhline(self.budget / MiB, color="red", linestyle="--", linewidth=1)
        oom = [r.policy for r in self.results if not r.fits]
        fig.suptitle(self._caption() + (f"; OOM: {', '.join(oom)}" if oom else ""),
                     fontsize="small")
        return fig

    def save_png(self, path) -> None:
        self.plot().savefig(path, format="png", dpi=100)


def _policies(policies) -> list[Policy]:
    if isinstance(policies, (str, Policy)):  # a string is not a list of one-letter policies
        example = [p.strip() for p in policies.split(",")] if isinstance(policies, str) else [
            str(policies)]
        raise TypeError(f"policies is a list of policies, not the {type(policies).__name__} "
                        f"{str(policies)!r}: write {example!r}")
    try:
        policies = list(policies)
    except TypeError:
        raise TypeError(f"policies is a list such as ['none', 'full'], got "
                        f"{type(policies).__name__}") from None
    parsed = [parse_policy(p) for p in policies]
    names = [str(p) for p in parsed]
    if not parsed:
        raise ValueError("give at least one policy, e.g. ['none', 'full']")
    if len(set(names)) != len(names):
        raise ValueError(f"each policy once, please: {names}")
    return parsed


def compare(model_or_config=None, policies=DEFAULT_POLICIES, steps: int = 6, batch_size: int = 8,
            seq_len: int | None = None, device=None, budget=None, live: bool = True,
            memory_steps: int = 2, seed: int = 0, lr: float = 1e-3) -> Comparison:
    """Measure each policy on copies of the same model (same weights, same batch).

    ``steps``: timed rounds (after one warm-up round); ``memory_steps``: metered steps per policy
    (two, so the optimizer state made by the first step is in the second step's peak).
    """
    policies = _policies(policies)
    check_steps(check_positive_int("steps", steps))
    check_steps(check_positive_int("memory_steps", memory_steps))
    check_positive_int("batch_size", batch_size)
    check_seed(seed)
    check_learning_rate(lr)
    budget = None if budget is None else parse_budget(budget)
    base = make_model(model_or_config if model_or_config is not None else GPTConfig(), seed,
                      device)
    check_run(base, batch_size=batch_size, seq_len=seq_len)  # a step that cannot fit: refused
    batch = _batch(base, batch_size, seq_len, seed, _device(base))
    names = [str(p) for p in policies]
    plot = None
    if live:
        from .live import LivePlot

        plot = LivePlot(names, steps=memory_steps + steps, budget=budget, title="compare")
    results = [_measure_memory(base, p, batch, batch_size, seq_len, budget, memory_steps, seed,
                               lr, plot) for p in policies]
    runners = [_Runner(make_model(base), p, batch, lr) for p, r in zip(policies, results,
                                                                        strict=True) if r.fits]
    by_name = {r.policy: r for r in results}

    def show(runner, r):
        if plot is not None:  # a timed step, with the memory its policy's metered steps had
            res = by_name[str(runner.policy)]
            record = replace(runner.last, step=memory_steps + r + 1, peak_bytes=res.peak_bytes,
                             saved_bytes=res.saved_bytes, recompute_flops=res.recompute_flops)
            plot(record)

    try:
        _interleaved(runners, steps, show)
    finally:
        for runner in runners:
            runner.close()
    tokens = batch_tokens(batch)
    for runner in runners:
        res = by_name[str(runner.policy)]
        res.times_s = runner.times
        res.step_time_s = statistics.median(runner.times)
        res.forward_time_s = statistics.median(runner.forward_times)
        res.tokens_per_s = tokens / res.step_time_s
    timed = [r for r in results if r.step_time_s is not None]
    reference = by_name.get("none") if by_name.get("none") in timed else (timed or [None])[0]
    for r in timed:
        r.time_ratio = r.step_time_s / reference.step_time_s
    if plot is not None:
        plot.close()
    seq = batch[0].shape[1] if batch[0].dim() > 1 else 1
    return Comparison(results, batch_size, seq, budget, reference.policy if reference else "-",
                      steps, plot)


def _measure_memory(base, policy, batch, batch_size, seq_len, budget, steps, seed, lr,
                    plot) -> PolicyResult:
    model = make_model(base)
    recompute = measure_recompute(model, batch, policy, seed)
    offload = 0
    if isinstance(policy, Offload):
        with applied(model, policy) as handle:
            model.loss(batch).backward()
        model.zero_grad(set_to_none=True)
        offload = handle.stats.bytes_to_host + handle.stats.bytes_to_device

    def on_step(record):
        record.recompute_flops = recompute.flops
        if plot is not None:
            plot(record)

    result = PolicyResult(str(policy), True, None, None, recompute.flops, recompute.step_flops,
                          offload, None)
    try:
        records = train(model, policy, steps=steps, batch_size=batch_size, seq_len=seq_len,
                        lr=lr, seed=seed, budget=budget, count_recompute=False, progress=False,
                        on_step=on_step)
    except torch.OutOfMemoryError:
        result.fits = False
        return result
    result.peak_bytes = max(r.peak_bytes for r in records)
    result.saved_bytes = records[-1].saved_bytes
    return result


# ---------------------------------------------------------------- forward / backward split
@dataclass
class StepSplit:
    """Median seconds of each part of a training step, measured in the same steps: medians
    over steps, not one step (hence not a ``StepRecord``)."""

    forward_s: float
    backward_s: float
    optimizer_s: float
    rounds: int
    step_s: float  # the whole step, timed on its own (clearing gradients included)

    @property
    def backward_over_forward(self) -> float:
        """The textbook says 2 (backward does two matmuls for each matmul of forward)."""
        return self.backward_s / self.forward_s

    @property
    def forward_share(self) -> float:
        """Forward's share of the step: what re-running one whole forward would add."""
        return self.forward_s / self.step_s

    def __str__(self) -> str:
        return (f"forward {self.forward_s * 1e3:.1f} ms, backward {self.backward_s * 1e3:.1f} ms "
                f"({self.backward_over_forward:.2f}x forward), optimizer "
                f"{self.optimizer_s * 1e3:.1f} ms; forward is {self.forward_share:.0%} of a step")


def measure_split(model_or_config=None, batch_size: int = 8, seq_len: int | None = None,
                  rounds: int = 7, policy="none", seed: int = 0, device=None) -> StepSplit:
    """Time forward, backward and the optimizer step in each of ``rounds`` steps (after one
    warm-up step); medians of each, and of the whole step."""
    model = make_model(model_or_config if model_or_config is not None else GPTConfig(), seed,
                       device).train()
    batch = _batch(model, batch_size, seq_len, seed, _device(model))
    optimizer = make_optimizer(model)
    with applied(model, policy):
        records = [run_step(model, optimizer, batch) for _ in range(rounds + 1)][1:]
    med = {k: statistics.median(r.phase_s[k] for r in records) for k in records[0].phase_s}
    return StepSplit(med["forward"], med["backward"], med["optimizer"], rounds,
                     statistics.median(r.time_s for r in records))


# ---------------------------------------------------------------- batch size under a budget
@dataclass
class SweepPoint:
    """A (policy, batch size) cell: the peak of metered steps and the median time of other,
    unmetered ones; several steps, not one (hence not a ``StepRecord``)."""

    policy: str
    batch_size: int
    peak_bytes: int
    fits: bool
    step_time_s: float | None = None
    tokens_per_s: float | None = None


def batch_sweep(model_or_config=None, policies=("none", "full"), batch_sizes=(2, 4, 8, 16),
                seq_len: int | None = None, budget=None, rounds: int = 3, seed: int = 0,
                device=None) -> list[SweepPoint]:
    """Peak memory (metered, exact) and tokens/s (unmetered, interleaved, medians) for every
    policy and batch size; sizes whose peak is over ``budget`` are measured but not timed."""
    policies = _policies(policies)
    budget = None if budget is None else parse_budget(budget)
    base = make_model(model_or_config if model_or_config is not None else GPTConfig(), seed,
                      device)
    points, runners = [], []
    for policy in policies:
        for b in batch_sizes:
            records = train(make_model(base), policy, steps=2, batch_size=b, seq_len=seq_len,
                            seed=seed, count_recompute=False, progress=False)
            peak = max(r.peak_bytes for r in records)
            point = SweepPoint(str(policy), b, peak, budget is None or peak <= budget)
            points.append(point)
            if point.fits:
                batch = _batch(base, b, seq_len, seed, _device(base))
                runners.append((point, _Runner(make_model(base), policy, batch)))
    try:
        _interleaved([r for _, r in runners], rounds)
    finally:
        for _, runner in runners:
            runner.close()
    for point, runner in runners:
        point.step_time_s = statistics.median(runner.times)
        point.tokens_per_s = batch_tokens(runner.batch) / point.step_time_s
    return points


def best_fit(points: list[SweepPoint], policy) -> SweepPoint | None:
    """The policy's largest batch that fits the budget."""
    name = str(parse_policy(policy))
    fitting = [p for p in points if p.policy == name and p.fits]
    return max(fitting, key=lambda p: p.batch_size, default=None)


# ---------------------------------------------------------------- one block of a big config
class _OneBlock(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.blocks = nn.ModuleList([block])

    def forward(self, x):
        return self.blocks[0](x)


def layer_memory(cfg: GPTConfig | LlamaConfig, batch_size: int, seq_len: int, policy="none",
                 dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes ONE block keeps alive for backward under ``policy`` (its input too, if kept), measured
    by a ``MemoryMeter`` on fake tensors (no memory used; a 70B layer takes a fraction of a
    second).

    Unlike the tape, the meter also sees what selective checkpointing keeps."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    policy = parse_policy(policy)
    if isinstance(policy, Offload):
        raise ValueError("offload keeps nothing on the device but parameter views; measure its "
                         "traffic with compare(), not layer_memory()")
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with FakeTensorMode():
            block = LlamaBlock(cfg) if isinstance(cfg, LlamaConfig) else GPTBlock(cfg)
            model = _OneBlock(block)
            # a leaf, like the embedding weight: the block input is the clone (a non-leaf; the
            # graph holds leaves for their .grad, so a leaf input would look "kept")
            leaf = torch.randn(batch_size, seq_len, cfg.d_model, requires_grad=True)
            meter = MemoryMeter()
            with applied(model, policy), meter:
                before = meter.track(model).count(leaf).live_bytes
                x = leaf.clone()
                y = model(x)
                del x  # its storage lives on only if the block saved it
                return meter.live_bytes - before - y.untyped_storage().nbytes()
    finally:
        torch.set_default_dtype(old)
