"""The TCP array transport on loopback (workers.transport): bytes arrive
exactly as offered, a wrong token, instance or step is refused, and a dead
peer is PeerLost, never other bits."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from workers.transport import Aborted, ArrayClient, ArrayService, NetArray, PeerLost, Refused, data_ports

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "ab" * 16


def odd_floats(n: int, seed: int = 0) -> np.ndarray:
    """Every kind of float32 bit pattern: random bits (NaN payloads and
    denormals among them), -0.0, infinities."""
    bits = np.random.default_rng(seed).integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32)
    out = bits.view(np.float32)
    out[:4] = [-0.0, np.inf, -np.inf, np.float32(1e-45)]
    return out


@pytest.fixture
def service():
    s = ArrayService("127.0.0.1", token=TOKEN)
    yield s
    s.close()


def pull(handle: NetArray, start: int = 0, stop: int | None = None, client: ArrayClient | None = None) -> np.ndarray:
    out = np.empty((stop if stop is not None else handle.length) - start, np.dtype(handle.dtype))
    (client or ArrayClient()).pull([(handle, out, start)])
    return out


def hung_up(sock: socket.socket) -> bool:
    """Whether the other end closed `sock` (a recv past its timeout raises instead)."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:  # closed with the stranger's bytes unread
        return True


def test_round_trip_is_bit_exact_whole_and_in_ranges(service):
    params = odd_floats(262_147)
    grads = np.random.default_rng(1).integers(0, 2**63, 1000, dtype=np.int64).view(np.float64)
    handles = service.offer(3, {"params": params, "shard-2": grads})
    client = ArrayClient()
    assert pull(handles["params"], client=client).tobytes() == params.tobytes()
    assert pull(handles["params"], 1000, 200_000, client).tobytes() == params[1000:200_000].tobytes()
    assert pull(handles["shard-2"], client=client).tobytes() == grads.tobytes()
    assert handles["params"].step == 3 and handles["params"].length == params.size


def test_one_pull_from_several_services_fills_each_output(service):
    other = ArrayService("127.0.0.1", token=TOKEN)
    try:
        a, b = odd_floats(5000), odd_floats(7000, seed=2)
        ha, hb = service.offer(0, {"params": a})["params"], other.offer(0, {"params": b})["params"]
        flat = np.empty(a.size + b.size, np.float32)  # one vector, each slice pulled into its place
        ArrayClient().pull([(ha, flat[:a.size], 0), (hb, flat[a.size:], 0)])
        assert flat.tobytes() == np.concatenate([a, b]).tobytes()
    finally:
        other.close()


@pytest.mark.parametrize("change, refusal", [
    ({"token": "cd" * 16}, "wrong token"),
    ({"step": 4}, "step 5 asked for, step 4 held"),
    ({"service": "00" * 16}, "the peer was replaced"),
    ({"key": "shard-9"}, "'shard-9' of step 4 asked for"),
])
def test_a_request_not_for_what_is_held_is_refused(service, change, refusal):
    handle = service.offer(3, {"params": odd_floats(64)})["params"]
    client = ArrayClient()
    with pytest.raises(Refused, match=refusal):
        pull(NetArray(**{**handle.__dict__, **change}), client=client)
    assert pull(handle, client=client).tobytes() == odd_floats(64).tobytes()  # and the service goes on


def test_a_withdrawn_or_replaced_step_is_refused(service):
    old = service.offer(3, {"params": odd_floats(64)})["params"]
    service.withdraw()
    with pytest.raises(Refused, match="nothing held"):
        pull(old)
    service.offer(4, {"params": odd_floats(64, seed=5)})
    with pytest.raises(Refused, match="step 4 asked for, step 5 held"):
        pull(old)


def test_an_array_withdrawn_while_it_is_sent_is_refused_as_torn():
    class WithdrawnMidSend(ArrayService):
        def _refusal(self, *args):  # the owner withdraws between the lookup and the end of the send
            found = super()._refusal(*args)
            self.withdraw()
            return found

    s = WithdrawnMidSend("127.0.0.1", token=TOKEN)
    try:
        with pytest.raises(Refused, match="changed while it was sent"):
            pull(s.offer(0, {"params": odd_floats(64)})["params"])
    finally:
        s.close()


def test_a_service_that_never_ran_or_died_is_peer_lost(service):
    handle = service.offer(0, {"params": odd_floats(8)})["params"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    with pytest.raises(PeerLost, match=f"127.0.0.1:{free}"):
        pull(NetArray(**{**handle.__dict__, "port": free}))


PEER = """
import json, sys, time
import numpy as np
from workers.transport import ArrayService
s = ArrayService("127.0.0.1", token=sys.argv[1])
h = s.offer(0, {"params": np.arange(100_000, dtype=np.float32)})["params"]
print(json.dumps(h.__dict__), flush=True)
time.sleep(600)
"""


def test_a_peer_killed_after_a_pull_is_peer_lost_on_the_same_connection():
    proc = subprocess.Popen([sys.executable, "-c", PEER, TOKEN], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        handle = NetArray(**json.loads(proc.stdout.readline()))
        client = ArrayClient(timeout_s=10)
        assert pull(handle, client=client).tobytes() == np.arange(100_000, dtype=np.float32).tobytes()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        with pytest.raises(PeerLost):
            pull(handle, client=client)
    finally:
        proc.kill()
        proc.wait(10)


def test_the_data_ports_are_a_range_or_ephemeral():
    assert data_ports(None) == range(0, 1) and data_ports("") == range(0, 1)
    assert data_ports("47100-47102") == range(47100, 47103) and data_ports("47100") == range(47100, 47101)
    assert not data_ports("off")
    for bad in ("abc", "47102-47100", "0-10", "1-70000"):
        with pytest.raises(ValueError, match=f"SHARDPROP_DATA_PORTS='{bad}'"):
            data_ports(bad)


def test_services_take_the_free_ports_of_the_range_in_order():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    first = ArrayService("127.0.0.1", range(port, port + 1), TOKEN)
    try:
        assert first.port == port
        with pytest.raises(OSError, match=f"no port of {port}-{port} free"):
            ArrayService("127.0.0.1", range(port, port + 1), TOKEN)
        with pytest.raises(OSError, match="SHARDPROP_DATA_PORTS=off"):
            ArrayService("127.0.0.1", data_ports("off"), TOKEN)
    finally:
        first.close()


def test_a_closed_service_stops_listening_at_once():
    s = ArrayService("127.0.0.1", token=TOKEN)
    s.close()
    s._accepting.join(10)
    assert not s._accepting.is_alive()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", s.port), timeout=5).close()


def test_past_its_connection_limit_the_service_hangs_up_on_new_ones_and_serves_the_others(service, monkeypatch):
    monkeypatch.setattr("workers.transport.MAX_CONNECTIONS", 2)
    handle = service.offer(0, {"params": odd_floats(64)})["params"]
    client = ArrayClient()
    assert pull(handle, client=client).tobytes() == odd_floats(64).tobytes()  # connection 1, kept
    with socket.create_connection(("127.0.0.1", service.port), timeout=5):  # connection 2, silent
        with socket.create_connection(("127.0.0.1", service.port), timeout=5) as third:
            assert hung_up(third)
        assert pull(handle, client=client).tobytes() == odd_floats(64).tobytes()


def raw_request(token: bytes, key: bytes = b"") -> bytes:
    from workers.transport import MAGIC, REQUEST

    return REQUEST.pack(MAGIC, token, b"\0" * 16, 0, 0, 0, len(key), 0) + key


@pytest.mark.parametrize("sends", [b"", b"SPA1 half a request", b"GET / HTTP/1.1\r\n\r\n" + b"\0" * 64],
                         ids=["silent", "half a request", "http"])
def test_a_stranger_that_sends_no_whole_request_in_time_or_another_protocol_is_hung_up_on(service, monkeypatch,
                                                                                           sends):
    monkeypatch.setattr("workers.transport.FIRST_REQUEST_S", 0.2)
    with socket.create_connection(("127.0.0.1", service.port), timeout=30) as stranger:
        stranger.sendall(sends)
        assert hung_up(stranger)
    handle = service.offer(0, {"params": odd_floats(64)})["params"]
    assert pull(handle).tobytes() == odd_floats(64).tobytes()


def test_a_wrong_token_is_answered_then_hung_up_on(service):
    from workers.transport import RESPONSE

    with socket.create_connection(("127.0.0.1", service.port), timeout=30) as stranger:
        stranger.sendall(raw_request(b"\x01" * 16))
        answer = b""
        while chunk := stranger.recv(4096):
            answer += chunk
    status, size = RESPONSE.unpack(answer[:RESPONSE.size])
    assert (status, answer[RESPONSE.size:]) == (1, b"wrong token") and size == len(b"wrong token")


def test_a_peer_connection_may_stay_idle_past_the_first_request_limit(service, monkeypatch):
    monkeypatch.setattr("workers.transport.FIRST_REQUEST_S", 0.2)
    handle = service.offer(0, {"params": odd_floats(64)})["params"]
    client = ArrayClient()
    assert pull(handle, client=client).tobytes() == odd_floats(64).tobytes()
    time.sleep(1.0)  # idle between two steps, five times the first request's limit
    assert pull(handle, client=client).tobytes() == odd_floats(64).tobytes()
    assert len(client._conns) == 1  # the same connection both times


def test_a_peer_that_accepts_but_never_answers_is_peer_lost_within_the_reach_timeout():
    with socket.socket() as mute:  # the kernel completes the handshake; nothing ever reads or answers
        mute.bind(("127.0.0.1", 0))
        mute.listen(4)
        handle = NetArray("127.0.0.1", mute.getsockname()[1], "00" * 16, "", 0, "|u1", 0, TOKEN)
        raised: list = []
        reach = threading.Thread(target=lambda: raised.append(pytest.raises(PeerLost, ArrayClient(timeout_s=600).reach,
                                                                          [handle], timeout_s=0.2)), daemon=True)
        reach.start()
        reach.join(120)  # the client's own 600 s would still be waiting
        assert not reach.is_alive() and "timed out" in str(raised[0].value)


SERVING = """
import json, sys
import numpy as np
from workers import transport
transport.DEAD_PEER_S = 2.0
s = transport.ArrayService(sys.argv[1], token=sys.argv[2])
print(json.dumps(s.offer(0, {"params": np.arange(1000, dtype=np.float32)})["params"].__dict__), flush=True)
for _ in sys.stdin:  # each line asks how many connections the service holds
    with s._lock:
        print(len(s._conns), flush=True)
"""

PULLING = """
import json, sys
import numpy as np
from workers.transport import ArrayClient, NetArray
client, out = ArrayClient(), np.empty(1000, np.float32)
client.pull([(NetArray(**json.loads(sys.argv[1])), out, 0)])
print(out.tobytes() == np.arange(1000, dtype=np.float32).tobytes(), flush=True)
sys.stdin.readline()
client.close()  # its FIN is lost on the cut link: the service's end is left half-open
print("closed", flush=True)
sys.stdin.readline()
"""


@pytest.fixture
def two_hosts():
    """Two network-namespace hosts on a bridge of their own, without Ray
    (tests/netns_cluster.py), and nothing of them left after."""
    from tests.netns_cluster import Naming, NetnsCluster, unavailable_reason

    if unavailable_reason() is not None:
        pytest.skip(unavailable_reason())
    hosts = NetnsCluster([0, 0], Naming("sptest-a", "sptar", "sptestabr", "10.251.99")).open_network()
    try:
        yield hosts
    finally:
        hosts.close()
    assert hosts.leftovers() == []


@pytest.mark.multihost
def test_a_connection_left_half_open_by_a_cut_link_ends_on_the_service_side(two_hosts):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    opened = lambda host, script, *args: subprocess.Popen(  # noqa: E731
        two_hosts.prefix(host) + [sys.executable, "-c", script, *args], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, text=True, env=env)
    server = opened(0, SERVING, two_hosts.ip(0), TOKEN)
    client = None
    try:
        handle = server.stdout.readline()
        client = opened(1, PULLING, handle)
        assert client.stdout.readline().strip() == "True"

        def connections() -> int:
            server.stdin.write("?\n")
            server.stdin.flush()
            return int(server.stdout.readline())

        assert connections() == 1
        two_hosts.cut(1)
        client.stdin.write("close\n")
        client.stdin.flush()
        assert client.stdout.readline().strip() == "closed"
        for _ in range(120):  # without keepalive the service's end waits for good
            if connections() == 0:
                break
            time.sleep(0.5)
        assert connections() == 0
    finally:
        for proc in (server, client):
            if proc is not None:
                proc.kill()
                proc.wait(10)


def test_the_client_forgets_the_connections_to_services_no_longer_its_peers(service):
    replaced = ArrayService("127.0.0.1", token=TOKEN)
    try:
        kept = service.offer(0, {"params": odd_floats(8)})["params"]
        gone = replaced.offer(0, {"params": odd_floats(8)})["params"]
        client = ArrayClient()
        pull(kept, client=client), pull(gone, client=client)
        client.forget_except([kept])
        assert list(client._conns) == [("127.0.0.1", service.port, service.instance)]
        for _ in range(100):  # the service's end of the forgotten connection sees it closed
            with replaced._lock:
                if not replaced._conns:
                    break
            time.sleep(0.1)
        assert not replaced._conns and pull(kept, client=client).tobytes() == odd_floats(8).tobytes()
    finally:
        replaced.close()


def test_an_actor_says_why_its_service_cannot_start_or_a_peer_cannot_be_reached(monkeypatch):
    from workers.transport import ArrayPeer

    server, worker = ArrayPeer(), ArrayPeer()
    try:
        at_server = server.open_arrays(TOKEN)
        assert worker.reach_arrays([at_server]) is None
        monkeypatch.setenv("SHARDPROP_DATA_PORTS", str(at_server.port))  # the only port, taken
        assert worker.open_arrays(TOKEN) == (f"no port of {at_server.port}-{at_server.port} free on "
                                             f"{at_server.host} for the array service (SHARDPROP_DATA_PORTS): "
                                             "[Errno 98] Address already in use")
        server._array_service.close()
        assert f"{at_server.host}:{at_server.port}) is unreachable" in worker.reach_arrays([at_server])
    finally:
        for peer in (server, worker):
            if peer._array_service is not None:
                peer._array_service.close()


def test_thousands_of_parts_from_one_peer_arrive_whole_with_small_socket_buffers(monkeypatch):
    """A server pulls one part per shard (up to MAX_SHARDS) from a worker:
    sent all at once, the requests outgrew the buffers while the peer,
    blocked sending answers not yet read, read no more of them."""
    import workers.transport as transport

    tune = transport._tune

    def small_buffers(sock):
        tune(sock)
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            sock.setsockopt(socket.SOL_SOCKET, option, 8192)

    monkeypatch.setattr(transport, "_tune", small_buffers)
    s = ArrayService("127.0.0.1", token=TOKEN)
    try:
        rows = {f"shard-{i}": odd_floats(256, seed=i) for i in range(1500)}
        handles = s.offer(0, rows)
        outs = {k: np.empty(256, np.float32) for k in rows}
        ArrayClient(timeout_s=10).pull([(handles[k], outs[k], 0) for k in rows])
        assert all(outs[k].tobytes() == rows[k].tobytes() for k in rows)
    finally:
        s.close()


def test_a_first_request_for_a_large_array_is_answered_whole_however_slowly_it_is_read(service, monkeypatch):
    import workers.transport as transport

    monkeypatch.setattr(transport, "FIRST_REQUEST_S", 0.2)
    big = odd_floats(8_000_000)  # 32 MB: more than the socket buffers hold
    handle = service.offer(0, {"params": big})["params"]
    read = transport._recv_into

    def late(sock, view):  # the reader starts reading a second after the answer began
        time.sleep(1.0)
        read(sock, view)

    monkeypatch.setattr(transport, "_recv_into", late)
    out = np.empty(big.size, np.float32)
    ArrayClient().pull([(handle, out, 0)])  # a new connection: this is its first request
    assert out.tobytes() == big.tobytes()


# ---- waiting pulls (the direct step graph names steps before they exist)


def in_thread(fn):
    """Run `fn` in a thread; returns a getter of its result (or raised error)."""
    box: dict = {}

    def body():
        try:
            box["value"] = fn()
        except BaseException as err:  # noqa: BLE001 - handed to the test
            box["error"] = err

    t = threading.Thread(target=body, daemon=True)
    t.start()

    def get(timeout: float = 20.0):
        t.join(timeout)
        assert not t.is_alive(), "the pull is still waiting"
        if "error" in box:
            raise box["error"]
        return box["value"]

    get.thread = t
    return get


def named(service: ArrayService, key: str, step: int, length: int, dtype: str = "<f4") -> NetArray:
    """A waiting handle to what `service` will offer, made without asking it (as the driver does)."""
    return NetArray(service.host, service.port, service.instance, key, step, dtype, length, service.token, wait=True)


def test_a_waiting_pull_of_a_step_to_come_gets_its_bits_once_offered(service):
    service.offer(2, {"params": odd_floats(64, seed=1)})
    got = in_thread(lambda: pull(named(service, "params", 3, 64)))
    time.sleep(0.3)
    assert got.thread.is_alive()  # step 4 is not offered yet: waiting, not refused
    service.withdraw()
    service.offer(3, {"params": odd_floats(64, seed=2)})
    assert got().tobytes() == odd_floats(64, seed=2).tobytes()


def test_without_wait_a_step_to_come_is_refused_and_with_wait_a_step_gone_is(service):
    service.offer(3, {"params": odd_floats(64)})
    with pytest.raises(Refused, match="step 5 asked for, step 4 held"):
        pull(NetArray(**{**named(service, "params", 4, 64).__dict__, "wait": False}))
    with pytest.raises(Refused, match="step 3 asked for, step 4 held"):
        pull(named(service, "params", 2, 64))
    service.withdraw()  # withdrawn, never waited for again
    with pytest.raises(Refused, match="step 4 asked for, nothing held"):
        pull(named(service, "params", 3, 64))


def test_a_wait_longer_than_the_socket_timeout_lives_on_the_services_heartbeats(service, monkeypatch):
    import workers.transport as t

    monkeypatch.setattr(t, "HEARTBEAT_S", 0.1)
    client = ArrayClient(timeout_s=0.5)  # every socket operation bounded by 0.5 s
    out = np.empty(8, np.float32)
    got = in_thread(lambda: client.pull([(named(service, "params", 0, 8), out, 0)]))
    time.sleep(2.0)  # four socket timeouts
    service.offer(0, {"params": odd_floats(8)})
    got()
    assert out.tobytes() == odd_floats(8).tobytes()


def test_an_abort_refuses_the_waiting_readers_at_once_and_an_open_ends_it(service):
    service.offer(4, {"summary": np.arange(4.0)})  # step 5's result, still being read
    waiting = [in_thread(lambda: pull(named(service, "summary", 5, 4, "<f8"))) for _ in range(2)]
    time.sleep(0.3)
    began = time.monotonic()
    service.abort(5, "worker 1's step 6 failed (WorkerFault: injected)")
    for got in waiting:
        with pytest.raises(Aborted, match=r"step 6: worker 1's step 6 failed \(WorkerFault: injected\)"):
            got()
    assert time.monotonic() - began < 2.0  # at once, not at a heartbeat or timeout
    assert pull(named(service, "summary", 4, 4, "<f8")).tolist() == [0.0, 1.0, 2.0, 3.0]  # an earlier step's
    service.offer(5, {"summary": np.arange(4.0)})
    with pytest.raises(Aborted):  # until the next graph opens the service
        pull(named(service, "summary", 5, 4, "<f8"))
    assert service.aborted() == "worker 1's step 6 failed (WorkerFault: injected)"
    service.open(TOKEN)
    assert service.aborted() is None
    service.offer(5, {"summary": np.arange(4.0)})
    assert pull(named(service, "summary", 5, 4, "<f8")).tolist() == [0.0, 1.0, 2.0, 3.0]


def test_an_actor_whose_part_failed_fails_its_later_parts_without_pulling(service):
    from workers.transport import ArrayPeer

    class Peer(ArrayPeer):
        def part(self, step, fail=False, token=TOKEN):
            with self._aborting(f"worker 0's step {step + 1}", step, token):
                if fail:
                    raise ValueError("bad rows")
                return "made"

    peer = Peer()
    peer._array_service = service
    assert peer.part(3) == "made"
    with pytest.raises(ValueError, match="bad rows"):
        peer.part(4, fail=True)
    with pytest.raises(Aborted, match=r"worker 0's step 6: not made, an earlier step's part failed here: "
                                      r"worker 0's step 5 failed \(ValueError: bad rows\)"):
        peer.part(5)
    assert peer.part(5, token=None) == "made"  # a call of no graph (a stray, late plan) is not refused for it
    with pytest.raises(ValueError):
        peer.part(6, fail=True, token=None)  # nor aborts the service when it fails
    assert service.aborted() == "worker 0's step 5 failed (ValueError: bad rows)"
    service.open(TOKEN)  # the next graph
    assert peer.part(5) == "made"


def test_opening_for_a_new_graph_serves_nothing_offered_before_and_refuses_the_old_token(service):
    service.offer(8, {"summary": np.arange(13.0)})  # a step of the graph before a failure
    old = named(service, "summary", 8, 13, "<f8")
    stale_wait = in_thread(lambda: pull(named(service, "summary", 9, 13, "<f8")))
    time.sleep(0.3)
    service.open("cd" * 16)
    with pytest.raises(Refused, match="wrong token"):
        stale_wait()
    replayed = in_thread(lambda: pull(named(service, "summary", 8, 19, "<f8")))  # the same step, made again
    time.sleep(0.3)
    assert replayed.thread.is_alive()  # not served the old graph's result
    service.offer(8, {"summary": np.arange(19.0)})
    assert replayed().tolist() == list(np.arange(19.0))
    with pytest.raises(Refused, match="wrong token"):
        pull(old)


def test_a_pull_of_no_items_is_a_notice_that_the_step_is_offered(service):
    got = in_thread(lambda: pull(named(service, "params", 0, 64), 0, 0))
    time.sleep(0.3)
    assert got.thread.is_alive()
    service.offer(0, {"params": odd_floats(64)})
    assert got().size == 0
