"""The live plot: headless it only draws at the end; live it redraws, throttled, in place."""

import sys
import types

import pytest

from ckpt_course import live as live_module
from ckpt_course.live import LivePlot, is_headless
from ckpt_course.models import GPTConfig, TinyGPT
from ckpt_course.train import StepRecord, train
from ckpt_course.units import MiB

TINY = GPTConfig(n_layer=2, d_model=32, n_head=2, seq_len=16)


def record(policy, step, peak=None, flops=0, time_s=0.01):
    return StepRecord(step, policy, 1.0, time_s, peak, None, flops)


def offsets(ax):
    """The (x, y) points of every scatter on an axes."""
    return [tuple(p) for c in ax.collections for p in c.get_offsets()]


def test_pytest_and_the_environment_variable_mean_headless(monkeypatch):
    assert is_headless()  # pytest sets PYTEST_VERSION, as it does for nbval's kernels
    monkeypatch.delenv("PYTEST_VERSION", raising=False)
    monkeypatch.delenv("PYTEST_CURRENT_TEST", raising=False)
    monkeypatch.setattr(live_module, "in_kernel", lambda: True)
    monkeypatch.setattr(live_module.matplotlib, "get_backend", lambda: "inline")
    assert not is_headless()
    monkeypatch.setenv("CKPT_COURSE_HEADLESS", "1")
    assert is_headless()


def test_headless_training_draws_only_the_final_figure():
    budget = 3 * MiB
    live = LivePlot(["none", "full"], steps=3, budget=budget)
    assert not live.live
    for policy in ("none", "full"):
        train(TinyGPT(TINY), policy, steps=3, batch_size=2, progress=False, on_step=live)
    assert live.progress() == "full: policy 2/2, step 3/3"
    assert live.redraws == 0
    live.close()
    left, right = live.axes
    assert len(left.collections) == len(right.collections) == 2  # one series per policy
    assert len(offsets(right)) == 6  # one point per step
    assert [t.get_text() for t in right.get_legend().get_texts()] == ["none", "full"]
    budget_lines = [ln for ln in left.get_lines() if ln.get_ydata()[0] == budget / MiB]
    assert budget_lines, "the budget is drawn as a horizontal line"
    assert live.figure.get_suptitle().endswith("done")


def test_a_record_without_peak_takes_the_policys_last_peak():
    live = LivePlot(mode="static")
    live(record("full", 0, peak=2 * MiB, flops=10**9))
    live(record("full", 1, peak=None, flops=10**9))
    live.close()
    assert offsets(live.axes[1]) == [(10.0, 2.0), (10.0, 2.0)]
    assert offsets(live.axes[0]) == [(1.0, 2.0), (1.0, 2.0)]


class FakeClock:
    """Seconds that move only when told: each reading advances by ``tick``."""

    def __init__(self, tick: float):
        self.now, self.tick = 0.0, tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


def test_live_mode_keeps_drawing_under_its_share_of_the_time():
    # every clock reading is 1 s later, so a redraw "costs" 1 s: with a 10% share, the first
    # step draws (1 s of drawing in the first 1 s is not yet counted), then drawing must wait
    live = LivePlot(mode="live", min_interval_s=0, max_share=0.1, clock=FakeClock(1.0))
    for step in range(5):
        live(record("none", step, peak=MiB))
    assert live.redraws == 1 and live.draw_seconds == 1.0
    generous = LivePlot(mode="live", min_interval_s=0, max_share=0.9, clock=FakeClock(1.0))
    for step in range(5):
        generous(record("none", step, peak=MiB))
    assert generous.redraws > 1
    patient = LivePlot(mode="live", min_interval_s=3600, max_share=0.999, clock=FakeClock(1.0))
    patient(record("none", 0, peak=MiB))
    assert patient.redraws == 0  # not before the minimum interval


class FakeImage:
    def __init__(self, data, format):
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and format == "png"
        self.data = data


def fake_ipython(monkeypatch, display):
    monkeypatch.setattr(live_module, "in_kernel", lambda: True)
    monkeypatch.setitem(sys.modules, "IPython.display",
                        types.SimpleNamespace(display=display, Image=FakeImage))


def test_in_a_kernel_it_updates_one_display_in_place(monkeypatch):
    shown = []

    class Handle:
        def update(self, image):
            shown.append(("update", image))

    def display(image, display_id=False):
        shown.append(("display", image))
        return Handle() if display_id else None

    fake_ipython(monkeypatch, display)
    live = LivePlot(mode="live", min_interval_s=0, max_share=0.999)
    for step in range(3):
        live(record("none", step, peak=MiB))
    live.close()
    kinds = [k for k, _ in shown]
    assert kinds[0] == "display" and kinds.count("display") == 1
    assert kinds[-1] == "update" and len(kinds) == live.redraws + 1
    assert all(isinstance(image, FakeImage) for _, image in shown)


def test_headless_in_a_kernel_shows_the_final_figure_once(monkeypatch):
    shown = []
    fake_ipython(monkeypatch, lambda image, **kw: shown.append(image))
    live = LivePlot(mode="static")
    live(record("none", 0, peak=MiB))
    live.close()
    live.close()
    assert len(shown) == 1 and isinstance(shown[0], FakeImage)


def test_bad_mode_says_what_is_accepted():
    with pytest.raises(ValueError, match="'auto', 'live' or 'static'"):
        LivePlot(mode="sometimes")
