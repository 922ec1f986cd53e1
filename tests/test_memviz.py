"""One training step's memory timeline: the offline page and memory_viz's snapshot (memviz.py,
`ckpt-course trace`). The browser test of the page is in test_browser.py."""

import pickle
import re

import pytest
import torch

from ckpt_course import cli
from ckpt_course.memviz import StepTimeline, step_timeline, timeline_page
from ckpt_course.meter import CATEGORIES
from ckpt_course.models import GPTConfig, TinyGPT
from ckpt_course.train import train

CFG = GPTConfig(n_layer=2, d_model=32, n_head=2, seq_len=16, vocab_size=64)


@pytest.fixture(scope="module")
def full_step() -> StepTimeline:
    torch.manual_seed(0)
    return step_timeline(TinyGPT(CFG), "full", batch_size=4)


@pytest.mark.parametrize("policy", ["none", "full"])
def test_the_peak_is_the_meters_peak_of_a_training_step(policy):
    torch.manual_seed(0)
    timeline = step_timeline(TinyGPT(CFG), policy, batch_size=4)
    torch.manual_seed(0)
    assert timeline.peak_bytes == train(TinyGPT(CFG), policy, steps=2, batch_size=4,
                                        progress=False, count_recompute=False)[-1].peak_bytes
    assert max(e.live_bytes for e in timeline.events) == timeline.peak_bytes


def test_events_add_up_and_name_op_phase_and_category(full_step):
    events = full_step.events
    assert {e.phase for e in events} >= {"forward", "backward", "optimizer"}
    assert {e.category for e in events} <= set(CATEGORIES)
    for before, after in zip(events, events[1:], strict=False):
        assert after.live_bytes == before.live_bytes + after.nbytes  # a running sum, exact
    assert all(sum(e.breakdown) == e.live_bytes for e in events)
    forward_ops = {e.op for e in events if e.phase == "forward" and e.nbytes > 0}
    assert {"embedding", "addmm"} & forward_ops or "mm" in forward_ops


def test_checkpointing_shows_a_lower_peak():
    torch.manual_seed(0)
    none = step_timeline(TinyGPT(CFG), "none", batch_size=8).peak_bytes
    torch.manual_seed(0)
    full = step_timeline(TinyGPT(CFG), "full", batch_size=8).peak_bytes
    assert full < none


def test_the_snapshot_is_what_memory_viz_opens(full_step):
    snapshot = pickle.loads(full_step.snapshot)
    events = [e for trace in snapshot["device_traces"] for e in trace]
    assert sum(e["action"] == "alloc" for e in events) > 50, "every op's allocations are there"
    assert {"device_traces", "segments"} <= set(snapshot)


def test_the_page_is_self_contained_and_marks_the_peak(full_step):
    page = timeline_page(full_step, "step.pickle")
    scripts = re.findall(r"<script[^>]*\bsrc=", page)
    assert scripts == [], "no script is loaded from anywhere: the page opens offline"
    assert "plotly" in page.lower() and len(page) > 1_000_000  # plotly.js is inside
    peak = full_step.peak_event
    assert f"{full_step.peak_bytes:,} bytes" in page
    assert f"({peak.op}, {peak.phase})" in page  # the peak's label
    assert "step.pickle" in page and "memory_viz" in page


def test_the_command_writes_the_page_and_the_snapshot(tmp_path, capsys):
    out = tmp_path / "step.html"
    assert cli.main(["trace", "--model", "hand-trace", "--batch", "64", "--policy", "every-2",
                     "--html", str(out)]) == 0
    assert 'id="memory-timeline"' in out.read_text()
    assert pickle.loads((tmp_path / "step.pickle").read_bytes())["device_traces"]
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "step.pickle" in printed and "memory_viz" in printed


@pytest.mark.parametrize("argv, fix", [
    (["trace", "--html", "{tmp}/missing/x.html"], "does not exist"),
    (["trace", "--html", "{tmp}/x.txt"], "expected a .html file name"),
    (["trace"], "--html"),
    (["trace", "--policy", "every-0", "--html", "{tmp}/x.html"], "every-K"),
    (["trace", "--html", "{tmp}/old.html"], "--force"),
    (["trace", "--html", "{tmp}/old2.html"], "--force"),  # the snapshot beside it exists
])
def test_bad_input_is_one_line_before_any_work(tmp_path, capsys, monkeypatch, argv, fix):
    (tmp_path / "old.html").write_text("a learner's page")
    (tmp_path / "old2.pickle").write_text("a learner's snapshot")
    monkeypatch.setattr("ckpt_course.memviz.step_timeline", _must_not_run)
    with pytest.raises(SystemExit) as stop:
        cli.main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert fix in err.strip().splitlines()[-1] and "Traceback" not in err
    assert (tmp_path / "old.html").read_text() == "a learner's page"
    assert (tmp_path / "old2.pickle").read_text() == "a learner's snapshot"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.html", "old2.pickle"]


def test_force_replaces_the_page(tmp_path, capsys):
    (tmp_path / "old.html").write_text("a learner's page")
    assert cli.main(["trace", "--model", "hand-trace", "--batch", "8", "--html",
                     str(tmp_path / "old.html"), "--force"]) == 0
    assert "memory-timeline" in (tmp_path / "old.html").read_text()


def _must_not_run(*args, **kwargs):
    raise AssertionError("the step ran before the bad input was refused")
