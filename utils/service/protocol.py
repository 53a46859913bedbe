"""uvicorn's HTTP/1.1 protocol (h11) with a deadline for a request's head, for bin/serve.py.

uvicorn closes a kept-alive connection that sends nothing after an answer (--timeout-keep-alive),
but has no deadline for a connection that sends nothing after connecting, or only part of a request
line or of its headers: such a socket stays open for as long as the client likes, and a handful of
them used to fill uvicorn's `limit_concurrency` (which counts open sockets) and answer 503 to
everyone, /livez included. Here a connection must complete a request head within `header_timeout`
seconds of connecting or of its previous answer, else it is closed (a client that sent part of a
head gets 408 first). A request whose head is complete is the app's: the edge
(utils/service/edge.py) bounds requests in flight and how long a body may stall.

An answer must be read, too: once more of it waits in the server's buffer than the transport's
high-water mark (64 KB), the client has `send_timeout` seconds plus what is unsent (that buffer and
the kernel's send buffer) at `min_send_rate` to take it below the low-water mark, else the
connection is aborted. asyncio's close() waits for the buffer to drain, so a client that never
read kept its whole answer (annotated pictures: tens of MB) in the server's memory for as long as
it held the socket open, past the head deadline.

An answer given before the request's body was read (401, 413, 429, 503, a body cut off) is followed by
a lingering close, as nginx does: the server sends the answer and a FIN, then reads and drops what the
client still sends, for at most `linger` seconds, before it closes (at once when the server is stopping, and
after an answer that kept the connection: uvicorn has read and dropped the body since, until its keep-alive
timeout or the head deadline closes it). uvicorn
closed the socket at once, and a close with unread bytes sends a reset: a client still sending its body
(http.client, requests: they read nothing until it is sent) saw "connection reset by peer" instead of the
answer and its reason.
"""

from __future__ import annotations

import asyncio
import socket
import struct

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol, RequestResponseCycle

from .. import defaults as D

_TIMEOUT_TEXT = b"request line and headers not complete in time (header timeout)\n"
TIMEOUT_ANSWER = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\nconnection: close\r\n"
                  b"content-length: %d\r\n\r\n%s" % (len(_TIMEOUT_TEXT), _TIMEOUT_TEXT))


class _LingeringClose:
    """The transport uvicorn is given: its close() while the client is still sending the request's body lingers
    (the module's docstring); everything else is the transport's own."""

    def __init__(self, transport: asyncio.Transport, protocol: HeadDeadlineProtocol):
        self._transport, self._protocol = transport, protocol
        self.lingering = False

    def __getattr__(self, name: str):
        return getattr(self._transport, name)

    def is_closing(self) -> bool:
        return self.lingering or self._transport.is_closing()

    def close(self) -> None:
        if self.lingering or self._transport.is_closing():
            return
        protocol = self._protocol  # a body still arriving after a kept-alive answer has been read and dropped since
        if (protocol.linger > 0 and not protocol.stopping and protocol.cycle is not protocol.kept_alive
                and protocol.conn.their_state is h11.SEND_BODY and self._transport.can_write_eof()):
            self.lingering = True
            self._transport.write_eof()  # the answer, then a FIN: the client may read it while it still sends
            self._transport.resume_reading()  # uvicorn may have paused reading with a body's buffer full
            self._protocol.linger_deadline = self._protocol.loop.call_later(self._protocol.linger,
                                                                            self._transport.close)
            return
        self._transport.close()

    def close_without_lingering(self) -> None:
        self._transport.close()


class HeadDeadlineProtocol(H11Protocol):
    """H11Protocol that closes a connection whose request head is not complete `header_timeout` s after it
    connected or after its previous answer."""

    header_timeout: float = D.SERVICE_HEADER_TIMEOUT_S
    send_timeout: float = D.SERVICE_SEND_TIMEOUT_S
    min_send_rate: float = D.SERVICE_MIN_BODY_RATE_KBS * 1024
    linger: float = D.SERVICE_LINGER_S

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._head_deadline: asyncio.TimerHandle | None = None
        self._send_deadline: asyncio.TimerHandle | None = None
        self.linger_deadline: asyncio.TimerHandle | None = None
        self.stopping = False  # the server is stopping: it waits for no body that no one reads
        self.kept_alive: RequestResponseCycle | None = None  # the last request answered without closing
        self._head_bytes = False
        super().connection_made(_LingeringClose(transport, self))  # type: ignore[arg-type]
        self._arm_head_deadline()

    def _arm_head_deadline(self) -> None:
        self._disarm_head_deadline()
        self._head_bytes = False
        self._head_deadline = self.loop.call_later(self.header_timeout, self._head_deadline_passed)

    def _disarm_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_deadline_passed(self) -> None:
        self._head_deadline = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            return  # its head came in time: a request in flight
        if self._head_bytes and self.conn.our_state is h11.IDLE:
            self.transport.write(TIMEOUT_ANSWER)  # part of a head arrived: say why before closing
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.transport.lingering:  # the rest of a body no one reads: dropped
            return
        if self.cycle is None or self.cycle.response_complete:
            self._head_bytes = self._head_bytes or bool(data)
        super().data_received(data)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self.kept_alive = self.cycle
            self._arm_head_deadline()

    # -- the answer must be read: the transport calls these at its high- and low-water marks
    def pause_writing(self) -> None:
        super().pause_writing()
        if self.min_send_rate > 0:
            # what is unsent: the transport's buffer and at most the kernel's send buffer, which a client empties
            # first (the transport's own buffer does not shrink until then: it measures no progress on its own)
            sock = self.transport.get_extra_info("socket")
            in_kernel = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) if sock is not None else 0
            unsent = self.transport.get_write_buffer_size() + in_kernel
            self._disarm_send_deadline()
            self._send_deadline = self.loop.call_later(self.send_timeout + unsent / self.min_send_rate,
                                                       self._send_deadline_passed, unsent)

    def resume_writing(self) -> None:
        super().resume_writing()
        self._disarm_send_deadline()

    def _disarm_send_deadline(self) -> None:
        if self._send_deadline is not None:
            self._send_deadline.cancel()
            self._send_deadline = None

    def _send_deadline_passed(self, unsent: int) -> None:
        self._send_deadline = None
        # abort, not close: close() keeps the buffer until the client reads it; and with no linger, so that the
        # kernel drops its send buffer too (a reset) instead of sending it on to the client for minutes
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.logger.warning("client %s: connection aborted: %d bytes of its answer not taken in %.0f s (at least "
                            "%g KB/s after the first %g s)", self.client[0] if self.client else "-", unsent,
                            self.send_timeout + unsent / self.min_send_rate, self.min_send_rate / 1024,
                            self.send_timeout)
        self.transport.abort()

    def shutdown(self) -> None:
        self.stopping = True  # an answer given from now on does not linger either
        if self.transport.lingering:
            self.transport.close_without_lingering()
            return
        super().shutdown()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.linger_deadline is not None:
            self.linger_deadline.cancel()
        self._disarm_head_deadline()
        self._disarm_send_deadline()
        super().connection_lost(exc)


def head_deadline_protocol(seconds: float, send_timeout: float = D.SERVICE_SEND_TIMEOUT_S,
                           min_send_rate: float = D.SERVICE_MIN_BODY_RATE_KBS * 1024,
                           linger: float = D.SERVICE_LINGER_S) -> type[HeadDeadlineProtocol]:
    """The protocol class for uvicorn.Config(http=...), with this head deadline, answer-reading limits
    (*min_send_rate* in bytes/s; 0: none) and lingering close (*linger* seconds; 0: none)."""
    return type("HeadDeadlineProtocol", (HeadDeadlineProtocol,), {"header_timeout": seconds,
                                                                  "send_timeout": send_timeout,
                                                                  "min_send_rate": min_send_rate,
                                                                  "linger": linger})
