"""The TCP array transport's own pace per byte, on loopback: no link, no relay.

One process serves a float32 array from an `ArrayService`
(workers/transport.py), this one pulls it with an `ArrayClient`, 30 times
after 5 warm-up pulls, for three sizes; the slope of the median pull time
over the bytes is the software's seconds per byte (core.scaling's mu when
the link is faster), the intercept one pull's fixed cost.

    .venv/bin/python bench/transport_rate.py
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from workers.transport import ArrayClient, NetArray  # noqa: E402

SERVE = """
import json, sys
import numpy as np
sys.path.insert(0, sys.argv[2])
from workers.transport import ArrayService
service = ArrayService("127.0.0.1", range(0, 1), token="ab" * 16)
handle = service.offer(0, {"params": np.ones(int(sys.argv[1]), np.float32)})["params"]
print(json.dumps(handle.__dict__), flush=True)
sys.stdin.read()
"""
SIZES = (269_322, 1_077_288, 4_000_000)


def median_pull_s(items: int) -> float:
    server = subprocess.Popen([sys.executable, "-c", SERVE, str(items), str(ROOT)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        handle = NetArray(**json.loads(server.stdout.readline()))
        client, into = ArrayClient(), np.empty(items, np.float32)
        for _ in range(5):
            client.pull([(handle, into, 0)])
        times = []
        for _ in range(30):
            began = time.perf_counter()
            client.pull([(handle, into, 0)])
            times.append(time.perf_counter() - began)
        client.close()
        return statistics.median(times)
    finally:
        server.stdin.close()
        server.wait()


def main() -> int:
    pulls = {items: median_pull_s(items) for items in SIZES}
    for items, seconds in pulls.items():
        print(f"{items * 4:>11,} bytes: {seconds * 1e3:.3f} ms, {items * 4 / seconds / 1e6:,.0f} MB/s")
    slope, intercept = np.polyfit([4 * n for n in SIZES], list(pulls.values()), 1)
    print(f"per byte {slope * 1e9:.3f} ns ({1 / slope / 1e9:.2f} GB/s), per pull {intercept * 1e6:.0f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
