"""Exercise checks, one module per phase (``phase1`` ... ``phase4``).

A check measures the right answer with ckpt_course on the learner's machine (bytes, counts,
FLOPs: never timings), compares it with the learner's, and on a mismatch raises ``CheckFailed``
with a hint that teaches: what was expected, in words, and which part of the tape was missed;
never the number itself.
"""


class CheckFailed(AssertionError):
    """A wrong answer, with a hint that teaches."""

    def _render_traceback_(self) -> list[str]:
        # IPython shows this instead of a traceback: the hint, not the checker's own code.
        return [f"CheckFailed: {self}"]


def expect(condition: bool, hint: str) -> None:
    if not condition:
        raise CheckFailed(hint)


def passed(what: str) -> None:
    print(f"Correct: {what}")
