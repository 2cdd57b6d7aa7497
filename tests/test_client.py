"""The Python client against a real service on loopback with real Ray: the
Job API end to end, typed errors carrying the service's message, the events
endpoint, provenance, and `shardprop diff` (1 vs 2 workers identical; two
learning rates differ from the first recorded step on)."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest

from core.mlp import MLP
from core.spec import parse_spec
from core.trainer import train
from service.cli import main
from service.client import (Client, JobCancelled, JobFailed, NotFound, Refused, ShardpropError, Timeout,
                            Unauthorized)
from service_helpers import service, tiny_spec

# params hashed after steps 3, 6, 9 (checkpoints; none at the last) and 4, 8, 12 (evaluations, and the last)
HASHED = [3, 4, 6, 8, 9, 12]


def small(**fields) -> dict:
    return tiny_spec(**{"steps": 12, "eval_every": 4, "checkpoint_every": 3, **fields})


@pytest.fixture(scope="module")
def reference_history():
    _, history = train(small())
    return history


@pytest.mark.ray
def test_a_job_through_the_client_and_diff(tmp_path, ray_local, reference_history, capsys):
    with service(tmp_path, max_concurrent_jobs=1, ray_address=ray_local) as (url, app), Client(url) as client:
        one = client.submit(small(workers=1))
        (tmp_path / "two.yaml").write_text(_yaml(small(workers=2)))
        two = client.submit(tmp_path / "two.yaml")  # a path
        faster = small()
        faster["name"], faster["training"]["optimizer"]["lr"] = "fast", 0.3
        fast = client.submit(_yaml(faster))  # YAML text
        seen = []
        final = one.wait(timeout=120, on_progress=lambda s: seen.append((s["state"], s["step"])))
        assert final["state"] == "succeeded" and seen[-1] == ("succeeded", 12)
        assert [s for _, s in seen] == sorted(s for _, s in seen)
        two.wait(timeout=120)
        fast.wait(timeout=120)

        # the history, each step once; params_sha256 where the reference trainer has it, and equal
        records = one.metrics()
        assert [r["step"] for r in records] == list(range(1, 13))
        assert [r["step"] for r in records if r.get("params_sha256")] == HASHED
        assert {r["step"]: r["params_sha256"] for r in records if r.get("params_sha256")} == \
               {r["step"]: r["params_sha256"] for r in reference_history if r.get("params_sha256")}
        net = MLP.load(io.BytesIO(one.model()))
        assert records[-1]["params_sha256"] == hashlib.sha256(net.params.tobytes()).hexdigest()
        saved = one.model(tmp_path / "m.npz")
        assert np.array_equal(MLP.load(saved).params, net.params)
        frame = one.dataframe()
        assert list(frame.index) == list(range(1, 13)) and frame.loc[12, "loss"] == records[-1]["loss"]
        assert one.metrics(since=10) == records[10:]

        # provenance: the code, the spec's canonical hash, the data's content hash
        prov = one.provenance
        assert prov["spec_sha256"] == hashlib.sha256(parse_spec(small(workers=1)).to_json().encode()).hexdigest()
        assert prov["code_version"].startswith("0.1.0")
        from core.data import _builtin

        X, y = _builtin("digits")
        assert prov["data_sha256"] == hashlib.sha256(X.tobytes() + y.tobytes()).hexdigest()
        assert two.provenance["data_sha256"] == prov["data_sha256"] != two.provenance["spec_sha256"]

        # the timeline: numbered 1..n, states in order, a checkpoint event at each checkpoint step
        events = list(one.events(follow=True))
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
        assert [e["detail"]["state"] for e in events if e["kind"] == "state"] == ["queued", "running", "succeeded"]
        assert [e["step"] for e in events if e["kind"] == "checkpoint"] == [0, 3, 6, 9, 12]  # first and last too
        assert list(one.events(since=2, follow=False)) == events[2:]
        page = client.events_page(one.id, since=1, limit=2)
        assert page["events"] == events[1:3] and page["next_since"] == 3 and page["more"]

        # predict and the jobs list
        rows = np.zeros((2, 64))
        assert len(one.predict(rows)["labels"]) == 2
        assert {j.id for j in client.jobs()} == {one.id, two.id, fast.id}

        # diff: 1 and 2 workers are identical; lr 0.1 and 0.3 differ from step 3 (the first hashed) on
        diff = client.diff(one.id, two.id)
        assert diff.identical and diff.common_steps == tuple(HASHED)
        assert diff.spec == [("resources.workers", 1, 2)]
        assert main(["--server", url, "diff", one.id, two.id]) == 0
        out = capsys.readouterr().out.splitlines()
        assert out[1] == "  resources.workers: 1 | 2" and out[-1] == "identical"
        assert main(["--server", url, "diff", one.id, fast.id]) == 1
        out = capsys.readouterr().out
        assert out.splitlines()[-1] == f"parameters first differ at step {HASHED[0]}"
        assert "identical" not in out and "  training.optimizer.lr: 0.1 | 0.3" in out
        assert '  name: "tiny" | "fast"' in out
        assert main(["--server", url, "diff", one.id, "nope"]) == 2
        assert "404" in capsys.readouterr().err


def _yaml(spec: dict) -> str:
    import yaml

    return yaml.safe_dump(spec, sort_keys=False)


@pytest.mark.ray
def test_wait_raises_typed_errors_for_failed_cancelled_and_slow_jobs(tmp_path, ray_local):
    from core.data import _builtin

    X, y = _builtin("iris")
    np.savez(tmp_path / "gone.npz", X=X, y=y)
    with service(tmp_path, max_concurrent_jobs=0, ray_address=ray_local) as (url, app), Client(url) as client:
        doomed = small()
        doomed["data"]["source"] = "gone.npz"
        job = client.submit(doomed)
        (tmp_path / "gone.npz").unlink()  # after admission: the job fails when it reads its data
        app.state.scheduler.max_concurrent_jobs = 1
        app.state.scheduler.wake()
        with pytest.raises(JobFailed) as failed:
            job.wait(timeout=120)
        assert failed.value.job["state"] == "failed" and failed.value.job["error"]
        assert failed.value.job["error"] in failed.value.message and "gone.npz" in failed.value.message
        slow = client.submit(small(steps=100_000, checkpoint_every=0, eval_every=0))
        with pytest.raises(Timeout, match=f"job {slow.id} is still"):
            slow.wait(timeout=0.5)
        slow.cancel()
        with pytest.raises(JobCancelled):
            slow.wait(timeout=60)


def test_typed_errors_carry_the_services_message(tmp_path):
    with service(tmp_path, token="t" * 24) as (url, app):
        with Client(url, token="") as anonymous, pytest.raises(Unauthorized) as err:
            anonymous.list()
        assert err.value.status == 401 and "bearer token" in err.value.message
        with Client(url, token="t" * 24) as client:
            queued = client.submit(small())
        with Client(url, token="wrong" * 5) as stranger, pytest.raises(Unauthorized):
            list(stranger.job(queued.id).events())  # the timeline is guarded like every read
        with Client(url, token="wrong" * 5) as stranger, pytest.raises(Unauthorized):
            stranger.events_page(queued.id)
        with Client(url, token="t" * 24) as client:
            with pytest.raises(NotFound) as err:
                client.job("nope")
            assert err.value.message == "no job with id 'nope'" and str(err.value) == "404: no job with id 'nope'"
            with pytest.raises(Refused) as err:
                client.submit({**small(), "colour": "red"})
            assert err.value.status == 422 and "colour" in err.value.message
            job = client.submit(small())
            for since, limit in ((-1, None), (0, 0), (0, 10_001)):
                with pytest.raises(Refused):
                    client.events_page(job.id, since, limit)
            with pytest.raises(NotFound):
                client.events_page("nope")
            assert isinstance(err.value, ShardpropError)
            assert [e["detail"]["state"] for e in job.events(follow=False)] == ["queued"]


def _run(job_id: str, hashes: dict[int, str], spec: dict | None = None) -> tuple[dict, list[dict]]:
    status = {"id": job_id, "state": "succeeded", "spec": spec or {"a": {"b": 1, "c": [1, 2]}}, "provenance": {}}
    return status, [{"step": s, **({"params_sha256": hashes[s]} if s in hashes else {})} for s in range(1, 11)]


@pytest.mark.parametrize("hashes_a, hashes_b, verdict, identical", [
    ({2: "x", 4: "y"}, {2: "x", 4: "y"}, "identical", True),
    ({2: "x", 4: "y", 6: "z"}, {2: "x", 4: "q", 6: "r"}, "parameters first differ at step 4", False),
    ({2: "x"}, {3: "x"}, "no common recorded step: job A recorded parameter hashes at steps 2, job B at steps 3",
     False),
    ({}, {}, "no common recorded step: job A recorded parameter hashes at no step, job B at no step", False),
    ({2: "x", 4: "y"}, {2: "x"}, "parameters agree at the 1 steps both recorded, but the recorded steps differ: "
                                 "only job A recorded steps 4", False),
])
def test_diff_says_identical_only_for_the_same_hashes_at_the_same_steps(hashes_a, hashes_b, verdict, identical):
    from service.client.diff import compare

    (a, history_a), (b, history_b) = _run("A", hashes_a), _run("B", hashes_b)
    diff = compare(a, b, history_a, history_b)
    assert diff.verdict() == verdict and diff.identical is identical
    assert diff.lines()[-1] == verdict
    if not identical:
        assert not any("identical" in line for line in diff.lines())


def test_spec_differences_are_dotted_paths_with_both_values():
    from service.client.diff import MISSING, compare

    a = {"name": "x", "training": {"optimizer": {"lr": 0.1, "name": "sgd"}, "steps": 5}, "model": {"hidden": [16]}}
    b = {"name": "x", "training": {"optimizer": {"lr": 0.3, "name": "sgd", "momentum": 0.9}, "steps": 5},
         "model": {"hidden": [16, 8]}}
    diff = compare(_run("A", {}, a)[0], _run("B", {}, b)[0], [], [])
    assert diff.spec == [("model.hidden", [16], [16, 8]), ("training.optimizer.lr", 0.1, 0.3),
                         ("training.optimizer.momentum", MISSING, 0.9)]


def test_a_spec_is_a_mapping_a_path_or_yaml_text(tmp_path):
    from service.client import SpecFileError, load_spec

    (tmp_path / "a.yaml").write_text("name: a\nseed: 3\n")
    (tmp_path / "b.json").write_text('{"name": "b"}')
    assert load_spec(tmp_path / "a.yaml") == load_spec(str(tmp_path / "a.yaml")) == {"name": "a", "seed": 3}
    assert load_spec(str(tmp_path / "b.json")) == {"name": "b"} == load_spec({"name": "b"})
    assert load_spec("name: c\nseed: 1") == {"name": "c", "seed": 1}
    for bad, words in ((str(tmp_path / "missing.yaml"), "cannot read"), ("- 1\n- 2", "a mapping of fields, got list"),
                       ("name: [", "not valid YAML")):
        with pytest.raises(SpecFileError, match=words):
            load_spec(bad)
