"""`make plots`: `dvc plots show` whose HTML renders with no network (vega, vega-lite and vega-embed from
tools/plots/node_modules, pinned by tools/plots/package-lock.json), checked in headless Chromium."""
from __future__ import annotations

import re
import shutil

import pytest

from .conftest import BIN, ROOT, copy_repo, run

NODE_MODULES = ROOT / "tools" / "plots" / "node_modules"


def render_offline(html) -> tuple[int, int, list[str]]:
    """Open ``html`` in headless Chromium with every http(s) request refused: (plots on the page, plots vega drew,
    the remote URLs the page asked for)."""
    plots = html.read_text().count("vegaEmbed(")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian chromium is not installed (make test installs it when run as root)")
    from playwright.sync_api import sync_playwright

    remote: list[str] = []

    def route(r):
        if r.request.url.startswith(("http://", "https://")):
            remote.append(r.request.url)
            return r.abort()
        return r.continue_()

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"])
        page = browser.new_page()
        page.route("**/*", route)
        page.goto(html.as_uri())
        try:
            page.wait_for_function(f"document.querySelectorAll('.vega-embed canvas, .vega-embed svg.marks').length >= {plots}",
                                   timeout=30_000)
        except Exception:  # noqa: BLE001 - not drawn: counted below
            pass
        drawn = page.locator(".vega-embed").filter(has=page.locator("canvas, svg.marks")).count()
        browser.close()
    return plots, drawn, remote


def test_make_plots_renders_offline(tmp_path):
    assert (NODE_MODULES / ".installed").is_file(), "tools/plots/node_modules is missing: run `make plots-js` (npm ci)"
    repo = copy_repo(tmp_path / "repo")  # the committed plots/*.csv and dvc.yaml's plot definitions
    (repo / "tools/plots/node_modules").symlink_to(NODE_MODULES)
    run(["make", "plots", f"VENV={BIN.parent}"], cwd=repo)
    html = repo / "dvc_plots" / "index.html"
    text = html.read_text()
    scripts = re.findall(r'<script[^>]*\bsrc="([^"]+)"', text)
    assert len(scripts) == 3 and not [s for s in scripts if re.match(r"\w+://", s)], scripts
    for src in scripts:
        assert (html.parent / src).resolve().is_file(), src
    plots, drawn, remote = render_offline(html)
    assert plots >= 10 and drawn == plots and remote == [], (plots, drawn, remote)

    # DVC's own page loads vega from a CDN: offline it draws nothing (what this target is for)
    run(["dvc", "plots", "show", "-o", "cdn"], cwd=repo)
    plots, drawn, remote = render_offline(repo / "cdn" / "index.html")
    assert plots >= 10 and drawn == 0 and any("cdn.jsdelivr.net" in u for u in remote)
