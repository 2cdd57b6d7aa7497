"""Prepared data through a real service on loopback: a spec whose split
contradicts its prepared set gets a 422 naming both values and stores
nothing; a prepared set (local or on a real S3-compatible server) is the
job's data hash; a large raw CSV is prepared while the job says so, once,
and trains to the bits of the same CSV prepared by hand."""

from __future__ import annotations

import threading

import httpx
import numpy as np
import pytest

import core.prepare_writer
from core.mlp import MLP
from core.prepared import prepare, s3_filesystem
from core.spec import parse_spec
from core.trainer import train
from service_helpers import service, tiny_spec, wait_for, wait_state
from tests.s3_helpers import s3_server, upload  # noqa: F401  (a fixture)
from tests.test_prepared import make_data, write_csv


def spec_on(source: str, **data) -> dict:
    raw = tiny_spec(steps=6, eval_every=3, checkpoint_every=3)
    raw["data"] = {"source": source, "shards": 2, **data}
    raw["model"]["hidden"] = [8]
    raw["training"]["batch_size"] = 16
    return raw


@pytest.fixture
def files(tmp_path):
    X, y = make_data(n=240, classes=3)
    csv = write_csv(tmp_path / "big.csv", X, y)
    return csv, prepare(csv, tmp_path / "set", seed=3, validation_split=0.25, block_rows=40)


def test_a_contradicting_split_is_refused_naming_both_values_and_nothing_is_stored(tmp_path, files, s3_server):
    csv, prepared = files
    upload(s3_filesystem(allow_bucket_creation=True), tmp_path / "set", "bucket/sets/d")
    with service(tmp_path) as (url, _):
        for source in ("set", "s3://bucket/sets/d"):
            refused = httpx.post(f"{url}/v1/jobs", json={**spec_on(source), "seed": 4}, timeout=30)
            assert refused.status_code == 422, refused.text
            detail = refused.json()["detail"]
            assert "data.split_seed is 4 in the spec, 3 in its manifest" in detail
            assert "data.validation_split is 0.2 in the spec, 0.25 in its manifest" in detail
            assert httpx.get(f"{url}/v1/jobs", timeout=10).json()["jobs"] == []
        # the same set with its own split (and another job seed) is taken; its data hash is the manifest's
        for source in ("set", "s3://bucket/sets/d"):
            taken = httpx.post(f"{url}/v1/jobs", json={**spec_on(source, split_seed=3, validation_split=0.25),
                                                       "seed": 4}, timeout=30)
            assert taken.status_code == 201, taken.text
            assert taken.json()["provenance"]["data_sha256"] == prepared.manifest_sha256
        assert len(httpx.get(f"{url}/v1/jobs", timeout=10).json()["jobs"]) == 2


@pytest.mark.ray
def test_a_large_raw_csv_is_prepared_once_while_the_job_says_so(tmp_path, files, ray_local, monkeypatch):
    csv, _ = files
    by_hand = prepare(csv, tmp_path / "by-hand", seed=0)  # the split the job's spec implies
    calls, gate = [], threading.Event()
    real = core.prepare_writer.prepare

    def held(*args, progress, **kw):  # holds preparation at its first block until the test saw the phase
        calls.append(args)

        def report(p):
            progress(p)
            if p.stage == "write":
                gate.wait(60)
        return real(*args, progress=report, **kw)

    monkeypatch.setattr(core.prepare_writer, "prepare", held)
    with service(tmp_path, max_concurrent_jobs=1, ray_address=ray_local, prepare_above_bytes=1000) as (url, app):
        first = httpx.post(f"{url}/v1/jobs", json=spec_on("big.csv"), timeout=30).json()
        assert first["provenance"]["data_sha256"] != by_hand.manifest_sha256  # the CSV's bytes, until prepared
        phase = wait_for(lambda: httpx.get(f"{url}/v1/jobs/{first['id']}", timeout=10).json()["phase"],
                         what="the preparing phase")
        assert phase.startswith("preparing data: writing blocks (1 of "), phase
        gate.set()
        done = wait_state(url, first["id"])
        assert done["state"] == "succeeded", done.get("error")
        assert done["phase"] is None and done["provenance"]["data_sha256"] == by_hand.manifest_sha256
        kinds = [e["kind"] for e in httpx.get(f"{url}/v1/jobs/{first['id']}/events", timeout=10).json()["events"]]
        assert kinds.index("preparing_data") < kinds.index("data_prepared")
        # a second job on the same bytes reuses the cached set
        second = httpx.post(f"{url}/v1/jobs", json={**spec_on("big.csv"), "name": "again"}, timeout=30).json()
        assert second["provenance"]["data_sha256"] == by_hand.manifest_sha256
        assert wait_state(url, second["id"])["state"] == "succeeded"
        kinds = [e["kind"] for e in httpx.get(f"{url}/v1/jobs/{second['id']}/events", timeout=10).json()["events"]]
        assert "preparing_data" not in kinds and len(calls) == 1
        model = MLP.load(app.state.settings.model_path(first["id"]))
    # the bits of the reference trainer on the CSV prepared by hand
    reference, _ = train(parse_spec(spec_on(str(tmp_path / "by-hand"))))
    np.testing.assert_array_equal(model.params, reference.params)
