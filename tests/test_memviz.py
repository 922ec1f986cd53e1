"""One training step's memory timeline as memory_viz HTML (memviz.py, `ckpt-course trace`)."""

import base64
import json
import pickle
import re

import pytest
import torch

from ckpt_course import cli
from ckpt_course.memviz import step_timeline_html
from ckpt_course.models import GPTConfig, TinyGPT
from ckpt_course.train import train

CFG = GPTConfig(n_layer=2, d_model=32, n_head=2, seq_len=16, vocab_size=64)


def snapshot_of(html: str) -> dict:
    """The profile the page embeds (our own pickle, written by torch's profile_plot)."""
    files = json.loads(re.search(r"const local_files = (\[.*?\])", html, re.S).group(1))
    return pickle.loads(base64.b64decode(files[0]["base64"]))


@pytest.mark.parametrize("policy", ["none", "full"])
def test_the_page_holds_the_step_and_the_meter_peak_is_trains(policy):
    torch.manual_seed(0)
    html, peak = step_timeline_html(TinyGPT(CFG), policy, batch_size=4)
    assert "MemoryViz.js" in html
    events = [e for trace in snapshot_of(html)["device_traces"] for e in trace]
    assert sum(e["action"] == "alloc" for e in events) > 50, "every op's allocations are there"
    torch.manual_seed(0)
    assert peak == train(TinyGPT(CFG), policy, steps=2, batch_size=4, progress=False,
                         count_recompute=False)[-1].peak_bytes


def test_checkpointing_shows_a_lower_peak():
    torch.manual_seed(0)
    _, none = step_timeline_html(TinyGPT(CFG), "none", batch_size=8)
    torch.manual_seed(0)
    _, full = step_timeline_html(TinyGPT(CFG), "full", batch_size=8)
    assert full < none


def test_the_command_writes_the_page(tmp_path, capsys):
    out = tmp_path / "step.html"
    assert cli.main(["trace", "--model", "hand-trace", "--batch", "64", "--policy", "every-2",
                     "--html", str(out)]) == 0
    assert "MemoryViz.js" in out.read_text()
    assert f"wrote {out}" in capsys.readouterr().out


@pytest.mark.parametrize("argv, fix", [
    (["trace", "--html", "{tmp}/missing/x.html"], "does not exist"),
    (["trace", "--html", "{tmp}/x.txt"], "expected a .html file name"),
    (["trace"], "--html"),
    (["trace", "--policy", "every-0", "--html", "{tmp}/x.html"], "every-K"),
])
def test_bad_input_is_one_line_before_any_work(tmp_path, capsys, argv, fix):
    with pytest.raises(SystemExit) as stop:
        cli.main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert fix in err.strip().splitlines()[-1] and "Traceback" not in err
    assert not list(tmp_path.glob("*.html"))
