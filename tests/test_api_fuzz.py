"""Random specs (and random JSON) at POST /v1/jobs with execution paused:
valid ones queue, invalid ones get a 4xx naming a field, nothing gets a 5xx."""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service_helpers import service, tiny_spec

scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20))
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)), max_leaves=12)

FIELDS = {
    "name": st.text(max_size=30),
    "seed": st.integers(-5, 2**64),
    "data.source": st.sampled_from(["digits", "iris", "synthetic", "x.csv", "../a.npz", "/etc/a.csv", "", "mnist"]),
    "data.shards": st.integers(-3, 10**10),
    "data.validation_split": st.floats(-1, 2),
    "model.hidden": st.lists(st.integers(-2, 10**10), max_size=5),
    "model.activation": st.sampled_from(["relu", "tanh", "sigmoid", "swish", ""]),
    "model.output": st.sampled_from(["softmax", "sigmoid", "identity", "linear"]),
    "model.loss": st.sampled_from(["cross_entropy", "squared_error", "hinge"]),
    "resources.workers": st.integers(-3, 10**10),
    "training.steps": st.integers(-3, 10**10),
    "training.batch_size": st.integers(-3, 10**10),
    "training.mode": st.sampled_from(["sync", "async", "ring"]),
    "training.optimizer.lr": st.floats(-1, 1e7),
    "training.optimizer.name": st.sampled_from(["sgd", "adam", "lbfgs"]),
    "training.dtype": st.sampled_from(["float32", "float64", "float16"]),
}


@st.composite
def specs(draw):
    spec = tiny_spec()
    for path in draw(st.lists(st.sampled_from(sorted(FIELDS)), unique=True, max_size=6)):
        value = draw(st.one_of(FIELDS[path], json_values)) if draw(st.booleans()) else draw(FIELDS[path])
        node = spec
        *parents, last = path.split(".")
        for p in parents:
            node = node.setdefault(p, {}) if isinstance(node.get(p), dict) else node.__setitem__(p, {}) or node[p]
        node[last] = value
    if draw(st.integers(0, 9)) == 0:
        spec[draw(st.text(min_size=1, max_size=8))] = draw(json_values)
    return spec


@pytest.fixture(scope="module")
def paused(tmp_path_factory):
    with service(tmp_path_factory.mktemp("fuzz")) as (url, app):
        with httpx.Client(base_url=url) as client:
            yield client, app


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(spec=specs())
def test_random_specs_never_5xx(paused, spec):
    client, app = paused
    body = json.dumps(spec, allow_nan=True)
    before = len(app.state.store.list_jobs(limit=100_000))
    r = client.post("/v1/jobs", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code < 500, r.text
    after = len(app.state.store.list_jobs(limit=100_000))
    if r.status_code == 201:
        assert r.json()["state"] == "queued" and after == before + 1
    else:
        assert r.status_code in (400, 413, 422), r.text
        detail = r.json()["detail"]
        assert isinstance(detail, str) and detail
        assert after == before


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=st.one_of(json_values.map(lambda v: json.dumps(v, allow_nan=True).encode()), st.binary(max_size=200)))
def test_random_bodies_never_5xx(paused, body):
    client, app = paused
    r = client.post("/v1/jobs", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code < 500, r.text
    r = client.patch("/v1/jobs/nope", content=body)
    assert r.status_code in (400, 404, 413), r.text
