"""The sweep document: every bad case refused naming the field and the value;
sampled values a function of (seed, trial) alone and within their bounds;
grid points in a documented order; trial specs as the rungs want them."""

from __future__ import annotations

import copy
import math
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml

from core.sweep import SweepError, grid_points, load_sweep, parse_sweep, rung_sizes

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "digits-sweep.yaml"

BASE = {"data": {"source": "digits", "shards": 4}, "model": {"hidden": [16]},
        "training": {"steps": 90, "batch_size": 64}, "resources": {"workers": 2}}


def sweep(**fields) -> dict:
    raw = {"seed": 7, "method": "random", "max_trials": 8, "base": copy.deepcopy(BASE),
           "space": {"training.optimizer.lr": {"log_uniform": [1.0e-3, 1.0]}},
           "objective": {"metric": "val_accuracy", "mode": "max"}}
    raw.update(fields)
    return raw


def refused(raw: dict) -> str:
    with pytest.raises(SweepError) as err:
        parse_sweep(raw)
    return str(err.value)


@pytest.mark.parametrize("raw, message", [
    (sweep(space={"training.optimizr.lr": {"uniform": [0.1, 0.2]}}),
     "space.training.optimizr.lr: unknown path 'training.optimizr.lr' (training has no field 'optimizr')"),
    (sweep(space={"learning_rate": {"uniform": [0.1, 0.2]}}),
     "space.learning_rate: unknown path 'learning_rate' (the job spec has no field 'learning_rate')"),
    (sweep(space={"model.hidden.width": {"choice": [1, 2]}}),
     "space.model.hidden.width: unknown path 'model.hidden.width' (model.hidden has no field 'width')"),
    (sweep(space={"training.optimizer": {"choice": [{"name": "sgd"}]}}),
     "space.training.optimizer: path 'training.optimizer' names a section, not a field"),
    (sweep(space={"name": {"choice": ["a", "b"]}}),
     "space.name: 'name' is set by the sweep itself and cannot be searched"),
    (sweep(space={"training.stop_at": {"grid": [1, 2]}}),
     "space.training.stop_at: 'training.stop_at' is set by the sweep itself"),
    (sweep(space={}), "space must name at least one path to search, got an empty mapping {}"),
    (sweep(space=["training.optimizer.lr"]), "space must be a mapping of dotted paths to distributions, got ['training"),
    (sweep(space={"model.hidden": {"choice": [{1, 2}]}}),
     "space.model.hidden.choice: values must be JSON data (numbers, strings, lists, mappings), got [{1, 2}]"),
    (sweep(space={"model.hidden": {"choice": []}}), "space.model.hidden.choice: must be a non-empty list of values, got []"),
    (sweep(space={"training.optimizer.lr": {"uniform": [0.5, 0.1]}}),
     "space.training.optimizer.lr.uniform: low must be <= high, got [0.5, 0.1]"),
    (sweep(space={"training.batch_size": {"int_uniform": [128, 32]}}),
     "space.training.batch_size.int_uniform: low must be <= high, got [128, 32]"),
    (sweep(space={"training.optimizer.lr": {"log_uniform": [0.0, 0.1]}}),
     "space.training.optimizer.lr.log_uniform: a log scale needs positive bounds, got [0.0, 0.1]"),
    (sweep(space={"training.optimizer.lr": {"log_uniform": [-1.0e-3, 0.1]}}),
     "space.training.optimizer.lr.log_uniform: a log scale needs positive bounds, got [-0.001, 0.1]"),
    (sweep(space={"training.optimizer.lr": {"uniform": [0.1, float("nan")]}}),
     "space.training.optimizer.lr.uniform: bounds must be finite, got [0.1, nan]"),
    (sweep(space={"training.batch_size": {"int_uniform": [32, 64.5]}}),
     "space.training.batch_size.int_uniform: must be [low, high], two integers, got [32, 64.5]"),
    (sweep(space={"training.optimizer.lr": {"normal": [0.1, 0.2]}}),
     "space.training.optimizer.lr.normal: unknown distribution 'normal', expected one of grid, choice"),
    (sweep(space={"training.optimizer.lr": {"uniform": [0.1, 0.2], "grid": [0.1]}}),
     "space.training.optimizer.lr: must be one of {grid, choice, uniform, log_uniform, int_uniform: ...}"),
    (sweep(method="grid", max_trials=3, space={"training.optimizer.lr": {"grid": [0.01, 0.1]},
                                               "model.hidden": {"grid": [[8], [16]]}}),
     "max_trials: the grid has 4 points, more than max_trials 3"),
    (sweep(method="halving", max_trials=5, space={"training.optimizer.lr": {"grid": [0.01, 0.03, 0.1]},
                                                  "model.hidden": {"grid": [[8], [16]]}}),
     "max_trials: the grid has 6 points, more than max_trials 5"),
    (sweep(method="grid", space={"training.optimizer.lr": {"uniform": [0.01, 0.1]}}),
     "space.training.optimizer.lr: method 'grid' enumerates grid paths only, got a 'uniform' distribution"),
    (sweep(max_trials=None), "max_trials: required for method 'random' without grid paths"),
    (sweep(max_trials=0), "max_trials: must be an integer in [1, 1000], got 0"),
    (sweep(max_concurrent_trials="2"), "max_concurrent_trials: must be an integer in [1, 1024], got '2'"),
    (sweep(objective={"metric": "val_f1"}),
     "objective.metric: must be a recorded metric, one of val_accuracy, val_loss, loss, got 'val_f1'"),
    (sweep(objective={"metric": "val_loss", "mode": "lowest"}), "objective.mode: must be min or max, got 'lowest'"),
    (sweep(base={**BASE, "data": {"source": "digits", "validation_split": 0.0}}),
     "objective.metric: 'val_accuracy' is not recorded with base.data.validation_split 0"),
    (sweep(base={**BASE, "model": {"output": "identity", "loss": "squared_error"}}),
     "objective.metric: 'val_accuracy' is not recorded for a regression (base.model.output 'identity')"),
    (sweep(method="anneal"), "method: must be one of grid, random, halving, got 'anneal'"),
    (sweep(searcher="bayes"), "searcher: unknown field"),
    (sweep(seed=-1), "seed: must be an integer in [0, 9223372036854775807], got -1"),
    (sweep(name="../etc"), "name: must be 1-180 letters, digits, '.', '_' and '-', starting with a letter or digit, "
                           "got '../etc'"),
    (sweep(base={"data": {"source": "digits"}}), "base: training: Field required"),
    (sweep(base={**BASE, "training": {"steps": 90, "stop_at": 30}}),
     "base.training.stop_at: set by the sweep's rungs, got 30"),
    # the job spec validator refuses a trial: data.shards 2 cannot feed the base's 3 workers
    (sweep(method="grid", max_trials=None, base={**BASE, "resources": {"workers": 3}},
           space={"data.shards": {"grid": [4, 2]}}),
     "space: trial 1 (data.shards=2) is not a valid job spec: resources.workers (3) must be <= data.shards (2)"),
    (sweep(space={"training.batch_size": {"int_uniform": [1, 3]}}),
     "space: trial 0 (training.batch_size=2) is not a valid job spec: training.batch_size (2) must be >= "
     "data.shards (4)"),
    (sweep(halving={"reduction_factor": 3}), "halving: only for method 'halving', got method 'random'"),
    (sweep(method="halving", halving={"rungs": [30, 60]}),
     "halving.rungs: the last rung must be base.training.steps (90), got [30, 60]"),
    (sweep(method="halving", halving={"rungs": [30, 30, 90]}),
     "halving.rungs: must be positive and strictly increasing, got [30, 30, 90]"),
    (sweep(method="halving", halving={"reduction_factor": 1}),
     "halving.reduction_factor: must be an integer in [2, 1000], got 1"),
    (sweep(method="halving", halving={"reduction_factor": 10}),
     "halving.rungs: base.training.steps 90 is too few for three rungs with reduction_factor 10"),
    (sweep(method="halving", space={"training.steps": {"grid": [30, 90]}}),
     "space.training.steps: halving's rungs decide how long trials train"),
    (sweep(method="halving", base={**BASE, "training": {"steps": 90, "mode": "async"}}),
     "method: 'halving' needs synchronous trials (a promotion continues a trial to the same bits), "
     "got training.mode 'async'"),
])
def test_a_bad_sweep_is_refused_naming_the_field_and_the_value(raw, message):
    assert message in refused(raw)


def test_a_huge_grid_is_refused_without_being_enumerated():
    space = {f"training.optimizer.{name}": {"grid": list(range(1, 10_001))}
             for name in ("lr", "momentum", "beta1", "beta2", "eps", "weight_decay")}
    assert refused(sweep(method="grid", max_trials=1000, space=space)).startswith(
        "max_trials: the grid has 1000000000000000000000000 points")


def test_an_async_sweep_is_accepted_and_flagged_not_reproducible():
    async_base = {**BASE, "training": {"steps": 90, "mode": "async"}, "resources": {"workers": 2}}
    assert parse_sweep(sweep(base=async_base)).reproducible is False
    assert parse_sweep(sweep()).reproducible is True


SPACE = {"training.optimizer.lr": {"log_uniform": [1.0e-4, 1.0e-1]},
         "training.optimizer.momentum": {"uniform": [0.0, 0.9]},
         "training.batch_size": {"int_uniform": [16, 20]},
         "model.hidden": {"choice": [[8], [16, 8], [32]]}}


def test_sampled_values_stay_within_their_bounds_and_follow_the_documented_generator():
    s = parse_sweep(sweep(max_trials=300, space=SPACE))
    values = [s.values(t) for t in range(s.n_trials)]
    lrs = np.array([v["training.optimizer.lr"] for v in values])
    assert ((1.0e-4 <= lrs) & (lrs <= 1.0e-1)).all()
    # log-uniform: about half below the geometric middle 10^-2.5, unlike uniform (which puts ~3% there)
    assert 0.4 < np.mean(lrs < 10 ** -2.5) < 0.6
    momenta = [v["training.optimizer.momentum"] for v in values]
    assert all(0.0 <= m <= 0.9 for m in momenta)
    batches = [v["training.batch_size"] for v in values]
    assert set(batches) == {16, 17, 18, 19, 20} and all(type(b) is int for b in batches)  # both ends drawn
    assert {tuple(v["model.hidden"]) for v in values} == {(8,), (16, 8), (32,)}
    # the documented rule: trial t's value at path p comes from default_rng([seed, t, crc32(p)])
    rng = np.random.default_rng([7, 123, zlib.crc32(b"training.optimizer.lr")])
    assert values[123]["training.optimizer.lr"] == math.exp(rng.uniform(math.log(1.0e-4), math.log(1.0e-1)))


def test_a_trials_values_depend_only_on_the_seed_and_its_index():
    s = parse_sweep(sweep(max_trials=20, space=SPACE))
    forward = [s.values(t) for t in range(20)]
    backward = [s.values(t) for t in reversed(range(20))][::-1]
    assert forward == backward
    # the document's key order, a round trip through its normal form, and a new dimension change nothing
    shuffled = parse_sweep(sweep(max_trials=20, space=dict(reversed(list(SPACE.items())))))
    again = parse_sweep(s.document())
    assert [shuffled.values(t) for t in range(20)] == [again.values(t) for t in range(20)] == forward
    wider = parse_sweep(sweep(max_trials=20, space={**SPACE, "training.optimizer.weight_decay": {"uniform": [0, 1e-3]}}))
    assert [{p: v for p, v in wider.values(t).items() if p in SPACE} for t in range(20)] == forward
    other_seed = parse_sweep(sweep(seed=8, max_trials=20, space=SPACE))
    assert [other_seed.values(t)["training.optimizer.lr"] for t in range(20)] != [v["training.optimizer.lr"]
                                                                                for v in forward]
    assert again.to_json() == s.to_json()


def test_grid_points_go_in_sorted_path_order_the_last_path_fastest():
    s = parse_sweep(sweep(method="grid", max_trials=None, space={
        "training.optimizer.lr": {"grid": [0.1, 0.01]}, "model.hidden": {"grid": [[8], [16], [32]]}}))
    expected = [([8], 0.1), ([8], 0.01), ([16], 0.1), ([16], 0.01), ([32], 0.1), ([32], 0.01)]
    assert s.n_trials == 6
    assert [(s.values(t)["model.hidden"], s.values(t)["training.optimizer.lr"]) for t in range(6)] == expected
    assert [(p["model.hidden"], p["training.optimizer.lr"]) for p in grid_points(s.space)] == expected


def test_random_sweeps_cycle_the_grid_and_sample_the_rest():
    s = parse_sweep(sweep(max_trials=6, space={"model.hidden": {"grid": [[8], [16]]},
                                               "training.optimizer.lr": {"uniform": [0.01, 0.1]}}))
    assert [s.values(t)["model.hidden"] for t in range(6)] == [[8], [16]] * 3
    assert len({s.values(t)["training.optimizer.lr"] for t in range(6)}) == 6
    assert parse_sweep(sweep(max_trials=None, space={"model.hidden": {"grid": [[8], [16]]}})).n_trials == 2


def test_trial_specs_carry_the_values_a_shared_name_and_each_rungs_stop():
    s = parse_sweep(sweep(name="lr-search", method="halving", max_trials=9, halving={"reduction_factor": 3}))
    assert s.rungs == (10, 30, 90) and rung_sizes(s) == (9, 3, 1)
    specs = [s.trial_spec(4, rung) for rung in range(3)]
    assert [j.training.stop_at for j in specs] == [10, 30, None]
    assert {j.name for j in specs} == {"lr-search-t4"}
    assert {j.training.optimizer.lr for j in specs} == {s.values(4)["training.optimizer.lr"]}
    assert specs[0].model.hidden == [16] and specs[0].resources.workers == 2  # the rest is the base's
    with pytest.raises(ValueError, match=r"trial must be in \[0, 8\], got 9"):
        s.trial_spec(9, 0)
    with pytest.raises(ValueError, match=r"rung must be in \[0, 2\], got 3"):
        s.trial_spec(0, 3)


def test_the_example_sweep_parses_with_safe_load():
    raw = yaml.safe_load(EXAMPLE.read_text())
    s = parse_sweep(raw)
    assert s.method == "halving" and s.reproducible
    assert isinstance(raw["space"]["training.optimizer.lr"]["log_uniform"][0], float)  # 1.0e-4, not a string
    assert load_sweep(EXAMPLE).to_json() == s.to_json()
