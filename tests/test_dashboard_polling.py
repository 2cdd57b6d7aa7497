"""The dashboard asks only for new points: once it holds a job's history up
to step S, every poll asks for `since=S` (a page at a time), never for the
whole history again. A real service (paused; its store filled by hand), the
page in headless Chromium."""

from __future__ import annotations

import shutil
from urllib.parse import parse_qs, urlparse

import httpx
import pytest

from service_helpers import service, tiny_spec, wait_for

pytestmark = pytest.mark.slow


def test_the_dashboard_fetches_only_the_steps_after_those_it_holds(tmp_path):
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium is installed by .ci/run"
    with service(tmp_path) as (url, app):
        store = app.state.store
        job = httpx.post(f"{url}/v1/jobs", json=tiny_spec()).json()
        for step in range(1, 7001):  # more than one page (5000)
            store.record_metric(job["id"], {"step": step, "loss": 1.0 / step})
        asked: list[dict] = []
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, headless=True,
                                        args=["--no-sandbox", "--disable-gpu", "--no-first-run"])
            try:
                page = browser.new_page()
                page.on("request", lambda r: "/metrics" in r.url and asked.append(parse_qs(urlparse(r.url).query)))
                page.goto(f"{url}/?job={job['id']}")
                points = lambda: int(page.locator("#loss").get_attribute("data-points") or 0)  # noqa: E731
                wait_for(lambda: points() == 7000, 60, what="7000 points drawn")
                for step in range(7001, 7011):
                    store.record_metric(job["id"], {"step": step, "loss": 1.0 / step})
                wait_for(lambda: points() == 7010, 60, what="7010 points drawn")
                for _ in range(2):  # two more polls
                    with page.expect_request(lambda r: "/metrics" in r.url, timeout=60_000):
                        pass
            finally:
                browser.close()
    since = [int(q["since"][0]) for q in asked]
    assert since[:2] == [0, 5000] and {q["limit"][0] for q in asked} == {"5000"}
    # after the first two pages: only ever from the last step held
    assert set(since[2:]) <= {7000, 7010} and since[-1] == 7010
    assert since.index(7010) > since.index(7000) and since.count(0) == 1
