"""What CI can check of the deployment without a Docker daemon: Prometheus's
config, the compose file's commands against the real CLI, the Grafana
dashboard's PromQL against a live service's /metrics — and a real Prometheus
scraping a real service and answering with a job's train loss."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import yaml

from promql_names import HEALTH_SERIES, defined_names, metric_names
from service.cli import build_parser
from tests.test_dashboard import JOB, free_port, service, wait_for  # noqa: F401  (the live service fixture)
from tests.netns_cluster import HEAD_PORTS, RAY_PORTS
from workers.transport import data_ports

ROOT = Path(__file__).resolve().parent.parent


SECRET = "/run/secrets/shardprop_token"  # where compose mounts SHARDPROP_TOKEN for Prometheus


def test_prometheus_config_is_valid(tmp_path):
    # promtool also checks that the token file exists: here it is a local one
    text = (ROOT / "deploy" / "prometheus.yml").read_text()
    assert text.count(SECRET) == 1
    token = tmp_path / "token"
    token.write_text("a-token-of-sixteen+\n")
    text = text.replace(SECRET, str(token))
    for inside, outside in prometheus_mounts().items():  # the rule files, where compose mounts them
        text = text.replace(inside, str(outside))
    (tmp_path / "prometheus.yml").write_text(text)
    done = subprocess.run(["promtool", "check", "config", str(tmp_path / "prometheus.yml")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_services_run_commands_the_cli_has():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"ray-head", "ray-worker", "prometheus", "grafana"}
    for name, svc in services.items():
        image = svc.get("image", "")
        assert ":" in image and not image.endswith(":latest"), f"{name}: pin the image tag"
    head = services["ray-head"]["command"]
    script = head[-1] if isinstance(head, list) else head
    serve = script.split("exec ", 1)[1]
    argv = shlex.split(serve)
    assert argv[0] == "shardprop"
    args = build_parser().parse_args(argv[1:])  # exits (fails the test) on an unknown flag
    assert args.command == "serve" and args.data_root and args.ray_address
    assert "jobstore" in compose["volumes"] and "data" in compose["volumes"]
    assert "ray start --head" in script
    assert services["ray-worker"]["command"][:2] == ["ray", "start"]
    # every node listens on the fixed ports the namespace-host tests run on (docs/deploy.md)
    head_start = shlex.split(script.split("&&", 1)[0])
    for flag in (*RAY_PORTS, *HEAD_PORTS):
        assert flag in head_start, f"ray-head: {flag}"
    for flag in RAY_PORTS:
        assert flag in services["ray-worker"]["command"], f"ray-worker: {flag}"
    # every node's actors serve their arrays on the range docs/deploy.md says to open
    deploy_doc = (ROOT / "docs" / "deploy.md").read_text()
    for name in ("ray-head", "ray-worker"):
        ports = data_ports(services[name]["environment"]["SHARDPROP_DATA_PORTS"])
        assert f"SHARDPROP_DATA_PORTS={ports.start}-{ports.stop - 1}" in deploy_doc, name
        assert len(ports) >= 64, f"{name}: one port per actor on a node"
    # Prometheus scrapes the service by its compose name, with the service's token
    scrape = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())["scrape_configs"][0]
    target_host, _, target_port = scrape["static_configs"][0]["targets"][0].partition(":")
    assert target_host in args.allowed_host and int(target_port) == args.port
    assert scrape["authorization"]["credentials_file"] == SECRET
    assert "shardprop_token" in services["prometheus"]["secrets"]
    assert compose["secrets"]["shardprop_token"] == {"environment": "SHARDPROP_TOKEN"}


def prometheus_mounts() -> dict[str, Path]:
    """The compose Prometheus's bind mounts of files: path inside -> file here."""
    volumes = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["prometheus"]["volumes"]
    binds = [v.split(":") for v in volumes if v.startswith("./")]
    return {inside: (ROOT / outside).resolve() for outside, inside, *_ in binds}


def test_prometheus_loads_the_alert_rules_compose_mounts():
    rule_files = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())["rule_files"]
    mounts = prometheus_mounts()
    assert [mounts.get(path) for path in rule_files] == [ROOT / "deploy" / "alerts.yml"]
    assert all(path.is_file() for path in mounts.values()), mounts


def board() -> dict:
    return json.loads((ROOT / "deploy" / "grafana" / "dashboards" / "shardprop.json").read_text())


def dashboard_metric_names() -> set[str]:
    exprs = [t["expr"] for p in board()["panels"] for t in p["targets"]]
    exprs.append(board()["templating"]["list"][0]["query"]["query"])
    return set().union(*map(metric_names, exprs))


def test_the_dashboard_charts_the_health_series_and_only_series_the_service_defines():
    panels = board()["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    names = dashboard_metric_names()
    assert HEALTH_SERIES <= names, HEALTH_SERIES - names
    assert names <= defined_names(), names - defined_names()


@pytest.mark.ray
def test_every_dashboard_query_names_a_metric_the_service_exports(service):  # noqa: F811
    # an async job: it exports everything a sync one does, and staleness too
    async_job = {**JOB, "training": {**JOB["training"], "steps": 200, "mode": "async"}}
    job = httpx.post(f"{service}/v1/jobs", json=async_job, timeout=10).json()
    wait_for(lambda: httpx.get(f"{service}/v1/jobs/{job['id']}", timeout=10).json()["step"] >= 20)
    exported = set(re.findall(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)", httpx.get(f"{service}/metrics").text, re.M))
    names = dashboard_metric_names()
    assert names and names <= exported, names - exported


def prometheus_query(port: int, query: str) -> list:
    """The result of an instant query to a Prometheus on loopback; [] while it
    is not up yet (refused, or `503 Service Unavailable` while it starts)."""
    try:
        r = httpx.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": query}, timeout=5)
    except httpx.HTTPError:
        return []
    return r.json().get("data", {}).get("result", []) if r.status_code == 200 else []


@contextmanager
def running_prometheus(config: dict, tmp_path: Path):
    """Debian's real `prometheus` on a free loopback port with `config`
    (written to tmp_path, its data there too); yields the port."""
    port = free_port()
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    prometheus = subprocess.Popen(
        ["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield port
    finally:
        prometheus.terminate()
        prometheus.wait(timeout=30)


@pytest.mark.ray
def test_a_real_prometheus_scrapes_a_jobs_train_loss(service, tmp_path):  # noqa: F811
    target = service.removeprefix("http://")
    config = {"global": {"scrape_interval": "1s"},
              "scrape_configs": [{"job_name": "shardprop", "static_configs": [{"targets": [target]}]}]}
    with running_prometheus(config, tmp_path) as port:
        job = httpx.post(f"{service}/v1/jobs", json=JOB, timeout=10).json()

        def loss_from_prometheus():
            result = prometheus_query(port, f'shardprop_train_loss{{job_id="{job["id"]}"}}')
            return float(result[0]["value"][1]) if result else None

        loss = wait_for(loss_from_prometheus, timeout=90, every=0.5)
        assert 0 < loss < 10


def test_a_real_prometheus_scrapes_a_service_with_a_token_only_with_its_credentials_file(tmp_path):
    """deploy/prometheus.yml's way of sending the token, against a real
    service with one: the scrape with the token file is up, the one without
    is down (401)."""
    from tests.service_helpers import service as paused_service

    token = "prometheus-scrapes-with-this"
    (tmp_path / "token").write_text(token + "\n")
    os.chmod(tmp_path / "token", 0o600)  # a token file: its owner's only
    with paused_service(tmp_path, token=token) as (url, _):
        target = url.removeprefix("http://")
        config = {"global": {"scrape_interval": "1s"},
                  "scrape_configs": [
                      {"job_name": "with-token", "authorization": {"credentials_file": str(tmp_path / "token")},
                       "static_configs": [{"targets": [target]}]},
                      {"job_name": "without", "static_configs": [{"targets": [target]}]}]}
        with running_prometheus(config, tmp_path) as port:
            def up():
                found = {s["metric"]["job"]: s["value"][1] for s in prometheus_query(port, "up")}
                return found if len(found) == 2 else None

            assert wait_for(up, timeout=90, every=0.5) == {"with-token": "1", "without": "0"}


@pytest.mark.ray
@pytest.mark.slow
def test_a_service_attached_to_a_ray_start_head_cluster_runs_a_job(ray_head, tmp_path):
    """The bare-machine commands of docs/deploy.md, on loopback: a service
    attached to a `ray start --head` (tests/conftest.py's `ray_head`; that an
    attached driver's step goes through the object store with shared files
    is tests/test_attached.py's)."""
    from tests.service_helpers import ServiceProcess, wait_state

    server = ServiceProcess(tmp_path / "store.db", "--ray-address", ray_head.address,
                            "--data-root", str(tmp_path), env={"RAY_AUTH_MODE": "disabled"}).start()
    try:
        small = {**JOB, "training": {**JOB["training"], "steps": 30}}
        job = httpx.post(f"{server.url}/v1/jobs", json=small, timeout=10).json()
        done = wait_state(server.url, job["id"], timeout=180, diagnose=lambda: (
            f"{server.diagnose()}\nray head log:\n{ray_head.log.read_text(errors='replace')[-3000:]}"))
        assert done["state"] == "succeeded", done
        assert done["step"] == 30
    finally:
        server.stop()
