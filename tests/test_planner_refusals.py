"""Refusals and messages of the planner that held-out testers found wrong (issue 20: Q2, Q7-Q10,
P9, P10): each bad input is refused in one line naming the fix, before any work is done."""

import copy
import os
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint, checkpoint_sequential

from ckpt_course import cli, costs
from ckpt_course.auto import _course_model, auto_checkpoint
from ckpt_course.costs import MENU, measure_costs, measure_layer, measure_menu
from ckpt_course.op_choices import block_ops
from ckpt_course.plan import make_plan, measure_peaks, optimal_frontier, predict
from ckpt_course.policies import OpPositionError, _installed, applied, parse_policy


class Residual(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.norm, self.linear = nn.LayerNorm(width), nn.Linear(width, width)

    def forward(self, x):
        return x + torch.tanh(self.linear(self.norm(x)))


class Chain(nn.Module):
    """Embedding, three residual blocks, a head; ``again``: the code after the last block calls
    block 0 once more (Q10's model)."""

    def __init__(self, again=False, width=16):
        super().__init__()
        self.embed, self.head = nn.Linear(8, width), nn.Linear(width, 4)
        self.blocks = nn.ModuleList(Residual(width) for _ in range(3))
        self.again = again

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        if self.again:
            x = self.blocks[0](x)
        return self.head(x)


class OwnCheckpoint(Chain):
    """A learner's model that checkpoints its blocks itself, the way ``how`` says (Q7)."""

    def __init__(self, how):
        super().__init__()
        self.how = how

    def forward(self, x):
        x = self.embed(x)
        if self.how == "sequential":
            return self.head(checkpoint_sequential(self.blocks, 3, x, use_reentrant=False))
        for block in self.blocks:
            if self.how == "save_on_cpu":
                with torch.autograd.graph.save_on_cpu():
                    x = block(x)
            else:
                x = checkpoint(block, x, use_reentrant=self.how == "reentrant")
        return self.head(x)


@pytest.mark.parametrize("text, says", [
    ("menu:suffix=", "suffix= names no option: write suffix=full or selective:..."),
    ("menu:prefix=", "prefix= names no option: write prefix=full"),
    ("menu:0-1=full,suffix= ", "suffix= names no option"),
    ("menu:suffix=full,suffix=full", "suffix= is given twice: give it once"),
    ("menu:0-1=full,prefix=full,prefix=full", "prefix= is given twice: give it once"),
    ("menu:suffix=full,0=full,suffix=selective:ops=1", "suffix= is given twice"),
    ("menu:suffix=bogus", "the suffix runs full or selective:..."),
    ("menu:0=full,suffix=every-2", "the suffix runs full or selective:..."),
])
def test_an_empty_repeated_or_unknown_trunk_clause_is_refused_in_one_line(text, says):
    """Q8: an empty clause was dropped (``menu:suffix=`` read as ``menu:none``), a repeated one
    let the later win, and ``suffix=bogus`` listed the block policies the suffix refuses."""
    with pytest.raises(ValueError) as error:
        parse_policy(text)
    message = str(error.value)
    assert says in message and "\n" not in message
    assert "every-K" not in message  # not the block policies' list


def test_a_wrong_selective_suffix_still_says_what_is_wrong_with_its_ops():
    with pytest.raises(ValueError, match=r"unknown op name\(s\) \['zz'\]"):
        parse_policy("menu:suffix=selective:save=zz")


def test_a_block_called_inside_an_open_suffix_is_refused_in_forward_in_one_line():
    """Q10: the code after the last block calls block 0 again. Under ``suffix=full`` that call
    ran inside the suffix's checkpoint and backward failed with torch's multi-line
    CheckpointError; now forward stops at the call, and nothing was trained."""
    torch.manual_seed(0)
    model = Chain(again=True)
    with applied(model, "menu:suffix=full"), pytest.raises(RuntimeError) as error:
        model(torch.randn(4, 8)).sum().backward()
    message = str(error.value)
    assert message.startswith("block 0 ran after the last block, inside the checkpointed suffix")
    assert message.endswith("drop suffix=") and "\n" not in message
    assert all(p.grad is None for p in model.parameters())
    model(torch.randn(4, 8)).sum().backward()  # the policy is gone and nothing stayed open


@pytest.mark.parametrize("how, says", [
    ("non-reentrant", "block 0 runs inside torch.utils.checkpoint already: remove it and let "
                      "the planner choose"),
    ("reentrant", "block 0 runs inside torch.utils.checkpoint already"),
    ("sequential", "block 0 runs inside torch.utils.checkpoint already"),
    ("save_on_cpu", "block 0 runs under saved-tensor hooks the model sets"),
])
def test_a_model_that_checkpoints_its_own_blocks_is_refused_before_any_work(how, says):
    """Q7: such a model was measured as plain (its peak over-predicted by the blocks' saved
    tensors) and auto_checkpoint installed a second checkpoint inside its own. Refused in the
    measuring pass, by what runs (torch.utils.checkpoint's frames, saved-tensor hooks), for
    ``measure_costs`` and so for ``auto_checkpoint``; the learner's model is left as it was."""
    torch.manual_seed(0)
    model, batch = OwnCheckpoint(how), torch.randn(4, 8)
    before = copy.deepcopy(model.state_dict())
    for run in (lambda: measure_costs(_course_model(copy.deepcopy(model), batch, None), None),
                lambda: auto_checkpoint(model, 10**9, batch)):
        with pytest.raises(ValueError) as error:
            run()
        assert says in str(error.value) and "\n" not in str(error.value)
    assert all(torch.equal(t, before[name]) for name, t in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert not any("forward" in vars(block) for block in model.blocks)


def test_hooks_around_the_measurement_are_not_the_models_own():
    """The check compares with what surrounds the measuring pass: hooks a caller set around
    ``measure_costs`` (a lesson's tape) do not refuse a plain model."""
    torch.manual_seed(0)
    course = _course_model(Chain(), torch.randn(4, 8), None)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        assert measure_costs(course, None).n == 3


def _ops_run(policy: str, model: nn.Module, x: torch.Tensor) -> int:
    """How many ops the refusal of ``policy`` says its region runs; nothing is trained."""
    with applied(model, policy), pytest.raises(OpPositionError) as error:
        model(x).sum().backward()
    message = str(error.value)
    assert "\n" not in message and all(p.grad is None for p in model.parameters())
    return int(re.search(r"runs (\d+) ops \(positions 0-\d+\): name positions below", message)
               .group(1))


def test_an_op_position_beyond_the_blocks_ops_is_refused_naming_how_many_there_are():
    """P9: ``selective:ops=999`` kept nothing, silently: ``full`` under another name. Refused
    when the block's first forward ends (the count is known there), before any backward: the
    last position it names is accepted, the next refused, in a menu alike."""
    torch.manual_seed(0)
    model, x = Chain(), torch.randn(4, 8)
    n = _ops_run("selective:ops=999", model, x)
    assert max(op.index for op in block_ops(model.blocks[0], torch.randn(4, 16))) < n
    assert _ops_run(f"menu:1=selective:ops=0,{n}", model, x) == n
    with applied(model, f"selective:ops=0,{n - 1}"):
        model(x).sum().backward()  # the last position is one


def test_an_op_position_beyond_the_suffixs_ops_is_refused():
    """Q8: ``menu:suffix=selective:ops=999`` trained (the suffix has a handful of ops)."""
    torch.manual_seed(0)
    model, x = Chain(), torch.randn(4, 8)
    n = _ops_run("menu:suffix=selective:ops=999", model, x)
    with applied(model, f"menu:suffix=selective:ops={n - 1}"):
        model(x).sum().backward()
    with applied(model, "menu:suffix=selective:ops=999"), pytest.raises(
            OpPositionError, match="but the suffix runs"):
        model(x)


def test_measuring_an_op_position_the_block_lacks_is_refused_not_left_out():
    torch.manual_seed(0)
    course = _course_model(Chain(), torch.randn(4, 8), None)
    with pytest.raises(OpPositionError, match=r"selective:ops=999 names op position 999, but "
                                              r"the block runs \d+ ops"):
        measure_costs(course, None, menu=("selective:ops=999",))


@pytest.mark.parametrize("budget, says", [
    ("-5MiB", "budget must be a positive number of bytes"),
    ("-0.5GiB", "budget must be a positive number of bytes"),
    ("0", "budget must be a positive number of bytes"),
    ("1.5", "budget '1.5' is not a whole number of bytes: give whole bytes, or a unit (did you "
            "mean '1.5GiB'?)"),
    ("512", "budget '512' has no unit and is under 1 KiB"),
])
def test_a_bad_budget_on_the_command_line_gets_one_line_naming_the_fix(budget, says, capsys):
    """P10: ``--budget -5MiB`` got argparse's "expected one argument" (a dash-led value reads as
    an option), ``--budget 1.5`` measured the model and answered "more than the budget 1 B"."""
    with pytest.raises(SystemExit) as stop:
        cli.main(["plan", "--model", "gpt", "--layers", "1", "--budget", budget])
    assert stop.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing was measured or printed
    line = captured.err.strip().splitlines()[-1]
    assert line.startswith(f"ckpt-course plan: error: argument --budget: {says}"), line


def test_a_fraction_of_a_byte_is_refused_by_the_api_before_any_work():
    """``auto_checkpoint(model, 1.5, batch)`` said "nothing fits in 1 B" after measuring."""
    torch.manual_seed(0)
    model = Chain()
    with pytest.raises(ValueError, match=r"^budget 1\.5 is not a whole number of bytes: give "
                                         r"whole bytes, or a unit \(did you mean '1\.5GiB'\?\)$"):
        auto_checkpoint(model, 1.5, torch.randn(4, 8))
    assert not any("forward" in vars(block) for block in model.blocks)


class BigTrunk(nn.Module):
    """An embedding and an MLP before three small blocks, a 512-wide head after: the trunk
    holds most of the step, so ``prefix=full`` plans peak lowest (Q2's model)."""

    def __init__(self, width=32, vocab=512):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.pre = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(),
                                 nn.Linear(4 * width, width))
        self.blocks = nn.ModuleList(Residual(width) for _ in range(3))
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, vocab, bias=False)

    def forward(self, idx):
        x = self.embed(idx)
        x = x + self.pre(x)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def test_nothing_fits_quotes_the_lowest_peak_over_the_trunk_clauses_the_plan_weighs():
    """Q2: "nothing fits" quoted the lowest of the usual policies with the trunk as it is
    (every-3 here), while a ``prefix=full`` plan, which ``optimal`` plans over, peaks lower: a
    learner asked for more memory than they needed. Now the quote names the policy with its
    clauses, and it is no higher than the plain prefix=full plan."""
    torch.manual_seed(0)
    idx, targets = torch.randint(0, 512, (4, 16)), torch.randint(0, 512, (4, 16))
    course = _course_model(BigTrunk(), (idx, targets),
                           lambda out, batch: F.cross_entropy(out.flatten(0, 1),
                                                              batch[1].flatten()))
    costs = measure_costs(course, None, suffix=True)
    reachable = optimal_frontier(costs)[-1].peak_bytes  # the lowest any placement reaches
    plan = make_plan(costs, reachable - 1)
    assert not plan.fits
    name, low = plan.lowest_peak()
    assert low.peak_bytes <= predict(costs, "menu:0-2=full,prefix=full").peak_bytes
    assert "prefix=full" in name and predict(costs, name).peak_bytes == low.peak_bytes
    assert reachable <= low.peak_bytes < min(p.peak_bytes for p in plan.alternatives.values())
    assert f"({name}, at " in plan.advice()


class _Measured(Exception):
    """Stops ``costs_from_args`` at the measurement, with what it was asked to measure."""


def _measured_with(monkeypatch, argv: list[str]) -> tuple[dict, object]:
    import ckpt_course.costs

    def record(model, batch_size, seq_len, **kwargs):
        raise _Measured(kwargs)

    monkeypatch.setattr(ckpt_course.costs, "measure_costs", record)
    args = cli._parser().parse_args(argv)
    with pytest.raises(_Measured) as stop:
        cli.costs_from_args(args)
    return stop.value.args[0], args


def test_plan_trunk_measures_the_suffix_and_prefix_clauses_and_plans_by_flops(monkeypatch):
    """Q9: ``ckpt-course plan`` never measured the trunk's clauses, so the command and
    ``auto_checkpoint(..., trunk=True)`` could disagree on what fits. ``--trunk`` measures them
    (``measure_costs(..., suffix=True)``), and plans by FLOPs, the objective that weighs them."""
    asked, args = _measured_with(monkeypatch, ["plan", "--model", "gpt", "--trunk",
                                               "--budget", "1GiB"])
    assert asked["suffix"] is True and asked["times"] is False and args.objective == "flops"
    asked, args = _measured_with(monkeypatch, ["plan", "--model", "gpt", "--budget", "1GiB"])
    assert asked["suffix"] is False and asked["times"] is True  # unchanged without it


@pytest.mark.parametrize("argv, says", [
    (["--config", "tiny"], "--trunk applies to a course model measured for real (--model)"),
    (["--model", "gpt", "--objective", "time"], "--trunk weighs the suffix= and prefix= "
                                                "clauses by recomputed FLOPs: use --objective "
                                                "flops, or drop --trunk"),
])
def test_plan_trunk_where_it_cannot_apply_is_refused_before_any_work(argv, says, capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["plan", *argv, "--trunk", "--budget", "1GiB"])
    assert stop.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == "" and says in captured.err.strip().splitlines()[-1]


class EncoderDecoder(nn.Module):
    def __init__(self, width=16):
        super().__init__()
        self.embed, self.head = nn.Linear(8, width), nn.Linear(width, 4)
        self.encoder = nn.ModuleList(Residual(width) for _ in range(2))
        self.decoder = nn.ModuleList(Residual(width) for _ in range(2))

    def forward(self, x):
        x = self.embed(x)
        for block in [*self.encoder, *self.decoder]:
            x = block(x)
        return self.head(x)


def test_auto_checkpoint_says_which_of_two_equal_block_lists_it_planned():
    """N2: with an encoder and a decoder list as long, one was planned without a word."""
    torch.manual_seed(0)
    report = auto_checkpoint(EncoderDecoder(), 10**9, torch.randn(4, 8), op_points=0)
    assert "; planned the blocks of encoder, not those of decoder (as many): to plan another " \
           "list, pass layers='decoder'. report.undo()" in str(report)
    report.undo()
    model = EncoderDecoder()
    report = auto_checkpoint(model, 10**9, torch.randn(4, 8), op_points=0, layers="decoder")
    assert report.plan.costs.n == 2 and "planned the blocks of decoder, not those of encoder" \
        in str(report)
    assert all(_installed(b) is not None for b in model.decoder)
    assert all(_installed(b) is None for b in model.encoder)
    report.undo()
    report = auto_checkpoint(Chain(), 10**9, torch.randn(4, 8), op_points=0)
    assert "planned the blocks" not in str(report)
    report.undo()


@pytest.mark.parametrize("policy", ["full", "every-2", "menu:suffix=full"])
def test_measuring_a_model_under_a_policy_names_the_policy(policy):
    """Measured under ``full`` the blocks read as checkpointed ones; under ``every-2`` the new
    check above would blame the model's own hooks: the installed policy is named instead."""
    torch.manual_seed(0)
    course = _course_model(Chain(), torch.randn(4, 8), None)
    with applied(course, policy), pytest.raises(ValueError) as error:
        measure_costs(course, None)
    assert str(error.value).startswith(f"block 0 already runs under policy "
                                       f"'{parse_policy(policy)}': undo it first")
    assert str(error.value).endswith("then measure the model as it is")


# ---------------------------------------------------------------- blocks not measurable alone
class _KeepsAuxLoss(Residual):
    """Keeps its router's load-balancing loss on itself, with its graph (Switch / Mixtral
    style), for the model to add up after the blocks."""

    def forward(self, x):
        gate = torch.softmax(self.norm(x)[..., :4], -1)
        self.aux_loss = gate.mean(0).square().sum()
        return super().forward(x)


class _KeepsDetached(Residual):
    """Keeps a detached copy of its hidden state (for a plot): no graph, nothing to refuse."""

    def forward(self, x):
        self.seen = x.detach()
        return super().forward(x)


class _ScalesItsInput(Residual):
    def forward(self, x):
        x.mul_(0.9)
        return super().forward(x)


class _ScalesItsOwnTensor(Residual):
    """Changes a tensor it made itself in place: checkpointing recomputes it alike."""

    def forward(self, x):
        h = self.linear(self.norm(x))
        return x + h.tanh_()


class _MadeOf(Chain):
    def __init__(self, block, sum_aux=False):
        super().__init__()
        self.blocks = nn.ModuleList(block(16) for _ in range(3))
        self.sum_aux = sum_aux

    def forward(self, x):
        out = super().forward(x)
        if self.sum_aux:
            out = out + 0.01 * sum(block.aux_loss for block in self.blocks)
        return out


def _no_block_measured(*args, **kwargs):
    raise AssertionError("a block was measured before the refusal")


@pytest.mark.parametrize("make, says", [
    (lambda: _MadeOf(_KeepsAuxLoss, sum_aux=True),
     r"block \d \(_KeepsAuxLoss, self.aux_loss\) stores a tensor with a graph that the model "
     r"reads after the blocks .*: the planner measures each block alone.*detach"),
    (lambda: _MadeOf(_ScalesItsInput),
     r"block 0 \(_ScalesItsInput\) changes its input in place .*a checkpoint recomputes the "
     r"block from that input.*x = x \* 0.9"),
    (lambda: _MadeOf(_KeepsAuxLoss),  # S6: read by nobody, it still holds its graph
     r"block \d \(_KeepsAuxLoss, self.aux_loss\) keeps a tensor with a graph after the "
     r"forward .*drop it while planning"),
])
def test_a_block_that_cannot_be_measured_alone_is_refused_before_it_is_measured(
        make, says, monkeypatch):
    monkeypatch.setattr(costs, "measure_layer", _no_block_measured)
    torch.manual_seed(0)
    model = make()
    with pytest.raises(ValueError, match=says) as refused:
        auto_checkpoint(model, "1MiB", torch.randn(4, 8), op_points=0)
    assert "\n" not in str(refused.value)
    assert all(_installed(b) is None for b in model.blocks)
    with pytest.raises(ValueError, match=says):
        measure_costs(_course_model(make(), torch.randn(4, 8), None), None)


def test_a_block_changing_its_own_tensors_in_place_is_measured():
    torch.manual_seed(0)
    course = _course_model(_MadeOf(_ScalesItsOwnTensor), torch.randn(4, 8), None)
    costs = measure_costs(copy.deepcopy(course), None)
    for policy in ("none", "full"):
        assert predict(costs, policy).peak_bytes == measure_peaks(copy.deepcopy(course),
                                                                  policy)[-1]


class _Hooked(Chain):
    """A forward hook collecting every block's output (feature extraction, logging)."""

    def __init__(self):
        super().__init__()
        self.features = []
        for block in self.blocks:
            block.register_forward_hook(lambda m, i, out: self.features.append(out.detach()))

    def forward(self, x):
        self.features.clear()
        return super().forward(x)


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_memory_kept_outside_the_blocks_is_refused_with_or_without_accumulation(micro_batches):
    """R14 and S4: the plain-step check ran for one pass only; under accumulation the same
    model was planned up to 23% under the meter."""
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"memory model does not hold for _Hooked: it predicts "
                                         r"[\d,]+ B for a plain step, the meter measures"):
        auto_checkpoint(_Hooked(), "1MiB", torch.randn(4, 8), op_points=0,
                        micro_batches=micro_batches)


class _Log(Chain):
    def __init__(self):
        super().__init__()
        self.log = open(os.devnull, "w")  # noqa: SIM115 (held for the model's life)


def test_a_model_that_cannot_be_copied_is_named_in_one_line():
    """R22: auto_checkpoint and the plain-step check work on a copy; copy's traceback said
    nothing of why a copy was made."""
    model = _Log()
    try:
        for call in (lambda: auto_checkpoint(model, "1MiB", torch.randn(4, 8), op_points=0),
                     lambda: measure_costs(_course_model(model, torch.randn(4, 8), None), None)):
            with pytest.raises(ValueError, match=r"on a copy of the model, and its attribute log "
                                                 r"cannot be copied \(TypeError") as err:
                call()
            assert "\n" not in str(err.value)
    finally:
        model.log.close()


def test_compiled_blocks_are_refused_before_any_work():
    """R21: a torch.compile'd block crashed auto_checkpoint's verify step after measuring."""
    model = Chain()
    model.blocks = nn.ModuleList(torch.compile(b) for b in model.blocks)
    with pytest.raises(ValueError, match=r"block 0 is a torch.compile'd module, which a policy "
                                         r"cannot wrap: give the blocks uncompiled"):
        auto_checkpoint(model, "1MiB", torch.randn(4, 8), op_points=0)


def test_a_transformers_model_with_its_cache_on_is_refused_naming_use_cache():
    """S11: each layer filled a key/value cache with a graph; measuring crashed in backward."""
    from ckpt_course import hf

    lm = hf.build(hf.small_config(hf.load_config("llama-3.2-1b"), n_layer=2, seq_len=16)).lm
    ids = torch.randint(0, lm.config.vocab_size, (2, 16))
    lm.config.use_cache = True
    with pytest.raises(ValueError, match=r"^model.config.use_cache is True: .*set "
                                         r"model.config.use_cache = False for training"):
        auto_checkpoint(lm, "1GiB", ids, op_points=0)
    lm.config.use_cache = False
    report = auto_checkpoint(lm, "1GiB", ids, op_points=0)
    assert report.measured_peak == report.predicted_peak
    report.undo()


class _HalfAutocast(Chain):
    """Block 0 in fp32, the others under bf16 autocast: a segment's recompute would run them
    all under block 0's."""

    def forward(self, x):
        x = self.embed(x)
        for k, block in enumerate(self.blocks):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=k > 0):
                x = block(x)
        return self.head(x.float())


def test_segments_end_where_the_autocast_changes():
    """S5: predict priced segments across the change, which crash when run."""
    torch.manual_seed(0)
    course = _course_model(_HalfAutocast(), torch.randn(4, 8), None)
    costs = measure_costs(copy.deepcopy(course), None)
    with pytest.raises(ValueError, match=r"segment 0-1 runs past block 0, and block 1 runs "
                                         r"under another torch.autocast"):
        predict(costs, "segments:0-1")
    for policy in ("segments:1-2", "full", "none"):
        assert predict(costs, policy).peak_bytes == \
            measure_peaks(copy.deepcopy(course), policy)[-1], policy


def test_a_block_keeping_its_input_on_itself_is_refused_by_the_plain_step_check():
    """self.seen = x.detach() keeps each block's input past its time: no measured part shows
    it, the metered plain step does (by the size of the inputs kept), so nothing is planned."""
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"memory model does not hold for _MadeOf: it predicts "
                                         r"[\d,]+ B for a plain step, the meter measures "
                                         r"[\d,]+ B \(\+[\d,]+ B\)") as err:
        measure_costs(_course_model(_MadeOf(_KeepsDetached), torch.randn(4, 8), None), None)
    assert "\n" not in str(err.value)


class _GRUBlock(nn.Module):
    def __init__(self, width=16):
        super().__init__()
        self.rnn = nn.GRU(width, width, batch_first=True)

    def forward(self, x):
        return x + self.rnn(x)[0]


def _gradients(block, x, policy):
    block = copy.deepcopy(block)
    x = x.clone().requires_grad_()
    with applied(block, policy, blocks=[block]):
        block(x).square().sum().backward()
    return [p.grad for p in block.parameters()] + [x.grad]


def test_an_option_that_changes_a_blocks_gradients_is_left_out_and_named():
    """R18: torch's nn.GRU changes its gate matmul's output in place through views autograd
    does not check, so keeping that output (save=mm) hands the recompute changed values."""
    torch.manual_seed(0)
    block, x = _GRUBlock(), torch.randn(4, 8, 16)
    plain = _gradients(block, x, "none")
    changed = [p for p in ("selective:save=mm,sdpa", "selective:save=sdpa", "offload")
               if not all(torch.equal(a, b) for a, b in zip(plain, _gradients(block, x, p),
                                                              strict=True))]
    assert changed == ["selective:save=mm,sdpa"]  # torch's own checkpoint, no course code
    dropped = []
    menu = measure_menu(block, x, measure_layer(block, x), MENU, dropped=dropped)
    assert dropped == ["selective:save=mm,sdpa"]
    assert set(menu) == set(MENU) - {"selective:save=mm,sdpa"}
