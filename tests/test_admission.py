"""The cost of a job against hand-derived figures, and each admission limit
refusing with the figure and the limit (no service: `admit` and `job_cost`
directly; tests/test_admission_service.py posts them to a real one)."""

from __future__ import annotations

import pytest

from core.metadata import DataMetadata
from core.mlp import MLP
from core.spec import parse_spec
from core.trainer import ShardedData, build_network
from service.admission import JobCost, Refused, admit, job_cost, parameter_count
from service.settings import Settings
from service_helpers import tiny_spec


def spec(**sections):
    raw = tiny_spec()
    for section, fields in sections.items():
        raw[section] = {**raw.get(section, {}), **fields}
    return parse_spec(raw)


def test_parameters_count_every_layer_with_biases():
    assert parameter_count([10, 5, 3], bias=True) == 10 * 5 + 5 + 5 * 3 + 3 == 73
    assert parameter_count([10, 5, 3], bias=False) == 65
    assert parameter_count([784, 256, 256, 10], True) == MLP([784, 256, 256, 10]).params.size


@pytest.mark.parametrize("model, meta, sizes", [
    ({"output": "sigmoid"}, DataMetadata(100, 10, 2, 2, 0), [10, 16, 1]),  # one unit: a binary sigmoid classifier
    ({"output": "softmax"}, DataMetadata(100, 10, 2, 2, 0), [10, 16, 2]),
    ({"output": "identity", "loss": "squared_error"}, DataMetadata(100, 10, None, 4, 0), [10, 16, 4]),
])
def test_the_output_layer_follows_the_data_and_the_loss(model, meta, sizes):
    assert job_cost(spec(model=model), meta).sizes == sizes


def test_the_cost_agrees_with_the_network_the_trainer_builds():
    s = spec(model={"hidden": [7, 5]}, data={"source": "wine"})
    cost = admit(s, Settings(data_roots=["/tmp"]))
    assert cost.parameters == build_network(s, ShardedData.from_spec(s).dataset).params.size


def test_bytes_and_counts_by_hand():
    # iris: 150 rows, 4 features, 3 classes; 30 validation rows, 120 training rows
    s = spec(data={"source": "iris", "shards": 2}, model={"hidden": [5]},
             training={"batch_size": 32, "steps": 100, "eval_every": 25, "checkpoint_every": 0,
                       "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9}})
    cost = admit(s, Settings(data_roots=["/tmp"]))
    params = 4 * 5 + 5 + 5 * 3 + 3  # 43, float32: a vector is 172 bytes
    data = 150 * 5 * 8 + 150 * 4 * 4  # float64 as read (X and y), then X standardized in float32
    worker = data + 172 + 1 * (172 + 2 * 16 * (4 + 5 + 3) * 4)  # one CPU: its gradient, activations of 16 rows
    server = 172 * (2 + 1 + 1)  # parameters, reduced gradient, velocity, one work buffer
    service = data + 172 * (2 + 1) + 30 * 12 * 4  # network, checkpoint (parameters, velocity), evaluation
    assert cost == JobCost(sizes=[4, 5, 3], parameters=params, optimizer_state=1, train_rows=120,
                           worker_bytes=worker, server_bytes=server, service_bytes=service,
                           job_bytes=worker + server + service, cpus=1, evaluations=5, checkpoints=1)
    assert (worker, server, service) == (10280, 688, 10356)


@pytest.mark.parametrize("optimizer, state", [
    ({"name": "sgd"}, 0), ({"name": "sgd", "momentum": 0.5}, 1), ({"name": "adam", "lr": 0.01}, 2)])
def test_optimizer_state(optimizer, state):
    assert admit(spec(training={"optimizer": optimizer}), Settings(data_roots=["/tmp"])).optimizer_state == state


def test_cpus_are_workers_times_cpus_each():
    s = spec(resources={"workers": 2, "cpus_per_worker": 3})
    assert admit(s, Settings(data_roots=["/tmp"])).cpus == 6


# digits: 1797 rows, 359 for validation, 1438 for training; TINY trains 64 -> 16 -> 10 for 30 steps
REFUSALS = [
    ({"training": {"steps": 2000}}, {"max_steps": 1000},
     "training.steps (2000) is more than the limit of 1000 (max_steps)"),
    ({"training": {"batch_size": 5000}}, {},
     "training.batch_size (5000) exceeds the training rows (1438) of 'digits': a step would use rows more than once"),
    ({"data": {"shards": 2000}, "training": {"batch_size": 4000}}, {},
     "data.shards (2000) exceeds the training rows (1438) of 'digits'"),
    ({"training": {"steps": 100_000, "checkpoint_every": 1}}, {},
     "training.checkpoint_every (1) with 100000 steps makes 100001 checkpoints, more than the limit of 10000 "
     "per job (max_checkpoints); use checkpoint_every >= 11"),
    ({"training": {"steps": 1000, "eval_every": 3}}, {"max_evaluations": 100},
     "training.eval_every (3) with 1000 steps makes 334 evaluations, more than the limit of 100 per job "
     "(max_evaluations); use eval_every >= 11"),
    ({"model": {"hidden": [65536, 2000]}}, {},
     f"the network 64 -> 65536 -> 2000 -> 10 has {64 * 65536 + 65536 + 65536 * 2000 + 2000 + 2000 * 10 + 10} "
     "parameters, more than the limit of 50000000 (max_parameters)"),
    # 64 -> 1000 -> 10: 75010 parameters, 300040 bytes; digits 934440 bytes read, 460032 standardized;
    # one gradient, and activations and deltas of 32 rows x 1074 units: 1394472 + 300040 + 300040 + 274944
    ({"model": {"hidden": [1000]}}, {"max_worker_bytes": 100_000},
     "each worker would need about 2269496 bytes, more than the limit of 100000 (max_worker_bytes)"),
    ({"data": {"source": "synthetic", "samples": 100_000, "features": 10_000}}, {},
     "synthetic data: 100000 rows x 10001 columns need 8000800000 bytes as float64, more than the limit of "
     "536870912 (max_data_bytes)"),
]


@pytest.mark.parametrize("fields, limits, message", REFUSALS, ids=[r[2][:40] for r in REFUSALS])
def test_each_limit_refuses_naming_the_figure_and_the_limit(fields, limits, message):
    with pytest.raises(Refused) as err:
        admit(spec(**fields), Settings(data_roots=["/tmp"], **limits))
    assert str(err.value) == message


def test_the_frequency_a_refusal_proposes_fits():
    # checkpoint_every 11 is what the refusal above proposes: it fits
    assert admit(spec(training={"steps": 100_000, "checkpoint_every": 11}), Settings(data_roots=["/tmp"])).checkpoints \
        == 100_000 // 11 + 1 <= 10_000


def test_softmax_on_a_regression_target_is_refused(tmp_path):
    (tmp_path / "r.csv").write_text("".join(f"{i},{i / 3}\n" for i in range(100)))
    with pytest.raises(Refused) as err:
        admit(spec(data={"source": "r.csv"}), Settings(data_roots=[tmp_path]))
    assert str(err.value) == ("model.output 'softmax' needs at least 2 output units, and 'r.csv' has one regression "
                              "target (its labels are not all integers): use output 'identity' with loss "
                              "'squared_error'")


@pytest.mark.parametrize("limit, message", [
    ("max_bogus=1", "--limit takes NAME=VALUE with NAME one of max_parameters, "),
    ("max_parameters", "--limit takes NAME=VALUE"),
    ("max_parameters=lots", "max_parameters: Input should be a valid integer"),
])
def test_serve_refuses_a_bad_limit(capsys, limit, message):
    from service.cli import main

    assert main(["serve", "--limit", limit]) == 1
    assert message in capsys.readouterr().err
