"""Runs jobs on a private single-node Ray, where the coordinator compiles its
step graph to shared-memory channels (the test session's cluster puts the
driver on a node without CPUs, so its jobs take the object-store path).

    python tests/compiled_runs.py CASES.json OUT_DIR

CASES.json is a list of {"name", "spec", "faults"?, "kill"?: ["worker"|"server", step],
"cancel_after"?: seconds, "shared_root"?: path for the shared arrays,
"keep_results"?: true to keep every step's statistics alive until the job ends};
for each case OUT_DIR/<name>.npz gets the trained parameters, or
OUT_DIR/<name>.json the error; OUT_DIR/<name>.events.json the coordinator's events;
OUT_DIR/leftovers.json the jobs' shared-array directories still there at the end.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from core.spec import parse_spec  # noqa: E402
from workers.coordinator import Coordinator  # noqa: E402
from workers.sync_loop import SyncLoop  # noqa: E402
from workers.runtime import connect_ray  # noqa: E402
from run_helpers import fault_plan  # noqa: E402


def run_case(case: dict, out: Path) -> None:
    events = []
    kill = case.get("kill")

    def on_step(record):
        if kill and record["step"] == kill[1] and not any(k == "recovery" for k, _ in events):
            where = coordinator.worker_locations[-1] if kill[0] == "worker" else coordinator.server_locations[0]
            os.kill(where["pid"], signal.SIGKILL)

    with tempfile.TemporaryDirectory() as tmp:
        def on_event(event):
            kind, detail = event.kind, event.detail()
            if kind == "graph" and coordinator.shared_dir is not None:  # what the job's shared files are now
                detail = dict(detail, files=sorted(p.name for p in coordinator.shared_dir.iterdir()))
            events.append((kind, detail))

        coordinator = Coordinator(parse_spec(case["spec"]), tmp, on_step=on_step, on_event=on_event,
                                  start_worker=fault_plan(case.get("faults", {})))
        finish = SyncLoop._finish
        if case.get("keep_results"):  # a caller that keeps what the step graph handed over
            kept = []
            SyncLoop._finish = lambda loop, stats: (kept.append(stats), finish(loop, stats))
        if "shared_root" in case:
            coordinator.shared_root = Path(case["shared_root"])
        if "cancel_after" in case:
            threading.Timer(case["cancel_after"], coordinator.cancel).start()
        began = time.monotonic()
        try:
            net = coordinator.run()
            np.save(out / f"{case['name']}.npy", net.params, allow_pickle=False)
        except Exception as err:  # reported to the test, which checks the message
            (out / f"{case['name']}.json").write_text(json.dumps({
                "error": type(err).__name__, "message": str(err), "seconds": time.monotonic() - began}))
        finally:
            SyncLoop._finish = finish
    (out / f"{case['name']}.events.json").write_text(json.dumps(events, default=str))


def main() -> int:
    cases = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    connect_ray(None, 4)
    for case in cases:
        run_case(case, out)
        print(case["name"], flush=True)
    # every job removed its shared-array directory (workers.shared)
    left = sorted(str(p) for p in Path("/dev/shm").glob(f"shardprop-{os.getuid()}-{os.getpid()}-*"))
    (out / "leftovers.json").write_text(json.dumps(left))
    # Ray goes down here, before the interpreter's own clean-up: twice in seven
    # runs, a driver left to shut Ray down during finalization (after jobs
    # whose compiled graphs lost actors) died of SIGSEGV there, every result
    # already written. Stopping Ray explicitly, then leaving without
    # finalization, has not crashed since.
    import gc

    import ray

    gc.collect()
    ray.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
