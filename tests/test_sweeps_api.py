"""/v1/sweeps on a real service whose execution is paused (no Ray): every
bad sweep document is a 422 naming the field and the value with nothing
stored; a good one is stored with its trials' values, idempotently; the
runner queues its trials as ordinary jobs within max_concurrent_trials, in
the one FIFO queue; cancelling a sweep cancels its queued trial jobs."""

from __future__ import annotations

import copy
import json

import httpx
import pytest
import yaml

from core.sweep import parse_sweep
from service import sweep_command
from service_helpers import service, tiny_spec, wait_for

http = httpx.Client(timeout=60)  # a loaded machine can stall a service for seconds
LRS = [0.05, 0.1, 0.2, 0.4]


def sweep_doc(**changes) -> dict:
    doc = {"name": "sw", "seed": 3, "method": "halving", "base": tiny_spec(steps=20, eval_every=10, checkpoint_every=10),
           "space": {"training.optimizer.lr": {"grid": LRS}},
           "objective": {"metric": "val_accuracy", "mode": "max"}, "max_concurrent_trials": 2,
           "halving": {"reduction_factor": 2, "rungs": [10, 20]}}
    for path, value in changes.items():
        *parents, last = path.split("/")
        node = doc
        for p in parents:
            node = node[p]
        if value is DROP:
            del node[last]
        else:
            node[last] = value
    return doc


DROP = object()


@pytest.fixture
def paused(tmp_path):
    with service(tmp_path, max_parameters=100_000) as (url, app):
        yield url, app


BAD = [  # (case, changes, words the detail names)
    ("unknown path", {"space": {"training.optimizr.lr": {"uniform": [0.1, 0.2]}}}, ["training.optimizr.lr", "optimizr"]),
    ("empty space", {"space": {}}, ["space", "{}"]),
    ("inverted bounds", {"space": {"training.optimizer.lr": {"uniform": [0.5, 0.1]}}},
     ["training.optimizer.lr", "0.5", "0.1"]),
    ("log of a non-positive number", {"space": {"training.optimizer.lr": {"log_uniform": [0.0, 0.1]}}},
     ["training.optimizer.lr", "0.0"]),
    ("grid larger than max_trials", {"method": "grid", "halving": DROP, "max_trials": 3}, ["max_trials", "3", "4"]),
    ("objective not a recorded metric", {"objective": {"metric": "val_f1", "mode": "max"}},
     ["objective.metric", "val_f1"]),
    ("a trial's spec is invalid", {"space": {"model.activation": {"grid": ["relu", "swish"]}}},
     ["model.activation", "swish"]),
    ("a trial past admission's limits", {"space": {"model.hidden": {"grid": [[16], [4096]]}}},
     ["trial 1", "model.hidden=[4096]", "max_parameters", "100000"]),
    ("unknown method", {"method": "bayes"}, ["method", "bayes"]),
]


@pytest.mark.parametrize("case,changes,words", BAD, ids=[b[0] for b in BAD])
def test_a_bad_sweep_is_a_422_naming_field_and_value_with_nothing_stored(paused, case, changes, words):
    url, app = paused
    before = app.state.store.snapshot()
    r = http.post(f"{url}/v1/sweeps", json=sweep_doc(**changes))
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    for word in words:
        assert word in detail, (word, detail)
    assert app.state.store.snapshot() == before


@pytest.mark.parametrize("body", [b"[1, 2]", b'"sweep"', b"{not json"])
def test_a_body_that_is_not_a_sweep_document_stores_nothing(paused, body):
    url, app = paused
    before = app.state.store.snapshot()
    r = http.post(f"{url}/v1/sweeps", content=body, headers={"Content-Type": "application/json"})
    assert 400 <= r.status_code < 500 and isinstance(r.json()["detail"], str), r.text
    assert app.state.store.snapshot() == before


def test_a_sweep_queues_its_trials_as_jobs_fifo_and_cancels_them(paused):
    url, app = paused
    doc = sweep_doc()
    r = http.post(f"{url}/v1/sweeps", json=doc, headers={"Idempotency-Key": "k1"})
    assert r.status_code == 201, r.text
    sweep = r.json()
    expected = parse_sweep(copy.deepcopy(doc))  # the core, independently: the trials' values
    assert sweep["state"] == "queued" and sweep["trials"] == 4 and sweep["rungs"] == [10, 20]
    assert sorted(row["values"]["training.optimizer.lr"] for row in sweep["leaderboard"]) == sorted(LRS)
    assert {row["trial"]: row["values"] for row in sweep["leaderboard"]} == {
        t: expected.values(t) for t in range(expected.n_trials)}
    again = http.post(f"{url}/v1/sweeps", json=doc, headers={"Idempotency-Key": "k1"})
    assert again.status_code == 200 and again.json()["id"] == sweep["id"]
    conflict = http.post(f"{url}/v1/sweeps", json=sweep_doc(seed=4), headers={"Idempotency-Key": "k1"})
    assert conflict.status_code == 409 and "k1" in conflict.json()["detail"]
    assert [s["id"] for s in http.get(f"{url}/v1/sweeps").json()["sweeps"]] == [sweep["id"]]

    # the runner queues max_concurrent_trials (2) trial jobs: trials 0 and 1, rung 0, named for the sweep
    def trial_jobs():
        jobs = [j for j in http.get(f"{url}/v1/jobs").json()["jobs"] if j["sweep"] == sweep["id"]]
        return jobs if len(jobs) == 2 else None

    jobs = wait_for(trial_jobs, 90, what="two trial jobs")
    app.state.scheduler.sweeps.advance()  # asked again: the same two jobs, no more
    assert [j["id"] for j in http.get(f"{url}/v1/jobs").json()["jobs"]] == [j["id"] for j in jobs]
    got = http.get(f"{url}/v1/sweeps/{sweep['id']}").json()
    first = {row["trial"]: row for row in got["leaderboard"]}
    assert sorted(t for t, row in first.items() if row["jobs"]) == [0, 1]
    for trial in (0, 1):
        job = http.get(f"{url}/v1/jobs/{first[trial]['jobs'][0]}").json()
        assert job["name"] == f"sw-t{trial}" and job["steps"] == 10 and job["state"] == "queued"
        assert job["spec"]["training"]["stop_at"] == 10 and job["spec"]["training"]["steps"] == 20
        assert job["spec"]["training"]["optimizer"]["lr"] == expected.values(trial)["training.optimizer.lr"]
    assert got["trial_states"]["queued"] == 4 and got["best"] is None and got["promotions"] == []

    # a job submitted now is in the queue ahead of every trial job launched later
    later = http.post(f"{url}/v1/jobs", json=tiny_spec()).json()
    queued = [j["id"] for j in app.state.store.jobs_in_state("queued")]
    assert queued == [jobs[1]["id"], jobs[0]["id"], later["id"]]

    cancelled = http.post(f"{url}/v1/sweeps/{sweep['id']}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled", cancelled.text
    assert {http.get(f"{url}/v1/jobs/{j['id']}").json()["state"] for j in jobs} == {"cancelled"}
    assert http.get(f"{url}/v1/jobs/{later['id']}").json()["state"] == "queued"  # not the sweep's
    app.state.scheduler.sweeps.advance()  # a cancelled sweep launches nothing more
    assert len([j for j in http.get(f"{url}/v1/jobs").json()["jobs"] if j["sweep"] == sweep["id"]]) == 2
    assert http.post(f"{url}/v1/sweeps/{sweep['id']}/cancel").status_code == 200  # again: no change

    # a sweep cancelled in the store only (the service killed before its jobs were): the runner finishes it
    other = http.post(f"{url}/v1/sweeps", json=sweep_doc(seed=5)).json()
    left = wait_for(lambda: [j["id"] for j in http.get(f"{url}/v1/jobs").json()["jobs"] if j["sweep"] == other["id"]]
                    if app.state.store.sweep_runs(other["id"]) else None, 90, what="the other sweep's jobs")
    app.state.store.sweep_transition(other["id"], "cancelled")
    wait_for(lambda: {http.get(f"{url}/v1/jobs/{j}").json()["state"] for j in left} == {"cancelled"}, 90,
             what="the runner to cancel the jobs the sweep left")
    assert http.get(f"{url}/v1/sweeps/nope").status_code == 404
    assert http.post(f"{url}/v1/sweeps/nope/cancel").status_code == 404
    cancelled = json.loads(http.get(f"{url}/v1/sweeps", params={"state": "cancelled"}).text)["sweeps"]
    assert [s["id"] for s in cancelled] == [other["id"], sweep["id"]]


def test_the_sweep_commands(paused, tmp_path, capsys):
    from service.cli import main

    url, _ = paused
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep_doc()))
    assert main(["--server", url, "sweep", "submit", str(tmp_path / "sweep.yaml")]) == 0
    sweep_id = capsys.readouterr().out.strip()
    assert main(["--server", url, "sweep", "list"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert listed[1].split()[:4] == [sweep_id, "sw", "queued", "4"]
    assert main(["--server", url, "sweep", "status", sweep_id]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["id"] == sweep_id and status["trials"] == 4
    table = sweep_command.leaderboard_lines(status)
    assert table[0].startswith(f"sweep {sweep_id} (sw, halving): queued; trials: 4 queued")
    assert [line.split()[1] for line in table[2:]] == ["0", "1", "2", "3"]
    assert main(["--server", url, "sweep", "best", sweep_id, "-o", str(tmp_path / "m.npz")]) == 1
    assert "no trial with a model yet" in capsys.readouterr().err and not (tmp_path / "m.npz").exists()
    assert main(["--server", url, "sweep", "cancel", sweep_id]) == 0
    assert capsys.readouterr().out.strip() == f"sweep {sweep_id} cancelled"
    assert main(["--server", url, "sweep", "status", "nope"]) == 1
    assert "404" in capsys.readouterr().err


def test_a_stored_sweep_that_no_longer_parses_fails_alone(paused):
    url, app = paused
    store = app.state.store
    broken = http.post(f"{url}/v1/sweeps", json=sweep_doc(name="broken")).json()
    with store._tx() as db:  # as if written by a version whose rules this one refuses
        db.execute("UPDATE sweeps SET document = json_set(document, '$.method', 'bayes') WHERE id = ?",
                   (broken["id"],))
    fine = http.post(f"{url}/v1/sweeps", json=sweep_doc(name="fine")).json()
    failed = wait_for(lambda: (s := store.get_sweep(broken["id"]))["state"] == "failed" and s, 90,
                      what="the broken sweep to fail")
    assert "no longer valid" in failed["error"] and "bayes" in failed["error"]
    wait_for(lambda: len(store.sweep_runs(fine["id"])) == 2, 90, what="the other sweep's trial jobs")
    # trial jobs it queued before it was found broken are cancelled, as a failed sweep's
    wait_for(lambda: {r["state"] for r in store.sweep_runs(broken["id"])} <= {"cancelled"}, 90,
             what="the broken sweep's jobs to be cancelled")
