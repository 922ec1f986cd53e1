"""Lesson 3b's checks: each passes its solution and rejects the wrong answers learners write (the
pitfall itself handed back as the fix, a fix that stops checkpointing, the wrong pitfall's
name, a fix that changes forward)."""

import pytest

from ckpt_course.checks import CheckFailed, phase3b


def answer(**value):
    return lambda: value


FROZEN_RIGHT = [
    answer(pitfall="reentrant frozen input", checkpoint_kwargs={"use_reentrant": False}),
    answer(pitfall="reentrant frozen input", checkpoint_kwargs={"use_reentrant": True},
           input_requires_grad=True),
]
FROZEN_WRONG = [
    answer(pitfall="reentrant frozen input", checkpoint_kwargs={"use_reentrant": True}),
    answer(pitfall="reentrant frozen input", checkpoint_kwargs={}),  # 2.13's default: reentrant
    answer(pitfall="reentrant frozen input",
           checkpoint_kwargs={"use_reentrant": True, "preserve_rng_state": False}),
    answer(pitfall="rng not preserved", checkpoint_kwargs={"use_reentrant": False}),
    answer(pitfall="reentrant frozen input", checkpoint_kwargs={"use_reentrant": False,
                                                                "context_fn": None}),
]
RNG_RIGHT = [answer(pitfall="rng not preserved", policy=p) for p in ("segments:0-1", "full")]
RNG_WRONG = [
    answer(pitfall="rng not preserved", policy="segments:0-1;preserve_rng_state=False"),
    answer(pitfall="rng not preserved", policy="none"),  # the memory is back
    answer(pitfall="wrong instrument", policy="full"),
    answer(pitfall="rng not preserved", policy="every-two"),
]
BN_RIGHT = [answer(pitfall="recompute differs from forward", fix="restore-buffers")]
BN_WRONG = [answer(pitfall="recompute differs from forward", fix=f)
            for f in ("none", "use_reentrant=True", "eval-mode", "no-checkpoint")] + [
    answer(pitfall="rng not preserved", fix="restore-buffers")]


@pytest.mark.parametrize(("check", "right", "wrong"), [
    (phase3b.frozen_fix, FROZEN_RIGHT, FROZEN_WRONG),
    (phase3b.rng_fix, RNG_RIGHT, RNG_WRONG),
    (phase3b.bn_fix, BN_RIGHT, BN_WRONG),
], ids=["frozen", "rng", "bn"])
def test_right_answers_pass_and_wrong_ones_are_rejected(check, right, wrong):
    for fn in right:
        assert check(fn) is None
    for fn in wrong:
        with pytest.raises(CheckFailed):
            check(fn)
