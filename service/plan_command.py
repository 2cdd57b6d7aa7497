"""`shardprop plan JOB.yaml --nodes N`: the step-time model's prediction for a job.

Reads the spec (and its data's shape, never the data itself), then prints
what core.scaling predicts for it on N nodes, one worker each: the bytes a
step moves over the servers' link, the step time by phase, samples/s and the
efficiency against the same job on one node, and the same for a ring
all-reduce. The constants are those fitted in docs/scaling.md. A bad option
exits 2 naming the option and its value.
"""

from __future__ import annotations

import re
import sys

from core.data import DataError
from core.scaling import FITTED, JobShape, Network, Placement, bytes_per_step, latency_hops, plan, shards_per_worker
from core.spec import SpecError, load_spec

BITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
SECONDS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
NUMBER = r"(?P<num>(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)"


class PlanError(ValueError):
    pass


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("plan", help="predict a job's step time, samples/s and efficiency on N nodes",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("job", help="job spec, YAML or JSON")
    p.add_argument("--nodes", type=int, required=True, help="nodes, one gradient worker each")
    p.add_argument("--bandwidth", default="10Gbit", help="each node's link, e.g. 10Gbit, 400Mbit, 1.25GB/s "
                                                         "(default 10Gbit)")
    p.add_argument("--latency", default="0.1ms", help="one-way node-to-node latency, e.g. 0.1ms, 50us "
                                                      "(default 0.1ms)")
    p.add_argument("--servers", type=int, help="parameter-server slices (default: the spec's)")
    p.add_argument("--data-root", action="append", help="folders data paths are confined to")


def parse_bandwidth(text: str) -> float:
    """Bytes per second from '10Gbit', '400mbit/s', '1.25GB/s'."""
    m = re.fullmatch(NUMBER + r"\s*([kKmMgGtT]?)(bit|B)(?:/s|ps)?", text.strip())
    if not m:
        raise PlanError(f"--bandwidth: cannot read {text!r} (give a rate such as 10Gbit, 400Mbit or 1.25GB/s)")
    rate = float(m["num"]) * BITS[m.group(2).lower()] / (8 if m.group(3) == "bit" else 1)
    if rate <= 0:
        raise PlanError(f"--bandwidth must be above 0, got {text!r}")
    return rate


def parse_latency(text: str) -> float:
    """Seconds from '0.1ms', '50us', '1s'."""
    m = re.fullmatch(NUMBER + r"\s*(s|ms|us|µs|ns)", text.strip())
    if not m:
        raise PlanError(f"--latency: cannot read {text!r} (give a time such as 0.1ms, 50us or 1s)")
    return float(m["num"]) * SECONDS[m.group(2)]


def job_shape(spec, data_roots: list[str] | None, servers: int | None) -> JobShape:
    from core.metadata import describe
    from core.trainer import output_units

    meta = describe(spec.data, data_roots)
    sizes = (meta.n_features, *spec.model.hidden, output_units(spec, meta))
    return JobShape(sizes, spec.model.bias, 4 if spec.training.dtype == "float32" else 8,
                    spec.training.batch_size, spec.data.shards, spec.resources.cpus_per_worker,
                    servers or spec.resources.parameter_servers)


def _fail(message: str) -> int:
    print(f"shardprop plan: error: {message}", file=sys.stderr)
    return 2


def run(args) -> int:
    try:
        if args.nodes < 1:
            raise PlanError(f"--nodes must be at least 1, got {args.nodes}")
        if args.servers is not None and args.servers < 1:
            raise PlanError(f"--servers must be at least 1, got {args.servers}")
        net = Network(args.nodes, parse_bandwidth(args.bandwidth), parse_latency(args.latency))
        spec = load_spec(args.job)
        shape = job_shape(spec, args.data_root, args.servers)
    except (PlanError, SpecError, DataError) as err:
        return _fail(str(err))
    print("\n".join(report(spec.name, shape, net, args.bandwidth, args.latency)))
    return 0


def report(name: str, shape: JobShape, net: Network, bandwidth: str, latency: str) -> list[str]:
    """The lines `shardprop plan` prints."""
    ps, ring = plan(shape, net, FITTED), plan(shape, net, FITTED, ring=True)
    store = plan(shape, net, FITTED, object_store=True)
    moved = bytes_per_step(shape, net.nodes)
    workers = len(shards_per_worker(shape, net.nodes))
    dtype = "float32" if shape.dtype_bytes == 4 else "float64"
    lines = [f"job {name}: {shape.parameters:,} parameters ({dtype}), batch {shape.batch_size} in "
             f"{shape.shards} shards, {shape.servers} parameter server(s)",
             f"cluster: {net.nodes} node(s) x {shape.cpus_per_worker} CPU, {bandwidth} links, {latency} one way"]
    if workers < net.nodes:
        lines.append(f"note: only {workers} of the {net.nodes} nodes get a shard (data.shards is {shape.shards})")
    s = ps.step
    lines += [f"bytes per step over the servers' link: {moved.params_out:,} parameters out, "
              f"{moved.grads_in:,} gradients in",
              f"critical path, TCP array transport: {latency_hops(workers, Placement(), shape.servers)} one-way "
              f"latencies, 2 pull phases (servers beside the driver)" if workers > 1 else
              "critical path: one node, shared files, nothing transferred",
              f"predicted step: {s.total_s * 1e3:.2f} ms (compute {s.compute_s * 1e3:.2f}, "
              f"transfer {s.transfer_s * 1e3:.2f}, reduce+apply {s.reduce_apply_s * 1e3:.2f}, "
              f"overhead {s.overhead_s * 1e3:.2f})",
              f"samples/s: {ps.samples_per_s:,.0f}",
              f"efficiency: {ps.efficiency:.2f} (speed-up {ps.efficiency * net.nodes:.2f}x over 1 node)",
              f"ring all-reduce, same assumptions: step {ring.step.total_s * 1e3:.2f} ms, "
              f"{ring.samples_per_s:,.0f} samples/s, efficiency {ring.efficiency:.2f}",
              f"arrays through Ray's object store (SHARDPROP_DATA_PORTS=off; older fit): step "
              f"{store.step.total_s * 1e3:.2f} ms, {store.samples_per_s:,.0f} samples/s, "
              f"efficiency {store.efficiency:.2f}"]
    return lines
