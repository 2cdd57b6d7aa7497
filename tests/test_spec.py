"""The job spec: defaults, and every refusal names the field and the value."""

import json

import pytest
import yaml

from core.spec import SpecError, checkpoint_key, load_spec, parse_spec, parse_stored_spec
from core.sweep import load_sweep

BASE = {"data": {"source": "digits"}, "training": {"steps": 10}}


def spec_with(section, **fields):
    raw = json.loads(json.dumps(BASE))
    raw.setdefault(section, {}).update(fields)
    return raw


def test_minimal_spec_gets_documented_defaults():
    spec = parse_spec(BASE)
    assert spec.data.validation_split == 0.2 and spec.data.shards == 4
    assert spec.model.hidden == [64] and spec.model.activation == "relu"
    assert spec.training.dtype == "float32" and spec.training.mode == "sync"
    assert spec.training.optimizer.name == "sgd" and spec.training.optimizer.momentum == 0.0


@pytest.mark.parametrize("raw, words", [
    (spec_with("training", steps=0), ["training.steps", "0"]),
    (spec_with("training", steps=-5), ["training.steps", "-5"]),
    (spec_with("resources", workers=10**9), ["resources.workers", "1000000000"]),
    (spec_with("training", batch_size=0), ["training.batch_size", "0"]),
    (spec_with("data", shards=0), ["data.shards", "0"]),
    (spec_with("data", validation_split=1.0), ["data.validation_split", "1.0"]),
    (spec_with("data", validation_split=-0.1), ["data.validation_split", "-0.1"]),
    (spec_with("model", hidden=[10**9]), ["model.hidden", "1000000000"]),
    (spec_with("model", hidden=[0]), ["model.hidden", "0"]),
    (spec_with("model", activation="swish"), ["model.activation", "swish"]),
    (spec_with("model", output="identity"), ["cross_entropy", "identity"]),
    (spec_with("training", steps="10"), ["training.steps", "'10'"]),
    (spec_with("training", steps=float("nan")), ["training.steps", "nan"]),
    (spec_with("training", optimizer={"lr": "Infinity"}), ["training.optimizer.lr", "Infinity"]),
    (spec_with("training", optimizer={"lr": float("inf")}), ["training.optimizer.lr", "inf"]),
    (spec_with("training", optimizer={"momentum": 1.5}), ["training.optimizer.momentum", "1.5"]),
    (spec_with("training", optimizer={"nesterov": True}), ["nesterov", "momentum"]),
    (spec_with("training", optimizer={"name": "rmsprop"}), ["training.optimizer.name", "rmsprop"]),
    (spec_with("data", colour="blue"), ["data.colour", "unknown field"]),
    ({**spec_with("training", mode="async"), "resources": {"parameter_servers": 2}}, ["parameter_servers (2)", "async"]),
    (spec_with("resources", worker_timeout_s=-1), ["resources.worker_timeout_s", "-1", "0 (never)"]),
    (spec_with("resources", worker_timeout_s=0.001), ["resources.worker_timeout_s", "0.001", "[1, 604800]"]),
    (spec_with("resources", worker_timeout_s=1e9), ["resources.worker_timeout_s", "1000000000.0"]),
    (spec_with("resources", worker_timeout_s="60"), ["resources.worker_timeout_s", "'60'"]),
    ({**BASE, "extra": 1}, ["extra", "unknown field"]),
    (spec_with("resources", workers=5), ["resources.workers (5)", "data.shards (4)"]),
    (spec_with("training", batch_size=3), ["training.batch_size (3)", "data.shards (4)"]),
    (spec_with("data", source="weights.pkl"), ["data.source", "weights.pkl"]),
    ({"data": {"source": "synthetic", "samples": 3, "shards": 4}, "training": {"steps": 1, "batch_size": 4},
      "resources": {"workers": 1}},
     ["data.shards (4)", "training rows (3)"]),
    ({"training": {"steps": 1}}, ["data", "Field required"]),
    ({"data": {"source": "digits"}}, ["training", "Field required"]),
])
def test_bad_specs_are_refused_naming_field_and_value(raw, words):
    with pytest.raises(SpecError) as err:
        parse_spec(raw)
    for word in words:
        assert word in str(err.value)


def test_non_mapping_spec_is_refused():
    with pytest.raises(SpecError, match="mapping"):
        parse_spec([1, 2, 3])


def test_yaml_and_json_files_give_the_same_spec(tmp_path):
    (tmp_path / "job.json").write_text(json.dumps(BASE))
    (tmp_path / "job.yaml").write_text("data: {source: digits}\ntraining: {steps: 10}\n")
    assert load_spec(tmp_path / "job.json") == load_spec(tmp_path / "job.yaml") == parse_spec(BASE)


def test_unreadable_and_malformed_files_are_refused(tmp_path):
    with pytest.raises(SpecError, match="cannot read"):
        load_spec(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("data: [unclosed")
    with pytest.raises(SpecError, match="not valid"):
        load_spec(tmp_path / "bad.yaml")


def test_with_workers_revalidates():
    spec = parse_spec(BASE)
    assert spec.with_workers(4).resources.workers == 4
    with pytest.raises(SpecError, match="resources.workers"):
        spec.with_workers(0)


def test_examples_are_valid():
    from pathlib import Path
    examples = sorted(Path(__file__).parent.parent.glob("examples/*.yaml"))
    assert examples
    for path in examples:
        if "space" in yaml.safe_load(path.read_text()):
            load_sweep(path)  # a sweep document (core.sweep), its base a job spec
        else:
            load_spec(path)


def test_resources_default_when_left_out():
    r = parse_spec(BASE).resources
    assert (r.workers, r.cpus_per_worker, r.parameter_servers, r.pin_cores, r.worker_timeout_s) == (2, 1, 1, True, 600.0)


@pytest.mark.parametrize("field, value", [("workers", 2), ("cpus_per_worker", 1), ("parameter_servers", 1),
                                          ("pin_cores", False), ("worker_timeout_s", 60.0)])
def test_a_field_of_the_old_layout_is_told_where_it_moved(field, value):
    with pytest.raises(SpecError) as err:
        parse_spec(spec_with("training", **{field: value}))
    assert f"training.{field}: moved to resources.{field}" in str(err.value)
    parse_spec(spec_with("resources", **{field: value}))  # where it lives now


def test_the_checkpoint_key_is_the_spec_minus_resources():
    key = checkpoint_key(parse_spec(BASE).model_dump(mode="json"))
    for resources in ({"workers": 4}, {"cpus_per_worker": 3}, {"parameter_servers": 2}, {"pin_cores": False},
                      {"worker_timeout_s": 0.0}):
        assert checkpoint_key(parse_spec({**BASE, "resources": resources}).model_dump(mode="json")) == key
    for changed in (spec_with("training", batch_size=64), {**BASE, "seed": 1}):
        assert checkpoint_key(parse_spec(changed).model_dump(mode="json")) != key


def test_split_seed_defaults_to_seed_and_is_in_the_key_only_when_it_differs():
    assert parse_spec({**BASE, "seed": 5}).data.split_seed == 5
    assert parse_spec(spec_with("data", split_seed=2)).data.split_seed == 2
    key = checkpoint_key(parse_spec({**BASE, "seed": 5}).model_dump(mode="json"))
    assert "split_seed" not in key  # as keys were before it existed
    assert checkpoint_key(parse_spec({**spec_with("data", split_seed=5), "seed": 5}).model_dump(mode="json")) == key
    assert checkpoint_key(parse_spec({**spec_with("data", split_seed=4), "seed": 5}).model_dump(mode="json")) != key


@pytest.mark.parametrize("source", ["big/", "big", "sets/a.v2/", "d.parquet", "d.pq", "s3://bucket/sets/d",
                                    "s3://bucket/a/b/"])
def test_a_source_may_name_a_folder_parquet_or_s3(source):
    assert parse_spec(spec_with("data", source=source)).data.source == source


@pytest.mark.parametrize("source, words", [
    ("s3://bucket", ["data.source", "s3://bucket/prefix", "'s3://bucket'"]),
    ("s3:///prefix", ["data.source", "s3://bucket/prefix"]),
    ("notes.txt", ["data.source", "'notes.txt'", "a folder"]),
    (spec_with("data", split_seed=-1), None),
])
def test_bad_sources_and_split_seeds_are_refused_naming_the_value(source, words):
    raw = source if isinstance(source, dict) else spec_with("data", source=source)
    with pytest.raises(SpecError) as err:
        parse_spec(raw)
    for word in words or ["data.split_seed", "-1"]:
        assert word in str(err.value)


def test_a_spec_stored_before_resources_existed_still_runs_with_its_placement():
    old = {"name": "stored", "data": {"source": "digits", "shards": 4},
           "training": {"steps": 5, "batch_size": 64, "workers": 3, "cpus_per_worker": 1, "parameter_servers": 2,
                        "pin_cores": False, "worker_timeout_s": 30.0}}
    spec = parse_stored_spec(old)
    assert spec.resources.model_dump() == {"workers": 3, "cpus_per_worker": 1, "parameter_servers": 2,
                                           "pin_cores": False, "worker_timeout_s": 30.0}
    assert spec.training.steps == 5 and spec.training.batch_size == 64
    with pytest.raises(SpecError, match="training.workers: moved to resources.workers"):
        parse_spec(old)  # a user's spec in the old layout is told, not moved
