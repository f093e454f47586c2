"""The trace-review page in real headless Chromium (Debian's ``chromium`` driven by
Playwright through its executable path): overlays, claim -> region, reviews kept."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import cli_env
from tests.service_helpers import Server, blood_smear_png, post_run, wait_done

pytestmark = pytest.mark.slow

CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _chromium() -> str:
    """Path of a Chromium binary: ``MEDLOUPE_CHROMIUM``, one on PATH, or Debian's package
    installed now (as root, with apt-get); otherwise the test is skipped with the reason."""
    given = os.environ.get("MEDLOUPE_CHROMIUM")
    if given:
        return given
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    if hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        proc = subprocess.run(
            ["apt-get", "install", "-y", "--no-install-recommends", "chromium"],
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
            capture_output=True,
            text=True,
            timeout=900,
        )
        found = shutil.which("chromium")
        if found:
            return found
        pytest.skip(f"Chromium is not installed and apt-get could not install it: {proc.stderr[-300:]}")
    pytest.skip("no Chromium: install Debian's 'chromium' package or set MEDLOUPE_CHROMIUM")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (dev extra) is not installed")
    executable = _chromium()
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, str]]:
    home = tmp_path_factory.mktemp("browser-svc")
    srv = Server(home).start()
    try:
        smear = blood_smear_png(home / "smear.png")
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            run_id = post_run(c, smear, "Where are the white blood cells?").json()["run_id"]
            info = wait_done(c, run_id)
        assert info["status"] == "done", info
        yield srv, run_id
    finally:
        srv.stop()


def test_review_page_overlays_claims_and_reviews_in_chromium(
    browser: Any, finished_run: tuple[Server, str], tmp_path: Path
) -> None:
    from playwright.sync_api import expect  # installed: the browser fixture imported it

    srv, run_id = finished_run
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"{srv.url}/runs/{run_id}")
    assert page.locator("h1").inner_text() == "Where are the white blood cells?"
    assert page.locator("#disclaimer").inner_text().startswith("medloupe is a research tool")
    # the image is decoded and drawn
    assert page.evaluate("document.querySelector('img.base').naturalWidth") == 480

    # overlays toggle
    boxes = page.locator("#layer-boxes rect.box")
    assert boxes.count() >= 2
    assert page.locator("#layer-crops rect.crop").count() >= 1
    assert boxes.first.is_visible()
    page.uncheck("#toggle-boxes")
    assert not boxes.first.is_visible()
    page.check("#toggle-boxes")
    assert boxes.first.is_visible()
    page.uncheck("#toggle-crops")
    assert not page.locator("#layer-crops rect.crop").first.is_visible()
    page.check("#toggle-crops")

    # selecting a claim highlights its regions (and only the regions of its evidence)
    claim = page.locator("button.claim").first
    cited = set((claim.get_attribute("data-evidence") or "").split())
    assert page.locator("rect.box.hl").count() == 0
    claim.click()
    assert claim.get_attribute("aria-pressed") == "true"
    lit = page.locator("rect.box.hl")
    assert lit.count() >= 2
    assert {lit.nth(i).get_attribute("data-evidence") for i in range(lit.count())} <= cited
    stroke = page.evaluate("getComputedStyle(document.querySelector('rect.box.hl')).stroke")
    assert stroke == "rgb(255, 45, 85)"
    assert page.locator("li.ev-tool.hl").count() >= 1  # its tool call in the timeline

    # a review is stored and survives a reload
    page.check("input[name=verdict][value=disagree]")
    page.fill("textarea[name=comment]", "second box is too wide")
    page.fill("input[name=reviewer]", "test reader")
    page.click("#review-submit")
    # a locator wait, not wait_for_function: the page's CSP (rightly) forbids string eval
    expect(page.locator("#review-status")).to_have_text("saved")
    page.reload()
    reviews = page.locator("#reviews li.review")
    assert reviews.count() == 1
    assert "second box is too wide" in reviews.first.inner_text()
    assert "disagree" in reviews.first.inner_text()

    shot = tmp_path / "review-page.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes().startswith(b"\x89PNG") and shot.stat().st_size > 20_000
    keep = os.environ.get("MEDLOUPE_SCREENSHOT_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / shot.name)
    assert errors == []
    page.close()


def test_exported_page_works_offline_with_the_review(
    browser: Any, finished_run: tuple[Server, str], tmp_path: Path
) -> None:
    srv, run_id = finished_run
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        c.post(f"/v1/runs/{run_id}/reviews", json={"verdict": "agree", "comment": "exported ok"})
    out = tmp_path / "review.html"
    proc = subprocess.run(
        [sys.executable, "-m", "medloupe", "trace", "export", run_id, "--html", "--out", str(out)],
        env=cli_env(srv.home),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    assert "http://" not in text.split("<style>")[1]  # nothing fetched from a server
    page = browser.new_page()
    page.route("**/*", lambda route: route.abort() if not route.request.url.startswith(("file:", "data:")) else route.continue_())
    page.goto(out.as_uri())
    assert page.evaluate("document.querySelector('img.base').naturalWidth") == 480
    page.locator("button.claim").first.click()
    assert page.locator("rect.box.hl").count() >= 2
    assert "exported ok" in page.locator("#reviews").inner_text()
    assert page.locator("#review-form").count() == 0
    page.close()
