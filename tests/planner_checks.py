"""The held-out planner tests' one check: which placements the planner's prediction or
gradients get wrong, each metered on a fresh copy of the model."""

from __future__ import annotations

import copy

from ckpt_course.plan import measure_peaks, placement_policy, predict
from ckpt_course.train import check_gradients


def off_the_meter(course, costs, policies) -> list[tuple[str, int]]:
    """(policy, metered - predicted) for each policy (or placement) whose predicted peak is not
    the meter's or whose gradients differ from plain's; [] when all hold."""
    wrong = []
    for policy in policies:
        policy = policy if isinstance(policy, str) else str(placement_policy(policy))
        predicted = predict(costs, policy).peak_bytes
        measured = measure_peaks(copy.deepcopy(course), policy)[-1]
        if predicted != measured or not check_gradients(course, policy).equal:
            wrong.append((policy, measured - predicted))
    return wrong
