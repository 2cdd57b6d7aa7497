"""core's training step against PyTorch on CPU, and against the GEMM limit.

One step = forward, backward and a plain SGD update of a 784-256-256-10 relu
MLP with softmax cross-entropy, batch 256, float32, both engines at the same
BLAS thread count. Rounds alternate (core, then torch) and we report medians
and the median of per-round ratios. The limit: the matrix-product FLOPs one
step really needs (forward and weight-gradient products of every layer,
input-gradient products of all but the first) at this machine's float32 GEMM
rate, measured in the same run (np.matmul on 1024², 1536² and 2048²,
median of 3 each, once per round; the median over the rounds). torch is a
benchmark baseline only (`.venv/bin/pip install torch==2.13.0` or
`pip install -e '.[bench]'`).

    .venv/bin/python bench/engine.py [--threads 1 2] [--rounds 7] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.mlp import MLP  # noqa: E402

SIZES = [784, 256, 256, 10]
BATCH = 256


def step_flops(sizes=SIZES, batch=BATCH) -> float:
    """2·m·k·n per product: forward and weight gradient per layer, input gradient but for the first."""
    layers = list(zip(sizes, sizes[1:]))
    forward = sum(2 * batch * i * o for i, o in layers)
    weight_grads = forward
    input_grads = sum(2 * batch * i * o for i, o in layers[1:])
    return float(forward + weight_grads + input_grads)


def gemm_rate(sizes=(1024, 1536, 2048), repeats: int = 3) -> float:
    """float32 np.matmul FLOP/s on square matrices: the median over all sizes and repeats."""
    rates = []
    for size in sizes:
        a = np.random.default_rng(size).standard_normal((size, size)).astype(np.float32)
        b = a.T.copy()
        out = np.empty_like(a)
        np.matmul(a, b, out=out)  # warm-up: pages touched, BLAS buffers allocated
        for _ in range(repeats):
            began = time.perf_counter()
            np.matmul(a, b, out=out)
            rates.append(2 * size ** 3 / (time.perf_counter() - began))
    return statistics.median(rates)


def core_engine(X, y, lr=0.01):
    """n steps of core: grad_sum into one reused flat buffer, then params -= lr/n * grad."""
    net = MLP(SIZES, seed=0)
    grad = np.empty_like(net.params)
    lr = np.float32(lr)

    def run(n: int) -> float:
        nonlocal grad
        began = time.perf_counter()
        for _ in range(n):
            _, grad, count = net.grad_sum(X, y, out=grad)
            grad *= lr / np.float32(count)
            net.params -= grad
        return time.perf_counter() - began
    return run


def torch_engine(X, y, lr=0.01):
    """n steps of torch: the textbook loop with nn.Linear, CrossEntropyLoss and optim.SGD."""
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(784, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                                torch.nn.ReLU(), torch.nn.Linear(256, 10))
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    loss_fn = torch.nn.CrossEntropyLoss()
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)

    def run(n: int) -> float:
        began = time.perf_counter()
        for _ in range(n):
            opt.zero_grad(set_to_none=True)
            loss_fn(model(Xt), yt).backward()
            opt.step()
        return time.perf_counter() - began
    return run


def measure(threads: int, rounds: int, steps: int, X, y) -> dict:
    """Alternating rounds of core then torch steps at `threads` BLAS/torch threads.
    Both networks are built once, outside the timed loops, and warmed up."""
    import torch

    torch.set_num_threads(threads)
    flops = step_flops()
    rows = []
    with threadpool_limits(limits=threads, user_api="blas"):
        core, torch_run = core_engine(X, y), torch_engine(X, y)
        core(10), torch_run(10)
        for _ in range(rounds):
            c = core(steps)
            t = torch_run(steps)
            g = gemm_rate()
            rows.append({"core": BATCH * steps / c, "torch": BATCH * steps / t, "gemm_flops": g,
                         "core_limit": (flops * steps / c) / g, "torch_limit": (flops * steps / t) / g})
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    return {"threads": threads, "median": med, "core_over_torch": statistics.median(r["core"] / r["torch"] for r in rows),
            "rounds": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1], help="thread counts to run, e.g. 1 2")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=60, help="steps per engine per round")
    parser.add_argument("--json")
    args = parser.parse_args()
    import torch

    rng = np.random.default_rng(1)
    X = rng.standard_normal((BATCH, 784)).astype(np.float32)
    y = rng.integers(0, 10, BATCH)
    runs = [measure(threads, args.rounds, args.steps, X, y) for threads in args.threads]
    blas = [f"{i.get('internal_api')} {i.get('version')} ({i.get('architecture')})"
            for i in threadpool_info() if i.get("user_api") == "blas"]
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown") if Path("/proc/cpuinfo").exists() else "unknown"
    result = {"network": "784-256-256-10 relu softmax cross-entropy", "batch": BATCH, "dtype": "float32",
              "rounds": args.rounds, "steps_per_round": args.steps, "step_flops": step_flops(),
              "nproc": os.cpu_count(), "cpu": cpu, "numpy": np.__version__, "torch": torch.__version__,
              "blas": blas, "runs": runs}
    print(f"784-256-256-10 relu softmax-CE, batch {BATCH}, float32, medians of {args.rounds} alternating "
          f"rounds of {args.steps} steps; {step_flops() / 1e6:.1f} MFLOP of matrix products per step")
    print(f"{'threads':>7} {'core/s':>9} {'torch/s':>9} {'core/torch':>10} {'core limit':>10} {'torch limit':>11} "
          f"{'GEMM GF/s':>9}")
    for r in runs:
        m = r["median"]
        print(f"{r['threads']:>7} {m['core']:>9.0f} {m['torch']:>9.0f} {r['core_over_torch']:>10.2f} "
              f"{m['core_limit']:>10.1%} {m['torch_limit']:>11.1%} {m['gemm_flops'] / 1e9:>9.1f}")
    print(f"numpy {np.__version__}, torch {torch.__version__}, BLAS {', '.join(blas)}, {os.cpu_count()} CPUs ({cpu})")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
