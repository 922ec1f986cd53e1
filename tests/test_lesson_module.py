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


def test_lesson_4_figures_draw_what_they_are_given():
    from types import SimpleNamespace as NS

    timeline = [(1, 1 * MiB, "forward"), (1, 2 * MiB, "backward"), (2, 3 * MiB, None),
                (2, 4 * MiB, "forward")]
    ax = plots.step_timelines(timeline, budget=5 * MiB)
    assert [list(line.get_ydata()) for line in ax.get_lines()] == [[1, 2], [4], [5, 5]]
    oom = NS(breakdown={"parameters": MiB, "optimizer state": 2 * MiB},
             by_layer={"blocks.10": MiB, "blocks.1": 3 * MiB, "blocks.0": 4 * MiB, "head": 9 * MiB})
    ax = plots.oom_bar(oom, budget=20 * MiB)
    assert [t.get_text() for t in ax.texts] == ["parameters", "AdamW state", "block 0", "block 1",
                                                "block 10"]  # in block order, not as text
    assert [p.get_width() for p in ax.patches] == [1, 2, 4, 3, 1]  # the head is not a block
    point = NS(peak_bytes=2 * MiB, overhead=0.25)
    ax = plots.frontier_figure({"f": [NS(peak_bytes=3 * MiB, overhead=0.0), point]},
                               {"a": point, "b": point}, [(point, "star")], budget=3 * MiB)
    assert list(ax.get_lines()[0].get_xdata()) == [2, 3]  # sorted by peak
    assert [t.get_text() for t in ax.texts] == ["a = b"]  # equal alternatives share a label
    ax = plots.nested_figure({3: 10, 5: 4}, {2: NS(recompute_flops=30), 3: NS(recompute_flops=10)})
    assert ax.get_lines()[-1].get_xdata()[0] == 3  # the single-level minimum


def test_lesson_3_and_4b_figures_draw_what_they_are_given():
    from types import SimpleNamespace as NS

    ax = plots.gpus_figure({"full": {8: 90e9, 4: 170e9}}, budget=80 * 10**9, top_gb=400)
    assert list(ax.get_lines()[0].get_xdata()) == [4, 8]  # sorted by GPU count
    assert list(ax.get_lines()[0].get_ydata()) == [170, 90]  # in GB
    assert ax.get_lines()[-1].get_ydata()[0] == 80 and ax.get_ylim() == (0, 400)
    ax = plots.saved_by_length_figure([128, 256], {"naive": [MiB, 4 * MiB], "sdpa": [MiB, 2 * MiB]})
    assert [list(line.get_ydata()) for line in ax.get_lines()] == [[1, 4], [1, 2]]
    assert ax.get_xscale() == ax.get_yscale() == "log"
    terms = {"a": NS(paper=2 * MiB, measured=MiB), "b": NS(paper=0, measured=3 * MiB)}
    ax = plots.formula_terms_figure(terms)
    assert [p.get_width() for p in ax.patches] == [2, 0, 1, 3]  # the paper's bars, then measured
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "b"]


def test_lesson_3b_figures_draw_what_they_are_given():
    ax = plots.loss_curves({"none": [3.0, 2.5, 2.0], "drift": [3.0, 2.6, 2.2]})
    assert [list(line.get_xdata()) for line in ax.get_lines()] == [[1, 2, 3]] * 2
    ax = plots.budget_figure({0.0: 0, 1.0: 8192, 0.5: 2048})
    kept, scaled = ax.get_lines()
    assert list(kept.get_xdata()) == [1.0, 0.5, 0.0] and list(kept.get_ydata()) == [8, 2, 0]
    assert list(scaled.get_ydata()) == [8, 4, 0]  # budget x the default's 8 KiB
