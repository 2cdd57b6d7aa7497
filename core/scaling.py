"""A step-time model of a synchronous job, for planning and for docs/scaling.md.

One step of shardprop's parameter-server design, as the code does it
(workers/step_graph.py): the servers publish the parameters, every worker
computes its shards' gradient sums, each server reduces them in shard order
and applies the optimizer. With one worker per node and the servers on the
driver's node (where Ray puts actors that reserve no CPU), node 0's link
carries, per step:

- the parameters out, once to each of the N - 1 other nodes: (N - 1) P b
  bytes, whether in one object or k slices (Ray moves an object to a node
  once; every worker there maps it);
- the gradients in: each remote worker returns ONE result holding a full
  P-value row per shard it computed (`GradientWorker.step`), so the shards
  computed off node 0 times P b bytes. With k slices all servers sit on node
  0 and the result crosses the link once; each server slices it after it
  arrived (`ParameterServer.reduce`).

The step time is the sum of its phases, which run one after the other
(step t + 1's parameters wait for step t's apply):

    T = c0 + compute + [N > 1] (2 (alpha + h L) + c_n (N - 1) + bytes / (eta B)) + rho (S + 1) P / k

A ring all-reduce under the same assumptions (same per-transfer cost, link
efficiency and memory rate; the gradients pre-summed on each node, every node
applying the optimizer to the whole vector) moves 2 (N - 1) / N P b bytes per
node in 2 (N - 1) transfers:

    T_ring = c0 + compute + [N > 1] 2 (N - 1) (alpha + h L + P b / (N eta B)) + rho (s_w + 2) P

The constants are fitted on namespace hosts by bench/scaling.py and recorded
in docs/scaling.md; `FITTED` holds them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Calibration:
    """The model's constants (seconds, FLOP/s, fractions)."""

    flop_rate: float  # F: FLOP/s of one shard's gradient on one core
    step_overhead_s: float  # c0: per step, whatever the nodes (task submission, the driver's reads)
    per_node_s: float  # c_n: per step and per remote node (its pulls, its result's handling)
    per_transfer_s: float  # alpha: software cost of one cross-node object transfer
    latency_hops: float  # h: one-way latencies per transfer (location lookup, pull, push)
    link_efficiency: float  # eta: the fraction of the link rate an object transfer achieves
    reduce_s_per_value: float  # rho: the servers' reduce and apply, per parameter per pass


# docs/scaling.md says where each comes from: c0, alpha and eta fitted by
# bench/scaling.py on 2 namespace hosts of this shared 2-core machine under a
# load average of ~35 (so generous); c_n not identifiable from 1-2 hosts
# (0); F from bench/engine.py on a quiet machine (310.1 MFLOP in 3.39 ms,
# one thread); rho from bench/distributed.py's quiet 2-worker run (0.8 ms
# for 5 passes over 269,322 values); h read from Ray's transfer protocol.
FITTED = Calibration(flop_rate=91.5e9, step_overhead_s=18.9e-3, per_node_s=0.0, per_transfer_s=17.3e-3,
                     latency_hops=4.0, link_efficiency=0.79, reduce_s_per_value=0.6e-9)


@dataclass(frozen=True)
class JobShape:
    """What of a job the model needs."""

    sizes: tuple[int, ...]  # layer widths, inputs first
    bias: bool
    dtype_bytes: int  # 4 (float32) or 8 (float64)
    batch_size: int  # global rows per step
    shards: int  # S
    cpus_per_worker: int = 1
    servers: int = 1  # k parameter-server slices

    @property
    def parameters(self) -> int:
        """P: weights of every layer, and a bias per unit past the inputs."""
        return sum(a * b + (b if self.bias else 0) for a, b in zip(self.sizes, self.sizes[1:]))

    def shard_rows(self) -> int:
        """Rows of the largest shard's mini-batch (the batch split over the shards)."""
        return math.ceil(self.batch_size / self.shards)

    def shard_flops(self) -> float:
        """FLOP of one shard's gradient: per layer of n_in x n_out on r rows,
        2 r n_in n_out for the forward product, as much for the weight
        gradient and, past the first layer, for the input gradient."""
        r = self.shard_rows()
        layers = list(zip(self.sizes, self.sizes[1:]))
        return sum(2 * r * a * b * (2 if i == 0 else 3) for i, (a, b) in enumerate(layers))


@dataclass(frozen=True)
class Network:
    nodes: int  # N, one worker each
    bandwidth_bytes_s: float  # B: each node's link, each direction
    latency_s: float  # L: one way, node to node


@dataclass(frozen=True)
class StepBytes:
    params_out: int  # parameters leaving node 0 per step
    grads_in: int  # gradient rows arriving at node 0 per step

    @property
    def total(self) -> int:
        return self.params_out + self.grads_in


def shards_per_worker(shape: JobShape, nodes: int) -> list[int]:
    """How many shards each worker computes (shard s goes to worker s mod W,
    W = min(nodes, shards): a worker without a shard would idle)."""
    workers = min(nodes, shape.shards)
    return [len(range(w, shape.shards, workers)) for w in range(workers)]


def bytes_per_step(shape: JobShape, nodes: int, colocated: bool = True) -> StepBytes:
    """Bytes over the servers' link in one step: worker 0 shares the servers'
    node when `colocated` (with a worker on every node, one always does)."""
    counts = shards_per_worker(shape, nodes)
    vector = shape.parameters * shape.dtype_bytes
    remote = counts[1:] if colocated else counts
    return StepBytes(params_out=len(remote) * vector, grads_in=sum(remote) * vector)


def ring_bytes_per_node(shape: JobShape, nodes: int) -> float:
    """Bytes each node sends (and receives) in a ring all-reduce of the gradient."""
    return 2 * (nodes - 1) / nodes * shape.parameters * shape.dtype_bytes


def compute_s(shape: JobShape, nodes: int, cal: Calibration, contention: float = 1.0) -> float:
    """The slowest worker's compute: its shards, c at a time on c cores.
    `contention` > 1 stretches it when workers share cores (the bench's hosts do)."""
    most = max(shards_per_worker(shape, nodes))
    return math.ceil(most / shape.cpus_per_worker) * shape.shard_flops() / cal.flop_rate * contention


@dataclass(frozen=True)
class StepTime:
    compute_s: float
    transfer_s: float  # parameters out and gradients in, with their fixed costs
    reduce_apply_s: float
    overhead_s: float

    @property
    def total_s(self) -> float:
        return self.compute_s + self.transfer_s + self.reduce_apply_s + self.overhead_s


def parameter_server_step(shape: JobShape, net: Network, cal: Calibration, contention: float = 1.0,
                          colocated: bool = True) -> StepTime:
    """shardprop's step (see the module's docstring); `colocated` as in bytes_per_step."""
    remote = len(shards_per_worker(shape, net.nodes)) - (1 if colocated else 0)
    transfer = 0.0
    if remote > 0:
        moved = bytes_per_step(shape, net.nodes, colocated).total
        transfer = (2 * (cal.per_transfer_s + cal.latency_hops * net.latency_s)
                    + cal.per_node_s * remote + moved / (cal.link_efficiency * net.bandwidth_bytes_s))
    reduce = cal.reduce_s_per_value * (shape.shards + 1) * shape.parameters / shape.servers
    return StepTime(compute_s(shape, net.nodes, cal, contention), transfer, reduce, cal.step_overhead_s)


def ring_step(shape: JobShape, net: Network, cal: Calibration) -> StepTime:
    """The same job with a ring all-reduce in place of the servers."""
    workers = len(shards_per_worker(shape, net.nodes))
    transfer = 0.0
    if workers > 1:
        chunk = shape.parameters * shape.dtype_bytes / workers
        transfer = 2 * (workers - 1) * (cal.per_transfer_s + cal.latency_hops * net.latency_s
                                        + chunk / (cal.link_efficiency * net.bandwidth_bytes_s))
    local = max(shards_per_worker(shape, net.nodes))
    reduce = cal.reduce_s_per_value * (local + 2) * shape.parameters
    return StepTime(compute_s(shape, net.nodes, cal), transfer, reduce, cal.step_overhead_s)


@dataclass(frozen=True)
class Plan:
    step: StepTime
    samples_per_s: float
    efficiency: float  # speed-up over one node, divided by the nodes


def plan(shape: JobShape, net: Network, cal: Calibration = FITTED, ring: bool = False) -> Plan:
    """Predicted step, throughput and strong-scaling efficiency (the job's
    batch split over `net.nodes` nodes, against the same job on one)."""
    model = ring_step if ring else parameter_server_step
    step = model(shape, net, cal)
    one = model(shape, Network(1, net.bandwidth_bytes_s, net.latency_s), cal)
    return Plan(step, shape.batch_size / step.total_s, one.total_s / (step.total_s * net.nodes))
