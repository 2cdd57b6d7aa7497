"""How long the dashboard takes to load with 500 jobs in the store.

A real service on loopback (paused: nothing runs; its SQLite store filled
through the store's own API with 500 jobs of 60 recorded steps each, 480 of
them finished), the page opened in headless Chromium (Debian's) `--loads`
times in fresh pages. A load is timed from the start of navigation to the
page's `dashboard-ready` mark: the jobs table drawn and the newest job's
curves, events, step time and spec shown. Reports each load and the median.

    .venv/bin/python bench/dashboard.py [--jobs 500] [--loads 7]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from browser_helpers import chromium, page_of  # noqa: E402
from service_helpers import service, tiny_spec, wait_for  # noqa: E402


def fill(store, jobs: int) -> None:
    spec = tiny_spec()
    for i in range(jobs):
        job = store.create_job({**spec, "name": f"sweep-{i:03d}"})[0]["id"]
        store.transition(job, "running")
        for s in range(1, 61):
            store.record_metric(job, {"step": s, "loss": 1.0 / (s + i), "val_loss": 1.0 / s if s % 10 == 0 else None,
                                      "val_accuracy": s / 60 if s % 10 == 0 else None})
        if i < jobs * 24 // 25:
            store.transition(job, "succeeded")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--loads", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, service(Path(tmp)) as (url, app):
        fill(app.state.store, args.jobs)
        times = []
        with chromium() as browser:
            for _ in range(args.loads):
                with page_of(browser) as page:
                    page.goto(f"{url}/")
                    wait_for(lambda: page.evaluate("document.body.dataset.ready") == "1", 30)
                    times.append(page.evaluate("performance.getEntriesByName('dashboard-ready')[0].startTime"))
    print(json.dumps({"jobs": args.jobs, "loads_ms": [round(t) for t in times],
                      "median_ms": round(statistics.median(times))}))


if __name__ == "__main__":
    main()
