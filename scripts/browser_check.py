"""Browser check of the head explorer: JupyterLab headless + the system's Chromium via Playwright.

    .venv/bin/python scripts/browser_check.py
    .venv/bin/python scripts/browser_check.py --timeout 1800 --screenshot figures/06_explorer_screenshot.png

What it does, and fails (exit code 1, with the step) if any step does not happen in time:

1. copies notebooks/06_head_explorer.ipynb into a temporary root (so JupyterLab never writes
   into the repository: autosave is off too, and the notebook's `../figures` lands in the copy);
2. starts `jupyter lab` token-less on a free port of 127.0.0.1, with temporary runtime, config,
   settings and workspace directories (nothing of the user's JupyterLab state is read or changed);
3. opens the notebook in headless Chromium (Playwright's Python package drives Debian's
   `chromium`: `executable_path` = `which chromium`; Playwright's own browser download is not
   used), runs Run > Run All Cells and waits until every cell has run;
4. waits for the explorer's heatmap and its "selected head" label, clicks a heatmap cell of
   another head (pixel position from plotly's own axes), waits for the label to name that head;
5. saves a screenshot of the explorer (default figures/06_explorer_screenshot.png).

Needs, in the venv: jupyterlab, ipywidgets, anywidget (plotly's FigureWidget), playwright (the
Python package only: `pip install playwright`, no `playwright install`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "06_head_explorer.ipynb"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    raise SystemExit("no Chromium found: install Debian's 'chromium' package")


def write_lab_settings(settings_dir: Path) -> None:
    """No autosave (the copy is thrown away anyway) and every cell in the DOM (no windowing), so
    the script can see every cell's prompt."""
    files = {
        "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
        "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
        "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false", "checkForUpdates": False},
    }
    for rel, content in files.items():
        path = settings_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(content))


def start_lab(root: Path, tmp: Path, port: int, log: Path) -> subprocess.Popen:
    env = dict(os.environ)
    env.update(
        JUPYTER_RUNTIME_DIR=str(tmp / "runtime"),
        JUPYTER_CONFIG_DIR=str(tmp / "config"),
        JUPYTERLAB_SETTINGS_DIR=str(tmp / "settings"),
        JUPYTERLAB_WORKSPACES_DIR=str(tmp / "workspaces"),
    )
    write_lab_settings(tmp / "settings")
    cmd = [
        sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
        "--IdentityProvider.token=", "--ServerApp.password=", f"--ServerApp.root_dir={root}",
        "--ServerApp.port_retries=0", "--LabApp.news_url=", "--allow-root",  # CI runs as root
    ]
    return subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def wait_for_server(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"jupyter lab exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/api/status", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"jupyter lab did not answer on {url} within {timeout:.0f} s")


def wait_kernel_idle(url: str, timeout: float, settle: float = 2.0) -> None:
    """Until the server has a kernel that has stayed idle for `settle` seconds (its REST API)."""
    deadline = time.time() + timeout
    idle_since = None
    while time.time() < deadline:
        with urllib.request.urlopen(f"{url}/api/kernels", timeout=5) as r:
            kernels = json.load(r)
        idle = bool(kernels) and all(k.get("execution_state") == "idle" for k in kernels)
        idle_since = (idle_since or time.time()) if idle else None
        if idle_since is not None and time.time() - idle_since >= settle:
            return
        time.sleep(0.5)
    raise TimeoutError(f"no idle kernel within {timeout:.0f} s")


# Page-side helpers (run in the browser by Playwright).
ALL_CELLS_RAN = """() => {
  const prompts = [...document.querySelectorAll('.jp-Notebook .jp-CodeCell .jp-InputArea-prompt')];
  return prompts.length > 0 && prompts.every(p => /\\[\\d+\\]/.test(p.textContent));
}"""
CELL_CENTRE = """([el, layer, head]) => {
  const fl = el._fullLayout;
  const r = el.getBoundingClientRect();
  return [r.left + fl._size.l + fl.xaxis.d2p(head), r.top + fl._size.t + fl.yaxis.d2p(layer),
          fl.yaxis.range[1] + 0.5, fl.xaxis.range[1] + 0.5];
}"""


def run_check(url: str, notebook_name: str, chromium: str, screenshot: Path, timeout_s: float, log) -> dict[str, float]:
    from playwright.sync_api import sync_playwright

    times: dict[str, float] = {}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        try:
            # tall enough for the whole explorer to fit in the notebook panel (the element screenshot)
            page = browser.new_page(viewport={"width": 1600, "height": 2000})
            step = time.time()
            page.goto(f"{url}/lab/tree/notebooks/{notebook_name}", wait_until="domcontentloaded")
            page.wait_for_selector(".jp-Notebook .jp-CodeCell", timeout=120_000)
            wait_kernel_idle(url, 120)  # the kernel must be up before Run All
            times["open notebook"] = time.time() - step
            log("notebook open, kernel idle")

            step = time.time()
            page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
            page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
            page.wait_for_function(ALL_CELLS_RAN, timeout=timeout_s * 1000, polling=1000)
            wait_kernel_idle(url, timeout_s)
            errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']", has_text="Traceback")
            if errors.count():
                raise RuntimeError("a cell raised:\n" + errors.first.inner_text()[:2000])
            times["run all cells"] = time.time() - step
            log(f"all cells ran in {times['run all cells']:.0f} s")

            explorer = page.locator(".fd-head-explorer").first
            explorer.wait_for(timeout=60_000)
            label = page.locator(".fd-head-explorer .fd-selected-head").first
            page.wait_for_function(
                "el => /selected head: L\\d+H\\d+/.test(el.textContent)", arg=label.element_handle(), timeout=60_000
            )
            heatmap = page.locator(".fd-head-explorer .js-plotly-plot").first
            heatmap.scroll_into_view_if_needed()
            page.wait_for_function("el => el._fullLayout && el.querySelector('.hm')", arg=heatmap.element_handle(),
                                   timeout=60_000)
            before = label.text_content().strip()
            log(f"explorer rendered: {before!r}")

            # a head other than the selected one, away from the edges
            _, _, n_layers, n_heads = page.evaluate(CELL_CENTRE, [heatmap.element_handle(), 0, 0])
            target = (int(n_layers) // 3, int(n_heads) // 2)
            if f"L{target[0]}H{target[1]}" in before:
                target = (target[0] + 1, target[1])
            x, y, _, _ = page.evaluate(CELL_CENTRE, [heatmap.element_handle(), *target])
            step = time.time()
            # plotly takes a click from the hover data of its drag layer: hover first, then click
            page.mouse.move(x - 3, y - 3)
            page.mouse.move(x, y, steps=4)
            page.wait_for_timeout(500)
            page.mouse.click(x, y)
            want = f"L{target[0]}H{target[1]}"
            page.wait_for_function(
                "([el, want]) => el.textContent.includes('selected head: ' + want)",
                arg=[label.element_handle(), want], timeout=timeout_s * 1000, polling=250,
            )
            times["click to new label"] = time.time() - step
            after = label.text_content().strip()
            timing = page.locator(".fd-head-explorer .fd-update-time").first.text_content().strip()
            log(f"clicked cell ({target[0]}, {target[1]}) of a {int(n_layers)} x {int(n_heads)} heatmap: "
                f"{before!r} -> {after!r}; widget says {timing!r}")
            page.mouse.move(5, 5)  # no hover label in the picture
            explorer.evaluate("el => el.scrollIntoView({block: 'start'})")
            page.wait_for_timeout(1500)  # let plotly redraw the selection marker
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            explorer.screenshot(path=str(screenshot))
            log(f"screenshot: {screenshot}")
        except Exception:
            failed = Path(tempfile.gettempdir()) / "fdlib_browser_check_failed.png"
            try:
                page.screenshot(path=str(failed), full_page=True)
                log(f"page at the failure: {failed}")
            except Exception:
                pass
            raise
        finally:
            browser.close()
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--screenshot", type=Path, default=ROOT / "figures" / "06_explorer_screenshot.png")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds for running all cells and for the click")
    ap.add_argument("--chromium", default=None, help="browser executable (default: `which chromium`)")
    ap.add_argument("--notebook", type=Path, default=NOTEBOOK, help="a notebook that displays a HeadExplorer")
    args = ap.parse_args(argv)
    # SIGTERM ends the check like an error: the finally blocks stop the server and the browser.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    def log(msg: str) -> None:
        print(f"[browser_check {time.time() - start:6.1f} s] {msg}", flush=True)

    start = time.time()
    chromium = args.chromium or find_chromium()
    tmp = Path(tempfile.mkdtemp(prefix="fdlib-browser-check-"))
    root = tmp / "root"
    (root / "notebooks").mkdir(parents=True)
    shutil.copy(args.notebook, root / "notebooks" / args.notebook.name)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    lab_log = tmp / "jupyterlab.log"
    proc = start_lab(root, tmp, port, lab_log)
    ok = False
    try:
        wait_for_server(url, proc, timeout=120)
        log(f"jupyter lab up on {url} (log: {lab_log})")
        times = run_check(url, args.notebook.name, chromium, args.screenshot.resolve(), args.timeout, log)
        ok = True
        log("OK: " + ", ".join(f"{k} {v:.1f} s" for k, v in times.items()) + f"; total {time.time() - start:.0f} s")
    except Exception as err:  # report the step, keep the logs
        log(f"FAILED: {type(err).__name__}: {err}")
        log(f"jupyter lab log kept at {lab_log}")
    finally:
        # Only the server this script started: its own process group.
        try:
            os.killpg(proc.pid, 15)
            proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, 9)
            except ProcessLookupError:
                pass
        if ok:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
