"""Parameters and gradients between actors on different machines, over TCP.

On one node the arrays go through shared files (workers.shared). Across
nodes Ray's object store would move them, and measured across two
network-namespace hosts that cost ~42 ms a step for 1 MB of parameters
(docs/benchmarks.md). So each actor of a job that spans nodes serves its
own arrays from a small service of its own, and only handles go through Ray
(small enough for Ray to inline them in the task's message):

- a parameter server offers its slice of the parameters for the step it
  holds, and each worker pulls the bytes straight into its parameter vector;
- a worker offers its shard gradients for the step it computed, with a
  summary of its result, and each server pulls only its slice of every row.

On the direct step graph (workers.step_graph) nobody sends these handles:
the driver names them before they exist (`wait`), and a pull of a step
still to come waits for its offer, answered WAITING every HEARTBEAT_S
meanwhile. An owner whose step failed `abort`s its service, refusing its
waiting readers at once; `open` (each new graph) sets the token and serves
nothing offered before.

The service is a daemon thread, started on first use, listening on the
node's IP on a port of `SHARDPROP_DATA_PORTS` (`lo-hi`; unset: an
ephemeral port), one thread per connection; a reader keeps one connection
per peer. A request names the job's random token, the serving instance,
the array, its step and a range of items, all fixed-size binary fields
(nothing is unpickled). The service refuses a wrong token or instance, an
array it does not hold, and a step other than the one it holds, so a stale
read fails loudly (`Refused`) and never returns other bits; and an array
withdrawn while it was being sent (a server applying the next step to its
parameters in place) is marked torn by a trailing byte, and refused by the
reader. A connection that fails is `PeerLost`: the step's recovery treats
it as the peer's death (workers.sync_loop). A stranger is hung up on: a
connection's first request must arrive whole, with the token, within
FIRST_REQUEST_S, and a service holds at most MAX_CONNECTIONS; keepalive and
TCP_USER_TIMEOUT end a connection left half-open by a cut link after about
DEAD_PEER_S. When a job's graph cannot have the transport, `open_transport`
says why (`Unavailable`) and its arrays go through Ray.

Only bytes move: the reader gets exactly the bits the owner offered.
"""

from __future__ import annotations

import hmac
import os
import socket
import struct
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

PORTS_ENV = "SHARDPROP_DATA_PORTS"
TIMEOUT_S = 30.0  # a peer that answers nothing for this long is lost (as workers.runtime.ALIVE_TIMEOUT_S)
REACH_TIMEOUT_S = 5.0  # a round trip to a peer when checking the transport before a step graph
DEAD_PEER_S = TIMEOUT_S  # a peer gone without a word (a cut link) is found dead after about this, idle or not
FIRST_REQUEST_S = 5.0  # a new connection's first request must arrive whole within this
MAX_CONNECTIONS = 1024  # per service (a job needs one per peer actor); past it new ones are hung up on
MAX_KEY = 256
# Requests go to a peer in batches, at most two batches unanswered: few
# enough (~2 kB) for any receive buffer, so a peer blocked sending answers
# that this side does not read yet never leaves this side blocked sending
# requests (thousands sent at once did, with small buffers).
BATCH = 16

HEARTBEAT_S = 1.0  # a request waiting for its step is answered "still waiting" this often

MAGIC = b"SPA2"
# magic, token, service instance, step, start item, stop item, key length, flags
REQUEST = struct.Struct("!4s16s16sqQQHB")
WAIT = 1  # flag: a step not offered yet is waited for, not refused
# status, bytes that follow (the payload, the refusal's message, or none while waiting)
RESPONSE = struct.Struct("!BQ")
OK, REFUSED, WAITING, ABORTED = 0, 1, 2, 3
WRONG_TOKEN = "wrong token"
_WAITING = object()  # a waiting request's step has not come yet
_CLOSED = object()  # the service closed: its connections end unanswered, as a peer's death would


class _Abort(str):
    """A refusal because the owner's part of the step failed (ABORTED)."""
INTACT, TORN = b"\x00", b"\x01"


class TransportError(RuntimeError):
    """The array transport failed."""


class PeerLost(TransportError):
    """A peer's array service could not be reached or stopped answering:
    treated as the peer's death."""


class Unavailable(TransportError):
    """The transport cannot be had for a job's graph (turned off, no free
    port, a peer unreachable): its arrays go through Ray's object store."""


class Refused(TransportError):
    """A peer's array service refused a request (wrong token, instance, step
    or array, or the array changed while sent): a stale read, never served."""


class Aborted(TransportError):
    """A peer's part of the step asked for failed (its service was
    aborted): the step will not come from it. Its own error says why; the
    reader fails in turn, a loss to recover from like PeerLost."""


@dataclass(frozen=True)
class NetArray:
    """A handle to array `key` of step `step` (`length` items of `dtype`),
    served at host:port by service instance `service` to holders of `token`.
    With `wait`, a pull of a step the owner has not offered yet waits for
    it (the direct step graph's readers name steps before they exist);
    without, it is refused."""

    host: str
    port: int
    service: str
    key: str
    step: int
    dtype: str
    length: int
    token: str
    wait: bool = False


def data_ports(value: str | None) -> range:
    """The ports a service may listen on, from `SHARDPROP_DATA_PORTS`
    (`lo-hi`, or one port); unset or empty: an ephemeral port (0); `off`:
    none (the arrays go through Ray's object store)."""
    if not value or not value.strip():
        return range(0, 1)
    if value.strip() == "off":
        return range(0)
    lo, sep, hi = value.strip().partition("-")
    try:
        first, last = int(lo), int(hi if sep else lo)
    except ValueError:
        first = last = -1
    if not 1 <= first <= last <= 65535:
        raise ValueError(f"{PORTS_ENV}={value!r}: expected a port range lo-hi within 1-65535 "
                         "(e.g. 10200-10299), or off")
    return range(first, last + 1)


def _recv_exact(sock: socket.socket, size: int) -> bytes | None:
    """`size` bytes, or None at a clean end of stream before the first."""
    buf = bytearray(size)
    view, got = memoryview(buf), 0
    while got < size:
        n = sock.recv_into(view[got:])
        if n == 0:
            if got == 0:
                return None
            raise ConnectionError(f"connection closed after {got} of {size} bytes")
        got += n
    return bytes(buf)


def _recv_into(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionError(f"connection closed after {got} of {len(view)} bytes")
        got += n


def _tune(sock: socket.socket) -> None:
    """No Nagle delay for the small requests and answers; and a connection
    whose peer went without a word (a cut link, its host down) ends after
    about DEAD_PEER_S: keepalive probes while it is idle, a limit on data
    left unacknowledged while it sends (TCP_USER_TIMEOUT, Linux)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    probe_s = max(1, int(DEAD_PEER_S / 3))
    for option, value in (("TCP_KEEPIDLE", probe_s), ("TCP_KEEPINTVL", probe_s), ("TCP_KEEPCNT", 3),
                          ("TCP_USER_TIMEOUT", int(DEAD_PEER_S * 1000))):
        if hasattr(socket, option):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


class ArrayService:
    """Serves the arrays its owner offers for one step at a time."""

    def __init__(self, host: str, ports: range | None = None, token: str = ""):
        self.host, self.token = host, token
        self.instance = uuid.uuid4().hex
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # notified whenever what is served changes
        self._step: int | None = None
        self._arrays: dict[str, np.ndarray] = {}
        self._generation = 0  # bumped whenever the offered arrays change
        self._last_step: int | None = None  # the newest step offered, even once withdrawn
        self._aborted: tuple[int, str] | None = None  # (step, why) the owner's part failed: refused until `open`
        self._sock = self._bind(host, ports if ports is not None else data_ports(os.environ.get(PORTS_ENV)))
        self.port = self._sock.getsockname()[1]
        self.closed = False
        self._conns: set[socket.socket] = set()
        self._accepting = threading.Thread(target=self._accept, name="shardprop-arrays", daemon=True)
        self._accepting.start()

    @staticmethod
    def _bind(host: str, ports: range) -> socket.socket:
        if not ports:
            raise OSError(f"{PORTS_ENV}=off: no array service")
        last: OSError | None = None
        for port in ports:
            sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
                sock.listen(64)
                return sock
            except OSError as err:
                sock.close()
                last = err
        raise OSError(f"no port of {ports.start}-{ports.stop - 1} free on {host} for the array service "
                      f"({PORTS_ENV}): {last}")

    def offer(self, step: int, arrays: dict[str, np.ndarray]) -> dict[str, NetArray]:
        """Serve `arrays` (1-D, contiguous; not copied: the owner leaves them
        unchanged until `withdraw` or the next offer) as those of `step`,
        instead of any offered before. Returns a handle to each."""
        with self._lock:
            self._generation += 1
            self._step, self._arrays = step, {k: np.ascontiguousarray(a).reshape(-1) for k, a in arrays.items()}
            self._last_step = step
            self._changed.notify_all()
            return {k: NetArray(self.host, self.port, self.instance, k, step, a.dtype.str, a.size, self.token)
                    for k, a in self._arrays.items()}

    def withdraw(self) -> None:
        """Serve nothing until the next offer (before the owner changes an
        offered array in place: a send under way is then marked torn)."""
        with self._lock:
            self._generation += 1
            self._step, self._arrays = None, {}
            self._changed.notify_all()

    def open(self, token: str) -> None:
        """Serve holders of `token` (a new step graph's) from now on, and
        nothing offered before; forget an abort. Requests with another token
        are refused, waiting ones included."""
        with self._lock:
            self.token, self._aborted = token, None
            self._generation += 1
            self._step, self._arrays, self._last_step = None, {}, None
            self._changed.notify_all()

    def abort(self, step: int, reason: str) -> None:
        """The owner's part of `step` failed: refuse every request for that
        step or a later one, those waiting first, until the next `open` (a
        waiting reader learns at once that its step will not come, and fails
        in turn); what was offered for an earlier step is still served."""
        with self._lock:
            if self._aborted is None or step < self._aborted[0]:
                self._aborted = (step, reason)
            self._changed.notify_all()

    def aborted(self) -> str | None:
        """Why the owner's part of a step failed since the last `open`, if it did."""
        with self._lock:
            return None if self._aborted is None else self._aborted[1]

    def close(self) -> None:
        """Stop listening and cut every connection."""
        self.closed = True
        try:
            # Wakes the accept thread (on Linux a close alone leaves it
            # waiting, and the port listening, until one more connection).
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        with self._lock:
            conns, self._conns = self._conns, set()
            self._changed.notify_all()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _accept(self) -> None:
        while not self.closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                if self.closed:
                    return
                time.sleep(0.1)  # out of descriptors, say: the service goes on once some are free
                continue
            self._start_serving(conn)

    def _start_serving(self, conn: socket.socket) -> None:
        """A thread for `conn`, or a hang-up past MAX_CONNECTIONS or once closed."""
        with self._lock:
            admitted = not self.closed and len(self._conns) < MAX_CONNECTIONS
            if admitted:
                self._conns.add(conn)
        try:
            if admitted:
                threading.Thread(target=self._serve, args=(conn,), name="shardprop-arrays-peer", daemon=True).start()
                return
        except RuntimeError:  # no thread to be had
            with self._lock:
                self._conns.discard(conn)
        conn.close()

    def _refusal(self, token: bytes, instance: bytes, step: int, key: str, start: int, stop: int,
                 wait: bool = False):
        """(reason, None, 0) or (None, the bytes to send, their generation);
        for a waiting request whose step has not come within HEARTBEAT_S,
        (_WAITING, None, 0)."""
        with self._lock:
            deadline = time.monotonic() + HEARTBEAT_S
            while True:
                found = self._lookup(token, instance, step, key, start, stop, wait)
                left = deadline - time.monotonic()
                if found[0] is not _WAITING or left <= 0:
                    return found
                self._changed.wait(left)

    def _lookup(self, token: bytes, instance: bytes, step: int, key: str, start: int, stop: int, wait: bool):
        """_refusal's answer from what is held now (the lock held)."""
        if not self.token or not hmac.compare_digest(token, bytes.fromhex(self.token)):
            return WRONG_TOKEN, None, 0
        if instance != bytes.fromhex(self.instance):
            return f"not service {instance.hex()[:8]} (this is {self.instance[:8]}): the peer was replaced", None, 0
        if key == "":  # a ping (reach)
            return None, b"", self._generation
        if self.closed:
            return _CLOSED, None, 0
        if self._aborted is not None and step >= self._aborted[0]:
            return _Abort(self._aborted[1]), None, 0
        array = self._arrays.get(key)
        if wait and step != self._step and (self._last_step is None or step > self._last_step):
            return _WAITING, None, 0  # a step still to come
        if array is None or step != self._step:
            held = "nothing" if self._step is None else f"step {self._step + 1}"
            return f"{key!r} of step {step + 1} asked for, {held} held", None, 0
        if not start <= stop <= array.size:
            return f"{key!r}: items [{start}, {stop}) asked for, it has {array.size}", None, 0
        return None, memoryview(array[start:stop]).cast("B"), self._generation

    def _serve(self, conn: socket.socket) -> None:
        """Answer `conn`'s requests in order until it closes. Its first
        request must arrive whole within FIRST_REQUEST_S and carry the
        token, so a stranger holds a connection (and its thread) only that
        long; a peer's connection may then stay idle between steps, and
        an answer take as long as the peer takes to read it (a dead peer
        is found by _tune's keepalive and TCP_USER_TIMEOUT)."""
        try:
            with conn:
                _tune(conn)
                conn.settimeout(FIRST_REQUEST_S)
                while self._answer_one(conn):
                    pass
        except OSError:
            pass
        finally:
            with self._lock:
                self._conns.discard(conn)

    def _answer_one(self, conn: socket.socket) -> bool:
        """Read one request and answer it; False to hang up (the stream
        ended, another protocol, or a wrong token: answered, then cut)."""
        head = _recv_exact(conn, REQUEST.size)
        if head is None:
            return False
        magic, token, instance, step, start, stop, key_len, flags = REQUEST.unpack(head)
        if magic != MAGIC or key_len > MAX_KEY:
            return False
        key = _recv_exact(conn, key_len) if key_len else b""
        if key is None:
            return False
        while True:
            reason, payload, generation = self._refusal(token, instance, step, key.decode("utf-8", "replace"),
                                                        start, stop, bool(flags & WAIT))
            if reason is _CLOSED:
                return False
            if reason is not _WAITING:
                break
            conn.settimeout(None)  # the token was right: a peer's
            conn.sendall(RESPONSE.pack(WAITING, 0))  # alive, still waiting (a reader gone ends it here)
        if reason != WRONG_TOKEN:
            conn.settimeout(None)  # a peer's: no deadline from now on
        if reason is not None:
            message = reason.encode()
            conn.sendall(RESPONSE.pack(ABORTED if isinstance(reason, _Abort) else REFUSED, len(message)) + message)
            return reason != WRONG_TOKEN
        conn.sendall(RESPONSE.pack(OK, len(payload)))
        conn.sendall(payload)
        # Everything sent was copied to the kernel before this check:
        # unchanged generation, unchanged bits.
        with self._lock:
            intact = generation == self._generation
        conn.sendall(INTACT if intact else TORN)
        return True


class ArrayClient:
    """Pulls arrays from peers' services, over one connection per peer."""

    def __init__(self, timeout_s: float = TIMEOUT_S):
        self.timeout_s = timeout_s
        self._conns: dict[tuple[str, int, str], socket.socket] = {}

    def _conn(self, h: NetArray, timeout_s: float) -> socket.socket:
        """The connection to `h`'s service (made on first use), each of its
        operations bounded by `timeout_s` for the pull under way."""
        key = (h.host, h.port, h.service)
        conn = self._conns.get(key)
        if conn is None:
            conn = socket.create_connection((h.host, h.port), timeout=timeout_s)
            _tune(conn)
            self._conns[key] = conn
        conn.settimeout(timeout_s)
        return conn

    def _drop(self, keys) -> None:
        for key in list(keys):
            conn = self._conns.pop(key, None)
            if conn is not None:
                conn.close()

    def pull(self, parts: list[tuple[NetArray, np.ndarray, int]], timeout_s: float | None = None) -> None:
        """Fill each `out` with items [start, start + out.size) of its
        handle's array. Each peer gets its first two batches of requests
        before any answer is read, so the peers send at once, then a batch
        more per batch answered. Raises PeerLost when a peer cannot be reached or
        leaves a socket operation waiting `timeout_s` (default: the
        client's), Refused when one refuses."""
        for h, out, start in parts:
            if out.dtype.str != h.dtype or not out.flags.c_contiguous or start + out.size > h.length:
                raise ValueError(f"{h.key}: {out.size} items of {out.dtype.str} from item {start} "
                                 f"do not fit {h.length} of {h.dtype}")
        by_peer: dict[tuple[str, int, str], list[tuple[NetArray, np.ndarray, int]]] = {}
        for part in parts:
            by_peer.setdefault((part[0].host, part[0].port, part[0].service), []).append(part)
        try:
            conns = {key: self._conn(asked[0][0], timeout_s or self.timeout_s) for key, asked in by_peer.items()}
            for key, asked in by_peer.items():
                conns[key].sendall(self._requests(asked, 0, 2))
            for key, asked in by_peer.items():
                for i, (h, out, _) in enumerate(asked):
                    if i and i % BATCH == 0:  # a batch answered: the one after next goes
                        conns[key].sendall(self._requests(asked, i // BATCH + 1))
                    self._answer(conns[key], h, memoryview(out.reshape(-1)).cast("B"))
        except Refused:
            self._drop(by_peer)  # answers may be left unread on them
            raise
        except OSError as err:  # ConnectionError and socket.timeout among them
            self._drop(by_peer)
            peers = ", ".join(sorted(f"{host}:{port}" for host, port, _ in by_peer))
            raise PeerLost(f"the array service of a peer ({peers}) is unreachable: "
                           f"{type(err).__name__}: {err}") from None

    def forget_except(self, peers: list[NetArray]) -> None:
        """Close the connections to every service but those of `peers` (a
        replaced peer's would stay open for the life of the actor)."""
        self._drop(set(self._conns) - {(h.host, h.port, h.service) for h in peers})

    def reach(self, peers: list[NetArray], timeout_s: float = REACH_TIMEOUT_S) -> None:
        """A round trip to each peer's service at once (a ping, key ""), or
        PeerLost/Refused."""
        self.pull([(NetArray(h.host, h.port, h.service, "", 0, "|u1", 0, h.token), np.empty(0, np.uint8), 0)
                   for h in peers], timeout_s)

    @classmethod
    def _requests(cls, parts: list[tuple[NetArray, np.ndarray, int]], batch: int, batches: int = 1) -> bytes:
        """The requests of `batches` batches of `parts` from batch `batch` on."""
        return b"".join(cls._request(*part) for part in parts[batch * BATCH:(batch + batches) * BATCH])

    @staticmethod
    def _request(h: NetArray, out: np.ndarray, start: int) -> bytes:
        key = h.key.encode()
        return REQUEST.pack(MAGIC, bytes.fromhex(h.token), bytes.fromhex(h.service), h.step, start,
                            start + out.size, len(key), WAIT if h.wait else 0) + key

    @staticmethod
    def _answer(conn: socket.socket, h: NetArray, into: memoryview) -> None:
        while True:  # a waiting request is answered WAITING every HEARTBEAT_S until its step comes
            head = _recv_exact(conn, RESPONSE.size)
            if head is None:
                raise ConnectionError("connection closed by the peer")
            status, size = RESPONSE.unpack(head)
            if status != WAITING:
                break
        if status != OK:
            message = (_recv_exact(conn, size) or b"").decode("utf-8", "replace") if size <= 4096 else "?"
            if status == ABORTED:
                raise Aborted(f"the array service at {h.host}:{h.port} cannot give {h.key!r} of step {h.step + 1}: "
                              f"{message}")
            raise Refused(f"the array service at {h.host}:{h.port} refused {h.key!r} of step {h.step + 1}: {message}")
        if size != len(into):
            raise Refused(f"the array service at {h.host}:{h.port} sent {size} bytes of {h.key!r}, "
                          f"{len(into)} were asked for")
        _recv_into(conn, into)
        if _recv_exact(conn, 1) != INTACT:
            raise Refused(f"the array service at {h.host}:{h.port}: {h.key!r} of step {h.step + 1} "
                          "changed while it was sent")

    def close(self) -> None:
        self._drop(self._conns)


class ArrayPeer:
    """The part of a parameter server or gradient worker that serves its
    arrays and pulls its peers' (a base class of both actor classes)."""

    _array_service: ArrayService | None = None
    _array_client: ArrayClient | None = None

    def open_arrays(self, token: str) -> NetArray | str:
        """Start this actor's array service (once) for the job's `token`,
        on its node's IP: a handle that reaches it (a ping), or why it
        cannot start (no free port). A malformed SHARDPROP_DATA_PORTS
        raises ValueError."""
        if self._array_service is None or self._array_service.closed:
            import ray

            try:
                self._array_service = ArrayService(ray.util.get_node_ip_address())
            except OSError as err:
                return str(err)
        self._array_service.open(token)
        s = self._array_service
        return NetArray(s.host, s.port, s.instance, "", 0, "|u1", 0, token)

    def reach_arrays(self, peers: list[NetArray]) -> str | None:
        """None when every peer's service answers, else why not. The
        connections to services that are no longer peers are closed."""
        self._pulls().forget_except(peers)
        try:
            self._pulls().reach(peers)
        except TransportError as err:
            return str(err)
        return None

    def _offer(self, token: str, step: int, arrays: dict[str, np.ndarray]) -> dict[str, NetArray]:
        if self._array_service is None or self._array_service.token != token:
            raise Refused("this actor's array service was not opened for the job's token (workers.transport)")
        return self._array_service.offer(step, arrays)

    def _withdraw(self) -> None:
        if self._array_service is not None:
            self._array_service.withdraw()

    @contextmanager
    def _aborting(self, what: str, step: int, token: str | None):
        """Run this actor's part of `step` of the graph whose token is
        `token`; if it fails, abort this actor's service from `step` on (its
        waiting readers are refused at once, saying `what` failed and why).
        Once aborted, a later part of the same graph (a pipelined step still
        queued) fails at once, without pulling. A call of no graph of this
        service's (another token, or none) neither aborts nor is refused."""
        s = self._array_service
        mine = s is not None and token is not None and s.token == token
        before = s.aborted() if mine else None
        if before is not None:
            raise Aborted(f"{what}: not made, an earlier step's part failed here: {before}")
        try:
            yield
        except BaseException as err:
            if mine:
                s.abort(step, f"{what} failed ({type(err).__name__}: {str(err)[:200]})")
            raise

    def _pulls(self) -> ArrayClient:
        if self._array_client is None:
            self._array_client = ArrayClient()
        return self._array_client


@dataclass(frozen=True)
class Opened:
    """A job's transport for one step graph: its token, and a handle to each
    server's parameter slice (`key` "params"; `step` to be set) and to each
    worker's service (a ping), in the order of the actors given."""

    token: str
    servers: tuple[NetArray, ...]
    workers: tuple[NetArray, ...]


def open_transport(servers: list, workers: list, timeout_s: float) -> Opened:
    """A new random token, once every server's and worker's array service
    has started and each reaches the other side's. Raises Unavailable
    saying why not (the arrays go through Ray then); a malformed
    SHARDPROP_DATA_PORTS on a node raises its ValueError."""
    import secrets

    import ray
    from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

    if not data_ports(os.environ.get(PORTS_ENV)):  # off on the driver's machine: off for its jobs
        raise Unavailable(f"{PORTS_ENV}=off where the job's driver runs")
    token = secrets.token_hex(16)
    try:
        opened = ray.get([a.open_arrays.remote(token) for a in servers + workers], timeout=timeout_s)
        failed = [o for o in opened if isinstance(o, str)]
        if failed:
            raise Unavailable(f"an array service cannot start: {failed[0]}")
        at_servers, at_workers = opened[:len(servers)], opened[len(servers):]
        why = ray.get([w.reach_arrays.remote(at_servers) for w in workers]
                      + [s.reach_arrays.remote(at_workers) for s in servers], timeout=timeout_s)
    except RayTaskError as err:
        if isinstance(err.cause, ValueError):
            raise err.cause from None
        raise Unavailable(f"an actor failed opening it: {err.cause or err}") from None
    except (RayActorError, GetTimeoutError) as err:  # an actor died: the step finds it, the next graph tries again
        raise Unavailable(f"an actor did not answer: {type(err).__name__}") from None
    unreached = [w for w in why if w is not None]
    if unreached:
        raise Unavailable(f"a peer cannot be reached: {unreached[0]}")
    return Opened(token, tuple(at_servers), tuple(at_workers))
