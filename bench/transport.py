"""The TCP array transport alone: one pull of a parameter vector, on loopback.

A service in a child process offers a float32 vector (default 269,322
values, the 784-256-256-10 network of bench/multihost.py: 1.08 MB); this
process pulls it whole on a kept connection, `--pulls` times after a warm-up,
and prints the median and 90th percentile of one pull and the rate. Against
the step phases of bench/multihost.py it says how much of a cross-host
step's transfer is the bytes and how much the rest of the step's path.

    .venv/bin/python bench/transport.py [--values 269322] [--pulls 300]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import time
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from workers.transport import ArrayClient, ArrayService  # noqa: E402


def serve(handles: mp.Queue, values: int, stop: mp.Event) -> None:
    service = ArrayService("127.0.0.1", range(0, 1), uuid.uuid4().hex)  # port 0: any free one
    vector = np.random.default_rng(0).random(values, dtype=np.float32)
    handles.put(service.offer(0, {"params": vector})["params"])
    stop.wait(600)
    service.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--values", type=int, default=269_322)
    parser.add_argument("--pulls", type=int, default=300)
    args = parser.parse_args()
    handles, stop = mp.Queue(), mp.Event()
    server = mp.Process(target=serve, args=(handles, args.values, stop), daemon=True)
    server.start()
    try:
        handle = handles.get(timeout=60)
        client, out = ArrayClient(), np.empty(args.values, np.float32)
        for _ in range(20):
            client.pull([(handle, out, 0)])
        seconds = []
        for _ in range(args.pulls):
            began = time.perf_counter()
            client.pull([(handle, out, 0)])
            seconds.append(time.perf_counter() - began)
        client.close()
    finally:
        stop.set()
        server.join(30)
    median, p90 = statistics.median(seconds), float(np.percentile(seconds, 90))
    mb = out.nbytes / 1e6
    print(f"pull of {mb:.2f} MB ({args.values:,} float32), {args.pulls} pulls: "
          f"median {median * 1e3:.3f} ms, p90 {p90 * 1e3:.3f} ms, {mb / median:.0f} MB/s")


if __name__ == "__main__":
    main()
