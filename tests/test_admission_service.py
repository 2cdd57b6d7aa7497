"""The memory bound: every input that used to exhaust memory, posted to a real
service (a subprocess on loopback, with a private Ray instance of its own),
gets a 422 naming the problem and stores nothing; the service stays healthy
and small, and a good job submitted after them all still succeeds."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import numpy as np
import pytest

from service_helpers import SERVICE_PEAK, ServiceProcess, status_field, tiny_spec, wait_state

GiB = 1 << 30
ALL_PROCESSES = 4 * GiB  # the service and every Ray process it started, summed (the bound)


def with_fields(**sections) -> dict:
    raw = tiny_spec()
    for section, fields in sections.items():
        raw[section] = {**raw.get(section, {}), **fields}
    return raw


def write_files(root: Path) -> None:
    rows = "".join(f"{i % 7},{(i * 3) % 5},{i % 2}\n" for i in range(45))  # 45 rows of 6 bytes
    (root / "label2m.csv").write_text("a,b,label\n" + rows + "1,1,2000000\n")
    (root / "wide.csv").write_text("1," * 10_000_000 + "0\n")  # one row of ten million columns, 20 MB
    np.savez_compressed(root / "zeros.npz", X=np.zeros((60_000, 1000)), y=np.zeros(60_000))  # 480 MB inflated
    # the good job: 50000 classes (labels up to 49999) on 20 rows, so its model is wide and cheap
    (root / "wide_model.csv").write_text("".join(f"{i},{i % 3},{(i * 2503) % 50_000}\n" for i in range(19))
                                         + "3,1,49999\n")


BAD = [
    ("a 292-byte CSV whose largest label is 2,000,000", with_fields(data={"source": "label2m.csv"}),
     "the largest label makes 2000001 classes, more than the limit of 100000 (max_classes)"),
    ("synthetic at its maxima", with_fields(data={"source": "synthetic", "samples": 10_000_000, "features": 100_000}),
     "synthetic data: 10000000 rows x 100001 columns need 8000080000000 bytes as float64, more than the limit of "
     "536870912 (max_data_bytes)"),
    ("hidden [65536, 65536, 65536]", with_fields(model={"hidden": [65536, 65536, 65536]}),
     "model: hidden [65536, 65536, 65536] needs 8589934592 weights, more than 200000000"),
    ("an input layer of 3 billion weights", with_fields(
        data={"source": "synthetic", "samples": 100, "features": 50_000}, model={"hidden": [65536]}),
     "the network 50000 -> 65536 -> 3 has 3277062147 parameters, more than the limit of 50000000 (max_parameters)"),
    ("a CSV with one row of ten million columns", with_fields(data={"source": "wide.csv"}),
     "wide.csv: line 1 has more than 100001 columns, the limit is 100001 (max_features + 1)"),
    ("a batch far larger than the rows", with_fields(training={"batch_size": 1_000_000}),
     "training.batch_size (1000000) exceeds the training rows (1438) of 'digits'"),
    ("a small .npz inflating to 480 MB", with_fields(data={"source": "zeros.npz"}),
     "zeros.npz: array X inflates"),
    ("a checkpoint every step for a million steps",
     with_fields(training={"steps": 1_000_000, "checkpoint_every": 1, "eval_every": 0}),
     "makes 1000001 checkpoints, more than the limit of 10000 per job (max_checkpoints)"),
    ("a NUL byte in data.source", with_fields(data={"source": "a\x00b.csv"}),
     "data.source: source must not contain control characters such as a NUL byte"),
    ("an over-long name in data.source", with_fields(data={"source": "x" * 5000 + ".csv"}),
     "data.source: source must be at most 4096 characters, got 5004"),
]


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants, from /proc/*/stat."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        parent = int(text[text.rindex(")") + 2:].split()[1])
        children.setdefault(parent, []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo.extend(children.get(tree[-1], []))
    return tree


class PeakMemory:
    """Samples the resident memory of a process and all its descendants
    (the Ray instance it started) every 0.2 s, keeping the largest sum."""

    def __init__(self, pid: int):
        self.pid, self.peak, self.stop = pid, 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(0.2):
            self.peak = max(self.peak, sum(status_field(p, "VmRSS") for p in process_tree(self.pid)))

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


@pytest.mark.ray
@pytest.mark.slow
def test_inputs_that_exhausted_memory_are_refused_and_the_service_stays_small(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    write_files(root)
    assert (root / "label2m.csv").stat().st_size == 292
    store = tmp_path / "store" / "shardprop.db"
    store.parent.mkdir()
    service = ServiceProcess(store, "--data-root", str(root), "--max-concurrent-jobs", "1",
                             "--limit", "max_predict_values=1000000").start()
    try:
        with PeakMemory(service.proc.pid) as memory, httpx.Client(base_url=service.url, timeout=120) as client:
            for case, body, detail in BAD:
                before = len(client.get("/v1/jobs").json()["jobs"])
                r = client.post("/v1/jobs", json=body)
                assert r.status_code == 422, (case, r.text)
                assert detail in r.json()["detail"], (case, r.json()["detail"])
                assert len(client.get("/v1/jobs").json()["jobs"]) == before, case
                assert client.get("/healthz").status_code == 200, case

            good = with_fields(data={"source": "wide_model.csv", "shards": 2, "validation_split": 0.2},
                               model={"hidden": [2]}, training={"steps": 3, "batch_size": 8})
            job = client.post("/v1/jobs", json=good)
            assert job.status_code == 201, job.text
            done = wait_state(service.url, job.json()["id"], timeout=300, diagnose=service.diagnose)
            assert done["state"] == "succeeded", done

            # predict: 100 rows x the 50000-unit output layer is 5,000,000 values, past the limit of 1,000,000
            predict = f"/v1/jobs/{done['id']}/predict"
            r = client.post(predict, json={"rows": [[1.0, 2.0]] * 100})
            assert r.status_code == 422, r.text
            assert r.json()["detail"] == ("rows has 100 rows and the model's widest layer 50000 units: 5000000 values, "
                                          "more than the limit of 1000000 (max_predict_values)")
            r = client.post(predict, json={"rows": [[1.0, 2.0]] * 2})
            assert r.status_code == 200 and len(r.json()["outputs"][0]) == 50_000
            assert client.get("/healthz").status_code == 200
            peak = status_field(service.proc.pid, "VmHWM")
        print(f"service VmHWM {peak / GiB:.2f} GiB; service and Ray processes together peaked at "
              f"{memory.peak / GiB:.2f} GiB (sampled)")
        assert peak < SERVICE_PEAK, peak
        assert memory.peak < ALL_PROCESSES, memory.peak
    finally:
        service.stop()
