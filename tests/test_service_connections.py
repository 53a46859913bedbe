"""Connections that send nothing, half a request or a stalled body cannot deny service: uvicorn's protocol with a
head deadline (utils/service/protocol.py) closes the first two, and the edge (utils/service/edge.py) bounds the
requests in flight (probes excepted) and cuts off a stalled body. No timings are asserted: the generous
socket timeouts only turn a hang into a failure."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time

import pytest

uvicorn = pytest.importorskip("uvicorn")

from utils.service.edge import EdgeMiddleware  # noqa: E402
from utils.service.metrics import ServiceMetrics  # noqa: E402
from utils.service.protocol import head_deadline_protocol  # noqa: E402

HANG = 20  # seconds a socket read may wait before the test calls it a hang


async def hello(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


@contextlib.contextmanager
def running(app, **config):
    with running_server(app, **config) as (port, _):
        yield port


@contextlib.contextmanager
def running_server(app, **config):
    """The port and the uvicorn server serving *app* on a thread."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", **config))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        for _ in range(400):
            if server.started:
                break
            time.sleep(0.05)
        yield sock.getsockname()[1], server
    finally:
        server.should_exit = True
        thread.join(HANG)


def read_until_closed(conn: socket.socket) -> bytes:
    """What the server sends until it closes the connection; socket.timeout if it keeps it open."""
    conn.settimeout(HANG)
    data = b""
    while chunk := conn.recv(4096):
        data += chunk
    return data


def test_silent_and_half_sent_connections_are_closed_at_the_head_deadline_and_requests_go_on():
    with running(hello, http=head_deadline_protocol(0.5)) as port:
        silent = socket.create_connection(("127.0.0.1", port))
        half = socket.create_connection(("127.0.0.1", port))
        half.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n")  # the head never ends
        kept = socket.create_connection(("127.0.0.1", port))
        kept.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        kept.settimeout(HANG)
        first = b""
        while not first.endswith(b"ok"):
            first += kept.recv(4096)
        assert first.startswith(b"HTTP/1.1 200")
        kept.sendall(b"GET / HT")  # after an answer, half a request line: the deadline runs again
        assert read_until_closed(silent) == b""
        assert read_until_closed(half).startswith(b"HTTP/1.1 408")
        assert read_until_closed(kept).startswith(b"HTTP/1.1 408")
        with socket.create_connection(("127.0.0.1", port)) as fresh:  # the server still answers
            fresh.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert read_until_closed(fresh).startswith(b"HTTP/1.1 200")


def _edge(app, **limits) -> EdgeMiddleware:
    return EdgeMiddleware(app, token=None, protected=(), max_body_bytes=10**6, metrics=ServiceMetrics(),
                          probes=("/livez",), **limits)


async def _call(edge, path: str, receive=None) -> tuple[int, bytes]:
    sent = []

    async def send(message):
        sent.append(message)

    async def complete_body():
        return {"type": "http.request", "body": b"", "more_body": False}

    scope = {"type": "http", "method": "POST", "path": path, "headers": [], "http_version": "1.1"}
    await edge(scope, receive or complete_body, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    return start["status"], b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


def test_requests_in_flight_are_bounded_but_probes_still_answer():
    release = asyncio.Event()

    async def slow(scope, receive, send):
        if scope["path"] == "/slow":
            await release.wait()
        await hello(scope, receive, send)

    async def scenario():
        edge = _edge(slow, max_requests=2)
        held = [asyncio.ensure_future(_call(edge, "/slow")) for _ in range(2)]
        await asyncio.sleep(0.05)
        refused = await _call(edge, "/api/predict")
        probe = await _call(edge, "/livez")
        release.set()
        answered = await asyncio.wait_for(asyncio.gather(*held), HANG)
        after = await _call(edge, "/api/predict")  # the places are given back
        return refused, probe, answered, after

    refused, probe, answered, after = asyncio.run(scenario())
    assert refused[0] == 503 and b"busy" in refused[1]
    assert probe[0] == 200 and [a[0] for a in answered] == [200, 200] and after[0] == 200


def test_a_body_that_stalls_is_cut_off_with_408():
    async def reads_the_body(scope, receive, send):
        while (message := await receive())["type"] == "http.request" and message.get("more_body"):
            pass
        if message["type"] == "http.disconnect":
            raise RuntimeError("client gone")  # as the multipart parser does, answered 400 by the app
        await hello(scope, receive, send)

    async def stalled():
        stalled.calls += 1
        if stalled.calls == 1:
            return {"type": "http.request", "body": b"--A\r\n", "more_body": True}
        await asyncio.Event().wait()  # never more

    stalled.calls = 0
    status, body = asyncio.run(asyncio.wait_for(_call(_edge(reads_the_body, body_timeout=0.2), "/api/predict",
                                                      stalled), HANG))
    assert status == 408 and b"no body bytes for 0.2 s" in body


def test_a_client_that_never_reads_its_answer_is_aborted_and_one_that_reads_gets_it_all():
    """An answer larger than the socket buffers waits in the server's write buffer until the client reads it;
    a client that never did kept it there (tens of MB with annotated pictures) for as long as it held the socket:
    the head deadline's close() waits for the buffer to drain. It now has send_timeout plus what is unsent at
    min_send_rate (here about a second), else the connection is aborted."""
    answer = b"x" * (8 * 2**20)
    lost = threading.Event()

    async def large(scope, receive, send):
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(len(answer)).encode())]})
        await send({"type": "http.response.body", "body": answer})

    class Watched(head_deadline_protocol(0.5, 0.3, 8 * 2**20)):
        def connection_lost(self, exc):
            super().connection_lost(exc)
            lost.set()

    def ask(port: int, buffer: int | None = None) -> socket.socket:
        conn = socket.create_connection(("127.0.0.1", port))
        if buffer:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer)
        conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        return conn

    with running(large, http=Watched) as port:
        with ask(port) as reader:  # reads at once: the whole answer
            reader.settimeout(HANG)
            chunks = []
            while chunk := reader.recv(2**16):
                chunks.append(chunk)
            assert b"".join(chunks).endswith(b"\r\n\r\n" + answer)
        lost.clear()
        with ask(port, 4096) as idle:  # most of the answer stays on the server's side
            assert lost.wait(HANG)  # aborted while it read nothing
            received = b""
            with contextlib.suppress(ConnectionResetError):
                received = read_until_closed(idle)
            assert len(received) < len(answer)


def _counting_app(entered: threading.Semaphore):
    """An app that reads its body (a held request's never ends) and answers the client address it was given."""
    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        entered.release()
        while (message := await receive())["type"] == "http.request" and message.get("more_body"):
            pass
        if message["type"] == "http.disconnect":
            return
        body = scope["client"][0].encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
    return app


def _hold(port: int, source: str, entered: threading.Semaphore, headers: bytes = b"") -> socket.socket:
    """A request whose body is still arriving (5 of its 10 bytes), from *source*; returns once the app has it."""
    conn = socket.create_connection(("127.0.0.1", port), source_address=(source, 0))
    conn.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n" + headers + b"\r\n12345")
    assert entered.acquire(timeout=HANG)
    return conn


def _ask(port: int, source: str, headers: bytes = b"") -> bytes:
    with socket.create_connection(("127.0.0.1", port), source_address=(source, 0)) as conn:
        conn.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n" + headers
                     + b"\r\n")
        return read_until_closed(conn)


def test_one_client_cannot_hold_every_request_slot_and_others_still_get_in():
    """A client keeping up the body rate on every slot (and reconnecting after each cut) held all --max-requests of
    them; one address now holds at most max_requests_per_client, one more from it is answered 429 with a reason and
    Retry-After before its body is read, and another address still gets in. Its places are given back."""
    entered = threading.Semaphore(0)
    edge = EdgeMiddleware(_counting_app(entered), token=None, protected=(), max_body_bytes=10**6,
                          metrics=ServiceMetrics(), max_requests=4, max_requests_per_client=2)
    with running(edge, proxy_headers=False) as port:
        held = [_hold(port, "127.0.0.1", entered) for _ in range(2)]
        refused = _ask(port, "127.0.0.1")
        other = _ask(port, "127.0.0.2")  # loopback is 127/8 on Linux: another client address
        for conn in held:
            conn.close()
        for _ in range(HANG * 20):  # the places come back once the app has seen its clients leave
            if (after := _ask(port, "127.0.0.1")).startswith(b"HTTP/1.1 200"):
                break
            time.sleep(0.05)
    assert refused.startswith(b"HTTP/1.1 429") and b"retry-after: 2" in refused.lower()
    assert b"too many requests from '127.0.0.1': 2 are being received or served" in refused
    assert b"--max-requests-per-client" in refused
    assert other.startswith(b"HTTP/1.1 200") and other.endswith(b"127.0.0.2")
    assert after.startswith(b"HTTP/1.1 200") and not edge.active_by_client


def test_behind_a_named_proxy_clients_are_told_apart_by_x_forwarded_for_and_no_one_else_can_name_themselves(root):
    """Behind a reverse proxy every request comes from its address, so the per-client limit bound all its clients
    together; with bin/serve.py --forwarded-allow-ips naming the proxy, uvicorn reads the client from its
    X-Forwarded-For. No one else's header is read, and with '' no one's."""
    from helpers import load_script

    proxy_settings = load_script(root, "serve").proxy_settings

    def one_per_client(entered):
        return EdgeMiddleware(_counting_app(entered), token=None, protected=(), max_body_bytes=10**6,
                              metrics=ServiceMetrics(), max_requests=8, max_requests_per_client=1)

    alice, bob = b"X-Forwarded-For: 203.0.113.7\r\n", b"X-Forwarded-For: 198.51.100.9\r\n"
    entered = threading.Semaphore(0)
    with running(one_per_client(entered), **proxy_settings("127.0.0.1")) as port:
        held = _hold(port, "127.0.0.1", entered, alice)
        alice_again, bob_too = _ask(port, "127.0.0.1", alice), _ask(port, "127.0.0.1", bob)
        # alice naming herself bob, through a proxy that appends the address it saw (nginx's
        # $proxy_add_x_forwarded_for): the last address not a proxy's is read, which the proxy wrote
        alice_as_bob = _ask(port, "127.0.0.1", b"X-Forwarded-For: 198.51.100.9, 203.0.113.7\r\n")
        not_a_proxy = _ask(port, "127.0.0.2", bob)  # its header is not read: it is its own address
        held.close()
    entered = threading.Semaphore(0)  # the answered requests above released it too
    with running(one_per_client(entered), **proxy_settings("")) as port:
        held = _hold(port, "127.0.0.1", entered, alice)
        spoofed = _ask(port, "127.0.0.1", bob)
        held.close()
    assert alice_again.startswith(b"HTTP/1.1 429") and b"'203.0.113.7'" in alice_again
    assert alice_as_bob.startswith(b"HTTP/1.1 429") and b"'203.0.113.7'" in alice_as_bob
    assert bob_too.startswith(b"HTTP/1.1 200") and bob_too.endswith(b"198.51.100.9")
    assert not_a_proxy.startswith(b"HTTP/1.1 200") and not_a_proxy.endswith(b"127.0.0.2")
    assert spoofed.startswith(b"HTTP/1.1 429") and b"'127.0.0.1'" in spoofed


def test_the_per_client_limit_defaults_to_a_share_of_max_requests_and_0_turns_it_off():
    from pathlib import Path

    from utils import defaults as D
    from utils.service.app import ServiceConfig

    assert ServiceConfig(Path("model.pt")).client_limit == int(D.SERVICE_MAX_REQUESTS
                                                               * D.SERVICE_CLIENT_SHARE_OF_REQUESTS) == 8
    assert ServiceConfig(Path("model.pt"), max_requests=2).client_limit == 1  # never none at all
    assert ServiceConfig(Path("model.pt"), max_requests_per_client=3).client_limit == 3
    assert ServiceConfig(Path("model.pt"), max_requests_per_client=0).client_limit is None
    # ... and the same share of the queue for the model (--queue-size): 8 of 32 requests, 2 of 8 places
    assert ServiceConfig(Path("model.pt")).client_queue_limit == 2
    assert ServiceConfig(Path("model.pt"), queue_size=1).client_queue_limit == 1
    assert ServiceConfig(Path("model.pt"), max_requests_per_client=0).client_queue_limit is None


def test_the_proxies_uvicorn_is_told_of_in_forwarded_allow_ips_are_still_trusted(root, monkeypatch):
    """$FORWARDED_ALLOW_IPS is how uvicorn is told of its proxies; bin/serve.py turned proxy headers off unless
    --forwarded-allow-ips was given, so a deployment that named its proxy there lost every client's address (all
    of them one client for --max-requests-per-client, the proxy's address in the access log)."""
    from helpers import load_script

    monkeypatch.setenv("FORWARDED_ALLOW_IPS", "10.0.0.5")
    serve = load_script(root, "serve")
    args = serve.get_args_parser().parse_args(["--model", "model.pt"])
    assert serve.proxy_settings(args.forwarded_allow_ips) == {"proxy_headers": True,
                                                              "forwarded_allow_ips": ["10.0.0.5"]}
    monkeypatch.delenv("FORWARDED_ALLOW_IPS")
    args = serve.get_args_parser().parse_args(["--model", "model.pt"])
    # unset: loopback (127.0.0.1, the default --host): a reverse proxy on this host, in front of the loopback binding,
    # tells its clients apart (bin/serve.py read no one's header: all of them were one client, 8 requests at once)
    assert serve.proxy_settings(args.forwarded_allow_ips) == {"proxy_headers": True,
                                                              "forwarded_allow_ips": ["127.0.0.1"]}
    args = serve.get_args_parser().parse_args(["--model", "model.pt", "--forwarded-allow-ips", ""])
    assert serve.proxy_settings(args.forwarded_allow_ips)["proxy_headers"] is False  # no one's


def test_an_answer_given_before_the_body_is_read_reaches_a_client_still_sending_it():
    """The edge answers a body over the limit (and a missing token, 429, 503) before reading it. uvicorn then closed
    the socket with the body's bytes unread, which sends a reset: a client still sending (http.client and requests
    read nothing until the body is sent) got "connection reset by peer", never the 413 and its reason. The server
    now sends the answer and a FIN, reads and drops the rest of the body (at most its linger time), then closes."""
    import http.client

    edge = EdgeMiddleware(hello, token=None, protected=(), max_body_bytes=1000, metrics=ServiceMetrics())
    body = b"\0" * (64 * 2**20)  # far more than the two sockets' buffers hold: the client is still sending
    with running(edge, http=head_deadline_protocol(HANG)) as port:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=HANG)
        conn.request("POST", "/upload", body=body)
        answer = conn.getresponse()
        text = answer.read()
        conn.close()
    assert answer.status == 413 and b"POST /upload: request body of 67108864 bytes; at most" in text



async def answers_before_reading(scope, receive, send, close=True):
    """An answer given with the request's body unread (as the edge's 401/413/429/503 are)."""
    if scope["type"] != "http":
        return
    headers = [(b"content-length", b"2")] + ([(b"connection", b"close")] if close else [])
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": b"no"})


def lets_every_connection_go(server) -> bool:
    for _ in range(HANG * 20):
        if not server.server_state.connections:
            return True
        time.sleep(0.05)
    return False


def test_a_stop_waits_for_no_body_still_arriving_after_an_answer_given_once_it_began():
    """A request in flight at a stop, answered before its body was read, lingered for its whole linger time (30 s by
    default), and the stop waited for it: the linger is for the client's sake, and a stopping server owes it none."""
    stopping, arrived = threading.Event(), threading.Event()

    async def answers_at_the_stop(scope, receive, send):
        if scope["type"] == "http":
            arrived.set()
            while not stopping.is_set():
                await asyncio.sleep(0.01)
        await answers_before_reading(scope, receive, send)

    with running_server(answers_at_the_stop, http=head_deadline_protocol(HANG, linger=100 * HANG)) as (port, server):
        with socket.create_connection(("127.0.0.1", port)) as client:
            client.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n" + b"\0" * 1000)
            assert arrived.wait(HANG)
            server.should_exit = True
            for _ in range(HANG * 20):  # uvicorn asks every connection to finish as it stops listening
                if server.servers and not any(listening.is_serving() for listening in server.servers):
                    break
                time.sleep(0.05)
            stopping.set()
            assert read_until_closed(client).startswith(b"HTTP/1.1 413")
            assert lets_every_connection_go(server)  # while the client still holds its socket, its body unsent


@pytest.mark.parametrize("deadlines", [{"head": 0.5, "keep_alive": 5}, {"head": HANG, "keep_alive": 0.5}],
                         ids=["head-deadline", "keep-alive-timeout"])
def test_a_body_still_arriving_after_a_kept_alive_answer_is_closed_without_lingering_too(deadlines):
    """An answer without `connection: close` keeps the connection: uvicorn reads and drops the rest of the body until
    its keep-alive timeout or the head deadline closes it. That close lingered as well: a client held the
    connection for that long and then the whole linger time on top, past the linger time the docs state."""
    async def keeps_alive(scope, receive, send):
        await answers_before_reading(scope, receive, send, close=False)

    protocol = head_deadline_protocol(deadlines["head"], linger=100 * HANG)
    with running_server(keeps_alive, http=protocol, timeout_keep_alive=deadlines["keep_alive"]) as (port, server):
        with socket.create_connection(("127.0.0.1", port)) as client:
            client.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n" + b"\0" * 1000)
            assert read_until_closed(client).startswith(b"HTTP/1.1 413")
            assert lets_every_connection_go(server)  # while the client still holds its socket, its body unsent


def test_the_retry_after_of_every_busy_answer_is_read_from_the_defaults_table(monkeypatch):
    # the edge's 503 and 429 and the queue's wrote "2" each on their own; utils/defaults.py holds it now
    from fastapi import HTTPException

    from utils import defaults as D
    from utils.service.uploads import AdmissionQueue

    monkeypatch.setattr(D, "SERVICE_RETRY_AFTER_S", 7)
    release = asyncio.Event()

    async def slow(scope, receive, send):
        await release.wait()
        await hello(scope, receive, send)

    async def scenario():
        edge, sent = _edge(slow, max_requests=1), []

        async def send(message):
            sent.append(message)

        async def body():
            return {"type": "http.request", "body": b"", "more_body": False}

        held = asyncio.ensure_future(_call(edge, "/slow"))
        await asyncio.sleep(0.05)
        scope = {"type": "http", "method": "POST", "path": "/api/predict", "headers": [], "http_version": "1.1"}
        await edge(scope, body, send)
        release.set()
        await asyncio.wait_for(held, HANG)
        return next(m for m in sent if m["type"] == "http.response.start")

    start = asyncio.run(scenario())
    assert start["status"] == 503 and (b"retry-after", b"7") in [(k.lower(), v) for k, v in start["headers"]]
    queue = AdmissionQueue(limit=1)
    queue.enter("POST /api/predict")
    with pytest.raises(HTTPException) as refused:
        queue.enter("POST /api/predict")
    assert refused.value.status_code == 503 and refused.value.headers == {"Retry-After": "7"}
