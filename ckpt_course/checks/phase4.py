"""Checks for phase 4, "Diagnose a real OOM and prescribe a policy" (exercises/4_*.ipynb).

The learner models and plans a chain of blocks given as plain numbers (``probes.chain_costs``
turns them into the package planner's ``ChainCosts``): ``{"input": bytes, "blocks": [{"tape":
bytes, "flops": n, "recompute_flops": n}, ...]}``. A block keeps its tape (input included) in a
plain run; a checkpointed segment keeps its input. The checks compare with ``plan.predict``,
``plan.optimal`` and ``plan.brute_force`` on chains and budgets drawn from the run's seed, so the
package's planner, which takes ``ChainCosts``, is of no use to an answer. A measured model's
chain also lists each block's menu options (``"options"``: selective variants, their tape and
recomputed FLOPs), so the capstone accepts a ``menu:`` mix judged against the menu's optimum.
"""

from __future__ import annotations

import functools

import torch

from ..costs import MENU, ChainCosts, measure_costs
from ..models import GPTConfig, TinyGPT, course_device, sized
from ..plan import (
    Menu,
    Segments,
    all_placements,
    brute_force,
    measure_peaks,
    optimal,
    predict,
)
from . import CheckFailed, call, expect, forbids, is_int, learner_policy, passed, rng
from .probes import chain_costs

# Build the planner: an answer may not use the package's (plan.predict, plan.optimal on
# probes.chain_costs) nor anything of the checks.
PLAN_RULES = ("ckpt_course.plan", "ckpt_course.checks")


def random_chain(r, n=None, ties=False, same_flops=False) -> dict:
    """A chain of plain numbers; ``ties``: every block the same, so many placements tie;
    ``same_flops``: blocks alike but for their ``recompute_flops`` (all different), so only the
    last block's recompute tells the placements apart."""
    n = n or r.randint(3, 7)
    a = 8 * r.randint(2, 6)
    same = {"tape": a + 8 * r.randint(3, 9), "flops": (f := r.randint(4 + n, 20 + n)),
            "recompute_flops": r.randint(1, f)}
    recomputes = r.sample(range(1, f + 1), n)

    def block():
        f = r.randint(2, 30)
        return {"tape": a + 8 * r.randint(1, 12), "flops": f, "recompute_flops": r.randint(1, f)}

    if same_flops:
        return {"input": a, "blocks": [dict(same, recompute_flops=c) for c in recomputes]}
    return {"input": a, "blocks": [dict(same) if ties else block() for _ in range(n)]}


def _placement(got, n: int):
    """The learner's placement as the package's tuple of (start, stop, checkpointed), or None."""
    try:
        out = tuple((int(a), int(b), bool(c)) for a, b, c in got)
    except (TypeError, ValueError):
        return None
    i = 0
    for a, b, _ in out:
        if a != i or b <= a:
            return None
        i = b
    return out if i == n else None


# ---------------------------------------------------------------- 4.1 the peak of a placement
@forbids(*PLAN_RULES)
def chain_peak(fn) -> None:
    """4.1: ``fn(chain, placement)`` -> the peak live bytes of one step, as ``plan.predict``."""
    r = rng("4.1-peak")
    for trial in range(6):
        chain = random_chain(r)
        n = len(chain["blocks"])
        placements = list(all_placements(n))
        placement = placements[r.randrange(len(placements))]
        if trial == 0:
            placement = tuple((k, k + 1, False) for k in range(n))
        elif trial == 1:
            placement = ((0, n, True),)
        want = predict(chain_costs(chain), placement).peak_bytes
        got = call(fn, chain, [list(s) for s in placement], name="chain_peak")
        expect(is_int(got), f"chain_peak(...) returned {got!r}: return bytes as an int")
        where = str(Segments(tuple((a, b) for a, b, c in placement if c)))
        if got == want:
            continue
        hint = (f"for {where}: the peak is in backward, when a segment's tapes are all alive "
                "(a checkpointed segment rebuilds every block's tape at once) on top of what the "
                "segments before it keep (a plain block its tape, a checkpointed segment only its "
                "input), plus the gradient arriving from above and the one being made")
        raise CheckFailed(hint)
    passed("the peak of a placement: the segments before keep, the segment rebuilds, two "
           "gradients on top")


# ---------------------------------------------------------------- 4.2 the planner
def _recompute_decides(chain) -> list[int]:
    """Budgets (exact peaks) at which every cheapest placement by the blocks' full forward FLOPs
    recomputes more than the optimum: only a planner that charges a segment's last block its
    ``recompute_flops`` finds the optimum there."""
    costs, blocks = chain_costs(chain), chain["blocks"]
    rows = [(p.peak_bytes, p.recompute_flops,
             sum(b["flops"] for i, j, c in p.placement if c for b in blocks[i:j]))
            for p in (predict(costs, q) for q in all_placements(costs.n))]
    out = []
    for budget in sorted({peak for peak, _, _ in rows}):
        fits = [(full, recompute) for peak, recompute, full in rows if peak <= budget]
        cheapest = min(full for full, _ in fits)
        if min(rc for full, rc in fits if full == cheapest) > min(rc for _, rc in fits):
            out.append(budget)
    return out


def _planner_cases(r):
    """(chain, budget): exact peaks of optimal placements (a peak equal to the budget fits),
    one byte below them, a budget nothing fits, one that only segments of several blocks fit,
    chains of equal blocks (ties), and chains alike but for ``recompute_flops`` at budgets where
    it decides the answer (a planner that charges every block its full forward fails there)."""
    cases = []
    for kind in ("same flops", "same flops", "random", "random", "ties"):
        if kind == "same flops":
            deciding = []
            while not deciding:  # most such chains have a deciding budget; draw until one does
                chain = random_chain(r, same_flops=True)
                deciding = _recompute_decides(chain)
            cases += [(chain, b) for b in r.sample(deciding, min(2, len(deciding)))]
            continue
        chain = random_chain(r, ties=kind == "ties")
        costs = chain_costs(chain)
        lowest = min(predict(costs, p).peak_bytes for p in all_placements(costs.n))
        highest = predict(costs, tuple((k, k + 1, False) for k in range(costs.n))).peak_bytes
        middle = r.randint(lowest, highest)
        best = optimal(costs, middle)
        cases += [(chain, best.peak_bytes), (chain, best.peak_bytes - 1), (chain, highest)]
        singles = min(predict(costs, p).peak_bytes for p in all_placements(costs.n)
                      if all(b - a == 1 for a, b, _ in p))
        if lowest < singles:  # a budget only a segment of several blocks fits
            cases.append((chain, r.randint(lowest, singles - 1)))
    cases.append((chain, lowest - 1))  # the ties chain: nothing fits
    return cases


@forbids(*PLAN_RULES)
def planner(fn) -> None:
    """4.2: ``fn(chain, budget)`` -> a placement (list of [start, stop, checkpointed]) whose
    peak fits ``budget`` with the least recompute, or None if nothing fits."""
    r = rng("4.2-planner")
    for chain, budget in _planner_cases(r):
        costs = chain_costs(chain)
        best = optimal(costs, budget)
        assert (best is None) == (brute_force(costs, budget) is None)
        got = call(fn, chain, budget, name="plan_placement")
        n = len(chain["blocks"])
        if best is None:
            expect(got is None, "with this budget no placement fits (not even checkpointing "
                   "every block), so return None rather than a placement that runs out of memory")
            continue
        expect(got is not None, "you returned None, but a placement fits this budget. A peak "
               "equal to the budget fits (<=, not <)")
        placement = _placement(got, n)
        expect(placement is not None, f"plan_placement returned {got!r}: return a list of "
               f"[start, stop, checkpointed] segments covering blocks 0..{n - 1} in order")
        p = predict(costs, placement)
        expect(p.peak_bytes <= budget, "your placement's peak is over the budget: compute each "
               "candidate's peak as in 4.1 before you pick it")
        expect(p.recompute_flops == best.recompute_flops,
               "your placement fits, but another one fits and recomputes less. Did you try "
               "segments of several blocks (one input kept for all of them)? And a checkpointed "
               "segment's last block recomputes only up to its last save (recompute_flops)")
    passed("the planner finds the cheapest placement that fits, at the boundary and on ties")


# ---------------------------------------------------------------- 4.3 the capstone
# The lesson's model and batch (notebooks/4_diagnose_a_real_oom.ipynb), and a smaller one the
# learner has not seen, for the capstone's runs.
LESSON_CONFIG = sized(cpu=GPTConfig(n_layer=6, d_model=64, n_head=4, seq_len=64),
                      gpu=GPTConfig(n_layer=12, d_model=256, n_head=8, seq_len=256))
LESSON_BATCH = sized(cpu=8, gpu=16)
# d_model 48 for a vocabulary of 256: the blocks, not the logits, set most placements' peaks
UNSEEN_CONFIG, UNSEEN_BATCH = GPTConfig(n_layer=5, d_model=48, n_head=4, seq_len=64), 4
POLICY_FORMS = ("'none', 'full', 'every-K' (K a whole number), or 'segments:...' with inclusive "
                "block numbers: 'a-b' one segment of blocks a to b, 'a..b' each of blocks a to b "
                "alone, 'a' block a alone, e.g. 'segments:0-2,5'; or a mix, 'menu:0-1=full,"
                "2=selective:save=sdpa', with the options a block lists")
# The options a measured chain lists per block: the menu's selective variants (FLOPs price them;
# offload, a copy, has no FLOP price, and this exercise's objective is recomputed FLOPs).
CHAIN_MENU = tuple(o for o in MENU if o.startswith("selective:"))


@functools.cache
def _measured(cfg: GPTConfig, batch: int) -> tuple[TinyGPT, ChainCosts]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = TinyGPT(cfg).to(course_device())
    return model, measure_costs(model, batch, menu=CHAIN_MENU)


def as_chain(costs: ChainCosts) -> dict:
    """A measured model's blocks as the exercise's plain numbers (its trunk, parameters and
    optimizer state left out), each with its menu's options (``"options"``)."""
    return {"input": costs.layers[0].input_bytes,
            "blocks": [{"tape": c.input_bytes + c.kept_bytes, "flops": c.forward_flops,
                        "recompute_flops": c.recompute_flops,
                        "options": {name: {"tape": c.input_bytes + o.layer.kept_bytes,
                                           "recompute_flops": o.recompute_flops}
                                    for name, o in menu.items()}}
                       for c, menu in zip(costs.layers, costs.menu, strict=True)]}


def lesson_chain() -> dict:
    """The lesson's model, measured here at this machine's lesson sizes (12 blocks on a GPU)."""
    return as_chain(_measured(LESSON_CONFIG, LESSON_BATCH)[1])


def _between_full_and_every2(chain: dict) -> int:
    costs = chain_costs(chain)
    full, every2 = predict(costs, "full").peak_bytes, predict(costs, "every-2").peak_bytes
    return full + (every2 - full) // 2


def lesson_budget() -> int:
    """The lesson chain's budget: halfway between what full and every-2 need, as in the lesson."""
    return _between_full_and_every2(lesson_chain())


def _run_budget(costs: ChainCosts, chain: dict, budget: int, extra=()) -> int | None:
    """The real bytes that stand for the chain's ``budget`` on the measured model: halfway
    between the highest real peak (``predict`` on the measured costs, which the meter matches to
    the byte) of a placement that fits ``budget`` and the lowest of one that does not; None when
    the model's trunk makes the two overlap. Every placement is tried up to 8 blocks; above (the
    GPU's 12-block lesson model) the package's optimum stands for those that fit, every-K for
    those that do not. ``extra``: placements tried too (a learner's mix of options)."""
    plain = chain_costs(chain)
    if costs.n <= 8:
        candidates = list(all_placements(costs.n))
    else:
        candidates = [optimal(chain_costs(chain, options=False), budget).placement, "full",
                      "none", *(f"every-{k}" for k in range(2, costs.n + 1))]
    candidates += list(extra)
    fit, over = [], []
    for p in candidates:
        real = predict(costs, p).peak_bytes
        (fit if predict(plain, p).peak_bytes <= budget else over).append(real)
    highest, lowest = max(fit), min(over, default=max(fit) * 2)
    return (highest + lowest) // 2 if highest < lowest else None


def _unseen_run(r) -> tuple[dict, int, int]:
    """The unseen model's chain, a chain budget where some block must be checkpointed and the
    real peaks of fitting and unfitting placements stand apart, and the real budget."""
    _, costs = _measured(UNSEEN_CONFIG, UNSEEN_BATCH)
    chain = as_chain(costs)
    plain = chain_costs(chain)
    peaks = sorted({predict(plain, p).peak_bytes for p in all_placements(costs.n)})  # single
    usable = [(b, real) for b in peaks[:-1] if (real := _run_budget(costs, chain, b))]
    budget, real = usable[r.randrange(len(usable))]
    return chain, budget, real


def _placement_of(policy: str, chain: dict, which: str):
    """The learner's policy as a placement of ``chain``, and whether it mixes in options."""
    blocks = chain["blocks"]
    listed = sorted({o for b in blocks for o in b.get("options", {})})
    offered = (f"this chain's blocks list {', '.join(listed)}" if listed else
               "this chain lists no options: its blocks run plain or full")
    try:
        parsed = learner_policy(policy, largest=max(len(blocks), 64))
        mixes = isinstance(parsed, Menu) and any(o != "full" for _, _, o, _ in parsed.items)
        for a, _, option, _ in parsed.items if mixes else ():
            if option != "full" and a < len(blocks) and option not in blocks[a].get("options", {}):
                raise CheckFailed(f"on {which}, block {a} offers no {option}: {offered}")
        return predict(chain_costs(chain, options=mixes), parsed).placement, mixes
    except (TypeError, ValueError) as e:
        raise CheckFailed(f"on {which}, {policy!r} is not a policy for this chain ({e}); write "
                          f"{POLICY_FORMS}") from None


def _judge(chain: dict, budget: int, which: str, policy):
    """A policy fits the chain's budget and recomputes at most 10% over the optimum of its own
    search: the single-level one for plain and full blocks, the menu's for a mix of options."""
    expect(isinstance(policy, str), f"my_policy returned {policy!r}: return a policy string, "
           f"{POLICY_FORMS}")
    placement, mixes = _placement_of(policy, chain, which)
    costs = chain_costs(chain, options=mixes)
    best, p = optimal(costs, budget, "flops"), predict(costs, placement)
    expect(p.peak_bytes <= budget, f"on {which}, {policy} runs out of memory: which blocks' "
           "tapes are alive at the peak? A checkpointed segment of several blocks rebuilds "
           "all their tapes at once when its backward starts")
    expect(p.recompute_flops <= 1.1 * best.recompute_flops,
           f"on {which}, {policy} fits but recomputes more than 10% above the cheapest "
           + ("mix of the blocks' options" if mixes else "placement") + " that fits: which "
           "block's tape is freed first in backward? Does it need checkpointing at all?")
    return policy, placement, mixes


@forbids(*PLAN_RULES)
def capstone(fn) -> None:
    """4.3: ``fn(chain, budget)`` -> a policy string (``"segments:..."``, ``"full"``,
    ``"every-2"``, ..., or a ``"menu:..."`` mix of the options a measured chain's blocks list)
    that fits with at most 10% more recompute than the optimum of its own search: on the
    lesson's chain and budget, on chains and budgets the learner has not seen, then RUN on the
    lesson's model and on an unseen smaller one (``measure_peaks``, two AdamW steps) under the
    real bytes that stand for the chain's budget (``_run_budget``)."""
    r = rng("4.3-capstone")
    cases = [(lesson_chain(), lesson_budget(), "the lesson's model")]
    for k in range(4):
        chain = random_chain(r, n=r.randint(5, 8))
        costs = chain_costs(chain)
        full = predict(costs, "full").peak_bytes
        none = predict(costs, "none").peak_bytes
        singles = min(predict(costs, p).peak_bytes for p in all_placements(costs.n)
                      if all(b - a == 1 for a, b, _ in p))
        lowest = min(predict(costs, p).peak_bytes for p in all_placements(costs.n))
        budget = (r.randint(lowest, singles - 1) if k == 0 and lowest < singles
                  else r.randint(full, none))  # first: only a segment of several blocks fits
        cases.append((chain, budget, "a chain you have not seen"))
    judged = [_judge(*case, call(fn, *case[:2], name="my_policy")) for case in cases]
    lesson_model, lesson_costs = _measured(LESSON_CONFIG, LESSON_BATCH)
    unseen_chain, unseen_budget, unseen_real = _unseen_run(r)
    unseen = call(fn, unseen_chain, unseen_budget, name="my_policy")
    _, unseen_placement, unseen_mixes = _judge(unseen_chain, unseen_budget,
                                               "a model you have not seen", unseen)
    unseen_model, unseen_costs = _measured(UNSEEN_CONFIG, UNSEEN_BATCH)
    if unseen_mixes:  # the real bytes that stand for the budget, with the learner's mix tried
        unseen_real = (_run_budget(unseen_costs, unseen_chain, unseen_budget, [unseen_placement])
                       or predict(unseen_costs, unseen_placement).peak_bytes)
    (chain, budget, _), (lesson_policy, lesson_placement, lesson_mixes) = cases[0], judged[0]
    # the lesson's budget stands apart from every real peak at the CPU sizes; should the trunk
    # ever blur it, the highest real peak that fits is the budget (a right plan still fits)
    lesson_real = (_run_budget(lesson_costs, chain, budget, [lesson_placement] * lesson_mixes)
                   or predict(lesson_costs, lesson_placement if lesson_mixes else optimal(
                       chain_costs(chain, options=False), budget).placement).peak_bytes)
    runs = [(lesson_model, LESSON_BATCH, lesson_policy, lesson_real, "the lesson's model"),
            (unseen_model, UNSEEN_BATCH, unseen, unseen_real, "a model you have not seen")]
    for model, batch, policy, real_budget, which in runs:
        peak = max(measure_peaks(model, policy, batch_size=batch))
        expect(peak <= real_budget,
               f"run on {which}, {policy} peaked above the budget: the plain numbers leave out "
               "the trunk, parameters and optimizer state, which are the same for every "
               "placement; did your policy fit the chain's budget with the least recompute?")
    passed("your policies fit and recompute near the least, on the lesson's model and on chains "
           "you had not seen, and they fit when run on the lesson's model and on another")
