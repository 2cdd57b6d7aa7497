"""The dashboard in headless Chromium against a real service (paused: its
store is filled through the store's own API with histories whose values are
known here): overlaid curves with a legend, drawn where the values say on a
log or a linear axis; the jobs table's final metrics and its filters; the
spec difference; the per-worker step time; events marked on the curves; and
the load time with 500 jobs in the store. Screenshots go to test-artifacts/."""

from __future__ import annotations

import json
import math
import time
from urllib.parse import parse_qs, urlparse

import httpx
import pytest

from browser_helpers import ARTIFACTS, chart, chromium, page_of, path_points, screenshot
from service_helpers import service, tiny_spec, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def browser():
    with chromium() as b:
        yield b


@pytest.fixture
def paused(tmp_path):
    with service(tmp_path) as (url, app):
        yield url, app.state.store


def submit(url: str, name: str, **changes) -> str:
    spec = tiny_spec()
    spec["name"] = name
    for path, value in changes.items():
        *parents, last = path.split(".")
        node = spec
        for p in parents:
            node = node[p]
        node[last] = value
    r = httpx.post(f"{url}/v1/jobs", json=spec)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def ready(page, url: str, query: str = "") -> None:
    page.goto(f"{url}/{query}")
    wait_for(lambda: page.evaluate("document.body.dataset.ready") == "1", 30, what="the page's first render")


def geometry(c: dict, steps: tuple[int, int]):
    """Pixel position of (step, value) from the chart's frame and domain, on its scale."""
    fx, fy, fw, fh = c["frame"]
    f = (lambda v: math.log10(max(v, c["ymin"]))) if c["scale"] == "log" else (lambda v: v)
    return (lambda s: fx + (s - steps[0]) / (steps[1] - steps[0]) * fw,
            lambda v: fy + fh - (f(v) - f(c["ymin"])) / (f(c["ymax"]) - f(c["ymin"])) * fh)


# ---------------------------------------------------------------- curves

STEPS = 300


def loss_a(s): return 2.0 * 0.98 ** s  # noqa: E704
def loss_b(s): return 2.0 * 0.9 ** s  # to ~4e-14: flat at zero on a linear axis  # noqa: E704


def fill_curves(store, a: str, b: str) -> dict:
    written = {a: [], b: []}
    for s in range(1, STEPS + 1):
        for job, loss, acc in ((a, loss_a, s / 400), (b, loss_b, min(0.99, s / 100))):
            record = {"step": s, "loss": loss(s), "samples_per_s": 1000.0 + s}
            if s % 10 == 0:
                record.update(val_loss=1.1 * loss(s), val_accuracy=acc)
            store.record_metric(job, record)
            written[job].append(record)
    return written


def test_two_jobs_overlaid_with_a_legend_drawn_where_the_values_are_on_a_log_or_linear_axis(browser, paused):
    url, store = paused
    a, b = submit(url, "lr-small"), submit(url, "lr-big", **{"training.optimizer.lr": 0.5})
    written = fill_curves(store, a, b)
    with page_of(browser) as page:
        ready(page, url, f"?jobs={a},{b}")
        acc = chart(page, "accuracy")
        assert set(acc["series"]) == {f"{a}:val_accuracy", f"{b}:val_accuracy"}
        assert [text for _, text in acc["legend"]] == ["lr-small", "lr-big"]
        loss = chart(page, "loss")
        assert [s for s, _ in loss["legend"]] == [f"{a}:loss", f"{a}:val_loss", f"{b}:loss", f"{b}:val_loss"]
        assert [t for _, t in loss["legend"]] == ["lr-small train", "lr-small validation", "lr-big train",
                                                  "lr-big validation"]
        assert loss["series"][f"{a}:loss"]["n"] == STEPS and loss["series"][f"{b}:val_loss"]["n"] == STEPS // 10
        assert "loss (log)" in page.locator("#loss text.axis-name.y").text_content()
        assert page.locator("#loss text.axis-name.x").text_content() == "step"
        assert page.locator("#accuracy text.axis-name.y").text_content() == "accuracy"

        values = [r[k] for rows in written.values() for r in rows for k in ("loss", "val_loss") if k in r]
        shots = {}
        for scale in ("log", "linear"):
            if scale == "linear":
                page.check("input[name=scale][value=linear]")
                wait_for(lambda: chart(page, "loss")["scale"] == "linear", 10, what="the linear axis")
                assert "scale=linear" in page.url
            c = chart(page, "loss")
            if scale == "log":  # the domain is the values' range; every tick a power of ten
                assert (c["ymin"], c["ymax"]) == (min(values), max(values))
                assert all(abs(math.log10(float(t)) - round(math.log10(float(t)))) < 1e-9 for t in c["yticks"])
                assert len(c["yticks"]) >= 4
            else:  # round ticks, evenly spaced, covering the values
                assert c["ymin"] <= 0 <= min(values) and c["ymax"] >= max(values)
                ticks = [float(t) for t in c["yticks"]]
                assert len(set(round(y - x, 12) for x, y in zip(ticks, ticks[1:]))) == 1
            X, Y = geometry(c, (1, STEPS))
            for job in (a, b):
                for key in ("loss", "val_loss"):
                    expected = [(X(r["step"]), Y(r[key])) for r in written[job] if key in r]
                    drawn = path_points(c["series"][f"{job}:{key}"]["d"])
                    assert len(drawn) == len(expected)
                    assert max(max(abs(p - q) for p, q in zip(d, e)) for d, e in zip(drawn, expected)) < 0.06
            # the tail of the fast run: visible on the log axis, flat at zero on the linear one
            tail = [y for (x, y) in path_points(c["series"][f"{b}:loss"]["d"])[STEPS // 2:]]
            span = max(tail) - min(tail)
            if scale == "log":
                assert span > 0.1 * c["frame"][3]
            else:
                assert span < 1.5
            assert chart(page, "accuracy")["scale"] == "linear"
            shots[scale] = screenshot(page, f"dashboard-overlay-{scale}.png")
        page.reload()
        wait_for(lambda: page.evaluate("document.body.dataset.ready") == "1", 30)
        assert chart(page, "loss")["scale"] == "linear" and page.is_checked("input[name=scale][value=linear]")


# ---------------------------------------------------------------- table and filters


def test_the_table_shows_final_metrics_and_filters_by_state_and_name_on_the_server(browser, paused):
    url, store = paused
    done = submit(url, "alpha-one")
    broke = submit(url, "alpha-two")
    waiting = submit(url, "beta")
    last = {}
    for job, steps in ((done, 12), (broke, 7)):
        store.transition(job, "running")
        for s in range(1, steps + 1):
            evaluated = s % 5 == 0
            store.record_metric(job, {"step": s, "loss": 3.0 / (s + 1) + (job == broke),
                                      "val_loss": 3.3 / (s + 1) if evaluated else None,
                                      "val_accuracy": 0.07 * s if evaluated else None})
        # what each column's last value is, worked out from what was written
        last[job] = {"loss": 3.0 / (steps + 1) + (job == broke), "val_loss": 3.3 / (steps // 5 * 5 + 1),
                     "val_accuracy": 0.07 * (steps // 5 * 5)}
    store.transition(done, "succeeded")
    store.transition(broke, "failed", error="boom")
    lists: list[dict] = []
    with page_of(browser) as page:
        page.on("request", lambda r: urlparse(r.url).path == "/v1/jobs" and lists.append(parse_qs(urlparse(r.url).query)))
        ready(page, url)
        rows = lambda: page.eval_on_selector_all("tr.job", "trs => trs.map(t => t.dataset.id)")  # noqa: E731
        assert rows() == [waiting, broke, done]
        for job in (done, broke):
            for column, value in last[job].items():
                td = page.locator(f"tr.job[data-id='{job}'] td.{column}")
                assert float(td.get_attribute("data-value")) == pytest.approx(value, rel=1e-12)
            text = page.locator(f"tr.job[data-id='{job}'] td.val_accuracy").text_content()
            assert text == f"{100 * last[job]['val_accuracy']:.1f}%"
        assert page.locator(f"tr.job[data-id='{waiting}'] td.loss").text_content() == "–"
        assert page.locator(f"tr.job[data-id='{done}']").get_attribute("data-state") == "succeeded"

        page.select_option("#filter-state", "succeeded")
        wait_for(lambda: rows() == [done], 10, what="only the succeeded job")
        assert "state=succeeded" in page.url
        page.fill("#filter-name", "ALPHA")
        page.select_option("#filter-state", "")
        wait_for(lambda: rows() == [broke, done], 10, what="the two alpha jobs")
        page.select_option("#filter-state", "failed")
        wait_for(lambda: rows() == [broke], 10, what="the failed alpha job")
        assert "1 job matching" in page.locator("#count").text_content()
        page.fill("#filter-name", "gamma")
        wait_for(lambda: "no job matches" in page.locator("#jobs").text_content(), 10, what="no job")
        screenshot(page, "dashboard-filters.png")
    # filtered by the service, not by the page
    assert {"state": ["succeeded"], "limit": ["1000"]} in lists
    assert any(q.get("name") == ["ALPHA"] and q.get("state") == ["failed"] for q in lists)
    assert any(q.get("name") == ["gamma"] for q in lists)


# ---------------------------------------------------------------- spec difference


def flat(spec: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in spec.items():
        path = f"{prefix}.{k}" if prefix else k
        out.update(flat(v, path) if isinstance(v, dict) and v else {path: v})
    return out


def test_the_spec_difference_names_each_differing_field_with_both_values(browser, paused):
    url, _ = paused
    a = submit(url, "base")
    b = submit(url, "wider", **{"training.optimizer.lr": 0.02, "model.hidden": [32, 8]})
    specs = [httpx.get(f"{url}/v1/jobs/{j}").json()["spec"] for j in (a, b)]
    fa, fb = flat(specs[0]), flat(specs[1])
    expected = {p: (json.dumps(fa.get(p), separators=(",", ":")), json.dumps(fb.get(p), separators=(",", ":")))
                for p in fa.keys() | fb.keys() if fa.get(p) != fb.get(p)}
    assert set(expected) == {"name", "training.optimizer.lr", "model.hidden"}  # what was changed above
    with page_of(browser) as page:
        ready(page, url, f"?jobs={a},{b}")
        wait_for(lambda: page.locator("#diff tr[data-path]").count() == 3, 10, what="three differing fields")
        shown = {tr[0]: (tr[1], tr[2]) for tr in page.eval_on_selector_all(
            "#diff tr[data-path]", "trs => trs.map(t => [...t.children].map(c => c.textContent))")}
        assert shown == expected
        assert shown["training.optimizer.lr"] == ("0.1", "0.02")
        assert json.loads(page.locator("#spec").text_content()) == specs[1]  # the focused job: the last chosen
        page.select_option("#diff-b", a)
        wait_for(lambda: page.locator("#diff").text_content() == "the same job", 10, what="the same job")
        page.select_option("#diff-b", b)
        wait_for(lambda: page.locator("#diff tr[data-path]").count() == 3, 10)
        screenshot(page, "dashboard-spec-diff.png")


# ---------------------------------------------------------------- per-worker step time


def test_the_per_worker_step_time_shows_the_straggler(browser, paused):
    url, store = paused
    slow = submit(url, "straggling")
    plain = submit(url, "older")
    compute = lambda s: {"0": 0.010 + 0.001 * (s % 3), "1": 0.011, "2": 0.035 + 0.002 * (s % 2)}  # noqa: E731
    wait = lambda s: {"0": 0.024, "1": 0.023 + 0.001 * (s % 2), "2": 0.0}  # noqa: E731
    for s in range(1, 151):
        store.record_metric(slow, {"step": s, "loss": 1.0, "worker_compute_s": compute(s), "worker_wait_s": wait(s)})
        store.record_metric(plain, {"step": s, "loss": 1.0, "phases": {"compute": 0.02, "transfer": 0.001 * (s % 4),
                                                                       "reduce_apply": 0.003, "wait": 0.01}})
    recent = range(51, 151)  # the breakdown is over the last 100 steps
    means = {(f"worker {w}", part): sum(f(s)[str(w)] for s in recent) / len(recent)
             for w in range(3) for part, f in (("compute", compute), ("wait", wait))}
    with page_of(browser) as page:
        ready(page, url, f"?jobs={plain},{slow}")
        assert page.locator("#workers").get_attribute("data-mode") == "workers"
        bars = page.eval_on_selector_all("#workers rect[data-part]", "rs => rs.map(r => [r.dataset.row, "
                                         "r.dataset.part, Number(r.dataset.value), Number(r.getAttribute('width'))])")
        assert {(row, part): value for row, part, value, _ in bars} == pytest.approx(means, rel=1e-12)
        scale = [width / value for _, _, value, width in bars if value > 0]
        assert scale == pytest.approx([scale[0]] * len(scale), rel=1e-9)  # one seconds axis for every bar
        assert page.eval_on_selector_all("#workers g.bar.straggler", "gs => gs.map(g => g.dataset.row)") == ["worker 2"]
        note = page.locator("#workers-note").text_content()
        assert "steps 51–150" in note and "worker 2 computes" in note
        screenshot(page, "dashboard-straggler.png")
        page.click(f".chip[data-id='{plain}'] .chip-name")  # a history without per-worker timings
        wait_for(lambda: page.locator("#workers").get_attribute("data-mode") == "phases", 10, what="phases")
        parts = dict(page.eval_on_selector_all("#workers rect[data-part]",
                                               "rs => rs.map(r => [r.dataset.part, Number(r.dataset.value)])"))
        assert parts == pytest.approx({"compute": 0.02, "transfer": sum(0.001 * (s % 4) for s in recent) / 100,
                                       "reduce_apply": 0.003, "wait": 0.01}, rel=1e-12)
        assert "no per-worker timings" in page.locator("#workers-note").text_content()


# ---------------------------------------------------------------- events on the curves


def test_a_failure_is_marked_on_the_curves_at_the_last_step_before_it(browser, paused):
    url, store = paused
    job = submit(url, "doomed")
    store.transition(job, "running")
    for s in range(1, 7):
        time.sleep(0.01)
        store.record_metric(job, {"step": s, "loss": 1.0 / s, "samples_per_s": 100.0})
    time.sleep(0.01)
    store.transition(job, "failed", reason="worker died", error="boom")
    with page_of(browser) as page:
        ready(page, url, f"?jobs={job}")
        wait_for(lambda: chart(page, "loss")["markers"] == [["failure", 6]], 10, what="the failure at step 6")
        assert chart(page, "rate")["markers"] == [["failure", 6]]  # on every chart with points
        assert chart(page, "accuracy")["points"] == 0 and chart(page, "accuracy")["markers"] == []
        kinds = page.eval_on_selector_all("#events tr.event", "trs => trs.map(t => t.className)")
        assert "event failure" in kinds
        assert "failed" in page.locator("#events").text_content()
        screenshot(page, "dashboard-failure.png")


# ---------------------------------------------------------------- 500 jobs


def test_with_500_jobs_the_page_loads_and_records_its_load_time(browser, paused):
    """Not a timed assertion: the time is written to test-artifacts/ (and
    measured in bench/dashboard.py for docs/benchmarks.md)."""
    url, store = paused
    spec = tiny_spec()
    ids = []
    for i in range(500):
        job = store.create_job({**spec, "name": f"sweep-{i:03d}"})[0]["id"]
        ids.append(job)
        store.transition(job, "running")
        for s in range(1, 61):
            store.record_metric(job, {"step": s, "loss": 1.0 / (s + i), "val_loss": 1.0 / s if s % 10 == 0 else None,
                                      "val_accuracy": s / 60 if s % 10 == 0 else None})
        if i < 480:
            store.transition(job, "succeeded")
    with page_of(browser) as page:
        ready(page, url)
        ms = page.evaluate("performance.getEntriesByName('dashboard-ready')[0].startTime")
        assert page.locator("#count").text_content() == "500 jobs"
        assert page.locator("tr.job").count() == 100  # the rest as it is scrolled to
        newest = page.locator(f"tr.job[data-id='{ids[-1]}'] td.loss")
        assert float(newest.get_attribute("data-value")) == 1.0 / (60 + 499)
        assert chart(page, "loss")["series"][f"{ids[-1]}:loss"]["n"] == 60  # the newest, chosen by default
        screenshot(page, "dashboard-500-jobs.png")
        rows = lambda: page.locator("tr.job").count()  # noqa: E731
        while rows() < 500:  # each time the end of the table is seen: 100 more
            before = rows()
            page.locator("#more-jobs").scroll_into_view_if_needed()
            wait_for(lambda: rows() > before, 10, what=f"more than {before} rows")
        assert page.locator("#more-jobs").count() == 0
        oldest = page.locator(f"tr.job[data-id='{ids[0]}']")
        assert oldest.get_attribute("data-state") == "succeeded"
        assert float(oldest.locator("td.loss").get_attribute("data-value")) == 1.0 / 60
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "dashboard-load.json").write_text(json.dumps({"jobs": 500, "ready_ms": ms}))
    print(f"500 jobs: the page was ready {ms:.0f} ms after navigation started")
