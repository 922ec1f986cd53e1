import pytest

from ckpt_course.checks import CheckFailed, expect


def test_a_failed_check_shows_its_hint_not_the_checkers_code():
    with pytest.raises(CheckFailed) as failure:
        expect(False, "you counted the weights as activations")
    rendered = failure.value._render_traceback_()
    assert rendered == ["CheckFailed: you counted the weights as activations"]
    expect(True, "never raised")
