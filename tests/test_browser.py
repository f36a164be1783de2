"""Chapter 11's chat panel in a real browser: JupyterLab headless, Chromium driven by Playwright.

Starts JupyterLab on a free local port with a token, opens a copy of notebook 11, runs all its
cells, uploads a picture of the world into the panel, asks about it, and checks that an answer
appears and that the panel's ``<audio>`` element gets a source. A screenshot is saved as
``build/browser-panel.png``; a failure lists the page's console errors. Skipped without Debian's
``chromium`` or the ``playwright`` package (its own browser download is not needed).
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from ports import free_port

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
NOTEBOOK = "11_talking_to_muomni.ipynb"
SCREENSHOT = ROOT / "build" / "browser-panel.png"
ALL_RAN = "every cell ran"  # printed by the last cell the test adds to its copy of the notebook

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (apt-get install chromium)"),
]


@pytest.fixture
def lab(tmp_path):
    """JupyterLab serving ``tmp_path`` (a copy of notebook 11 and a world picture): yields its URL and token."""
    # The copy keeps no stored output and ends in a cell that says every cell ran, so the test can
    # wait until the kernel is free (an Ask sent earlier would queue behind the notebook's training).
    notebook = json.loads((ROOT / "notebooks" / NOTEBOOK).read_text())
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code":
            cell["outputs"], cell["execution_count"] = [], None
    notebook["cells"].append({"cell_type": "code", "metadata": {}, "outputs": [], "execution_count": None,
                              "source": [f"print({ALL_RAN!r})"]})
    (tmp_path / NOTEBOOK).write_text(json.dumps(notebook))
    from muomni.data import scenes

    scenes.render_scene(scenes.sample_scene(random.Random(3)), 64).save(tmp_path / "world.png")
    port, token = free_port(), secrets.token_hex(16)
    settings = tmp_path / ".jupyter"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "JUPYTER_CONFIG_DIR": str(settings / "config"), "JUPYTER_RUNTIME_DIR": str(settings / "runtime"),
           "JUPYTERLAB_SETTINGS_DIR": str(settings / "lab"), "JUPYTERLAB_WORKSPACES_DIR": str(settings / "workspaces")}
    command = [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
               f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={tmp_path}",
               "--LabApp.news_url=", "--ServerApp.open_browser=False"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        command.append("--allow-root")
    log = open(tmp_path / "jupyter.log", "wb")
    server = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    pytest.fail(f"JupyterLab did not start: {(tmp_path / 'jupyter.log').read_text()[-2000:]}")
                time.sleep(0.5)
        yield url, token, tmp_path
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def test_the_chat_panel_answers_an_uploaded_picture_in_a_browser(lab):
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    url, token, folder = lab
    errors: list[str] = []
    SCREENSHOT.parent.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda error: errors.append(str(error)))
        try:
            page.goto(f"{url}/lab/tree/{NOTEBOOK}?token={token}")
            page.locator(".jp-NotebookPanel").first.wait_for(timeout=60_000)
            # A fresh JupyterLab asks which kernel to start; the notebook's own (python3) is preselected.
            try:
                page.locator(".jp-Dialog button", has_text="Select").click(timeout=20_000)
            except sync_api.TimeoutError:
                pass  # no dialog: the kernel started by itself
            page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
            page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
            panel = page.locator(".muomni-panel")
            panel.wait_for(timeout=90_000)
            page.locator(".jp-OutputArea-output", has_text=ALL_RAN).first.wait_for(timeout=300_000)

            with page.expect_file_chooser() as chooser:
                panel.locator(".widget-upload").first.click()
            chooser.value.set_files(str(folder / "world.png"))
            panel.locator(".widget-upload", has_text="1").first.wait_for(timeout=10_000)  # "image (1)"
            panel.locator("input[placeholder='what colour is the circle?']").fill("what colour is the star?")
            panel.locator("button", has_text="Ask").click()
            panel.get_by_text("image world.png").wait_for(timeout=60_000)
            answer = panel.locator("pre").first.inner_text()
            source = panel.locator("audio source").first.get_attribute("src", timeout=10_000) or ""
            try:  # JupyterLab's question about its news would cover part of the screenshot
                page.locator(".jp-toast-button", has_text="No").click(timeout=2_000)
            except sync_api.TimeoutError:
                pass
            panel.scroll_into_view_if_needed()
            page.screenshot(path=str(SCREENSHOT))
            assert answer.strip(), "the panel shows no answer"
            assert source.startswith("data:audio/wav"), f"the panel's <audio> has no WAV source: {source[:40]!r}"
        except Exception as error:
            page.screenshot(path=str(SCREENSHOT))
            raise AssertionError(f"{error}\nconsole errors: {errors or 'none'}\nscreenshot: {SCREENSHOT}") from error
        finally:
            browser.close()
