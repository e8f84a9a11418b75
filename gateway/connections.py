"""Connection limits for uvicorn's httptools protocol: time limits, a header-size cap, a
connection cap, and the write timeout that cuts off a client that stopped reading.

uvicorn times out only the gap between requests on a kept-alive connection: a connection that
never sends a byte, a head sent one byte at a time, or a chunked body that never ends would stay
open forever, and enough of them exhaust the file descriptors so that ``/health`` fails too.
Each connection here moves through phases, each with its own clock:

- ``head`` (from accept, or the first byte after a response): ``header_timeout``, and at most
  ``max_header_bytes`` of request line and headers (431 past it);
- ``body`` (head parsed, body not finished): ``body_timeout`` (408);
- ``app`` (the route runs): no read clock; but while the client takes no more bytes (the
  kernel refused a write, so the transport paused writing), ``write_timeout`` runs, and past it
  the connection is aborted and the request marked ``write_timeout`` (a streaming route then
  cancels its generation). The same pause tells the running request its client is behind, so
  it may lend its concurrency slot to a waiting one (``supervisor/flow.py``);
- ``idle`` (between requests): uvicorn's ``timeout_keep_alive``.

At most ``max_connections`` are open: a new one past the cap closes the oldest connection that
is idle or still sending its head (those are the cheap ones an attacker holds); if every
connection is busy with a request, the new one gets 503 at once.
"""

from __future__ import annotations

import contextlib
import logging
import resource
import socket
import sys
from dataclasses import dataclass, field
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("mlx_supervisor.connections")
FD_RESERVE = 48  # descriptors kept for everything but client connections (logs, ledger, zmq)
FD_PER_MODEL = 4  # a worker's ipc connections and its stderr pipe, in the gateway
# How much a client that stopped reading may have queued unsent before we see it. With
# TCP_NOTSENT_LOWAT the kernel takes no more once this many bytes wait unsent, while the bytes in
# flight (the congestion window) still autotune, so a long, fast link streams at full speed.
# The event loop's own buffer above it is 0: the first write the kernel refuses pauses writing
# (``pause_writing``), which starts the write clock and tells the route its client is behind.
# So a stalled client is seen after about this plus its receive window (about 20 KB: one second
# of a 100 tokens/s stream), not after 160 KB of fixed send buffer. Where the option is missing,
# the send buffer is fixed instead (64 KiB; the kernel doubles it).
NOTSENT_LOWAT = 16 * 1024
TCP_NOTSENT_LOWAT: int | None = getattr(socket, "TCP_NOTSENT_LOWAT",
                                        {"linux": 25, "darwin": 0x201}.get(sys.platform))
SEND_BUFFER = 64 * 1024
WRITE_BUFFER = 0


@dataclass
class Limits:
    header_timeout: float = 10.0
    body_timeout: float = 60.0
    write_timeout: float = 30.0
    max_header_bytes: int = 32 * 1024
    max_connections: int = 1000
    conns: dict[GuardedProtocol, None] = field(default_factory=dict)  # oldest first
    evicted: int = 0
    refused: int = 0
    timed_out: int = 0

    def status(self) -> dict[str, Any]:
        """For /health and /metrics: open connections against the cap, and what was closed."""
        return {"status": "ok", "open": len(self.conns), "max": self.max_connections,
                "closed_idle_for_room": self.evicted, "refused": self.refused,
                "timed_out": self.timed_out}


def raise_fd_limit() -> tuple[int, int]:
    """Raise the soft open-files limit to the hard one (launchd and systemd often start us with
    256 or 1024 of a much higher hard limit); returns (soft, hard) after, and logs both."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if want > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError) as e:  # macOS refuses more than kern.maxfilesperproc
            log.warning("could not raise the open-files limit from %d to %d: %s", soft, want, e)
    log.info("open-files limit: soft %d, hard %s", soft, "unlimited" if hard == resource.RLIM_INFINITY
             else hard)
    return soft, hard


def connection_cap(wanted: int, fd_soft: int, models: int) -> int:
    """``max_connections``, lowered so that the descriptors the gateway needs itself are left."""
    room = fd_soft - FD_RESERVE - FD_PER_MODEL * models
    return min(wanted, max(8, room))


def limit_unsent(sock: Any) -> str | None:
    """Bound what a client socket holds unsent (``NOTSENT_LOWAT``, else a fixed send buffer);
    returns which was set (None: neither, e.g. a Unix socket)."""
    if sock is None:
        return None
    if TCP_NOTSENT_LOWAT is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT, NOTSENT_LOWAT)
            return "notsent_lowat"
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        return "sndbuf"
    return None


def protocol_class(limits: Limits) -> type[HttpToolsProtocol]:
    """The httptools protocol with these limits (uvicorn instantiates one per connection)."""
    return type("GuardedProtocol", (GuardedProtocol,), {"limits": limits})


_RESPONSES = {
    408: b"request timed out",
    431: b"request headers too large",
    503: b"too many open connections",
}


class GuardedProtocol(HttpToolsProtocol):
    limits: Limits

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._phase = "head"
        self._head_bytes = 0
        self._too_large = False
        self._head_size = 0
        self._timer: Any = None
        self._write_timer: Any = None

    # ------------------------------------------------------------ connection life

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        limit_unsent(transport.get_extra_info("socket"))
        with contextlib.suppress(AttributeError, NotImplementedError):
            transport.set_write_buffer_limits(high=WRITE_BUFFER, low=0)
        lim = self.limits
        if len(lim.conns) >= lim.max_connections and not self._evict_one():
            lim.refused += 1
            self._reply_and_close(503)
            return
        lim.conns[self] = None
        self._arm(lim.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self.limits.conns.pop(self, None)
        self._disarm()
        self._cancel_write_timer()
        super().connection_lost(exc)

    def _evict_one(self) -> bool:
        for conn in self.limits.conns:
            if conn._phase in ("head", "idle"):
                self.limits.evicted += 1
                self.limits.conns.pop(conn, None)
                conn.transport.close()
                return True
        return False

    # ------------------------------------------------------------ phases and their clocks

    def _arm(self, seconds: float) -> None:
        self._disarm()
        if seconds > 0:
            self._timer = self.loop.call_later(seconds, self._expired)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self) -> None:
        self._timer = None
        if self.transport.is_closing() or self._phase not in ("head", "body"):
            return
        self.limits.timed_out += 1
        started = self.cycle is not None and self.cycle.response_started and self._phase == "body"
        if started or (self._phase == "head" and self._head_bytes == 0):
            self.transport.close()  # nothing was asked, or an answer is already under way
        else:
            self._reply_and_close(408)

    def data_received(self, data: bytes) -> None:
        if self._phase == "idle":
            self._phase, self._head_bytes = "head", 0
            self._arm(self.limits.header_timeout)
        if self._phase == "head":
            self._head_bytes += len(data)
        super().data_received(data)

    def on_message_begin(self) -> None:
        self._too_large = False
        self._head_size = 0
        super().on_message_begin()

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
        super().on_header(name, value)

    def _count(self, n: int) -> None:
        self._head_size += n
        if self._head_size > self.limits.max_header_bytes:
            self._too_large = True
            raise ValueError("request head too large")  # stops the parser: answered with 431

    def send_400_response(self, msg: str) -> None:
        if self._too_large:
            self._reply_and_close(431)
        else:
            super().send_400_response(msg)

    def on_headers_complete(self) -> None:
        self._phase = "body"
        self._arm(self.limits.body_timeout)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._phase = "app"
        self._disarm()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        self._cancel_write_timer()
        if self._phase == "app":
            self._phase = "idle"
        super().on_response_complete()

    # ------------------------------------------------------------ a client that stops reading

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._write_timer is None and self.limits.write_timeout > 0:
            self._write_timer = self.loop.call_later(self.limits.write_timeout, self._write_stalled)
        self._behind(True)

    def resume_writing(self) -> None:
        self._cancel_write_timer()
        super().resume_writing()
        self._behind(False)

    def _behind(self, behind: bool) -> None:
        """Tell the running request (``Run`` put its callback in the request's state) that its
        client stopped taking bytes, or took them all: the supervisor may park it (flow.py)."""
        if self.scope is None or self.cycle is None or self.cycle.response_complete:
            return
        state = self.scope.get("state")
        if isinstance(state, dict):
            state["behind"] = behind
            tell = state.get("on_behind")
            if callable(tell):
                tell(behind)

    def _cancel_write_timer(self) -> None:
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def _write_stalled(self) -> None:
        """The client has not taken a byte for ``write_timeout``: say why on the request (the
        route records it), then abort, which the route sees as a disconnect."""
        self._write_timer = None
        self.limits.timed_out += 1
        if self.scope is not None:
            self.scope["state"]["cut"] = (f"write_timeout: the client read nothing for "
                                          f"{self.limits.write_timeout:g}s")
        log.warning("%s: client stopped reading for %gs; closing the connection",
                    self.scope.get("path") if self.scope else "-", self.limits.write_timeout)
        self.transport.abort()

    def _reply_and_close(self, status: int) -> None:
        body = _RESPONSES[status]
        head = STATUS[status] + (b"content-type: text/plain; charset=utf-8\r\nconnection: close\r\n"
                                 b"content-length: " + str(len(body)).encode() + b"\r\n\r\n")
        if not self.transport.is_closing():
            self.transport.write(head + body)
            self.transport.close()


STATUS = {408: b"HTTP/1.1 408 Request Timeout\r\n", 431: b"HTTP/1.1 431 Request Header Fields Too Large\r\n",
          503: b"HTTP/1.1 503 Service Unavailable\r\n"}
