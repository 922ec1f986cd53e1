"""The lessons' one import and the batch-sweep picture."""

import matplotlib

from ckpt_course import lesson, plots
from ckpt_course.compare import SweepPoint
from ckpt_course.units import MiB

matplotlib.use("Agg")


def test_every_exported_name_exists_and_batches_move_to_the_device():
    assert all(hasattr(lesson, name) for name in lesson.__all__)
    assert len(set(lesson.__all__)) == len(lesson.__all__)
    batch = lesson.TinyGPT(lesson.GPTConfig(n_layer=1, seq_len=8)) \
        .example_batch(2, generator=lesson.seeded())
    assert all(t.device == lesson.DEVICE for t in lesson.on_device(batch))
    again = lesson.TinyGPT(lesson.GPTConfig(n_layer=1, seq_len=8)).example_batch(
        2, generator=lesson.seeded())
    assert all((a == b).all() for a, b in zip(batch, again, strict=True))


def test_batch_sweep_figure_draws_each_policy_and_only_fitting_batches_for_throughput():
    points = [SweepPoint("none", 1, 10 * MiB, True, 0.1, 100.0),
              SweepPoint("none", 2, 30 * MiB, False),
              SweepPoint("full", 1, 5 * MiB, True, 0.1, 90.0),
              SweepPoint("full", 2, 15 * MiB, True, 0.2, 95.0)]
    ax_mem, ax_tps = plots.batch_sweep_figure(points, budget=20 * MiB)
    assert [len(line.get_xdata()) for line in ax_tps.get_lines()] == [1, 2]
    assert [line.get_label() for line in ax_mem.get_lines()] == ["none", "full", "budget"]
    assert ax_mem.get_lines()[-1].get_ydata()[0] == 20
