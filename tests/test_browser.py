"""The course in a real browser: JupyterLab on localhost, driven by Debian's Chromium.

The lessons with something only a browser shows run top to bottom with no error: lesson 1's
widgets render and its N slider redraws the plot; phase 3's live plot updates while it runs (every
lesson also runs once with wrong answers typed in, tests/lesson_runs.py; these two run here as
shipped). An exercise accepts a correct answer typed into its answer cell and shows the hint for
a wrong one. Screenshots go to artifacts/browser/. Skipped, with the reason, where Chromium is
not installed (CI installs it).
"""

from __future__ import annotations

import ast
import re
import time
from pathlib import Path

import nbformat
import pytest
from lab import CHROMIUM, CHROMIUM_ARGS, JupyterLab, LabPage

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "artifacts" / "browser"
# the lessons whose widgets or live plots need a browser to be seen working; the others run in
# tests/lesson_runs.py, and would add a minute to `make test` here
IN_BROWSER = ("1_why_activations_eat_memory", "3_choosing_a_policy")
LESSONS = [p for p in sorted((ROOT / "notebooks").glob("*.ipynb")) if p.stem in IN_BROWSER]

playwright = pytest.importorskip("playwright.sync_api", reason="no playwright: run `make test`")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason=(
        f"no Chromium at {CHROMIUM}: install Debian's package (`apt-get install chromium`) to run "
        "the browser tests; .ci/run does")),
]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    server = JupyterLab(tmp_path_factory.mktemp("lab"), ROOT)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(lab, browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    yield LabPage(context.new_page(), lab)
    context.close()
    lab.shut_down_kernels()


def screenshot(page: LabPage, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.page.screenshot(path=str(ARTIFACTS / f"{name}.png"))


def test_the_browser_lessons_exist():
    assert [p.stem for p in LESSONS] == list(IN_BROWSER), "a lesson named in IN_BROWSER is gone"


@pytest.mark.parametrize("lesson", LESSONS, ids=[p.stem for p in LESSONS])
def test_lesson_runs_clean_in_jupyterlab(page, lesson):
    page.open(f"notebooks/{lesson.name}")
    page.watch_images()  # every figure drawn from now on, however briefly it was shown
    page.command("notebook:run-all-cells", wait=False)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if page.kernel_status() == "idle" and not page.page.locator(
                ".jp-InputPrompt:has-text('[*]')").count():
            break
        time.sleep(0.25)
    page.wait_idle()
    seen = set(page.images_seen())
    screenshot(page, lesson.stem)

    assert page.errors() == []
    unrun = [i for i, c in enumerate(page.cells()) if c["type"] == "code" and c["count"] is None]
    assert not unrun, f"cells never ran: {unrun}"
    final = set(page.images())
    assert final, "the lesson shows no figure"

    if page.page.locator(".widget-hslider").count():
        check_slider_redraws(page, lesson)
    if uses_live_plot(lesson):  # a frame drawn during the run that the final one replaced;
        # how many depends on the machine (redraws are throttled to a share of the run's time:
        # live.LivePlot._due), so on a busy machine there may be only one
        assert len(seen - final) >= 1, "the live plot did not update while the run went on"


def uses_live_plot(lesson: Path) -> bool:
    """A LivePlot, or a compare() call that keeps its live plot (``live=False`` turns it off)."""
    if re.search(r"ckpt_course\.live|LivePlot", lesson.read_text()):
        return True
    for cell in nbformat.read(lesson, as_version=4).cells:
        if cell.cell_type != "code" or cell.source.lstrip().startswith("%"):
            continue
        for node in ast.walk(ast.parse(cell.source)):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "compare":
                live = [k.value for k in node.keywords if k.arg == "live"]
                if not (live and isinstance(live[0], ast.Constant) and live[0].value is False):
                    return True
    return False


def check_slider_redraws(page: LabPage, lesson: Path) -> None:
    slider = page.page.locator(".widget-hslider").first
    slider.scroll_into_view_if_needed()
    output = slider.locator("xpath=ancestor::div[contains(@class,'jp-OutputArea')][1]")
    before = output.locator("img").first.get_attribute("src")
    handle = slider.locator(".noUi-handle").first
    handle.click()
    for _ in range(2):
        handle.press("ArrowRight")
    page.page.wait_for_function(
        "([el, old]) => { const i = el.querySelector('img'); return i && i.src !== old; }",
        arg=[output.element_handle(), before], timeout=30_000)
    page.wait_idle()  # the last key press's redraw, not a passing one
    screenshot(page, f"{lesson.stem}-slider")
    output.screenshot(path=str(ARTIFACTS / "readme-dial.png"))  # the README's picture


def first_exercise() -> tuple[str, str, str]:
    """(notebook name, answer tag, the solution's answer source) of the first exercise."""
    exercise = sorted((ROOT / "exercises").glob("*.ipynb"))[0]
    solution = nbformat.read(ROOT / "solutions" / exercise.name, as_version=4)
    for cell in solution.cells:
        tags = [t for t in cell.metadata.get("tags", []) if t.startswith("answer:")]
        if tags:
            return exercise.name, tags[0], cell.source
    raise AssertionError(f"{exercise.name} has no answer cell")


def test_exercise_accepts_a_right_answer_and_hints_at_a_wrong_one(page):
    name, tag, solution = first_exercise()
    page.open(f"exercises/{name}")
    answer = page.index_of(tag)
    check = page.index_of("check:" + tag.split(":", 1)[1])
    page.select(answer)
    page.command("notebook:run-all-above")
    page.wait_idle()

    page.type_into(answer, solution)
    page.run_cell(answer)
    page.run_cell(check)
    screenshot(page, "exercise-right")
    assert not [o for o in page.cells()[check]["outputs"] if o.get("output_type") == "error"]

    signature = solution.splitlines()[0]
    page.type_into(answer, f"{signature}\n    return 0\n")
    page.run_cell(answer)
    page.run_cell(check)
    screenshot(page, "exercise-wrong")
    page.page.locator(".jp-Notebook .jp-Cell").nth(check).screenshot(
        path=str(ARTIFACTS / "readme-hint.png"))  # the README's picture
    errors = [o for o in page.cells()[check]["outputs"] if o.get("output_type") == "error"]
    assert errors and errors[0]["ename"] in ("CheckFailed", "AssertionError"), errors
    assert len(errors[0]["evalue"]) > 20, "a wrong answer must get a hint that teaches"


# ---------------------------------------------------------------- `ckpt-course trace --html`
@pytest.fixture(scope="module")
def trace_page(tmp_path_factory):
    """The page `ckpt-course trace` writes, for a small model (one step, a few seconds)."""
    from ckpt_course import cli

    out = tmp_path_factory.mktemp("trace") / "step.html"
    assert cli.main(["trace", "--model", "gpt", "--layers", "2", "--batch", "2", "--seq", "16",
                     "--policy", "full", "--html", str(out)]) == 0
    return out


def test_the_trace_page_draws_offline_with_its_peak_and_hover(browser, trace_page):
    """Network blocked: the page draws its plot (an SVG with the timeline's line), shows the
    peak's label, and a hover over the peak names its op, phase, category and bytes."""
    context = browser.new_context(viewport={"width": 1200, "height": 700}, offline=True)
    requested = []

    def block(route):
        requested.append(route.request.url)
        route.abort()

    context.route(re.compile(r"^(?!file:).*"), block)  # anything but the file itself
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(trace_page.as_uri())
    page.wait_for_selector("#memory-timeline .main-svg", timeout=30_000)
    lines = page.locator("#memory-timeline g.trace.scatter path.js-line")
    drawn = [len(lines.nth(i).get_attribute("d") or "") for i in range(lines.count())]
    assert max(drawn) > 2000, "the timeline is drawn (hundreds of points)"
    peak_label = page.locator("#memory-timeline .annotation-text", has_text="peak")
    assert peak_label.count() == 1
    assert re.search(r"peak [\d.]+ [KM]iB \(\w+, (forward|backward|optimizer)\)",
                     peak_label.text_content())
    peak_point = page.locator("#memory-timeline g.trace.scatter path.point").last
    box = peak_point.bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    hover = page.locator("#memory-timeline .hoverlayer .hovertext").first
    hover = hover.text_content(timeout=10_000)
    assert re.search(r"\w+ \((forward|backward|optimizer)\)", hover), hover  # op (phase)
    assert re.search(r"allocated [\d.]+ [KM]?i?B of (activations|temporaries|gradients|"
                     r"optimizer state|parameters)", hover), hover
    assert "live:" in hover
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "trace-page.png"))
    context.close()
    assert requested == [], f"the page asked the network for {requested}"
    assert errors == []
