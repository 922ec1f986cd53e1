"""The suffix (final norm, head, loss) as a checkpointable part of the chain: spelled in the one
policy vocabulary (``menu:...,suffix=full``), predicted to the byte for every option, gradients
bit-identical, chosen by the planner where it pays, and on a learner's own model ending where
the model returns (the learner's loss is their own code)."""

import random
from dataclasses import replace

import pytest
import torch
from torch import nn

from ckpt_course.costs import measure_costs
from ckpt_course.models import GPTConfig, TinyGPT
from ckpt_course.op_choices import block_ops, pareto, suffix_ops, thin
from ckpt_course.plan import (
    all_placements,
    brute_force,
    measure_peaks,
    optimal,
    placement_policy,
    predict,
)
from ckpt_course.policies import Menu, applied, parse_policy
from ckpt_course.train import check_gradients


def test_the_suffix_clause_reads_back_and_a_wrong_one_is_refused_in_one_line():
    for text in ("menu:0-1=full,suffix=full", "menu:suffix=selective:ops=3,5",
                 "menu:0=offload,2..3=selective:save=mm,sdpa,suffix=full"):
        assert str(parse_policy(text)) == text
        assert str(parse_policy(str(parse_policy(text)))) == text
    assert parse_policy("menu:suffix=selective:ops=5,3").suffix == "selective:ops=3,5"
    assert placement_policy(((0, 2, True),), "full") == Menu(((0, 2, "full", ()),), "full")
    assert str(placement_policy(((0, 1, False),), "")) == "segments:none"  # unchanged without
    text = "menu:0-1=full,3=offload,prefix=full,suffix=full"
    assert str(parse_policy(text)) == text and parse_policy(text).prefix == "full"
    for wrong in ("menu:suffix=offload", "menu:0=full,suffix=every-2", "menu:suffix=sqrt",
                  "menu:1-2=full,prefix=full", "menu:0=offload,prefix=full",
                  "menu:0=full,prefix=yes"):
        with pytest.raises(ValueError, match="suffix|prefix") as error:
            parse_policy(wrong)
        assert "\n" not in str(error.value)


@pytest.fixture(scope="module")
def gpt3():
    """Three blocks, a vocabulary whose logits outweigh a block's input, and dropout (the
    prefix's draws must be replayed for the suffix's recompute)."""
    torch.manual_seed(0)
    model = TinyGPT(GPTConfig(n_layer=3, d_model=32, n_head=2, seq_len=32, vocab_size=1024,
                              dropout=0.1))
    return model, measure_costs(model, 2, suffix=True, op_points=2)


def test_the_suffix_options_measured_are_full_and_the_zero_flop_point(gpt3):
    model, costs = gpt3
    options = [t.suffix for t in costs.suffixes]
    assert options[0] == "full" and len(options) == 2
    zero = costs.suffixes[1]
    ops = {o.index: o.op for o in suffix_ops(model, model.example_batch(2), torch.zeros(2, 32, 32))}
    kept = parse_policy(zero.suffix).indices
    assert [ops[k] for k in kept] == ["aten.mm"]  # the head's output; norm, log-softmax again
    assert zero.recompute_flops == 0 < costs.suffixes[0].recompute_flops  # full re-runs the head
    assert costs.suffixes[0].recompute_flops == 2 * 2 * 32 * 32 * 1024  # one matmul, counted
    assert all(t.flops == costs.trunk.flops for t in costs.suffixes)


@pytest.mark.slow  # 3 suffixes x 9 placements, metered and checked for gradients: ~20 s
def test_every_suffix_option_is_predicted_to_the_byte_with_identical_gradients(gpt3):
    model, costs = gpt3
    placements = random.Random(0).sample(list(all_placements(3)), 9)
    assert _wrong(model, costs, [placement_policy(placement, trunk.suffix)
                                 for trunk in (costs.trunk, *costs.suffixes)
                                 for placement in placements]) == []


def _wrong(model, costs, policies) -> list:
    """The policies whose predicted peak is not the meter's, or whose gradients differ."""
    wrong = []
    for policy in policies:
        predicted = predict(costs, policy).peak_bytes
        measured = measure_peaks(model, policy, 2)[-1]
        equal = check_gradients(model, policy, 2).equal
        if predicted != measured or not equal:
            wrong.append((str(policy), predicted - measured, equal))
    return wrong


def test_a_few_suffix_placements_are_exact(gpt3):
    """The fast subset of the test above (suffix full and the zero-FLOP point, on a plain and
    on a checkpointed last block)."""
    model, costs = gpt3
    for policy in ("menu:suffix=full", "menu:1-2=full,suffix=full",
                   f"menu:2=full,suffix={costs.suffixes[1].suffix}"):
        assert predict(costs, policy).peak_bytes == measure_peaks(model, policy, 2)[-1]
        assert check_gradients(model, policy, 2).equal


def test_a_checkpointed_suffix_keeps_less_but_its_recompute_peaks_the_same(gpt3):
    """Measured: the suffix full keeps only the last block's output, yet its backward starts
    by recomputing what it dropped, so the step peaks where it did; the planner (by peak) then
    never pays for it. What it keeps less shows in saved bytes (bench/planner_compile.py)."""
    _, costs = gpt3
    plain, full = costs.trunk, costs.suffixes[0]
    assert full.suffix_kept_free < plain.suffix_kept_free - 200_000
    assert (full.suffix_kept_free + full.suffix_backward_peak_free
            >= plain.suffix_kept_free + plain.suffix_backward_peak_free)
    peaks = sorted({predict(costs, p).peak_bytes for p in all_placements(3)})
    for budget in peaks:
        assert optimal(costs, budget, "flops").suffix == ""


def test_given_a_suffix_option_that_peaks_lower_the_planner_takes_it_and_pays_its_recompute(
        gpt3):
    """On given numbers: a suffix option whose backward peaks 400 kB lower is chosen exactly
    where nothing else fits, and its recompute is added to the plan's."""
    _, costs = gpt3
    full = replace(costs.suffixes[0], prefix_recomputable=False)  # the suffix alone here
    lower = replace(full, suffix_backward_peak_free=full.suffix_backward_peak_free - 400_000,
                    suffix_backward_peak_held=full.suffix_backward_peak_held - 400_000)
    costs = replace(costs, trunk=replace(costs.trunk, prefix_recomputable=False), suffixes=())
    given = replace(costs, suffixes=(lower,))
    without = min(predict(costs, p).peak_bytes for p in all_placements(3))
    assert optimal(given, without, "flops").suffix == ""  # fits without: not paid for
    best = optimal(given, without - 1, "flops")
    assert best.suffix == "full" and "suffix=full" in str(best.policy)
    assert best.recompute_flops == predict(given, best.policy).recompute_flops
    assert best.recompute_flops >= full.recompute_flops > 0
    brute = brute_force(given, without - 1, "flops")
    assert (brute.recompute_flops, brute.peak_bytes, brute.suffix) == (
        best.recompute_flops, best.peak_bytes, best.suffix)


def test_the_plan_over_trunk_options_is_brute_forces(gpt3):
    _, costs = gpt3
    peaks = sorted({predict(costs, placement_policy(p, t.suffix, prefix)).peak_bytes
                    for t in (costs.trunk, *costs.suffixes) for prefix in ("", "full")
                    for p in all_placements(3) if not prefix or p[0][2] is True})
    for budget in peaks[::max(1, len(peaks) // 8)] + [peaks[-1]]:
        best, brute = optimal(costs, budget, "flops"), brute_force(costs, budget, "flops")
        assert (best.recompute_flops, best.peak_bytes) == (brute.recompute_flops,
                                                           brute.peak_bytes)
    with pytest.raises(ValueError, match="measure_costs"):
        predict(measure_costs(TinyGPT(GPTConfig(n_layer=1, d_model=16, n_head=2, seq_len=8)),
                              1), "menu:suffix=full")


def test_thinning_keeps_the_zero_flop_point_of_a_block():
    """The point that recomputes no FLOPs (every free op again, every matmul and attention
    output kept) is what matches compile at a high budget: thinning always keeps it."""
    torch.manual_seed(0)
    block = TinyGPT(GPTConfig(n_layer=1, d_model=32, n_head=2, seq_len=16)).blocks[0]
    front = pareto(block_ops(block, torch.randn(2, 16, 32, requires_grad=True)))
    least = min(c.recompute_flops for c in front)
    assert least == 0
    for points in range(1, 7):
        assert min(c.recompute_flops for c in thin(front, points)) == least


class Net(nn.Module):
    """A learner's own model: blocks, a final norm and a head; no loss of its own."""

    def __init__(self, width=16, classes=256):
        super().__init__()
        self.embed = nn.Linear(8, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.Tanh())
                                    for _ in range(3))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def test_on_a_learners_model_the_suffix_ends_where_the_model_returns():
    """The learner's loss is outside: the suffix is the norm and the head, so the checkpoint
    drops the norm's output, and any loss on the output gets the gradients of no policy."""
    torch.manual_seed(0)
    model, x = Net(), torch.randn(64, 8)
    target = torch.randint(0, 256, (64,))

    def grads_and_saved(policy):
        saved, params = {}, {id(p.untyped_storage()) for p in model.parameters()}

        def pack(t):
            if id(t.untyped_storage()) not in params:
                saved[id(t.untyped_storage())] = t.untyped_storage().nbytes()
            return t

        with applied(model, policy), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = nn.functional.cross_entropy(model(x), target)
        loss.backward()
        out = [p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
        return out, sum(saved.values())

    plain, plain_saved = grads_and_saved("none")
    checkpointed, saved = grads_and_saved("menu:suffix=full")
    assert all(torch.equal(a, b) for a, b in zip(plain, checkpointed, strict=True))
    assert plain_saved - saved == 64 * 16 * 4 + 2 * 64 * 4  # the norm's output and statistics
    assert "forward" not in vars(model) and "loss" not in vars(model)  # undone


def _first_checkpointed(n):
    return [p for p in all_placements(n) if p[0][2] is True]


def test_the_prefix_inside_block_0s_checkpoint_is_exact_and_lowers_the_peak(gpt3):
    """prefix=full: the embeddings run inside the checkpointed segment at block 0, which keeps
    the batch only; predicted to the byte, gradients identical (dropout included), and the
    lowest peak of this model needs it."""
    model, costs = gpt3
    assert costs.trunk.prefix_recomputable
    for policy in ("menu:0=full,prefix=full", "menu:0-1=full,prefix=full,suffix=full"):
        assert predict(costs, policy).peak_bytes == measure_peaks(model, policy, 2)[-1]
        assert check_gradients(model, policy, 2).equal
    without = min(predict(costs, placement_policy(p, t.suffix)).peak_bytes
                  for t in (costs.trunk, *costs.suffixes) for p in all_placements(3))
    best = optimal(costs, without - 1, "flops")
    assert best is not None and best.prefix == "full" and "prefix=full" in str(best.policy)
    assert measure_peaks(model, best.policy, 2)[-1] == best.peak_bytes
    with pytest.raises(ValueError, match="block 0"):
        predict(costs, "menu:1=full,prefix=full")


@pytest.mark.slow  # 3 suffixes x 8 placements, metered and checked for gradients: ~20 s
def test_every_prefix_placement_is_predicted_to_the_byte_with_identical_gradients(gpt3):
    model, costs = gpt3
    assert _wrong(model, costs, [placement_policy(placement, trunk.suffix, "full")
                                 for trunk in (costs.trunk, *costs.suffixes)
                                 for placement in _first_checkpointed(3)]) == []


def test_on_a_learners_model_the_prefix_runs_inside_block_0s_checkpoint():
    torch.manual_seed(0)
    model, x = Net(), torch.randn(64, 8)

    def grads(policy):
        with applied(model, policy):
            loss = model(x).logsumexp(-1).mean()
        loss.backward()
        out = [p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
        return out

    plain = grads("none")
    for policy in ("menu:0=full,prefix=full", "menu:0-2=full,prefix=full,suffix=full"):
        assert all(torch.equal(a, b) for a, b in zip(plain, grads(policy), strict=True))


@pytest.mark.slow  # auto_checkpoint measures the menu and op-level points twice: seconds
def test_auto_checkpoint_installs_a_trunk_clause_and_undoes_it():
    from ckpt_course.auto import auto_checkpoint

    torch.manual_seed(0)
    model = TinyGPT(GPTConfig(n_layer=3, d_model=32, n_head=2, seq_len=32, vocab_size=1024))
    batch = model.example_batch(2, generator=torch.Generator().manual_seed(0))
    generous = auto_checkpoint(model, 10**9, batch, trunk=True)
    generous.undo()
    costs = generous.plan.costs
    without = min(predict(costs, p).peak_bytes for p in all_placements(3, costs))
    report = auto_checkpoint(model, without - 1, batch, trunk=True)
    try:
        assert "prefix=full" in str(report.policy) and "prefix=full" in str(report)
        assert report.measured_peak == report.predicted_peak <= without - 1
        assert "loss" in vars(model)  # the trunk's entry: the model's own loss, wrapped
    finally:
        report.undo()
    assert "loss" not in vars(model) and "forward" not in vars(model.blocks[0])


def test_auto_checkpoint_leaves_the_trunk_alone_unless_asked():
    """A trunk clause re-runs the model's own code around the blocks in backward: a forward
    with side effects would do them twice, so auto_checkpoint weighs it only when asked."""
    from ckpt_course.auto import auto_checkpoint

    torch.manual_seed(0)
    model = TinyGPT(GPTConfig(n_layer=3, d_model=32, n_head=2, seq_len=32, vocab_size=1024))
    batch = model.example_batch(2, generator=torch.Generator().manual_seed(0))
    report = auto_checkpoint(model, 10**9, batch, op_points=0)
    try:
        assert not report.plan.costs.suffixes
        assert "suffix=" not in str(report.policy) and "prefix=" not in str(report.policy)
    finally:
        report.undo()
