"""A real JupyterLab, driven by Debian's Chromium through Playwright, for the browser tests.

``JupyterLab`` starts a server on 127.0.0.1 with a fresh token on a free port, serving a temporary
copy of the course (so autosave never writes outputs into the repository's notebooks), with its
own settings (no news pop-up, every cell rendered). ``LabPage`` wraps a Playwright page with the
few actions the tests need: open a notebook, run cells, read outputs from the notebook model.
Nothing downloads a browser: Playwright launches /usr/bin/chromium.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
SETTINGS = {  # JupyterLab user settings: quiet and fully rendered, for a test
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "fetchNews": "false", "checkForUpdates": False},
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class JupyterLab:
    def __init__(self, root: Path, course: Path):
        self.root, self.port, self.token = root, free_port(), secrets.token_hex(16)
        for folder in ("notebooks", "exercises", "solutions"):
            shutil.copytree(course / folder, root / folder, ignore=shutil.ignore_patterns("src"))
        settings = root / ".lab-settings"
        for name, values in SETTINGS.items():
            path = settings / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(values))
        command = [
            sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={self.port}", "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={self.token}", f"--ServerApp.root_dir={root}",
            f"--LabApp.user_settings_dir={settings}", f"--LabApp.workspaces_dir={root / '.ws'}",
            "--LabApp.expose_app_in_browser=True",
        ]
        if hasattr(os, "getuid") and os.getuid() == 0:
            command.append("--allow-root")
        self.log = open(root / "jupyterlab.log", "w")
        # A learner's environment: pytest's variables would tell the live plot it runs headless.
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("PYTEST_") and k != "CKPT_COURSE_HEADLESS"}
        env["CKPT_COURSE_COMPILE"] = "0"  # the lesson runs run 3b's compile; the browser need not
        self.process = subprocess.Popen(
            command, cwd=root, env=env, stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._wait_until_up()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path}?token={self.token}"

    def api(self, path: str, method: str = "GET"):
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/api/{path}", method=method,
            headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            body = response.read()
        return json.loads(body) if body else None

    def _wait_until_up(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                log = (self.root / "jupyterlab.log").read_text()
                raise RuntimeError(f"JupyterLab exited: {log}")
            try:
                self.api("status")
                return
            except OSError:
                time.sleep(0.3)
        raise TimeoutError("JupyterLab did not answer within a minute")

    def shut_down_kernels(self) -> None:
        """Kernels outlive the page: delete every session through the server API."""
        for session in self.api("sessions"):
            self.api(f"sessions/{session['id']}", method="DELETE")

    def stop(self) -> None:
        try:
            self.shut_down_kernels()
        except OSError:
            pass
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.log.close()


# JavaScript run in the page; `app` is window.jupyterapp (exposed by expose_app_in_browser).
_NOTEBOOK = "const w = window.jupyterapp.shell.currentWidget; const nb = w.content;"
_CELLS_JSON = _NOTEBOOK + """
  const out = [];
  for (let i = 0; i < nb.model.cells.length; i++) {
    const c = nb.model.cells.get(i);
    out.push({type: c.type, tags: c.getMetadata('tags') || [], source: c.sharedModel.getSource(),
              count: c.type === 'code' ? c.executionCount : null,
              outputs: c.type === 'code' ? c.outputs.toJSON() : []});
  }
  return out;"""


class LabPage:
    def __init__(self, page, lab: JupyterLab):
        self.page, self.lab = page, lab

    def open(self, path: str) -> None:
        # a fresh workspace: an earlier test's layout (and its deleted kernels) is not restored
        self.page.goto(self.lab.url(f"lab/workspaces/{secrets.token_hex(4)}/tree/{path}"))
        self.page.wait_for_function(
            "() => { const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;"
            " return w && w.sessionContext && w.sessionContext.session &&"
            " w.sessionContext.session.kernel && w.context.isReady; }", timeout=60_000)
        self.wait_idle()

    def js(self, body: str, arg=None):
        return self.page.evaluate(f"(arg) => {{ {body} }}", arg)

    def command(self, name: str, args: dict | None = None, wait: bool = True) -> None:
        """Run a JupyterLab command; with wait=False return at once (e.g. to watch a run-all)."""
        body = "const p = window.jupyterapp.commands.execute(n, a);"
        body += " return p;" if wait else " return null;"
        self.page.evaluate(f"([n, a]) => {{ {body} }}", [name, args or {}])

    def kernel_status(self) -> str:
        return self.js(_NOTEBOOK + "const s = w.sessionContext.session, k = s && s.kernel;"
                       " return k ? k.status : 'starting';")

    def wait_idle(self, timeout: float = 300) -> None:
        """Wait until the kernel is idle and stays idle (a run-all is a burst of executions)."""
        deadline, quiet_since = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            busy = self.kernel_status() != "idle" or self.page.locator(
                ".jp-InputPrompt:has-text('[*]')").count()
            if busy:
                quiet_since = None
            elif quiet_since is None:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since > 1.0:
                return
            time.sleep(0.2)
        raise TimeoutError(f"kernel still busy after {timeout} s")

    def cells(self) -> list[dict]:
        return self.js(_CELLS_JSON)

    def errors(self) -> list[str]:
        return [f"cell {i}: {o['ename']}: {o['evalue']}"
                for i, cell in enumerate(self.cells()) for o in cell["outputs"]
                if o.get("output_type") == "error"]

    def run_all(self, timeout: float = 300) -> None:
        self.command("notebook:run-all-cells")
        time.sleep(0.5)
        self.wait_idle(timeout)

    def index_of(self, tag: str) -> int:
        return next(i for i, c in enumerate(self.cells()) if tag in c["tags"])

    def select(self, index: int) -> None:
        self.js(_NOTEBOOK + "nb.activeCellIndex = arg; nb.deselectAll();", index)

    def type_into(self, index: int, text: str) -> None:
        """Replace a cell's text by typing into its editor, as a learner would."""
        self.select(index)
        editor = self.page.locator(".jp-Notebook .jp-Cell").nth(index).locator(".cm-content")
        editor.click()
        self.page.keyboard.press("Control+A")
        self.page.keyboard.press("Delete")
        self.page.keyboard.insert_text(text)  # no auto-indent or bracket closing on the way in

    def run_cell(self, index: int) -> None:
        self.select(index)
        self.command("notebook:run-cell")
        time.sleep(0.3)
        self.wait_idle()

    def watch_images(self) -> None:
        """Record every output image's source as the page shows it (a MutationObserver): a live
        plot's frames are all seen, where polling from here missed some on a loaded machine."""
        self.page.evaluate("""() => {
          const seen = window.__imagesSeen = new Set();
          const record = () => document.querySelectorAll('.jp-OutputArea-output img')
            .forEach(img => seen.add(img.src));
          new MutationObserver(record).observe(document.body, {
            subtree: true, childList: true, attributes: true, attributeFilter: ['src']});
          record();
        }""")

    def images_seen(self) -> list[str]:
        """Every image source recorded since ``watch_images``."""
        return self.page.evaluate("() => Array.from(window.__imagesSeen || [])")

    def images(self) -> list[str]:
        return self.page.eval_on_selector_all(
            ".jp-OutputArea-output img", "els => els.map(e => e.src)"
        )
