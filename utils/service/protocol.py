"""uvicorn's HTTP/1.1 protocol (h11) with a deadline for a request's head, for bin/serve.py.

uvicorn closes a kept-alive connection that sends nothing after an answer (--timeout-keep-alive),
but has no deadline for a connection that sends nothing after connecting, or only part of a request
line or of its headers: such a socket stays open for as long as the client likes, and a handful of
them used to fill uvicorn's `limit_concurrency` (which counts open sockets) and answer 503 to
everyone, /livez included. Here a connection must complete a request head within `header_timeout`
seconds of connecting or of its previous answer, else it is closed (a client that sent part of a
head gets 408 first). A request whose head is complete is the app's: the edge
(utils/service/edge.py) bounds requests in flight and how long a body may stall.
"""

from __future__ import annotations

import asyncio

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from .. import defaults as D

_TIMEOUT_TEXT = b"request line and headers not complete in time (header timeout)\n"
TIMEOUT_ANSWER = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\nconnection: close\r\n"
                  b"content-length: %d\r\n\r\n%s" % (len(_TIMEOUT_TEXT), _TIMEOUT_TEXT))


class HeadDeadlineProtocol(H11Protocol):
    """H11Protocol that closes a connection whose request head is not complete `header_timeout` s after it
    connected or after its previous answer."""

    header_timeout: float = D.SERVICE_HEADER_TIMEOUT_S

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._head_deadline: asyncio.TimerHandle | None = None
        self._head_bytes = False
        super().connection_made(transport)
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
        if self.cycle is None or self.cycle.response_complete:
            self._head_bytes = self._head_bytes or bool(data)
        super().data_received(data)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_head_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_deadline()
        super().connection_lost(exc)


def head_deadline_protocol(seconds: float) -> type[HeadDeadlineProtocol]:
    """The protocol class for uvicorn.Config(http=...), with this head deadline."""
    return type("HeadDeadlineProtocol", (HeadDeadlineProtocol,), {"header_timeout": seconds})
