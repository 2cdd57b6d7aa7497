"""A wire of our own between two TAP devices: delay, jitter and loss, per direction.

This kernel has no netem qdisc, so a namespace host's link can be made slow
and lossy only in userspace: the host is joined to the bridge through two
TAP devices (tests/netns_cluster.py makes them: one inside the host's
namespace with its address, one on the bridge) and this relay copies each
Ethernet frame from one to the other. Per direction, a frame is dropped
with probability `loss` (a seeded generator of its own), or else delivered
`delay_ms` later, plus a uniform jitter in [-jitter_ms, +jitter_ms]; frames
never overtake one another (a due time is at least the one before it), and
at most `LIMIT` frames wait per direction (more are dropped and counted as
overflow), as netem's queue.

    python tests/link_emulator.py OUTSIDE INSIDE_NETNS INSIDE CONTROL

OUTSIDE is the bridge's TAP (in this process's namespace), INSIDE the
host's TAP in namespace INSIDE_NETNS; CONTROL is a UNIX datagram socket
where `control(CONTROL, message)` sets a shape (`{"shape": {"to_host":
{...}, "from_host": {...}}, "seed": n}`) or asks for the counters (`{}`):
the reply is the shape in force and the counters. No library beyond the
standard one.
"""

from __future__ import annotations

import ctypes
import fcntl
import heapq
import json
import os
import random
import selectors
import socket
import struct
import sys
import time
from dataclasses import asdict, dataclass, field

DIRECTIONS = ("to_host", "from_host")  # bridge -> host, host -> bridge
LIMIT = 1000  # frames waiting per direction (netem's default limit)
FRAME_MAX = 65536  # larger than any frame of a 1500-byte MTU
READS_PER_WAKE = 64  # frames read from one side before the other gets its turn

TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI = 0x0002, 0x1000
CLONE_NEWNET = 0x40000000


@dataclass(frozen=True)
class LinkShape:
    """One direction of a link: a frame is lost with probability `loss`,
    or else arrives `delay_ms` (+- up to `jitter_ms`) after it was sent."""

    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss: float = 0.0

    def __post_init__(self):
        if not 0.0 <= self.loss <= 1.0:
            raise ValueError(f"loss must be a fraction in [0, 1], got {self.loss!r}")
        if self.delay_ms < 0 or self.jitter_ms < 0:
            raise ValueError(f"delay_ms and jitter_ms must be >= 0, got {self.delay_ms!r} and {self.jitter_ms!r}")


@dataclass
class Direction:
    """The state of one direction: its shape, generator, last due time and counters."""

    shape: LinkShape
    rng: random.Random
    last_due: float = 0.0
    waiting: int = 0
    counts: dict = field(default_factory=lambda: {"passed": 0, "dropped": 0, "overflow": 0, "undelivered": 0})

    def admit(self, now: float) -> float | None:
        """The due time of a frame sent at `now`, or None if it is lost.
        Each frame draws once for its loss and once for its jitter, so
        which frames are lost depends only on the seed and their order."""
        lost = self.rng.random() < self.shape.loss
        spread = self.rng.uniform(-self.shape.jitter_ms, self.shape.jitter_ms)
        if lost:
            self.counts["dropped"] += 1
            return None
        if self.waiting >= LIMIT:
            self.counts["overflow"] += 1
            return None
        due = max(now + max(0.0, self.shape.delay_ms + spread) / 1e3, self.last_due)
        self.last_due, self.waiting = due, self.waiting + 1
        return due


def direction_rng(seed: int, name: str) -> random.Random:
    """Each direction's own generator (str seeds are hashed deterministically)."""
    return random.Random(f"{seed}:{name}")


class Relay:
    """Frames between two file descriptors that each read and write whole
    frames (TAP devices; SOCK_SEQPACKET sockets in the unit tests)."""

    def __init__(self, outside: int, inside: int, control: socket.socket | None = None):
        self.fds = {"to_host": (outside, inside), "from_host": (inside, outside)}
        self.directions = {}
        self.set_shape({}, seed=0)
        self.queue: list[tuple[float, int, str, bytes]] = []
        self.sequence = 0
        self.control = control
        self.selector = selectors.DefaultSelector()
        for name, (source, _) in self.fds.items():
            os.set_blocking(source, False)
            self.selector.register(source, selectors.EVENT_READ, name)
        if control is not None:
            self.selector.register(control, selectors.EVENT_READ, "control")

    def set_shape(self, shapes: dict[str, LinkShape], seed: int) -> None:
        """New shapes (a direction not named is unshaped) and fresh
        generators; the counters and the frames in flight are kept."""
        for name in DIRECTIONS:
            old = self.directions.get(name)
            new = Direction(shapes.get(name, LinkShape()), direction_rng(seed, name))
            if old is not None:
                new.last_due, new.waiting, new.counts = old.last_due, old.waiting, old.counts
            self.directions[name] = new

    def report(self) -> dict:
        return {name: {"shape": asdict(d.shape), **d.counts} for name, d in self.directions.items()}

    def step(self, timeout: float | None = None) -> None:
        """Wait for a frame (at most until the next one is due, or `timeout`),
        take in what came, and deliver what is due."""
        wait = timeout
        if self.queue:
            until_due = max(0.0, self.queue[0][0] - time.monotonic())
            wait = until_due if wait is None else min(wait, until_due)
        for key, _ in self.selector.select(wait):
            if key.data == "control":
                self._answer()
            else:
                self._take(key.data)
        self._deliver()

    def serve(self) -> None:
        while True:
            self.step()

    def _take(self, name: str) -> None:
        source, _ = self.fds[name]
        direction = self.directions[name]
        for _ in range(READS_PER_WAKE):
            try:
                frame = os.read(source, FRAME_MAX)
            except BlockingIOError:
                return
            if not frame:
                return
            due = direction.admit(time.monotonic())
            if due is not None:
                heapq.heappush(self.queue, (due, self.sequence, name, frame))
                self.sequence += 1

    def _deliver(self) -> None:
        now = time.monotonic()
        while self.queue and self.queue[0][0] <= now:
            _, _, name, frame = heapq.heappop(self.queue)
            direction = self.directions[name]
            direction.waiting -= 1
            try:
                os.write(self.fds[name][1], frame)
                direction.counts["passed"] += 1
            except OSError:  # the far side is down (a cut link) or full: the frame is lost
                direction.counts["undelivered"] += 1

    def _answer(self) -> None:
        message, sender = self.control.recvfrom(65536)
        try:
            asked = json.loads(message)
            if "shape" in asked:
                self.set_shape({name: LinkShape(**shape) for name, shape in asked["shape"].items()},
                               int(asked.get("seed", 0)))
            reply = {"ok": True, **self.report()}
        except (ValueError, TypeError) as err:
            reply = {"ok": False, "error": str(err)}
        if sender:
            self.control.sendto(json.dumps(reply).encode(), sender)


def control(path: str, message: dict, timeout: float = 10.0) -> dict:
    """Send a relay a message on its control socket; its reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("")  # an abstract address of our own, so the relay can answer
        sock.settimeout(timeout)
        sock.sendto(json.dumps(message).encode(), path)
        reply = json.loads(sock.recv(65536))
    if not reply["ok"]:
        raise ValueError(f"the link emulator at {path} refused {message}: {reply['error']}")
    return reply


def open_tap(name: str) -> int:
    """A file descriptor on the existing TAP device `name` (made by `ip tuntap add ... mode tap`)."""
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
    return fd


def setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "setns")


def open_tap_in(netns: str, name: str) -> int:
    """Open a TAP device of namespace `netns` and come back to our own:
    the relay stays out of the host's namespace, so ending the host's
    processes (`ip netns pids`) never ends its wire."""
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    there = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    try:
        setns(there)
        try:
            return open_tap(name)
        finally:
            setns(home)
    finally:
        os.close(there)
        os.close(home)


def main(argv: list[str]) -> int:
    outside, netns, inside, path = argv
    relay_control = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    relay_control.bind(path)
    Relay(open_tap(outside), open_tap_in(netns, inside), relay_control).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
