"""The sweep series: trials by state and the best objective, per sweep,
removed a retention period after the sweep ended; promtool accepts them."""

from __future__ import annotations

import shutil
import subprocess
import time

from prometheus_client.parser import text_string_to_metric_families

from service.metrics import ServiceMetrics
from service.states import STATES


def samples(metrics) -> dict:
    text, _ = metrics.exposition()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text.decode()) for s in f.samples}


def test_trials_by_state_and_best_then_gone_after_retention():
    m = ServiceMetrics(retention_s=0.2)
    m.sweeps.observe("s1", {"running": 2, "succeeded": 3}, None)
    m.sweeps.observe("s2", {"queued": 4}, None)
    m.sweeps.observe("s1", {"running": 1, "succeeded": 4}, 0.93)
    found = samples(m)
    trials = {state: found[("shardprop_sweep_trials", (("state", state), ("sweep_id", "s1")))] for state in STATES}
    assert trials == {"queued": 0, "running": 1, "succeeded": 4, "failed": 0, "cancelled": 0}
    assert found[("shardprop_sweep_best_objective", (("sweep_id", "s1"),))] == 0.93
    assert ("shardprop_sweep_best_objective", (("sweep_id", "s2"),)) not in found  # no objective yet
    m.sweeps.ended("s1")
    assert ("shardprop_sweep_best_objective", (("sweep_id", "s1"),)) in samples(m)  # kept a while
    time.sleep(0.3)
    left = {labels for (name, labels) in samples(m) if name.startswith("shardprop_sweep")}
    assert left == {(("state", state), ("sweep_id", "s2")) for state in STATES}
    assert shutil.which("promtool"), "promtool missing: .ci/run installs Debian's prometheus package"
    text, _ = m.exposition()
    done = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
