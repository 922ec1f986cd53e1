"""Every check passes its solution and rejects at least two wrong answers of the kinds learners
write: constants, answers that ignore an argument, `<` for `<=`, a missed term, a checkpoint that
keeps the tape, offload hooks that keep the tensor, a planner that stops at one-block segments."""

import functools
import math
from pathlib import Path

import nbformat
import pytest
import torch

from ckpt_course import plan
from ckpt_course.authoring import tagged_name
from ckpt_course.checks import CheckFailed, Parts, expect, phase1, phase2, phase3, phase4, probes
from ckpt_course.models import TinyGPT

SOLUTIONS = Path(__file__).resolve().parents[1] / "solutions"


@functools.cache
def solution(stem: str) -> dict:
    """The names a solution notebook's answer cells define, after its first (import) cell; the
    other setup cells (measurements for the learner to read) are left out."""
    names: dict = {}
    threads = torch.get_num_threads()  # a notebook may pin it; the tests should not inherit that
    nb = nbformat.read(SOLUTIONS / f"{stem}.ipynb", as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    for cell in code[:1] + [c for c in code if tagged_name(c, "answer")]:
        exec(compile(cell.source, f"{stem}.ipynb", "exec"), names)  # noqa: S102
    torch.set_num_threads(threads)
    return names


def hand_trace(name):
    return solution("2_hand_trace")[name]


def choosing(name):
    return solution("3_choosing_a_policy")[name]


def changed(name, **edits):
    """The solution's ``name`` with some of its returned dict's entries recomputed by ``edits``:
    ``key=lambda got, *args: new value``."""
    def wrong(*args):
        got = dict(hand_trace(name)(*args))
        return {**got, **{k: f(got, *args) for k, f in edits.items()}}
    return wrong


def table_edit(policy, key, f):
    def wrong(width, depth):
        got = {p: dict(e) for p, e in hand_trace("predict_table")(width, depth).items()}
        got[policy][key] = f(got[policy][key], width, depth)
        return got
    return wrong


# ---------------------------------------------------------------- answers
def state(n, opt=8):
    return {"parameters": 4 * n, "gradients": 4 * n, "optimizer state": opt * n}


def pick(n_layers, act, budget, fits=lambda peak, budget: peak <= budget):
    ok = [n for n in range(1, n_layers + 1)
          if fits((math.ceil(n_layers / n) + n) * act, budget)]
    return max(ok) if ok else 1


class Hand(torch.autograd.Function):
    """The solution, with switches for the wrong versions."""

    rng, fork, no_grad = True, True, True

    @staticmethod
    def forward(ctx, block, x):
        ctx.block, ctx.state = block, torch.get_rng_state()
        if Hand.no_grad:
            ctx.save_for_backward(x)
            return block(x)
        with torch.enable_grad():  # keeps the whole tape alive through ctx
            xd = x.detach().requires_grad_(True)
            ctx.out, ctx.xd = block(xd), xd
        return ctx.out.detach()

    @staticmethod
    def backward(ctx, grad):
        if not Hand.no_grad:
            torch.autograd.backward(ctx.out, grad)
            return None, ctx.xd.grad
        (x,) = ctx.saved_tensors
        x = x.detach().requires_grad_(True)
        with torch.random.fork_rng(enabled=Hand.fork), torch.enable_grad():
            if Hand.rng:
                torch.set_rng_state(ctx.state)
            out = ctx.block(x)
        torch.autograd.backward(out, grad)
        return None, x.grad


def hand(**switches):
    def run(spec):
        old = {k: getattr(Hand, k) for k in switches}
        for k, v in switches.items():
            setattr(Hand, k, v)
        try:
            return probes.run_blocks(spec, Hand.apply)
        finally:
            for k, v in old.items():
                setattr(Hand, k, v)
    return run


def offload(pack_wrap=None, skip_params=True, dedupe=True):
    def hooks(host, params):
        pack, unpack = probes.reference_offload_hooks(host, params if skip_params else [])
        if not dedupe:
            ps = {p.untyped_storage().data_ptr() for p in params}

            def pack(t, host=host, ps=ps):
                return t if t.untyped_storage().data_ptr() in ps else host.put(t)
        return (pack_wrap(pack) if pack_wrap else pack), unpack
    return lambda spec: probes.run_offloaded(spec, hooks)


def keeps(pack):
    held = []

    def wrapped(t):
        held.append(t)
        return pack(t)
    return wrapped


def peak(chain, placement, grads=2):
    a, kept, top = chain["input"], 0, 0
    for i, j, c in placement:
        tapes = sum(b["tape"] for b in chain["blocks"][i:j])
        top = max(top, kept + tapes + grads * a)
        kept += a if c else tapes
    return top


def placements(n, i=0, longest=None):
    if i == n:
        yield []
        return
    for rest in placements(n, i + 1, longest):
        yield [[i, i + 1, False], *rest]
    for j in range(i + 1, min(n, i + (longest or n)) + 1):
        for rest in placements(n, j, longest):
            yield [[i, j, True], *rest]


def recompute(chain, p, last=True):
    b = chain["blocks"]
    tail = "recompute_flops" if last else "flops"
    return sum(sum(x["flops"] for x in b[i:j - 1]) + b[j - 1][tail] for i, j, c in p if c)


def planner(fits=lambda p, b: p <= b, longest=None, last=True, none_ok=True):
    def plan(chain, budget):
        ok = [p for p in placements(len(chain["blocks"]), longest=longest)
              if fits(peak(chain, p), budget)]
        if not ok and not none_ok:
            return [[0, len(chain["blocks"]), True]]
        return min(ok, key=lambda p: recompute(chain, p, last), default=None)
    return plan


def policy_of(plan):
    def my_policy(chain, budget):
        p = plan(chain, budget)
        return "segments:" + (",".join(f"{i}-{j - 1}" for i, j, c in p if c) or "none")
    return my_policy


@pytest.fixture(scope="module")
def measured():
    model = TinyGPT(phase3.BUDGET_CONFIG)
    rows = phase3._candidates()
    assert model is not None
    return {name: (peak_, flops) for peak_, flops, name in rows}


def choose(measured, fits=lambda p, b: p <= b, key=lambda pf: (pf[1], pf[0])):
    def choose_policy(budget):
        ok = [(name, pf) for name, pf in measured.items() if fits(pf[0], budget)]
        return min(ok, key=lambda t: key(t[1]))[0] if ok else "full"
    return choose_policy


A = 4  # bytes per float32

CASES = {
    "2.1-tape": (phase2.check_tape, lambda: hand_trace("predict_tape"), [
        lambda: changed("predict_tape", activations=lambda g, b, w, d: d * b * w * A),  # no x
        lambda: changed("predict_tape", parameters=lambda g, b, w, d: d * w * w * A),  # W1 too
        lambda: changed("predict_tape", saved_twice=lambda g, b, w, d: d),  # the last ReLU too
        lambda: lambda b, w, d: {"activations": 5 * 2**20, "parameters": 3 * 2**20,
                                 "saved_twice": 3}]),  # the lesson's numbers
    "2.2-every2": (phase2.check_every2_saved, lambda: hand_trace("every2_saved_bytes"), [
        lambda: lambda b, w, d: (d // 2 - 1) * b * w * A + A,  # floor: odd depths lose one
        lambda: lambda b, w, d: (-(-d // 2) - 1) * b * w * A,  # the loss forgotten
        lambda: lambda b, w, d: -(-d // 2) * b * w * A + A]),  # x counted
    "2.3-recompute": (phase2.check_recompute, lambda: hand_trace("predict_recompute"), [
        lambda: lambda p, relu_first, b, w, d: hand_trace("predict_recompute")(p, False, b, w, d),
        lambda: changed("predict_recompute", flops=lambda g, p, r, b, w, d: g["flops"] // 2),
        lambda: lambda p, r, b, w, d: hand_trace("predict_recompute")("full", r, b, w, d)]),
    "2.4-peak": (phase2.check_peak_moment, lambda: hand_trace("predict_peak"), [
        lambda: lambda f, b, w, d: {"layer": 2, "bytes": (d + 2) * b * w * A},  # as if A = W
        lambda: lambda f, b, w, d: hand_trace("predict_peak")(False, b, w, d),  # free ignored
        lambda: changed("predict_peak", bytes=lambda g, *args: g["bytes"] - 8),  # no crumbs
        lambda: changed("predict_peak", layer=lambda g, f, b, w, d: d if g["layer"] == 1
                        else g["layer"])]),  # layer 1's addmm forgotten
    "2.5-table": (phase2.check_policy_table, lambda: hand_trace("predict_table"), [
        lambda: table_edit("every-2", "saved", lambda v, w, d: v - (d % 2) * w * w * A),
        lambda: table_edit("none", "saved", lambda v, w, d: v - A),  # the loss forgotten
        lambda: table_edit("every-2", "peak", lambda v, w, d: v - 2 * w * w * A),  # "it drops"
        lambda: table_edit("full", "peak", lambda v, w, d: v - (d - 1) * w * A)]),  # no biases
    "1.1-state": (phase1.training_state_bytes, lambda: state, [
        lambda: lambda n: state(n, opt=4), lambda: lambda n: state(1000),
        lambda: lambda n: 16 * n]),
    "1.1-scaling": (phase1.activation_ratio, lambda: lambda b, s: b * s, [
        lambda: lambda b, s: b * s * s, lambda: lambda b, s: b, lambda: lambda b, s: 4]),
    "1.2-mlp": (phase1.mlp_saved_bytes, lambda: lambda b, t, d: 36 * b * t * d, [
        lambda: lambda b, t, d: 20 * b * t * d, lambda: lambda b, t, d: 9 * b * t * d,
        lambda: lambda b, t, d: 36 * 2 * 8 * 16]),
    "1.3-by-hand": (phase1.hand_checkpoint, lambda: hand(), [
        lambda: hand(rng=False), lambda: hand(fork=False), lambda: hand(no_grad=False),
        lambda: probes.plain]),
    "1.4-pick-n": (phase1.pick_n, lambda: pick, [
        lambda: lambda n, a, b: math.isqrt(n),
        lambda: lambda n, a, b: pick(n, a, b, fits=lambda p, b: p < b),
        lambda: lambda n, a, b: min(range(1, n + 1), key=lambda k: math.ceil(n / k) + k)]),
    "3.2-offload": (phase3.offload, lambda: offload(), [
        lambda: offload(pack_wrap=lambda pack: (lambda t: t)), lambda: offload(skip_params=False),
        lambda: offload(dedupe=False), lambda: offload(pack_wrap=keeps)]),
    "3.2-per-gpu": (phase3.per_gpu, lambda: lambda n, g, a: n * 12 / g + a, [
        lambda: lambda n, g, a: (n * 12 + a) / g, lambda: lambda n, g, a: n * 12 + a,
        lambda: lambda n, g, a: n * 16 / g + a]),
    "3.3-attention": (phase3.attention_extra, lambda: choosing("naive_extra_bytes"), [
        lambda: lambda b, h, t, p: 4 * b * h * t * t + t * t - 4 * b * h * t,  # dropout ignored
        lambda: lambda b, h, t, p: t * t if p else 4 * b * h * t * t - 4 * b * h * t,  # no mask
        lambda: lambda b, h, t, p: (12 if p else 4) * b * h * t * t + t * t - 4 * b * h * t,
        lambda: lambda b, h, t, p: t * t if p else 4 * b * h * t * t + b * h * t * t]),
    "3.4-save": (phase3.ops_to_save, lambda: lambda: {"mm", "sdpa"}, [
        lambda: lambda: {"mm"}, lambda: lambda: {"mm", "sdpa", "gelu"}, lambda: lambda: set()]),
    "4.1-peak": (phase4.chain_peak, lambda: peak, [
        lambda: lambda c, p: peak(c, p, grads=0),
        lambda: lambda c, p: peak([dict(c, input=0)][0], p) + 2 * c["input"] + 1,
        lambda: lambda c, p: sum(b["tape"] for b in c["blocks"]) + 2 * c["input"]]),
    "4.2-planner": (phase4.planner, lambda: planner(), [
        lambda: planner(fits=lambda p, b: p < b), lambda: planner(longest=1),
        lambda: planner(none_ok=False),
        lambda: planner(last=False)]),  # recompute_flops ignored: full flops for every block
    "4.3-capstone": (phase4.capstone, lambda: policy_of(planner()), [
        lambda: lambda c, b: "full", lambda: lambda c, b: "every-2",
        lambda: policy_of(planner(longest=1)), lambda: lambda c, b: "segments:0..4",
        lambda: policy_of(planner(last=False))]),
}


@pytest.mark.parametrize("check_id", sorted(CASES))
def test_the_solution_passes(check_id, capsys):
    check, right, _ = CASES[check_id]
    assert check(right()) is None
    assert "Correct" in capsys.readouterr().out


@pytest.mark.parametrize("check_id, k", [(c, k) for c in sorted(CASES)
                                         for k in range(len(CASES[c][2]))])
def test_a_wrong_answer_fails(check_id, k):
    check, _, wrong = CASES[check_id]
    try:
        score = check(wrong[k]())
    except CheckFailed:
        return
    assert score is not None and score < 1, f"wrong answer {k} of {check_id} scored full marks"


def test_every_check_has_at_least_two_wrong_answers():
    assert all(len(w) >= 2 for _, _, w in CASES.values())


def test_policy_for_budget_rejects_the_lowest_peak_and_strict_less(measured):
    phase3.policy_for_budget(choose(measured))
    strict = choose(measured, fits=lambda p, b: p < b)
    for wrong in (strict, choose(measured, key=lambda pf: pf[0])):
        with pytest.raises(CheckFailed):
            phase3.policy_for_budget(wrong)


def test_parts_give_partial_credit_and_print_the_missed_hints(capsys):
    parts = Parts()
    with parts("a"):
        expect(True, "")
    with parts("b"):
        expect(False, "missed b")
    assert parts.score() == 0.5 and "missed b" in capsys.readouterr().out
    none = Parts()
    with none("a"):
        expect(False, "missed a")
    with pytest.raises(CheckFailed, match="missed a"):
        none.score()


def test_the_lesson_chain_is_the_lesson_model_measured():
    chain = phase4.lesson_chain()
    cfg, batch = phase4.LESSON_CONFIG, phase4.LESSON_BATCH
    assert len(chain["blocks"]) == cfg.n_layer
    assert chain["input"] == batch * cfg.seq_len * cfg.d_model * 4  # one float32 block input
    assert all(b == chain["blocks"][0] for b in chain["blocks"])  # equal blocks


def _menu_optimum(chain, budget):
    """A learner who plans the blocks' options too (the package's planner on the chain)."""
    return str(plan.optimal(probes.chain_costs(chain), budget, "flops").policy)


def test_a_mix_of_options_is_accepted_and_judged_against_the_menus_optimum(capsys):
    chain, budget = phase4.lesson_chain(), phase4.lesson_budget()
    mix = _menu_optimum(chain, budget)
    assert "selective" in mix  # the lesson's budget is one where a mix beats a single level
    assert phase4.capstone(_menu_optimum) is None and "Correct" in capsys.readouterr().out
    everywhere = f"menu:0..{len(chain['blocks']) - 1}=selective:save=mm,sdpa"
    wrong = [lambda c, b: everywhere,  # keeps too much: does not fit
             lambda c, b: _menu_optimum(c, b).replace("save=mm,sdpa", "save=sdpa"),  # too dear
             lambda c, b: _menu_optimum(c, b).replace("selective:save=mm,sdpa", "offload")]
    for answer in wrong:
        with pytest.raises(CheckFailed):
            phase4.capstone(answer)
    with pytest.raises(CheckFailed, match="lists no options"):  # a random chain has none
        phase4.capstone(lambda c, b: _menu_optimum(chain, budget))


def test_a_policy_that_does_not_parse_gets_the_accepted_forms():
    with pytest.raises(CheckFailed, match="every-K"):
        phase4.capstone(lambda c, b: "checkpoint blocks 1 to 3")


@pytest.mark.parametrize("plain", [lambda: probes.plain, lambda: hand(no_grad=False)],
                         ids=["plain-forward", "forward-keeps-its-tape"])
def test_no_checkpoint_earns_nothing_for_output_gradients_or_rng(plain):
    """A plain forward gives the right output, gradients and random stream: that is not
    checkpointing, so the memory part gates the others (it once earned 2 of 3 points)."""
    with pytest.raises(CheckFailed, match="no points for output, gradients"):
        phase1.hand_checkpoint(plain())
