"""The service's edge: a pure ASGI middleware that sees every request before the app does.

- Credentials: with a token, a request to a protected path without `Authorization: Bearer <token>`
  is answered 401 before one byte of its body is received.
- Time: a body that pauses for body_timeout seconds, or arrives slower than min_body_rate on average
  after its first body_timeout seconds, or is not complete body_deadline seconds after it began, is
  cut off with 408.
- Size: a Content-Length above the limit is answered 413 before the body is received; a body
  without one (chunked) is counted as it streams and cut off at the limit with 413. The app
  never holds more than the limit of one request's body.
- Share: at most max_requests requests are in the app at once (probes excepted; more: 503), and at most
  max_requests_per_client of them from one client address as uvicorn reports it (more: 429), so that one
  client cannot hold every place.
- Every request gets an id (the client's X-Request-ID when it is a short plain token, else a new
  one), returned as X-Request-ID, and one access-log line with its timings: the app writes
  decode / queue / inference times into ``scope["state"]["timings"]`` (and, for a client gone, the
  model's jobs dropped).
- Requests by route and status and their latency go to the metrics.

It is plain ASGI (no BaseHTTPMiddleware) so that it can answer before the body is read and
never buffers a body itself.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import time
import uuid

from .. import defaults as D
from ..errors import shown
from .metrics import ServiceMetrics

ACCESS_LOG = logging.getLogger("mask_service.access")
REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
PLAIN_METHOD = re.compile(r"[A-Z]{1,16}")  # GET, POST, OPTIONS...; h11 takes any token (G'E|T~!) up to 16 KB
PLAIN_PATH = re.compile(rf"/[\x21-\x7e]{{0,{D.MESSAGE_VALUE_CHARS - 1}}}")  # printable ASCII, no spaces
# Digits of a Content-Length read as a number at most: Python refuses to convert over 4300 (a ValueError,
# answered 500), and any length past 18 digits is an exabyte, over every limit anyway.
LENGTH_DIGITS = 18


def shown_path(path: str) -> str:
    """The request path for an answer or the access log: as sent when it is short printable ASCII without spaces,
    else its repr, cut (utils.errors.shown). The server percent-decodes paths, so %0A would put a line break into
    the one-line log, and a path can be as long as the server's header limit."""
    return path if PLAIN_PATH.fullmatch(path) else shown(path)


def shown_request(method: str, path: str) -> str:
    """'POST /api/predict': a request as answers and the access log name it, its method and path bounded (h11
    takes any token up to 16 KB as a method; shown_path)."""
    return f"{method if PLAIN_METHOD.fullmatch(method) else shown(method, 24)} {shown_path(path)}"


class _CutOff:
    """Marks a request whose body the edge cut off while streaming: its answer's status and reason."""

    def __init__(self):
        self.status, self.detail = 0, ""

    def cut(self, status: int, detail: str) -> dict:
        self.status, self.detail = status, detail
        return {"type": "http.disconnect"}  # the app stops reading; nothing more is buffered


async def answer(send, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
    """A JSON error answer {"detail": ...}, as the app's own 4xx are."""
    body = json.dumps({"detail": detail}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
           (b"connection", b"close")]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class EdgeMiddleware:
    def __init__(self, app, *, token: str | None, protected: tuple[str, ...], max_body_bytes: int,
                 metrics: ServiceMetrics, max_requests: int | None = None, probes: tuple[str, ...] = (),
                 body_timeout: float | None = None, min_body_rate: float = 0.0, body_deadline: float | None = None,
                 max_requests_per_client: int | None = None):
        self.app, self.token, self.protected = app, token, protected
        self.max_body_bytes, self.metrics = max_body_bytes, metrics
        # requests in the app at once, probes excepted: what bodies arriving and answers being made may hold
        self.max_requests, self.probes, self.active = max_requests, probes, 0
        # ... and from one client address (None: no bound): one client keeping up the body rate on every slot, and
        # reconnecting after each cut, held them all. The address is scope["client"], which uvicorn sets from
        # X-Forwarded-For only for a proxy named in --forwarded-allow-ips; a request without one is not counted here
        self.max_requests_per_client, self.active_by_client = max_requests_per_client, {}
        # A body may pause for at most body_timeout seconds, and once that long has passed since it began it must
        # have come at min_body_rate bytes/s on average: a client that trickles a byte at a time stays under any
        # pause limit and would hold its request slot (and, with --max-requests of them, the whole server) for hours
        self.body_timeout, self.min_body_rate = body_timeout, min_body_rate
        # ... and the whole body must have come within body_deadline seconds (None: no bound): the rate alone let a
        # client that kept just above it hold a slot for as long as its bytes earned (the largest body: 2.9 hours)
        self.body_deadline = body_deadline

    def _authorised(self, headers: dict[bytes, bytes]) -> bool:
        given = headers.get(b"authorization", b"")
        return secrets.compare_digest(given, f"Bearer {self.token}".encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        began = time.perf_counter()
        headers = dict(scope.get("headers") or [])
        given_id = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = given_id if REQUEST_ID.fullmatch(given_id) else uuid.uuid4().hex[:16]
        state = scope.setdefault("state", {})
        state["request_id"], state["timings"] = request_id, {}
        path, method = scope.get("path", ""), scope.get("method", "")
        where = shown_request(method, path)
        status = [500]
        cut_off = _CutOff()
        limit_mb = f"{self.max_body_bytes / 2**20:g} MB"

        started, counted = [False], False
        client = (scope.get("client") or (None, 0))[0]

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status[0], started[0] = message["status"], True
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"x-request-id", request_id.encode())]}
            await send(message)

        async def send_or_cut(message):
            # The app answers a body cut off (at the size limit, or stalled) with its own error (a parse error,
            # 400): the client is told the real reason instead, and the app's answer is dropped.
            if cut_off.status:
                if message["type"] == "http.response.start":
                    await answer(send_with_id, cut_off.status, cut_off.detail)
                return
            await send_with_id(message)

        received, body_done, body_began = [0], [False], [0.0]
        length = headers.get(b"content-length")

        async def counted_receive():
            if body_done[0] or (self.body_timeout is None and self.body_deadline is None):
                message = await receive()
            else:
                now = time.monotonic()
                body_began[0] = body_began[0] or now
                waits = []  # (seconds left, why): the nearest limit is the one that cuts the body off
                if self.body_timeout is not None:
                    waits.append((self.body_timeout, "stalled"))
                    if self.min_body_rate > 0:  # the time the bytes so far have earned, after the first body_timeout
                        earned = body_began[0] + self.body_timeout + received[0] / self.min_body_rate - now
                        waits.append((max(earned, 0.0), "slow"))
                if self.body_deadline is not None:
                    waits.append((max(body_began[0] + self.body_deadline - now, 0.0), "late"))
                wait, why = min(waits, key=lambda limit: limit[0])
                try:
                    message = await asyncio.wait_for(receive(), wait)
                except TimeoutError:  # a body that stalls or trickles would hold its place (and memory) for ever
                    seconds = time.monotonic() - body_began[0]
                    if why == "late":
                        of = f" of {int(length):,}" if length is not None and length.isdigit() else ""
                        return cut_off.cut(408, f"{where}: body not complete in {self.body_deadline:g} s "
                                                f"({received[0]:,}{of} bytes came); request cut off (body deadline)")
                    if why == "slow":
                        return cut_off.cut(408, f"{where}: body arriving at under {self.min_body_rate / 1024:g} KB/s "
                                                f"({received[0]:,} bytes in {seconds:.0f} s); request cut off")
                    return cut_off.cut(408, f"{where}: no body bytes for {self.body_timeout:g} s; request cut off")
            if message["type"] == "http.request":
                received[0] += len(message.get("body", b""))
                body_done[0] = not message.get("more_body", False)
                if received[0] > self.max_body_bytes:
                    return cut_off.cut(413, f"{where}: request body larger than {limit_mb}")
            return message

        try:
            if self.token is not None and path.startswith(self.protected) and not self._authorised(headers):
                await answer(send_with_id, 401, f"{where}: missing or wrong bearer token "
                                                "(Authorization: Bearer <token>)", {"WWW-Authenticate": "Bearer"})
                return
            if length is not None:
                if not length.isdigit():
                    await answer(send_with_id, 400, f"{where}: Content-Length {shown(length.decode('latin-1'))} "
                                                    "is not a number")
                    return
                if len(length.lstrip(b"0")) > LENGTH_DIGITS or int(length) > self.max_body_bytes:
                    declared = str(int(length)) if len(length.lstrip(b"0")) <= LENGTH_DIGITS else "over 10**18"
                    await answer(send_with_id, 413, f"{where}: request body of {declared} bytes; at most {limit_mb}")
                    return
            if path not in self.probes:
                limit, held = self.max_requests_per_client, self.active_by_client.get(client, 0)
                if limit is not None and client is not None and held >= limit:
                    await answer(send_with_id, 429, f"{where}: too many requests from {shown(client)}: {held} are "
                                                    f"being received or served, at most {limit} from one client "
                                                    "(--max-requests-per-client); retry when one is answered",
                                 {"Retry-After": str(D.SERVICE_RETRY_AFTER_S)})
                    return
                if self.max_requests is not None and self.active >= self.max_requests:
                    await answer(send_with_id, 503, f"{where}: busy: {self.max_requests} requests are being received "
                                                    "or served; retry shortly",
                                 {"Retry-After": str(D.SERVICE_RETRY_AFTER_S)})
                    return
                self.active += 1
                if client is not None:
                    self.active_by_client[client] = held + 1
                counted = True
            try:
                await self.app(scope, counted_receive, send_or_cut)
            except asyncio.CancelledError:
                # uvicorn cancels the requests still in flight when --stop-timeout has passed after SIGTERM (it
                # cancels for nothing else): the client is told so, not sent uvicorn's bare 500
                if started[0]:
                    raise
                await answer(send_with_id, 503, f"{where}: the server is stopping and cut this request off; "
                                                 "retry", {"Retry-After": str(D.SERVICE_RETRY_AFTER_S)})
                return
            except Exception:
                if not cut_off.status:
                    raise
            if cut_off.status and status[0] != cut_off.status:
                await answer(send_with_id, cut_off.status, cut_off.detail)
        finally:
            if counted:
                self.active -= 1
                if client is not None:
                    left = self.active_by_client.pop(client) - 1
                    if left:  # an address with nothing in flight leaves no entry behind
                        self.active_by_client[client] = left
            seconds = time.perf_counter() - began
            self.metrics.observe_request(path, status[0], seconds)
            timings = state.get("timings") or {}
            stages = "".join(f" {name}_ms={timings[name] * 1000:.1f}" for name in ("decode", "queue", "inference")
                             if name in timings)
            images = f" images={timings['images']}" if "images" in timings else ""
            if "dropped" in timings:  # a client gone (499): the model's jobs of its request withdrawn unbegun
                images += f" dropped={timings['dropped']}"
            ACCESS_LOG.info("id=%s %s %s %d total_ms=%.1f%s%s client=%s", request_id, where,
                            scope.get("http_version", "1.1"), status[0], seconds * 1000, stages, images, client or "-")
