"""The sweeps page in headless Chromium against a real service whose
execution is paused: the sweep runner queues the trial jobs, and the test
plays their workers, writing their histories through the store with values
known here. The leaderboard is ranked as those values say, and every trial's
validation curve is drawn (a promoted trial's two rung jobs joined into one
curve) where its values are. A screenshot goes to test-artifacts/."""

from __future__ import annotations

import httpx
import pytest

from browser_helpers import chart, chromium, page_of, path_points, screenshot
from service_helpers import service, tiny_spec, wait_for
from test_dashboard_compare import geometry

pytestmark = pytest.mark.slow

http = httpx.Client(timeout=60)  # a loaded machine can stall a service for seconds
LRS = [0.05, 0.1, 0.2, 0.4]
FINAL = {0: 0.50, 1: 0.80, 2: 0.70, 3: 0.60}  # each trial's val_accuracy at step 10: trials 1 and 2 go on


def accuracy(trial: int, step: int) -> float:
    return FINAL[trial] * step / 10 if step <= 10 else FINAL[trial] + 0.02 * (step - 10) * (trial == 2)


def play(store, job_id: str, trial: int, steps: range) -> None:
    """Run a trial job as its workers would report it: evaluated every 5 steps."""
    store.transition(job_id, "running")
    for s in steps:
        store.record_metric(job_id, {"step": s, "loss": 1.0 / s, **(
            {"val_accuracy": accuracy(trial, s), "val_loss": 2.0 - accuracy(trial, s)} if s % 5 == 0 else {})})
    store.transition(job_id, "succeeded")


def runs(url: str, sweep_id: str, count: int) -> dict:
    def made():
        view = http.get(f"{url}/v1/sweeps/{sweep_id}").json()
        found = {(row["trial"], rung): job for row in view["leaderboard"] for rung, job in enumerate(row["jobs"])}
        return found if len(found) == count else None

    return wait_for(made, 90, what=f"{count} trial jobs")


def test_the_leaderboard_and_every_trials_validation_curve(tmp_path):
    with service(tmp_path) as (url, app), chromium() as browser:
        store = app.state.store
        doc = {"name": "page", "method": "halving", "base": tiny_spec(steps=20, eval_every=5, checkpoint_every=5),
               "space": {"training.optimizer.lr": {"grid": LRS}}, "max_concurrent_trials": 4,
               "objective": {"metric": "val_accuracy", "mode": "max"},
               "halving": {"reduction_factor": 2, "rungs": [10, 20]}}
        sweep_id = http.post(f"{url}/v1/sweeps", json=doc).json()["id"]
        for (trial, _), job in runs(url, sweep_id, 4).items():
            play(store, job, trial, range(1, 11))
        promoted = runs(url, sweep_id, 6)
        assert {t for (t, rung) in promoted if rung == 1} == {1, 2}
        for trial in (1, 2):
            play(store, promoted[(trial, 1)], trial, range(11, 21))
        wait_for(lambda: http.get(f"{url}/v1/sweeps/{sweep_id}").json()["state"] == "succeeded", 90,
                 what="the sweep to succeed")

        with page_of(browser) as page:
            page.goto(f"{url}/sweeps?sweep={sweep_id}")
            wait_for(lambda: page.evaluate("document.body.dataset.ready") == "1", 90, what="the first render")
            wait_for(lambda: chart(page, "accuracy")["points"] == 4 * 2 + 2 * 2, 90, what="every trial's curve")
            ranked = page.eval_on_selector_all("#leaderboard tr.trial", "trs => trs.map(t => Number(t.dataset.trial))")
            assert ranked == [2, 1, 3, 0]  # rung reached, then objective (at step 20: 2 0.90, 1 0.80)
            cells = page.eval_on_selector_all("#leaderboard tr.trial[data-trial='2'] td", "tds => tds.map(t => t.textContent)")
            assert cells[2:4] == ["succeeded", "20"] and "0.2" in cells[5]
            assert float(cells[4]) == pytest.approx(accuracy(2, 20), abs=5e-5)  # shown to 4 digits
            assert "best: trial 2" in page.locator("#sweep-summary").text_content()
            c = chart(page, "accuracy")
            assert [text for _, text in c["legend"]] == [f"trial {t}" for t in range(4)]
            X, Y = geometry(c, (5, 20))
            for trial in range(4):
                steps = [5, 10, 15, 20] if trial in (1, 2) else [5, 10]
                drawn = path_points(c["series"][f"trial-{trial}:val_accuracy"]["d"])
                expected = [(X(s), Y(accuracy(trial, s))) for s in steps]
                assert len(drawn) == len(expected)
                assert max(abs(p - q) for d, e in zip(drawn, expected) for p, q in zip(d, e)) < 0.06
            assert chart(page, "val-loss")["points"] == 12
            screenshot(page, "dashboard-sweep.png")
