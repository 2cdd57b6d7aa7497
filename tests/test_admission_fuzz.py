"""Random data files (CSV text, .npz arrays, raw bytes) and random spec fields
posted to a real service on loopback (execution paused): admitted jobs are
stored, refused ones get a 4xx with a message and store nothing, nothing
gets a 5xx, and the process stays under its memory bound."""

from __future__ import annotations

import io
import itertools
import os

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from service_helpers import SERVICE_PEAK, service, status_field, tiny_spec

cells = st.one_of(st.integers(-3, 3), st.integers(-2**40, 2**40), st.floats(allow_nan=True, allow_infinity=True),
                  st.sampled_from(["", "x", "1e400", "nan", " 2 ", '"3"', "1,2"]))
csv_text = st.lists(st.lists(cells.map(str), min_size=0, max_size=6), max_size=25).map(
    lambda rows: "\n".join(",".join(r) for r in rows))

dtypes = st.sampled_from(["int8", "int64", "uint16", "float32", "float64", "bool", "complex64", "U2"])
shapes = st.one_of(st.tuples(st.integers(0, 30), st.integers(0, 6)), st.tuples(st.integers(0, 30)),
                   st.tuples(st.integers(0, 4), st.integers(0, 3), st.integers(0, 2)))


@st.composite
def npz_bytes(draw) -> bytes:
    def array(shape, dtype):
        values = draw(st.lists(st.integers(-5, 60), min_size=int(np.prod(shape)), max_size=int(np.prod(shape))))
        return np.array(values).reshape(shape).astype(dtype)

    arrays = {"X": array(draw(shapes), draw(dtypes)), "y": array(draw(shapes), draw(dtypes))}
    if draw(st.booleans()):
        del arrays[draw(st.sampled_from(["X", "y"]))]
    buffer = io.BytesIO()
    (np.savez_compressed if draw(st.booleans()) else np.savez)(buffer, **arrays)
    data = buffer.getvalue()
    if draw(st.integers(0, 5)) == 0:  # a damaged archive
        at = draw(st.integers(0, len(data) - 1))
        data = data[:at] + draw(st.binary(min_size=1, max_size=8)) + data[at + 1:]
    return data




@st.composite
def well_formed(draw) -> tuple[str, bytes]:
    """A file that mostly trains: 10 to 60 rows of 1 to 5 features and small integer (or float) labels."""
    rows, features = draw(st.integers(10, 60)), draw(st.integers(1, 5))
    X = np.array(draw(st.lists(st.floats(-1e6, 1e6), min_size=rows * features, max_size=rows * features)))
    y = np.array(draw(st.lists(st.integers(0, draw(st.sampled_from([1, 3, 200_000]))), min_size=rows,
                               max_size=rows)))
    if draw(st.booleans()):
        y = y + 0.5 * draw(st.integers(0, 1))
    if draw(st.booleans()):
        table = np.column_stack([X.reshape(rows, features), y])
        header = ",".join([f"a{j}" for j in range(features)] + ["label"]) + "\n" if draw(st.booleans()) else ""
        return "csv", (header + "\n".join(",".join(repr(float(v)) for v in row) for row in table) + "\n").encode()
    buffer = io.BytesIO()
    np.savez(buffer, X=X.reshape(rows, features), y=y)
    return "npz", buffer.getvalue()


files = st.one_of(well_formed(), well_formed(),  # twice: about a quarter of the examples are admitted
                  csv_text.map(lambda t: ("csv", t.encode())), npz_bytes().map(lambda b: ("npz", b)),
                  st.tuples(st.sampled_from(["csv", "npz"]), st.binary(max_size=64)))


FIELDS = {
    ("data", "shards"): st.integers(1, 12),
    ("data", "validation_split"): st.sampled_from([0.0, 0.2, 0.5, 0.9]),
    ("data", "label_column"): st.one_of(st.integers(-8, 8), st.sampled_from(["label", "a", ""])),
    ("data", "standardize"): st.booleans(),
    ("model", "hidden"): st.lists(st.integers(1, 70_000), max_size=3),
    ("model", "output"): st.sampled_from(["softmax", "sigmoid"]),
    ("training", "batch_size"): st.integers(1, 100_000),
    ("training", "steps"): st.integers(1, 20_000_000),
    ("training", "eval_every"): st.integers(0, 50),
    ("training", "checkpoint_every"): st.integers(0, 50),
    ("training", "optimizer"): st.sampled_from([{"name": "adam", "lr": 0.01}, {"name": "sgd", "momentum": 0.9}]),
    ("resources", "workers"): st.integers(1, 4),
}

counter = itertools.count()


@pytest.fixture(scope="module")
def paused(tmp_path_factory):
    root = tmp_path_factory.mktemp("admission-fuzz")
    with service(root) as (url, app):
        with httpx.Client(base_url=url, timeout=60) as client:
            yield client, app, root


@settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck))
@given(file=files, fields=st.dictionaries(st.sampled_from(sorted(FIELDS)), st.none(), max_size=4), data=st.data())
def test_random_data_and_specs_never_5xx(paused, file, fields, data):
    client, app, root = paused
    suffix, content = file
    name = f"f{next(counter)}.{suffix}"
    (root / name).write_bytes(content)
    spec = tiny_spec()
    spec["data"]["source"] = name
    spec["training"]["batch_size"] = 8
    for section, field in fields:
        spec[section][field] = data.draw(FIELDS[section, field])
    before = len(app.state.store.list_jobs(limit=100_000))
    r = client.post("/v1/jobs", json=spec)
    after = len(app.state.store.list_jobs(limit=100_000))
    assert r.status_code < 500, r.text
    event(f"{suffix} {r.status_code}")  # --hypothesis-show-statistics shows the mix
    if r.status_code == 201:
        assert after == before + 1
    else:
        assert r.status_code == 422, r.text
        assert isinstance(r.json()["detail"], str) and r.json()["detail"]
        assert after == before
    assert status_field(os.getpid(), "VmHWM") < SERVICE_PEAK  # the service runs in this process
