"""A Ray cluster of network-namespace "hosts" on one machine: a real network to fail.

Each host is a network namespace with its own address in a private subnet,
joined to the others by a veth pair on one bridge, or, for the hosts named
in `emulated`, by a pair of TAP devices with our own link emulator between
them (tests/link_emulator.py: delay, jitter and loss per direction, as netem
would, which this kernel lacks). `ray start --head` runs in host 0 and
`ray start --address` in the others, each with its own CPUs and the fixed
ports of docs/deploy.md; drivers and the service run inside a host
(`prefix(i)` + a command). Faults are made on the host's link: `cut` and
`heal` (the bridge end of its link down or up), `shape` (an emulated
host's delay, jitter and loss), and `rejoin` (its Ray started again, as an
operator would after a partition).

Everything is ours by name (a prefix for namespaces and links, TAP devices
included, one bridge) and by pid (the `ray start` process groups, the link
emulators, and whatever still runs in our namespaces or names our work
folder): `close` ends only that, never `ray stop`, and `leftovers` says
what, if anything, is still there. Tests (tests/test_multihost.py) and the
benchmark (bench/multihost.py) use one instance each, with different names
and subnets, so they never collide. Needs root and `ip` (and /dev/net/tun for an emulated host).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from tests.link_emulator import LinkShape, control

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent

# The fixed Ray ports every host listens on (docs/deploy.md lists them; each
# namespace has its own network stack, so every host uses the same numbers).
GCS_PORT = 6379
RAY_PORTS = ("--node-manager-port=6380", "--object-manager-port=6381", "--runtime-env-agent-port=6382",
             "--dashboard-agent-grpc-port=6383", "--dashboard-agent-listen-port=6384",
             "--metrics-export-port=8080", "--min-worker-port=10002", "--max-worker-port=10101")
HEAD_PORTS = (f"--port={GCS_PORT}", "--ray-client-server-port=10001")

# A cut host is declared dead after about period x threshold (plus the
# timeout of the check under way): seconds, not the defaults' minute.
FAST_FAILURE_DETECTION = {"health_check_initial_delay_ms": 1000, "health_check_period_ms": 1000,
                          "health_check_timeout_ms": 2000, "health_check_failure_threshold": 5}

START_NICENESS = -10  # of a host's session while its Ray starts (see NetnsCluster._await_start)
START_TIMEOUT_S = 90.0
# A link emulator is a wire: it runs at a raised priority, so that the
# machine's load stretches its delays as little as it can.
RELAY_NICENESS = -10
LINK_MTU = 1500  # of every host's link, veth or TAP

ENV = {**os.environ, "RAY_ADDRESS": "", "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT),
       "RAY_USAGE_STATS_ENABLED": "0",
       "RAY_agent_register_timeout_ms": "120000"}  # a loaded machine starts agents slowly


class NetnsUnavailable(RuntimeError):
    """This machine cannot make the cluster (not root, or no `ip`)."""


def unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    if not shutil.which("ip"):
        return "`ip` (iproute2) is not installed"
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@dataclass(frozen=True)
class Naming:
    """Names of one cluster's namespaces, links and subnet (tests and bench differ)."""

    prefix: str  # namespace i is f"{prefix}{i}"
    link: str  # host i's link is f"{link}v{i}" (bridge side) and f"{link}p{i}" (inside); at most 10 chars
    bridge: str
    subnet: str  # the first three octets: host i is f"{subnet}.{i + 1}"


TESTS = Naming("sptest-h", "sptst", "sptestbr", "10.251.88")
BENCH = Naming("spbench-h", "spbch", "spbenchbr", "10.251.77")


class NetnsCluster:
    """`len(cpus)` hosts, host i with `cpus[i]` CPUs; host 0 is Ray's head.
    The hosts in `emulated` are joined through the link emulator, unshaped
    until `shape` says otherwise."""

    def __init__(self, cpus: list[int], naming: Naming = TESTS, system_config: dict | None = None,
                 emulated: Iterable[int] = ()):
        self.cpus, self.naming = list(cpus), naming
        self.emulated = sorted(set(emulated))
        if any(not 0 <= i < len(self.cpus) for i in self.emulated):
            raise ValueError(f"emulated hosts must be among 0..{len(self.cpus) - 1}, got {self.emulated}")
        self.system_config = dict(FAST_FAILURE_DETECTION if system_config is None else system_config)
        self.names = [f"{naming.prefix}{i}" for i in range(len(cpus))]
        self.work = Path("/nonexistent")  # made on entering: a short path, Ray's sockets live under it
        self._made: list[tuple[str, str]] = []  # (kind, name): "netns", or "link" (the bridge, a bridge end)
        self._ray: dict[int, subprocess.Popen] = {}
        self._relays: dict[int, subprocess.Popen] = {}

    # ------------------------------------------------------------ addresses

    def ip(self, i: int) -> str:
        return f"{self.naming.subnet}.{i + 1}"

    @property
    def address(self) -> str:
        return f"{self.ip(0)}:{GCS_PORT}"

    def prefix(self, i: int) -> list[str]:
        """Prefix a command with this to run it on host i."""
        return ["ip", "netns", "exec", self.names[i]]

    def _veth(self, i: int) -> str:
        """Host i's link at the bridge (a veth end, or the emulator's TAP)."""
        return f"{self.naming.link}v{i}"

    def _inside(self, i: int) -> str:
        return f"{self.naming.link}p{i}"

    def _control(self, i: int) -> str:
        return str(self.work / f"link{i}.sock")

    # ------------------------------------------------------------ the network

    def __enter__(self) -> "NetnsCluster":
        self.open_network()
        try:
            self.start_ray(0)
            self.start_ray(*range(1, len(self.cpus)))
            self.wait_nodes(len(self.cpus))
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open_network(self) -> "NetnsCluster":
        """The hosts and their links, without Ray (`__enter__` starts it
        too); `close` undoes it."""
        reason = unavailable_reason()
        if reason:
            raise NetnsUnavailable(reason)
        self.work = Path(tempfile.mkdtemp(prefix="spns-"))
        try:
            self._make_network()
        except BaseException:
            self.close()
            raise
        return self

    def _make_network(self) -> None:
        n = self.naming
        if subprocess.run(["ip", "link", "show", n.bridge], capture_output=True).returncode == 0:
            raise RuntimeError(f"bridge {n.bridge!r} exists: another cluster of names {n.prefix}* runs (or was "
                               f"left behind); this one touches none of it")
        _ip("link", "add", n.bridge, "type", "bridge")
        self._made.append(("link", n.bridge))
        _ip("link", "set", n.bridge, "up")
        for i, ns in enumerate(self.names):
            _ip("netns", "add", ns)
            self._made.append(("netns", ns))
            outside, inside = self._veth(i), self._inside(i)
            if i in self.emulated:
                _ip("tuntap", "add", "dev", outside, "mode", "tap")
                self._made.append(("link", outside))
                _ip("-n", ns, "tuntap", "add", "dev", inside, "mode", "tap")
            else:
                _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
                self._made.append(("link", outside))
                _ip("link", "set", inside, "netns", ns)
            _ip("link", "set", outside, "mtu", str(LINK_MTU), "master", n.bridge, "up")
            _ip("-n", ns, "addr", "add", f"{self.ip(i)}/24", "dev", inside)
            _ip("-n", ns, "link", "set", inside, "mtu", str(LINK_MTU), "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            # A default route on the host's own link lets Ray find the host's
            # address the usual way (the source address towards a public IP);
            # nothing on the bridge forwards, so no packet leaves the subnet.
            _ip("-n", ns, "route", "add", "default", "dev", inside)
            if i in self.emulated:
                self._start_relay(i)

    def _start_relay(self, i: int) -> None:
        """Host i's link emulator, until it answers on its control socket."""
        log = open(self.work / f"link{i}.log", "wb")
        with log:
            self._relays[i] = subprocess.Popen(
                [sys.executable, str(ROOT / "tests" / "link_emulator.py"), self._veth(i), self.names[i],
                 self._inside(i), self._control(i)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        _set_session_niceness(self._relays[i].pid, RELAY_NICENESS)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                control(self._control(i), {}, timeout=1.0)
                return
            except OSError:  # not bound yet (FileNotFoundError), or not answering yet (a timeout)
                if self._relays[i].poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the link emulator of host {i} did not start: "
                                       f"{(self.work / f'link{i}.log').read_text(errors='replace')[-2000:]}")
                time.sleep(0.1)

    def cut(self, i: int) -> None:
        """Host i's link down: no packet in or out (its processes keep running)."""
        _ip("link", "set", self._veth(i), "down")

    def heal(self, i: int) -> None:
        _ip("link", "set", self._veth(i), "up")

    def shape(self, i: int, to_host: LinkShape = LinkShape(), from_host: LinkShape | None = None,
              seed: int = 0) -> dict:
        """Delay, jitter and loss on emulated host i's link, frames to it and
        from it (the same both ways unless `from_host` is given; all zero:
        unshaped); returns the emulator's counters so far."""
        if i not in self._relays:
            raise ValueError(f"host {i} is not emulated (emulated: {self.emulated})")
        shapes = {"to_host": asdict(to_host), "from_host": asdict(to_host if from_host is None else from_host)}
        return control(self._control(i), {"shape": shapes, "seed": seed})

    def link_counts(self, i: int) -> dict:
        """Emulated host i's link: per direction its shape and frames passed,
        dropped (loss), overflowed (queue full) and undelivered (far side down)."""
        return control(self._control(i), {})

    # ------------------------------------------------------------ Ray

    def start_ray(self, *hosts: int, tries: int = 3) -> None:
        """`ray start` on these hosts at once (the head is host 0: start it
        first), until each says it runs. A host whose start fails is tried
        again: on a loaded machine a raylet can give up waiting for its own
        agent to start (a fixed wait in Ray 2.60, "Timed out waiting for
        file .../dashboard_agent_listen_port_...")."""
        logs = {i: self._launch(i) for i in hosts}
        for i, log in logs.items():
            for attempt in range(1, tries + 1):
                try:
                    self._await_start(i, log)
                    break
                except RuntimeError:
                    self.stop_ray(i)
                    if attempt == tries:
                        raise
                    log = self._launch(i)

    def _launch(self, i: int) -> Path:
        args = ["--head", *HEAD_PORTS, "--include-dashboard=false", f"--temp-dir={self.work / 'ray'}",
                f"--system-config={json.dumps(self.system_config)}"] if i == 0 else [f"--address={self.address}"]
        log = self.work / f"host{i}-{time.monotonic_ns()}.log"
        cmd = [str(BIN / "ray"), "start", *args, *RAY_PORTS, f"--num-cpus={self.cpus[i]}",
               f"--node-ip-address={self.ip(i)}", "--include-log-monitor=false", "--disable-usage-stats", "--block"]
        with open(log, "wb") as out:
            self._ray[i] = subprocess.Popen(self.prefix(i) + cmd, stdout=out, stderr=subprocess.STDOUT, env=ENV,
                                            start_new_session=True)
        _set_session_niceness(self._ray[i].pid, START_NICENESS)  # while it starts: see _await_start
        return log

    def _await_start(self, i: int, log: Path) -> None:
        """Until host i's `ray start` says it runs; then it goes back to
        normal priority. A raylet gives up if its agent (a Python process)
        takes over 15 s to start, as it does on a machine loaded many times
        over, so while starting the host's session runs at a higher
        priority. When the raylet has given up, `ray start` waits on for
        ever: hence the deadline."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while "Ray runtime started" not in log.read_text(errors="replace"):
            if self._ray[i].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray start on host {i} failed:\n{log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.3)
        _set_session_niceness(self._ray[i].pid, 0)

    def run(self, i: int, code: str, *args: str, timeout: float = 120) -> str:
        """Run Python `code` on host i; its stdout (raises with its stderr on failure)."""
        done = subprocess.run(self.prefix(i) + [sys.executable, "-c", code, *args], capture_output=True,
                              text=True, env=ENV, cwd=ROOT, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"on host {i}: {done.stderr[-2000:]}")
        return done.stdout

    def nodes(self) -> dict[str, str]:
        """Node IP -> node ID of the live nodes, as the head sees them."""
        code = ("import json,ray,sys\nray.init(address=sys.argv[1],log_to_driver=False)\n"
                "print('nodes:', json.dumps({n['NodeManagerAddress']: n['NodeID'] for n in ray.nodes() if n['Alive']}))")
        return _nodes_line(self.run(0, code, self.address))

    def wait_nodes(self, count: int, timeout: float = 90) -> dict[str, str]:
        """Until `count` nodes are alive (with all their CPUs); returns `nodes()`."""
        code = ("import json,ray,sys,time\nray.init(address=sys.argv[1],log_to_driver=False)\n"
                "end=time.time()+float(sys.argv[3])\n"
                "alive=lambda: {n['NodeManagerAddress']: n['NodeID'] for n in ray.nodes() if n['Alive']}\n"
                "while (len(alive())<int(sys.argv[2]) or ray.cluster_resources().get('CPU',0)<float(sys.argv[4]))"
                " and time.time()<end: time.sleep(0.3)\n"
                "print('nodes:', json.dumps(alive()))")
        cpus = sum(c for i, c in enumerate(self.cpus) if i in self._ray)
        nodes = _nodes_line(self.run(0, code, self.address, str(count), str(timeout), str(cpus),
                                     timeout=timeout + 60))
        if len(nodes) < count:
            raise RuntimeError(f"{len(nodes)} of {count} hosts joined: {nodes}")
        return nodes

    def stop_ray(self, i: int) -> None:
        """End host i's Ray: its `ray start` process group, then anything left in its namespace."""
        proc = self._ray.pop(i, None)
        if proc is not None:
            end_group(proc)
        _end_pids(_netns_pids(self.names[i]))

    def rejoin(self, i: int) -> None:
        """After a cut: heal host i's link, and start its Ray afresh (a node
        the head declared dead does not come back by itself)."""
        self.stop_ray(i)
        self.heal(i)
        self.start_ray(i)
        self.wait_nodes(len(self._ray))

    # ------------------------------------------------------------ teardown

    def close(self) -> None:
        """End every process of ours and remove every namespace and link made."""
        for i in sorted(self._ray, reverse=True):
            self.stop_ray(i)
        for kind, ns in self._made:  # only namespaces we made: another cluster's of the same names is not ours
            if kind == "netns":
                _end_pids(_netns_pids(ns))
        for i in sorted(self._relays):
            end_group(self._relays.pop(i))
        _end_pids(self._stray_pids())
        # Each link by name before its namespace: a namespace's own links go
        # with it, but a veth pair only some time after `ip netns del` returns.
        for kind, name in reversed(self._made):
            if kind == "netns":
                subprocess.run(["ip", "netns", "del", name], capture_output=True)
            else:
                subprocess.run(["ip", "link", "del", name], capture_output=True)
        self._made.clear()
        shutil.rmtree(self.work, ignore_errors=True)

    def _stray_pids(self) -> list[int]:
        """Processes whose command line names our work folder (Ray's session
        dir is under it, and the link emulators' control sockets)."""
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                try:
                    if str(self.work).encode() in (entry / "cmdline").read_bytes() and _running(int(entry.name)):
                        found.append(int(entry.name))
                except OSError:
                    pass
        return found

    def leftovers(self) -> list[str]:
        """What of this cluster still exists: namespaces, links, processes."""
        left = []
        namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        left += [f"namespace {line.split()[0]}" for line in namespaces.splitlines()
                 if line.split() and line.split()[0].startswith(self.naming.prefix)]
        links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
        left += [f"link {line.split(':')[1].strip().split('@')[0]}" for line in links.splitlines()
                 if line.split(":")[1].strip().startswith((self.naming.link, self.naming.bridge))]
        left += [f"process {pid}" for pid in self._stray_pids()]
        return left


def _set_session_niceness(pid: int, nice: int) -> None:
    """The niceness of the scheduling group of `pid`'s session (with Linux's
    autogroups a session competes as one group, whatever its processes'
    own niceness); nothing where autogroups are off."""
    try:
        Path(f"/proc/{pid}/autogroup").write_text(str(nice))
    except OSError:
        pass


def _nodes_line(stdout: str) -> dict[str, str]:
    """The `nodes: {...}` line of a probe's output (Ray prints its own
    warnings to a driver's stdout too, a node's death for one)."""
    return json.loads(next(line for line in reversed(stdout.splitlines()) if line.startswith("nodes: "))[7:])


def _netns_pids(name: str) -> list[int]:
    done = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True)
    return [int(p) for p in done.stdout.split()] if done.returncode == 0 else []


def end_group(proc: subprocess.Popen) -> None:
    """End a process started in a session of its own, and its whole group."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def _end_pids(pids: list[int], grace_s: float = 10.0) -> None:
    """SIGTERM these pids, then SIGKILL whichever still runs after `grace_s`."""
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while any(_running(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in pids:
        _signal(pid, signal.SIGKILL)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
