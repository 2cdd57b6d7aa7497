"""The `shardprop` client commands against a real service."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from core.mlp import MLP
from service.cli import main
from service_helpers import free_port, service, tiny_spec


def _write_spec(tmp_path, spec) -> str:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


@pytest.mark.ray
def test_submit_follow_model_predict(tmp_path, ray_local, capsys):
    from sklearn.datasets import load_digits

    with service(tmp_path, max_concurrent_jobs=1, ray_address=ray_local) as (url, app):
        path = _write_spec(tmp_path, tiny_spec(workers=2, steps=30))
        assert main(["--server", url, "submit", path, "--follow"]) == 0
        out = capsys.readouterr()
        job_id = out.out.splitlines()[0]
        assert f"job {job_id} succeeded at step 30/30" in out.out
        assert "loss" in out.err  # the progress bar

        assert main(["--server", url, "list"]) == 0
        assert job_id in capsys.readouterr().out
        assert main(["--server", url, "status", job_id]) == 0
        status = json.loads(capsys.readouterr().out)
        assert status["state"] == "succeeded" and status["latest_metrics"]["step"] == 30
        assert [t["to"] for t in status["transitions"]] == ["queued", "running", "succeeded"]
        assert main(["--server", url, "metrics", job_id]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[0].startswith("step,loss") and len(lines) == 31
        png = tmp_path / "curves.png"
        assert main(["--server", url, "metrics", job_id, "--plot", str(png)]) == 0
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
        capsys.readouterr()

        model = tmp_path / "m.npz"
        assert main(["--server", url, "model", job_id, "-o", str(model)]) == 0
        net = MLP.load(model)
        X, _ = load_digits(return_X_y=True)
        rows = tmp_path / "rows.csv"
        rows.write_text(",".join(f"p{i}" for i in range(64)) + "\n" +
                        "\n".join(",".join(str(v) for v in r) for r in X[:5]) + "\n")
        capsys.readouterr()
        assert main(["--server", url, "predict", job_id, str(rows)]) == 0
        labels = [int(v) for v in capsys.readouterr().out.split()]
        assert labels == np.argmax(net.predict(X[:5]), axis=1).tolist()

        # errors: one line, no traceback, non-zero
        assert main(["--server", url, "resize", job_id, "2"]) == 1
        err = capsys.readouterr().err
        assert "succeeded" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
        assert main(["--server", url, "cancel", job_id]) == 1
        capsys.readouterr()


@pytest.mark.ray
def test_follow_failed_job_exits_non_zero(tmp_path, ray_local, capsys):
    with service(tmp_path, max_concurrent_jobs=1, ray_address=ray_local) as (url, app):
        spec = tiny_spec(steps=20, max_nonfinite_steps=1)
        spec["training"]["optimizer"] = {"name": "sgd", "lr": 1e6}
        spec["model"]["activation"] = "relu"
        code = main(["--server", url, "submit", _write_spec(tmp_path, spec), "--follow"])
        out = capsys.readouterr().out
        if code == 0:  # lr 1e6 did not blow up: nothing to assert about failure here
            pytest.skip("job did not fail")
        assert code == 1 and "failed" in out


def test_client_commands_paused(tmp_path, capsys):
    with service(tmp_path) as (url, app):
        path = _write_spec(tmp_path, tiny_spec())
        assert main(["--server", url, "submit", path]) == 0
        job_id = capsys.readouterr().out.strip()
        assert main(["--server", url, "list", "--state", "queued"]) == 0
        assert job_id in capsys.readouterr().out
        assert main(["--server", url, "cancel", job_id]) == 0
        assert f"job {job_id} cancelled" in capsys.readouterr().out
        assert main(["--server", url, "model", job_id, "-o", str(tmp_path / "x.npz")]) == 1
        assert "cancelled" in capsys.readouterr().err
        assert main(["--server", url, "status", "nope"]) == 1
        err = capsys.readouterr().err
        assert err.startswith("shardprop status: error: 404") and "Traceback" not in err
        bad = _write_spec(tmp_path, {**tiny_spec(), "colour": 1})
        assert main(["--server", url, "submit", bad]) == 1
        assert "colour: unknown field" in capsys.readouterr().err
        (tmp_path / "broken.yaml").write_text("a: [")
        assert main(["--server", url, "submit", str(tmp_path / "broken.yaml")]) == 1
        assert "not valid YAML" in capsys.readouterr().err
        assert main(["--server", url, "submit", str(tmp_path / "missing.yaml")]) == 1
        assert "cannot read" in capsys.readouterr().err


def test_token_from_environment(tmp_path, capsys, monkeypatch):
    with service(tmp_path, token="tok") as (url, app):
        path = _write_spec(tmp_path, tiny_spec())
        monkeypatch.delenv("SHARDPROP_TOKEN", raising=False)
        assert main(["--server", url, "submit", path]) == 1
        assert "401" in capsys.readouterr().err
        monkeypatch.setenv("SHARDPROP_TOKEN", "tøk")  # cannot travel in a header: one line, no traceback
        assert main(["--server", url, "submit", path]) == 1
        assert "printable ASCII" in capsys.readouterr().err
        monkeypatch.setenv("SHARDPROP_TOKEN", "tok")
        assert main(["--server", url, "submit", path]) == 0


def test_unreachable_server_and_serve_refusals(tmp_path, capsys, monkeypatch):
    assert main(["--server", "http://127.0.0.1:9", "list"]) == 1
    assert "cannot reach" in capsys.readouterr().err
    monkeypatch.delenv("SHARDPROP_TOKEN", raising=False)
    assert main(["serve", "--host", "0.0.0.0"]) == 1
    assert "SHARDPROP_TOKEN" in capsys.readouterr().err
    # nothing listens there: a clear error at once, not jobs queued behind a Ray retrying for minutes
    address = f"127.0.0.1:{free_port()}"
    assert main(["serve", "--ray-address", address, "--store", str(tmp_path / "s.db")]) == 1
    err = capsys.readouterr().err
    assert f"cannot reach Ray at --ray-address {address}" in err and len(err.strip().splitlines()) == 1


def test_python_dash_m_service_help():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "service", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    for cmd in ("serve", "submit", "list", "status", "metrics", "cancel", "resize", "model", "predict", "train"):
        assert cmd in out.stdout


def test_sigusr1_prints_every_threads_stack_and_the_service_keeps_serving(tmp_path):
    """The operator's question "what is a stuck service doing?": the stacks
    must show the scheduler's loop (a thread of its own) and the HTTP
    server's, and the service must go on answering afterwards."""
    import os
    import signal
    import time

    import httpx

    from service_helpers import ServiceProcess, wait_for

    server = ServiceProcess(tmp_path / "store.db", "--max-concurrent-jobs", "0").start()
    try:
        assert f"kill -USR1 {server.proc.pid}" in server.log.read_text()  # told on start
        os.kill(server.proc.pid, signal.SIGUSR1)
        wait_for(lambda: "most recent call first" in server.log.read_text(), 30, 0.1, "the stack dump")
        time.sleep(0.5)  # the dump is written in one go, but let it finish
        dump = server.log.read_text()
        threads = dump.count("(most recent call first)")
        assert threads >= 2, dump
        assert "service/scheduler.py" in dump and "_run_loop" in dump, dump
        assert "uvicorn" in dump, dump
        assert httpx.get(f"{server.url}/healthz", timeout=10).status_code == 200
        assert server.proc.poll() is None
    finally:
        server.stop()
