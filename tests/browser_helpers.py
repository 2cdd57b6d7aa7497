"""Helpers for the dashboard tests: Debian's chromium driven headless by
Playwright (it never downloads a browser), a page that fails the test on
any script error, and the geometry of the SVG charts the page draws, read
back so that a test can check where a value was drawn."""

from __future__ import annotations

import re
import shutil
from contextlib import contextmanager
from pathlib import Path

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"  # gitignored; kept by CI


def launch_chromium(playwright):
    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium is installed by .ci/run"
    return playwright.chromium.launch(executable_path=chromium, headless=True, args=[
        "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"])


@contextmanager
def chromium():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = launch_chromium(p)
        try:
            yield browser
        finally:
            browser.close()


@contextmanager
def page_of(browser, width: int = 1400, height: int = 1000):
    """A new page; any uncaught script error in it fails the test at the end."""
    page = browser.new_page(viewport={"width": width, "height": height})
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    try:
        yield page
    finally:
        page.close()
    assert not errors, errors


def screenshot(page, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    return path


def path_points(d: str) -> list[tuple[float, float]]:
    """The vertices of an SVG path made of M and L commands."""
    return [(float(x), float(y)) for x, y in re.findall(r"[ML](-?[\d.]+),(-?[\d.]+)", d)]


def chart(page, svg_id: str) -> dict:
    """What a line chart shows: its scale and y domain, its plot area (the
    frame), its series {id: [(x, y), ...] in pixels}, its y tick labels and
    its markers [(kind, step)]."""
    return page.evaluate("""id => {
        const svg = document.getElementById(id), f = svg.querySelector("rect.frame");
        return {
            scale: svg.dataset.scale, points: Number(svg.dataset.points),
            ymin: Number(svg.dataset.ymin), ymax: Number(svg.dataset.ymax),
            frame: f && ["x", "y", "width", "height"].map(k => Number(f.getAttribute(k))),
            series: Object.fromEntries([...svg.querySelectorAll("path.series")].map(p =>
                [p.dataset.series, {d: p.getAttribute("d"), n: Number(p.dataset.points)}])),
            yticks: [...svg.querySelectorAll("text.tick.y")].map(t => t.textContent),
            markers: [...svg.querySelectorAll("g.marker")].map(g => [g.dataset.kind, Number(g.dataset.step)]),
            spans: [...svg.querySelectorAll("rect.span")].length,
            legend: [...document.querySelectorAll(`#${id}-legend li`)].map(li => [li.dataset.series, li.textContent]),
        };
    }""", svg_id)
