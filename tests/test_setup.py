"""The set-up promises: one pinned list, the same in environment.yml, and the installed versions."""

import re
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def pins(lines):
    return dict(line.split("==") for line in lines if re.match(r"^[A-Za-z0-9_.-]+==", line))


def requirement_lines():
    text = (ROOT / "requirements.txt").read_text()
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]


def test_every_requirement_is_pinned_exactly_and_torch_is_2_13():
    lines = requirement_lines()
    unpinned = [ln for ln in lines if "==" not in ln]
    assert not unpinned, f"pin these with ==, or a fresh install drifts: {unpinned}"
    assert pins(lines)["torch"] == "2.13.0", "unpinned torch pulls a multi-GB CUDA build"


def test_environment_yml_lists_the_same_versions():
    yml = (ROOT / "environment.yml").read_text()
    conda_pins = pins(m.group(1) for m in re.finditer(r"^\s+- ([^\s#]+==[^\s#]+)", yml, re.M))
    assert conda_pins == pins(requirement_lines()), "environment.yml and requirements.txt disagree"


def test_installed_versions_match_the_pins():
    wrong = {
        name: (pinned, version(name))
        for name, pinned in pins(requirement_lines()).items()
        if version(name).split("+")[0] != pinned
    }
    assert not wrong, (
        f"installed versions differ from requirements.txt (name: pinned, installed): {wrong}"
    )


def test_readme_commands_exist_and_ci_runs_the_test_command():
    readme = (ROOT / "README.md").read_text()
    makefile = (ROOT / "Makefile").read_text()
    for target in ("lab", "test", "check-fast"):
        assert f"make {target}" in readme, f"README does not document `make {target}`"
        assert re.search(rf"^{target}:", makefile, re.M), f"Makefile has no `{target}` target"
    assert "make test" in (ROOT / ".ci/run").read_text()
    lab = makefile.split("\nlab:")[1].split("\n\n")[0]
    assert "127.0.0.1" in lab and "token=''" not in lab and "disable" not in lab
