"""Checks for phase 4, "Diagnose a real OOM and prescribe a policy" (exercises/4_*.ipynb).

The learner models and plans a chain of blocks given as plain numbers (``probes.chain_costs``
turns them into the package planner's ``ChainCosts``): ``{"input": bytes, "blocks": [{"tape":
bytes, "flops": n, "recompute_flops": n}, ...]}``. A block keeps its tape (input included) in a
plain run; a checkpointed segment keeps its input. The checks compare with ``plan.predict``,
``plan.optimal`` and ``plan.brute_force`` on chains and budgets drawn from the run's seed, so the
package's planner, which takes ``ChainCosts``, is of no use to an answer.
"""

from __future__ import annotations

from ..plan import Segments, all_placements, brute_force, optimal, predict
from . import CheckFailed, call, expect, is_int, passed, rng
from .probes import chain_costs


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
def _recompute(chain, placement) -> int:
    return predict(chain_costs(chain), placement).recompute_flops


def _planner_cases(r):
    """(chain, budget): exact peaks of optimal placements (a peak equal to the budget fits),
    one byte below them, a budget nothing fits, one that only segments of several blocks fit,
    chains of equal blocks (ties), and chains where only ``recompute_flops`` tells the
    placements apart (a planner that charges every block its full forward fails there)."""
    cases = []
    for kind in ("random", "random", "ties", "same flops", "same flops"):
        chain = random_chain(r, ties=kind == "ties", same_flops=kind == "same flops")
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
    cases.append((chain, lowest - 1))
    return cases


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
# The lesson's model (TinyGPT, 6 blocks, d_model 64, seq 64, batch 8, on CPU) as plain numbers:
# measure_costs' input bytes, input + kept bytes, forward and recompute FLOPs of each (equal)
# block; tests/test_wrong_answers.py measures them again. Its budget sits between full's and
# every-2's predicted peaks, as in the lesson.
LESSON_CHAIN = {"input": 131072, "blocks": [
    {"tape": 2113536, "flops": 58720256, "recompute_flops": 41943040} for _ in range(6)]}


def lesson_budget() -> int:
    costs = chain_costs(LESSON_CHAIN)
    full, every2 = predict(costs, "full").peak_bytes, predict(costs, "every-2").peak_bytes
    return full + (every2 - full) // 2


def capstone(fn) -> None:
    """4.3: ``fn(chain, budget)`` -> a policy string (``"segments:..."``, ``"full"``,
    ``"every-2"``, ...) that fits with at most 10% more recompute than the optimum; on the
    lesson's chain and budget, and on chains and budgets the learner has not seen."""
    r = rng("4.3-capstone")
    cases = [(LESSON_CHAIN, lesson_budget())]
    for _ in range(3):
        chain = random_chain(r, n=r.randint(5, 8))
        costs = chain_costs(chain)
        full = predict(costs, "full").peak_bytes
        none = predict(costs, "none").peak_bytes
        cases.append((chain, r.randint(full, none)))
    for k, (chain, budget) in enumerate(cases):
        costs = chain_costs(chain)
        best = optimal(costs, budget)
        got = call(fn, chain, budget, name="my_policy")
        which = "the lesson's model" if k == 0 else "a chain you have not seen"
        expect(isinstance(got, str), f"my_policy returned {got!r}: return a policy string such as "
               "'segments:0..4' or 'every-2'")
        try:
            p = predict(costs, got)
        except ValueError as e:
            raise CheckFailed(f"on {which}, {got!r} is not a whole-block policy: {e}") from None
        expect(p.peak_bytes <= budget, f"on {which}, {got} runs out of memory: which blocks' "
               "tapes are alive at the peak? A checkpointed segment of several blocks rebuilds "
               "all their tapes at once when its backward starts")
        expect(p.recompute_flops <= 1.1 * best.recompute_flops,
               f"on {which}, {got} fits but recomputes more than 10% above the cheapest "
               "placement that fits: which block's tape is freed first in backward? Does it need "
               "checkpointing at all?")
    passed("your policies fit and recompute near the least, on the lesson's model and on chains "
           "you had not seen")
