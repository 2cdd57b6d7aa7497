"""The link emulator (tests/link_emulator.py), checked two ways.

First its relay alone, on socket pairs that carry whole frames as a TAP
does: which frames are lost is exactly what its documented rule (each
frame draws its loss, then its jitter, from the direction's own seeded
generator) gives; no frame arrives before its due time; frames never
overtake; a full queue drops. Then on a real network of two namespace
hosts of our own (tests/netns_cluster.py, without Ray), one joined through
the emulator: the round trip of a UDP echo is at least twice the delay and
not much more, and the share of datagrams lost one way is the loss of that
direction within a binomial bound, each direction its own.
"""

from __future__ import annotations

import json
import math
import random
import socket
import statistics
import subprocess
import sys
import time

import pytest

from tests import link_emulator
from tests.link_emulator import LinkShape, Relay
from tests.netns_cluster import ENV, Naming, NetnsCluster, unavailable_reason


class Wire:
    """A relay between two socket pairs: frames written to `outside` come
    out of `inside` (to_host), and the other way round (from_host)."""

    def __init__(self):
        self.outside, relay_outside = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        relay_inside, self.inside = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.ends = [self.outside, relay_outside, relay_inside, self.inside]
        self.relay = Relay(relay_outside.fileno(), relay_inside.fileno())
        self.inside.setblocking(False)

    def arrivals(self, count: int, within_s: float = 10.0) -> list[tuple[float, bytes]]:
        """Step the relay until `count` frames came out inside, or it has
        taken in nothing more and has nothing left to deliver; each frame
        with the time it came."""
        got, deadline = [], time.monotonic() + within_s
        while len(got) < count and time.monotonic() < deadline:
            taken = self.taken()
            self.relay.step(0.05)
            while True:
                try:
                    got.append((time.monotonic(), self.inside.recv(65536)))
                except BlockingIOError:
                    break
            if self.taken() == taken and not self.relay.queue:
                break
        return got

    def taken(self) -> int:
        counts = self.relay.report()["to_host"]
        return counts["passed"] + counts["dropped"] + counts["overflow"] + len(self.relay.queue)

    def close(self):
        for end in self.ends:
            end.close()


@pytest.fixture
def wire():
    made = Wire()
    yield made
    made.close()


def frame(i: int) -> bytes:
    return i.to_bytes(4, "big") + bytes(60)


def expected_survivors(count: int, seed: int, shape: LinkShape) -> list[int]:
    """The documented rule, derived again: frame i draws loss then jitter."""
    rng = random.Random(f"{seed}:to_host")
    survivors = []
    for i in range(count):
        lost = rng.random() < shape.loss
        rng.uniform(-shape.jitter_ms, shape.jitter_ms)
        if not lost:
            survivors.append(i)
    return survivors


def binomial_bound(n: int, p: float, sigmas: float = 6.0) -> tuple[float, float]:
    spread = sigmas * math.sqrt(n * p * (1 - p))
    return n * p - spread, n * p + spread


def test_the_frames_lost_are_the_seeded_rules_and_the_rest_arrive_in_order(wire):
    shape, count = LinkShape(loss=0.3), 200
    wire.relay.set_shape({"to_host": shape}, seed=7)
    for i in range(count):
        wire.outside.send(frame(i))
    got = [int.from_bytes(f[:4], "big") for _, f in wire.arrivals(count)]
    assert got == expected_survivors(count, 7, shape)
    low, high = binomial_bound(count, 0.3)
    assert low <= count - len(got) <= high
    counts = wire.relay.report()["to_host"]
    assert (counts["passed"], counts["dropped"]) == (len(got), count - len(got))
    assert wire.relay.report()["from_host"]["dropped"] == 0, "the other direction is not shaped"


def test_no_frame_arrives_before_its_delay_and_jitter_and_none_overtakes(wire):
    shape, count = LinkShape(delay_ms=30, jitter_ms=10), 20
    wire.relay.set_shape({"to_host": shape}, seed=1)
    rng = random.Random("1:to_host")  # the due offsets the rule gives, made non-decreasing
    offsets, last = [], 0.0
    for _ in range(count):
        rng.random()
        last = max(last, (shape.delay_ms + rng.uniform(-shape.jitter_ms, shape.jitter_ms)) / 1e3)
        offsets.append(last)
    assert offsets[-1] - offsets[0] > 0.002, "the seed gives the frames different due times"
    sent = []
    for i in range(count):
        sent.append(time.monotonic())
        wire.outside.send(frame(i))
    got = wire.arrivals(count)
    assert [int.from_bytes(f[:4], "big") for _, f in got] == list(range(count))
    for (arrived, _), began, offset in zip(got, sent, offsets):
        assert arrived - began >= offset - 0.001  # (1 ms: our clock reading before the send)


def test_a_full_queue_drops_what_comes_next(wire, monkeypatch):
    monkeypatch.setattr(link_emulator, "LIMIT", 5)
    wire.relay.set_shape({"to_host": LinkShape(delay_ms=50)}, seed=0)
    for i in range(9):
        wire.outside.send(frame(i))
    got = [int.from_bytes(f[:4], "big") for _, f in wire.arrivals(9)]
    assert got == [0, 1, 2, 3, 4]
    assert wire.relay.report()["to_host"]["overflow"] == 4


def test_the_control_socket_sets_shapes_and_refuses_a_bad_one_by_name(tmp_path):
    wire = Wire()
    control = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    control.bind(str(tmp_path / "c.sock"))
    client = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    client.bind("")
    try:
        relay = Relay(wire.ends[1].fileno(), wire.ends[2].fileno(), control)

        def ask(message: dict) -> dict:
            client.sendto(json.dumps(message).encode(), str(tmp_path / "c.sock"))
            relay.step(1.0)
            return json.loads(client.recv(65536))

        set_ = ask({"shape": {"to_host": {"delay_ms": 5}, "from_host": {"loss": 0.25}}, "seed": 3})
        assert set_["ok"] and set_["to_host"]["shape"]["delay_ms"] == 5 and set_["from_host"]["shape"]["loss"] == 0.25
        bad = ask({"shape": {"to_host": {"loss": 1.5}}})
        assert bad == {"ok": False, "error": "loss must be a fraction in [0, 1], got 1.5"}
        assert ask({})["from_host"]["shape"]["loss"] == 0.25, "a refused shape changes nothing"
    finally:
        control.close()
        client.close()
        wire.close()


# ---------------------------------------------------------------- on a real network

LINK_TESTS = Naming("sptest-l", "sptsl", "sptestlbr", "10.251.89")
EMULATED = 1
PROBE = r"""
import json, socket, sys, time
mode = sys.argv[1]
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
if mode in ("echo", "sink"):
    sock.setsockopt(socket.SOL_SOCKET, 33, 1 << 22)  # SO_RCVBUFFORCE: no loss of ours in the socket
    sock.bind(("0.0.0.0", int(sys.argv[2])))
    print("ready", flush=True)
if mode == "echo":
    while True:
        data, peer = sock.recvfrom(2048)
        sock.sendto(data, peer)
elif mode == "sink":  # distinct datagrams seen, until idle for argv[3] s after the first
    seen = set()
    sock.settimeout(30)
    try:
        while True:
            seen.add(sock.recv(2048))
            sock.settimeout(float(sys.argv[3]))
    except socket.timeout:
        print(len(seen))
elif mode == "rtt":  # round trips of one datagram at a time, in ms
    sock.settimeout(5)
    rtts = []
    for i in range(int(sys.argv[4])):
        began = time.perf_counter()
        sock.sendto(str(i).encode(), (sys.argv[2], int(sys.argv[3])))
        while sock.recv(2048) != str(i).encode():
            pass
        rtts.append((time.perf_counter() - began) * 1e3)
    print(json.dumps(rtts))
elif mode == "send":
    for i in range(int(sys.argv[4])):
        sock.sendto(b"%d" % i, (sys.argv[2], int(sys.argv[3])))
        time.sleep(float(sys.argv[5]))
"""

needs_netns = pytest.mark.skipif(unavailable_reason() is not None, reason=f"{unavailable_reason()}")


@pytest.fixture(scope="module")
def two_hosts():
    """Two namespace hosts without Ray, host 1 joined through the emulator."""
    cluster = NetnsCluster([0, 0], LINK_TESTS, emulated=[EMULATED])
    cluster.open_network()
    try:
        yield cluster
    finally:
        cluster.close()
    assert cluster.leftovers() == []


def serve(hosts: NetnsCluster, i: int, *args: str) -> subprocess.Popen:
    proc = subprocess.Popen(hosts.prefix(i) + [sys.executable, "-c", PROBE, *args], stdout=subprocess.PIPE,
                            text=True, env=ENV, start_new_session=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def rtts(hosts: NetnsCluster, count: int) -> list[float]:
    echo = serve(hosts, EMULATED, "echo", "9100")
    try:
        return json.loads(hosts.run(0, PROBE, "rtt", hosts.ip(EMULATED), "9100", str(count)))
    finally:
        echo.kill()
        echo.wait()


def one_way_received(hosts: NetnsCluster, sender: int, receiver: int, count: int) -> int:
    sink = serve(hosts, receiver, "sink", "9101", "2")
    try:
        hosts.run(sender, PROBE, "send", hosts.ip(receiver), "9101", str(count), "0.0005")
        return int(sink.communicate(timeout=60)[0])
    finally:
        sink.kill()
        sink.wait()


@pytest.mark.multihost
@needs_netns
def test_a_round_trip_through_the_emulator_takes_twice_its_delay(two_hosts):
    two_hosts.shape(EMULATED, LinkShape(delay_ms=20))
    try:
        times = rtts(two_hosts, 30)
    finally:
        two_hosts.shape(EMULATED)
    print(f"RTT through 2 x 20 ms: min {min(times):.1f}, median {statistics.median(times):.1f} ms")
    assert min(times) >= 40.0, "no frame is delivered before its delay"
    # generous: the machine is shared, and a round trip is four relay hops in Python
    assert statistics.median(times) <= 40.0 + 25.0


@pytest.mark.multihost
@needs_netns
def test_each_direction_loses_its_own_share(two_hosts):
    rtts(two_hosts, 3)  # unshaped: both hosts know each other's MAC before any loss
    count, to_host, from_host = 2000, 0.05, 0.20
    two_hosts.shape(EMULATED, LinkShape(loss=to_host), LinkShape(loss=from_host), seed=15)
    try:
        received_in = one_way_received(two_hosts, 0, EMULATED, count)
        received_out = one_way_received(two_hosts, EMULATED, 0, count)
        counts = two_hosts.link_counts(EMULATED)
    finally:
        two_hosts.shape(EMULATED)
    print(f"lost to the host {count - received_in}/{count}, from it {count - received_out}/{count}; "
          f"emulator: {counts}")
    low, high = binomial_bound(count, to_host)
    assert low <= count - received_in <= high
    low, high = binomial_bound(count, from_host)
    assert low <= count - received_out <= high


@pytest.mark.multihost
@needs_netns
def test_a_second_cluster_of_the_same_names_refuses_and_leaves_the_first_alone(two_hosts):
    echo = serve(two_hosts, EMULATED, "echo", "9102")  # a process in the first cluster's namespace
    try:
        with pytest.raises(RuntimeError, match="bridge 'sptestlbr' exists"):
            NetnsCluster([0, 0], LINK_TESTS, emulated=[EMULATED]).open_network()
        assert echo.poll() is None, "the first cluster's process lives on"
        times = json.loads(two_hosts.run(0, PROBE, "rtt", two_hosts.ip(EMULATED), "9102", "3"))
        assert len(times) == 3, "and its emulated link still carries frames"
    finally:
        echo.kill()
        echo.wait()
