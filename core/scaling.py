"""A step-time model of a synchronous job, for planning and for docs/scaling.md.

One step of shardprop's parameter-server design across nodes, as the code
does it (workers/step_graph.py, the direct graph; workers/transport.py):
the driver submits every call of a step the moment its plan is made, each
depending on nothing, and the actors wait for each other over their own TCP
array services, which carry the arrays. The critical path of a step:

1. the servers' commit of the step before offers the new parameters; each
   worker's pull of them was sent ahead and waits at the server's service,
   so they leave at once: 1 one-way latency to a worker off the servers'
   node, and P b bytes through the servers' link to each such worker;
2. the worker computes and offers its shard rows and a summary of its
   result; the server's pull of them (summary and its slice of every row,
   one request batch) waits at the worker's service, so they leave at
   once: 1 latency, and the rows of the shards computed off the servers'
   node through their link;
3. reduce in shard order, apply, and offer the next parameters.

So h = 2 one-way latencies a step, whatever N (the workers pull and are
pulled from at once), whichever node the driver is on; plus 2 when k > 1
servers are off the driver's node (their finite flags go from `reduce` to
the driver and on to `commit` as object refs). `latency_hops` counts them
from a `Placement`. Between actors on the driver's node the arrays go
through shared files; every other pair's over TCP (through the node's own
stack, no link, when they share a node elsewhere).

    T = c0 + c_w W + compute + rho (S + 1) P / k
          + [spans nodes] (h L + 2 alpha + bytes max(1 / (eta B), mu))

    bytes = (workers off the servers' node) P b + (their shards) P b

- W workers of ceil(S / W) or fewer shards; c_w each: its task's push, its
  reply, the driver's handling of it;
- alpha per pull phase (two a step: the workers' pulls of the parameters,
  the servers' pulls of the rows): the requests of a phase are all sent
  before any answer is read, so the phase pays one request's fixed cost
  (the service thread's wake-up, the headers), not one per request;
- bytes through the servers' link: a transfer streams through the link
  (rate B, efficiency eta) and through software (copies into and out of the
  kernel, the receiving thread; on the bench also the link emulator's
  relays) at once, so the slower sets the pace: 1 / (eta B) per byte, or mu
  per byte when the software is slower than the link;
- rho per parameter and pass of the reduce and apply.

On one node the arrays go through shared files (workers.shared) and only
c0 + c_w W + compute + rho ... is left.

`SHARDPROP_DATA_PORTS=off` (or an array service that cannot start) sends the
arrays through Ray's object store instead; its model, fitted on the old
transport, is `object_store_step` with `OBJECT_STORE`, kept for that case.

A ring all-reduce under the same assumptions (same per-transfer cost, link,
per-byte cost and memory rate; the gradients pre-summed on each node, every
node applying the optimizer to the whole vector) moves 2 (N - 1) / N P b
bytes per node in 2 (N - 1) transfers, each a pull (2 latencies) like ours:

    T_ring = c0 + c_w W + compute
             + [N > 1] 2 (N - 1) (alpha + 2 L + P b / N max(1 / (eta B), mu)) + rho (s_w + 2) P

The constants are fitted on namespace hosts by bench/scaling.py and recorded
in docs/scaling.md; `FITTED` holds them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Calibration:
    """The model's constants (seconds, FLOP/s, fractions), TCP array transport."""

    flop_rate: float  # F: FLOP/s of one shard's gradient on one core
    step_overhead_s: float  # c0: per step, whatever the nodes (the servers' calls, the coordinator)
    per_worker_s: float  # c_w: per worker and step (its task, its reply, the driver's handling)
    per_transfer_s: float  # alpha: fixed software cost of one pull phase (its requests pipelined)
    link_efficiency: float  # eta: the fraction of the link rate a TCP transfer achieves
    per_byte_s: float  # mu: per byte of the slowest software stage of a transfer (the pace when the link is faster)
    reduce_s_per_value: float  # rho: the servers' reduce and apply, per parameter per pass


@dataclass(frozen=True)
class ObjectStoreCalibration:
    """The object-store transport's own constants (compute and rho as in
    Calibration): each cross-node array a Ray object, moved by a location
    lookup, a pull and a push."""

    step_overhead_s: float  # c0
    per_node_s: float  # c_n: per step and remote node
    per_transfer_s: float  # alpha: one object transfer
    latency_hops: float  # h: one-way latencies per object transfer
    link_efficiency: float  # eta


# docs/scaling.md says where each comes from. bench/scaling.py on 1-4
# namespace hosts of this 2-core machine with the direct step graph
# (2026-12-06 22:05-22:17 UTC, load average 1-6.5, the bench's own hosts):
# c0, c_w, alpha and eta fitted on the 1-, 2- and 4-host points (c_w fitted
# 0: not seen at 1-4 workers; eta fitted 1.08, above the wire's 1, taken as
# 1), F and rho from its 1-host points (this machine computed ~35% slower
# that day than on 2026-12-03). mu from bench/transport_rate.py (the
# transport on loopback, no relay): the bench's own fit of mu (11.8 ns/B)
# is the link emulator's relays, not shardprop's.
FITTED = Calibration(flop_rate=50.5e9, step_overhead_s=3.01e-3, per_worker_s=0.0, per_transfer_s=0.26e-3,
                     link_efficiency=1.0, per_byte_s=0.31e-9, reduce_s_per_value=7.9e-9)

# The object-store transport (SHARDPROP_DATA_PORTS=off): fitted by
# bench/scaling.py on 2 namespace hosts under a load average of ~35
# (2026-12-03 07:31 UTC, docs/scaling.md); c_n not identifiable there (0);
# h read from Ray's protocol.
OBJECT_STORE = ObjectStoreCalibration(step_overhead_s=18.9e-3, per_node_s=0.0, per_transfer_s=17.3e-3,
                                      latency_hops=4.0, link_efficiency=0.79)


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
class Placement:
    """Where Ray put the servers (all k on one node; they reserve no CPU,
    so Ray chooses) relative to the driver and the workers."""

    servers_with_driver: bool = True  # the servers' node is the driver's
    worker_with_servers: bool = True  # a worker shares the servers' node
    worker_with_driver: bool = True  # a worker shares the driver's node (matters when the servers are apart)


@dataclass(frozen=True)
class StepBytes:
    params_out: int  # parameters leaving the servers' node per step
    grads_in: int  # gradient rows arriving at it per step

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


def worker_nodes(workers: int, placement: Placement) -> list[tuple[bool, bool]]:
    """For each worker: (on the servers' node, on the driver's node)."""
    if placement.servers_with_driver:
        beside = [(True, True)] if placement.worker_with_servers else []
    else:
        beside = ([(True, False)] if placement.worker_with_servers else []) + \
                 ([(False, True)] if placement.worker_with_driver else [])
    return (beside + [(False, False)] * workers)[:workers]


def spans_nodes(workers: int, placement: Placement) -> bool:
    """Whether the job's actors and driver span nodes (then its arrays go over TCP)."""
    return not placement.servers_with_driver or any(w != (True, True) for w in worker_nodes(workers, placement))


def latency_hops(workers: int, placement: Placement, servers: int = 1) -> int:
    """One-way latencies on a step's critical path (the module's docstring):
    the parameters to a worker off the servers' node and its rows back,
    whose requests were sent ahead and waited; and, for k > 1 servers off
    the driver's node, their finite flags through the driver. A hop between
    actors on one node costs no latency."""
    if not spans_nodes(workers, placement):
        return 0
    apart = any(not on_servers for on_servers, _ in worker_nodes(workers, placement))
    return 2 * apart + (2 if servers > 1 and not placement.servers_with_driver else 0)


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
    transfer_s: float  # parameters out and gradients in: latencies, per-transfer and per-byte costs
    reduce_apply_s: float
    overhead_s: float  # c0 and the per-worker calls

    @property
    def total_s(self) -> float:
        return self.compute_s + self.transfer_s + self.reduce_apply_s + self.overhead_s


def seconds_per_byte(net: Network, cal: Calibration) -> float:
    """A transfer's pace: the link's or the software's, whichever is slower."""
    return max(1.0 / (cal.link_efficiency * net.bandwidth_bytes_s), cal.per_byte_s)


def transfer_s(shape: JobShape, net: Network, cal: Calibration, placement: Placement = Placement()) -> float:
    """The TCP transport's part of a step: h L + 2 alpha + bytes max(1 / (eta B), mu)."""
    workers = len(shards_per_worker(shape, net.nodes))
    if not spans_nodes(workers, placement):
        return 0.0
    moved = bytes_per_step(shape, net.nodes, placement.worker_with_servers).total
    return (latency_hops(workers, placement, shape.servers) * net.latency_s
            + 2 * cal.per_transfer_s
            + moved * seconds_per_byte(net, cal))


def parameter_server_step(shape: JobShape, net: Network, cal: Calibration, contention: float = 1.0,
                          placement: Placement = Placement()) -> StepTime:
    """shardprop's step over the TCP array transport (the module's docstring)."""
    workers = len(shards_per_worker(shape, net.nodes))
    reduce = cal.reduce_s_per_value * (shape.shards + 1) * shape.parameters / shape.servers
    return StepTime(compute_s(shape, net.nodes, cal, contention), transfer_s(shape, net, cal, placement), reduce,
                    cal.step_overhead_s + cal.per_worker_s * workers)


def object_store_step(shape: JobShape, net: Network, cal: Calibration, store: ObjectStoreCalibration = OBJECT_STORE,
                      contention: float = 1.0, colocated: bool = True) -> StepTime:
    """The step with the arrays through Ray's object store
    (SHARDPROP_DATA_PORTS=off): two transfer phases, each alpha + h L, a
    cost per remote node, the same bytes over the servers' link."""
    remote = len(shards_per_worker(shape, net.nodes)) - (1 if colocated else 0)
    transfer = 0.0
    if remote > 0:
        moved = bytes_per_step(shape, net.nodes, colocated).total
        transfer = (2 * (store.per_transfer_s + store.latency_hops * net.latency_s)
                    + store.per_node_s * remote + moved / (store.link_efficiency * net.bandwidth_bytes_s))
    reduce = cal.reduce_s_per_value * (shape.shards + 1) * shape.parameters / shape.servers
    return StepTime(compute_s(shape, net.nodes, cal, contention), transfer, reduce, store.step_overhead_s)


def ring_step(shape: JobShape, net: Network, cal: Calibration, latencies_per_transfer: int = 2) -> StepTime:
    """The same job with a ring all-reduce in place of the servers, its
    transfers pulls like ours (2 latencies each; a collective library
    pushes: 1)."""
    workers = len(shards_per_worker(shape, net.nodes))
    transfer = 0.0
    if workers > 1:
        chunk = shape.parameters * shape.dtype_bytes / workers
        transfer = 2 * (workers - 1) * (cal.per_transfer_s + latencies_per_transfer * net.latency_s
                                        + chunk * seconds_per_byte(net, cal))
    local = max(shards_per_worker(shape, net.nodes))
    reduce = cal.reduce_s_per_value * (local + 2) * shape.parameters
    return StepTime(compute_s(shape, net.nodes, cal), transfer, reduce,
                    cal.step_overhead_s + cal.per_worker_s * workers)


@dataclass(frozen=True)
class Plan:
    step: StepTime
    samples_per_s: float
    efficiency: float  # speed-up over one node, divided by the nodes


def plan(shape: JobShape, net: Network, cal: Calibration = FITTED, ring: bool = False,
         object_store: bool = False) -> Plan:
    """Predicted step, throughput and strong-scaling efficiency (the job's
    batch split over `net.nodes` nodes, against the same job on one)."""
    def model(n: Network) -> StepTime:
        if ring:
            return ring_step(shape, n, cal)
        return object_store_step(shape, n, cal) if object_store else parameter_server_step(shape, n, cal)

    step = model(net)
    one = model(Network(1, net.bandwidth_bytes_s, net.latency_s))
    return Plan(step, shape.batch_size / step.total_s, one.total_s / (step.total_s * net.nodes))
