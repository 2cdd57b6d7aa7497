"""Project the fitted step-time model to 10-1,000 nodes, beside a ring all-reduce.

Weak scaling: every node computes one shard of `--shard-rows` rows per step
(global batch = nodes x rows), float32, one CPU per node. The network is two
dense layers of width d (d x d x d, biases), d = sqrt(P / 2), so P is about
the named count; a shard's compute is its FLOPs at the calibration's rate.
Efficiency is the one-node step over the N-node step (1.0: N times the
samples per second). Prints a markdown table and draws the plot.

    .venv/bin/python bench/scaling_projection.py [--calibration scaling.json] [--plot docs/scaling.png]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.scaling import FITTED, Calibration, JobShape, Network, parameter_server_step, ring_step  # noqa: E402

PARAMETERS = (10_000, 100_000, 1_000_000, 10_000_000)
NODES = (10, 100, 1000)


def shape_for(parameters: int, nodes: int, rows: int, servers: int = 1) -> JobShape:
    d = max(1, round(math.sqrt(parameters / 2)))
    return JobShape((d, d, d), True, 4, rows * nodes, nodes, servers=servers)


def steps(parameters: int, nodes: int, net: Network, cal: Calibration, rows: int,
          ring_latencies: int = 2) -> tuple[float, float, float]:
    """(parameter server, ring, compute) seconds per step; the ring's
    transfers pulls (2 latencies each) unless `ring_latencies` says otherwise."""
    shape = shape_for(parameters, nodes, rows)
    n = replace(net, nodes=nodes)
    ps = parameter_server_step(shape, n, cal)
    return ps.total_s, ring_step(shape, n, cal, ring_latencies).total_s, ps.compute_s


def efficiency(parameters: int, nodes: int, net: Network, cal: Calibration, rows: int,
               ring_latencies: int = 2) -> tuple[float, float]:
    one = steps(parameters, 1, net, cal, rows, ring_latencies)[0]
    ps, ring, _ = steps(parameters, nodes, net, cal, rows, ring_latencies)
    return one / ps, one / ring


def native(cal: Calibration) -> Calibration:
    """A collective library's transfers: no per-transfer or per-byte
    software cost (the wire at eta only), pushed: one latency a hop."""
    return replace(cal, per_transfer_s=0.0, per_byte_s=0.0)


def table(net: Network, cal: Calibration, rows: int) -> list[str]:
    out = ["| parameters | nodes | compute | parameter server: step | samples/s | efficiency | "
           "ring all-reduce: step | samples/s | efficiency | ring, native transfers: efficiency |",
           "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for p in PARAMETERS:
        for n in NODES:
            ps, ring, compute = steps(p, n, net, cal, rows)
            e_ps, e_ring = efficiency(p, n, net, cal, rows)
            e_native = efficiency(p, n, net, native(cal), rows, ring_latencies=1)[1]
            out.append(f"| {p:,} | {n:,} | {compute * 1e3:.2f} ms | {_t(ps)} | {n * rows / ps:,.0f} | {e_ps:.3f} | "
                       f"{_t(ring)} | {n * rows / ring:,.0f} | {e_ring:.3f} | {e_native:.3f} |")
    return out


# Llama 3 (arXiv:2407.21783, section 3.3.4): 419 unexpected interruptions in
# 54 days on 16,384 GPUs, 8 to a server: 2,048 servers x 1,296 h / 419.
NODE_MTBF_H = 2048 * 54 * 24 / 419


def young_interval(checkpoint_s: float, mtbf_s: float) -> float:
    """Young's checkpoint interval, sqrt(2 C M): it minimises C / tau + tau / (2 M)."""
    return math.sqrt(2 * checkpoint_s * mtbf_s)


def restart_loss(checkpoint_s: float, restart_s: float, mtbf_s: float) -> float:
    """Fraction of time lost with checkpoints every Young interval and, per
    failure, a restart and on average half an interval of lost work."""
    tau = young_interval(checkpoint_s, mtbf_s)
    return checkpoint_s / tau + (restart_s + tau / 2) / mtbf_s


def failure_table(zero_lost_s: tuple[float, ...], restart_s: float, checkpoint_s: float) -> list[str]:
    """Fraction of cluster time lost to failures. shardprop: a worker node's
    failure stops the sync job for `zero_lost_s` and loses no step; the
    servers' node (1 in N failures) is restored from a checkpoint and
    replayed, so checkpoints are still written, at the interval that node's
    own MTBF calls for. Checkpoint-and-restart: any failure restarts the job
    (`restart_s`) from the last checkpoint, taken at the cluster's Young
    interval."""
    out = ["| nodes | cluster MTBF | shardprop, zero lost steps (" + " / ".join(f"{z:g} s" for z in zero_lost_s)
           + " per failure) | checkpoint-and-restart: interval | time lost |", "|---:|---:|---:|---:|---:|"]
    node_s = NODE_MTBF_H * 3600
    servers = restart_loss(checkpoint_s, restart_s, node_s)
    for n in NODES:
        mtbf = node_s / n
        ours = [z / mtbf * (n - 1) / n + servers for z in zero_lost_s]
        out.append(f"| {n:,} | {mtbf / 3600:,.1f} h | " + " / ".join(f"{x:.3%}" for x in ours)
                   + f" | {young_interval(checkpoint_s, mtbf):,.0f} s | {restart_loss(checkpoint_s, restart_s, mtbf):.2%} |")
    return out


def _t(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 10 else f"{seconds:.1f} s"


def plot(net: Network, cal: Calibration, rows: int, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nodes = sorted({round(10 ** (k / 8)) for k in range(0, 25)})
    fig, ax = plt.subplots(figsize=(8, 5))
    for p, colour in zip(PARAMETERS, ("C0", "C1", "C2", "C3")):
        eff = [efficiency(p, n, net, cal, rows) for n in nodes]
        ax.plot(nodes, [e[0] for e in eff], "-", color=colour, label=f"{p:,} params, parameter server")
        ax.plot(nodes, [e[1] for e in eff], "--", color=colour, label=f"{p:,} params, ring all-reduce")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("nodes (one worker each)")
    ax.set_ylabel("weak-scaling efficiency (1-node step / N-node step)")
    ax.set_title(f"shardprop step model: {net.bandwidth_bytes_s * 8 / 1e9:g} Gbit/s, "
                 f"{net.latency_s * 1e3:g} ms, {rows} rows per node")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calibration", help="bench/scaling.py's --json output (default: core.scaling.FITTED)")
    ap.add_argument("--bandwidth-gbit", type=float, default=10.0)
    ap.add_argument("--latency-ms", type=float, default=0.1)
    ap.add_argument("--shard-rows", type=int, default=256)
    ap.add_argument("--plot", help="PNG to draw")
    ap.add_argument("--zero-lost-s", type=float, nargs="+", default=[3.0, 60.0],
                    help="seconds a zero-lost-steps recovery stops the job (default: measured 3, link-cut budget 60)")
    ap.add_argument("--restart-s", type=float, default=120.0, help="seconds to restart a whole job")
    ap.add_argument("--checkpoint-s", type=float, default=1.0, help="seconds a checkpoint stops the job")
    args = ap.parse_args()
    cal = Calibration(**json.loads(Path(args.calibration).read_text())["calibration"]) if args.calibration \
        else FITTED
    net = Network(1, args.bandwidth_gbit * 1e9 / 8, args.latency_ms * 1e-3)
    print("\n".join(table(net, cal, args.shard_rows)))
    print(f"\nper-node MTBF {NODE_MTBF_H:,.0f} h (Llama 3's 419 interruptions / 54 days / 2,048 servers)\n")
    print("\n".join(failure_table(tuple(args.zero_lost_s), args.restart_s, args.checkpoint_s)))
    if args.plot:
        plot(net, cal, args.shard_rows, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
