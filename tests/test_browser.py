"""Notebook 00 in a real JupyterLab, driven by headless Chromium: Run All Cells
gives no error output, the lab bench widget renders and measures a step when its
Run button is pressed, and a screenshot of it is saved to docs/screenshots/
(committed, so readers see the widget without running). A chapter past the guide
opens from its committed outputs with its summary plot drawn, screenshot beside.

Chromium and chromedriver are Debian's packages (scripts/setup_browser.sh, run by
`make test`'s setup); nothing is downloaded here. Deselect with -m "not browser".
"""
import io
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

import pytest
from PIL import Image
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = "notebooks/00_baseline.ipynb"
WIDGET_SELECTOR = ".cblab-lab-bench"
SCREENSHOT = REPO / "docs" / "screenshots" / "00_baseline_lab_bench.png"
CHAPTER = "notebooks/06b_owning_the_graph.ipynb"
CHAPTER_SCREENSHOT = REPO / "docs" / "screenshots" / "06b_owning_the_graph.png"
WINDOW = (1280, 900)
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")

SERVER_START_S = 120
KERNEL_START_S = 180
# The notebook takes one to two minutes on a CPU; the first run on a machine also
# builds the synthetic checkpoint.
RUN_ALL_S = 600
WIDGET_RENDER_S = 60
# One measurement of the tiny model on a CPU: seconds, minutes on a loaded machine.
WIDGET_RUN_S = 300
# A step the widget leaves off by default (it starts on the recommended steps, which on a CPU run fp32).
CLICKED_STEP = "bf16"

# JupyterLab user settings for the run: no news or update checks (the network is
# not there and their toast would cover the screenshot), and every cell kept in
# the DOM rather than only those scrolled into view, so the widget can be found.
LAB_SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings":
        {"fetchNews": "false", "checkForUpdates": False},
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
}

# Chromium as root in a container with no network: no sandbox (needs user
# namespaces), no GPU, /tmp instead of a small /dev/shm, and no background
# connections (Google services, component updates), which the closed network
# refuses and Chromium then retries.
CHROMIUM_FLAGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
    "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
]

# The page's JupyterLab application, exposed by --LabApp.expose_app_in_browser.
JS_NOTEBOOK = """
const app = window.jupyterapp;
const panel = app && app.shell.currentWidget;
const notebook = panel && panel.context && panel.context.path === arguments[0] ? panel : null;
"""
JS_KERNEL_STATUS = JS_NOTEBOOK + """
const kernel = notebook && notebook.sessionContext.session && notebook.sessionContext.session.kernel;
return kernel ? kernel.status : null;
"""
# Run All Cells is the Run menu's command; its promise settles once every cell
# has run or one has failed (which stops the rest), and the outcome is kept on
# the page for the test to poll.
JS_RUN_ALL = JS_NOTEBOOK + """
app.shell.collapseLeft();
window.cblabRunAll = "running";
app.commands.execute("notebook:clear-all-cell-outputs")
  .then(() => app.commands.execute("notebook:run-all-cells"))
  .then(ok => { window.cblabRunAll = ok ? "done" : "stopped"; },
        err => { window.cblabRunAll = "failed: " + err; });
"""
JS_CELLS = JS_NOTEBOOK + """
const cells = [];
for (const cell of notebook.content.model.cells) {
  if (cell.type !== "code") continue;
  cells.push({source: cell.sharedModel.getSource(), execution_count: cell.executionCount,
              outputs: cell.outputs.toJSON()});
}
return cells;
"""


@pytest.fixture(autouse=True)
def chromium_installed():
    """Skips before JupyterLab starts where Chromium cannot be installed."""
    if CHROMIUM.is_file() and CHROMEDRIVER.is_file():
        return
    missing = " and ".join(str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.is_file())
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip(f"{missing} missing and not installable here (needs root and apt-get): "
                    "install Debian's chromium and chromium-driver to run the browser test")
    pytest.fail(f"{missing} missing, though this machine can install them: "
                "run `bash scripts/setup_browser.sh` (make test's setup does)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@pytest.fixture
def lab(tmp_path):
    """JupyterLab serving a copy of the notebook (and the data/ it reads by
    relative path), so that saves and checkpoints land in tmp_path, not the
    repository; user-level
    Jupyter and IPython settings are replaced by empty temporary ones. The kernel
    inherits this process's environment: TQDM_DISABLE (conftest) and
    CHATTERBOX_LAB_CACHE, where the synthetic checkpoint is cached."""
    root = tmp_path / "root"
    (root / "notebooks").mkdir(parents=True)
    for notebook in (NOTEBOOK, CHAPTER):
        shutil.copy2(REPO / notebook, root / notebook)
    shutil.copytree(REPO / "data", root / "data")

    home = tmp_path / "jupyter"
    settings = home / "lab-settings"
    for name, values in LAB_SETTINGS.items():
        (settings / name).parent.mkdir(parents=True, exist_ok=True)
        (settings / name).write_text(json.dumps(values))
    env = {k: v for k, v in os.environ.items() if k not in ("JUPYTER_PATH", "JUPYTER_CONFIG_PATH")}
    env.update(
        JUPYTER_CONFIG_DIR=str(home / "config"),
        JUPYTER_DATA_DIR=str(home / "data"),
        JUPYTER_RUNTIME_DIR=str(home / "runtime"),
        JUPYTERLAB_SETTINGS_DIR=str(settings),
        JUPYTERLAB_WORKSPACES_DIR=str(home / "workspaces"),
        IPYTHONDIR=str(home / "ipython"),
        # With user data dirs emptied, the first python3 kernel spec found is the
        # one setup_venv.sh installed into this venv, running this interpreter.
        JUPYTER_PREFER_ENV_PATH="1",
    )
    port, token = _free_port(), secrets.token_hex(24)
    log_path = tmp_path / "jupyterlab.log"
    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
             f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
             f"--ServerApp.root_dir={root}", "--ServerApp.allow_root=True",
             "--LabApp.expose_app_in_browser=True"],
            cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if server.poll() is not None:
                pytest.fail(f"JupyterLab exited with code {server.returncode}:\n{_tail(log_path)}")
            try:
                request = urllib.request.Request(f"{url}/api/status", headers={"Authorization": f"token {token}"})
                urllib.request.urlopen(request, timeout=5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"JupyterLab did not answer within {SERVER_START_S} s:\n{_tail(log_path)}")
                time.sleep(0.5)
        yield {"url": url, "token": token, "log": log_path}
    finally:
        # SIGTERM lets the server shut its kernels down (they run in sessions of
        # their own); SIGKILL is for a server that hangs doing so.
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)


@pytest.fixture
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
        options.add_argument(flag)
    # A driver path of our own keeps Selenium Manager, which downloads drivers, out of it.
    service = Service(executable_path=str(CHROMEDRIVER), log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    try:
        # Screenshots capture the viewport, which --window-size leaves shorter than
        # the window by the height of a (headless, unseen) toolbar: size it directly.
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                               {"width": WINDOW[0], "height": WINDOW[1], "deviceScaleFactor": 1, "mobile": False})
        driver.set_page_load_timeout(60)
        driver.set_script_timeout(30)
        yield driver
    finally:
        driver.quit()


def _wait(driver, seconds, condition, failure):
    try:
        return WebDriverWait(driver, seconds, poll_frequency=1).until(condition)
    except TimeoutException:
        pytest.fail(failure() if callable(failure) else failure)


def _kernel_status(driver):
    return driver.execute_script(JS_KERNEL_STATUS, NOTEBOOK)


def _run_all_outcome(driver):
    outcome = driver.execute_script("return window.cblabRunAll")
    return outcome if outcome != "running" else None


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "(empty cell)"


def test_baseline_runs_in_jupyterlab_and_shows_lab_bench(lab, browser):
    browser.get(f"{lab['url']}/lab/tree/{NOTEBOOK}?token={lab['token']}")
    _wait(browser, KERNEL_START_S, lambda d: _kernel_status(d) == "idle",
          lambda: f"{NOTEBOOK} did not open with an idle kernel within {KERNEL_START_S} s "
                  f"(kernel status {_kernel_status(browser)!r}); server log:\n{_tail(lab['log'])}")

    browser.execute_script(JS_RUN_ALL, NOTEBOOK)
    started = time.monotonic()
    outcome = _wait(browser, RUN_ALL_S, _run_all_outcome, f"Run All Cells did not finish within {RUN_ALL_S} s")
    print(f"Run All Cells: {outcome} in {time.monotonic() - started:.0f} s")

    cells = browser.execute_script(JS_CELLS, NOTEBOOK)
    errors = [(cell, out) for cell in cells for out in cell["outputs"] if out["output_type"] == "error"]
    if errors:
        cell, out = errors[0]
        pytest.fail(f"{len(errors)} error output(s); the first, in the cell starting "
                    f"{_first_line(cell['source'])!r}: {out['ename']}: {out['evalue']}")
    not_run = [_first_line(cell["source"]) for cell in cells if cell["execution_count"] is None]
    assert outcome == "done" and not not_run, f"Run All Cells ended {outcome!r}; cells not run: {not_run}"

    widgets = _wait(browser, WIDGET_RENDER_S,
                    lambda d: [w for w in d.find_elements(By.CSS_SELECTOR, WIDGET_SELECTOR) if w.is_displayed()],
                    lambda: f"no visible {WIDGET_SELECTOR} element after running {NOTEBOOK} "
                            f"({len(browser.find_elements(By.CSS_SELECTOR, WIDGET_SELECTOR))} in the page)")
    # Use it as a reader would: tick a step (the Measure tab's box), press Run, and wait
    # for the table, the chart and the audio player.
    bench = widgets[0]
    step_box = _visible(bench, f".//label[span[normalize-space()='{CLICKED_STEP}']]/input")
    step_box.click()
    _visible(bench, ".//button[normalize-space()='Run']").click()
    _wait(browser, WIDGET_RUN_S,
          lambda d: bench.find_elements(By.CSS_SELECTOR, "table.cblab-results") and bench.find_elements(By.TAG_NAME, "audio"),
          lambda: f"the lab bench showed no results within {WIDGET_RUN_S} s; it says: {bench.text[-500:]!r}")
    table = bench.find_element(By.CSS_SELECTOR, "table.cblab-results").text
    assert CLICKED_STEP in table and "T3 decode tokens/s" in table, table
    assert "Error" not in bench.text, bench.text[-500:]
    # Centred where it fits; a widget taller than the window is shown from its top.
    browser.execute_script("arguments[0].scrollIntoView({block: arguments[0].offsetHeight < innerHeight * 0.8"
                           " ? 'center' : 'start'})", bench)
    _save_screenshot(browser, SCREENSHOT)


def test_a_chapter_opens_with_its_summary_plot(lab, browser):
    """A reader's first view of a chapter: its committed outputs, nothing run. The first plot
    has drawn (a non-empty image), and the screenshot shows it."""
    browser.get(f"{lab['url']}/lab/tree/{CHAPTER}?token={lab['token']}")
    plots = _wait(browser, KERNEL_START_S,
                  lambda d: [i for i in d.find_elements(By.CSS_SELECTOR, ".jp-OutputArea-output img")
                             if d.execute_script("return arguments[0].naturalWidth", i) > 0],
                  lambda: f"{CHAPTER} showed no drawn plot within {KERNEL_START_S} s; server log:\n"
                          f"{_tail(lab['log'])}")
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", plots[0])
    time.sleep(1)  # the scroll settles before the capture
    _save_screenshot(browser, CHAPTER_SCREENSHOT)


def _visible(element, xpath):
    """The first displayed match: the Compare tab holds hidden copies of the same controls."""
    matches = [m for m in element.find_elements(By.XPATH, xpath) if m.is_displayed()]
    if not matches:
        pytest.fail(f"no visible element for {xpath} in the lab bench")
    return matches[0]


def _save_screenshot(driver, path: Path):
    """The viewport as a 256-colour PNG: the file is committed and rewritten by
    every run, and a palette keeps it at about 40 % of Chromium's size with no
    visible change to a UI's flat colours."""
    image = Image.open(io.BytesIO(driver.get_screenshot_as_png()))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
