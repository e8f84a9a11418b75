"""The gateway's one ROUTER socket: sends to workers, routes what they send back.

Replies that carry a request id go to that request's stream (an asyncio queue the route reads);
everything else (hello, ready, heartbeats) goes to the supervisor as an event. Frames from a
routing id we did not spawn, and frames that do not decode, are logged and dropped. A ``Hello``
of another protocol version reaches the supervisor as that worker's ``LoadFailed`` (naming both
versions), and nothing more from it is read.

Flow control: a request is paused in its worker while either of two holds. Its stream fell
``high`` messages behind (the HTTP client stopped reading, so the route stopped pulling): the
stream pauses it itself, at once, and lets it go once the backlog is down to a quarter of that.
Or the supervisor parked it (``hold``): its client is behind while other requests wait for its
slot (``supervisor/flow.py``). ``Pause`` goes to the worker when the first starts, ``Resume``
when the last ends. Messages already on their way when the pause lands still queue, up to
``4 * high``; past that the request is cancelled and the stream ends with an error, so one
stream's memory is bounded whatever the worker does. The socket has high-water marks as the
last backstop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import msgspec
import zmq
import zmq.asyncio

from mlx_supervisor.shared import protocol as p

log = logging.getLogger("mlx_supervisor.transport")

ControlHandler = Callable[[str, p.FromWorker], None]
_TERMINAL = (p.Done, p.Error, p.Embeddings)
RECV_BURST = 256  # messages taken per turn of the event loop
STREAM_BUFFER = 64  # messages a stream may fall behind before its request is paused
HWM = 10_000  # ZeroMQ high-water marks (messages), a backstop behind the per-stream limits


class RequestStream:
    """What one request gets back from its worker, in order, ending with a terminal message."""

    def __init__(self, request_id: str, worker_id: str, send: Callable[[str, p.Base], bool] | None = None,
                 high: int = STREAM_BUFFER):
        self.request_id = request_id
        self.worker_id = worker_id
        self.queue: asyncio.Queue[p.FromWorker] = asyncio.Queue()
        self.finished = False
        self.backlog = False  # it fell ``high`` behind: paused by the stream itself
        self.held = False  # parked by the supervisor (its client is behind while others wait)
        self.overflowed = False
        self.pauses = 0
        self._send = send
        self.high = max(1, high)
        self.on_flow: Callable[[bool], None] | None = None  # told of backlog: True, then False
        self.cut: Callable[[], bool] = lambda: False  # the client was cut off: never Resume

    @property
    def paused(self) -> bool:
        return self.backlog or self.held

    def hold(self, held: bool) -> None:
        """The supervisor parks the request (True) or lets it run again (False)."""
        was, self.held = self.paused, held
        self._flow(was)

    def _flow(self, was: bool) -> None:
        if self._send is None or was == self.paused:
            return
        if self.paused:
            self.pauses += 1
            self._send(self.worker_id, p.Pause(id=self.request_id))
        elif not self.cut():  # a cut request drains to its Cancel, still paused
            self._send(self.worker_id, p.Resume(id=self.request_id))

    def put(self, msg: p.FromWorker) -> None:
        """From the receive loop: queue, pausing the request when the reader falls behind."""
        if self.overflowed:
            return
        n = self.queue.qsize()
        if n >= 4 * self.high and not isinstance(msg, _TERMINAL):
            self.overflowed = True
            if self._send is not None:
                self._send(self.worker_id, p.Cancel(id=self.request_id))
            msg = p.Error(id=self.request_id, status=503, code="slow_consumer",
                          message=f"the client fell {n} messages behind and the request was cancelled")
        elif n + 1 >= self.high and not self.backlog and self._send is not None:
            was, self.backlog = self.paused, True
            self._flow(was)
            if self.on_flow is not None:
                self.on_flow(True)
        self.queue.put_nowait(msg)

    async def __aiter__(self) -> AsyncIterator[p.FromWorker]:
        while not self.finished:
            msg = await self.queue.get()
            if isinstance(msg, _TERMINAL):
                self.finished = True
            elif self.backlog and self.queue.qsize() <= self.high // 4:
                was, self.backlog = self.paused, False
                self._flow(was)
                if self.on_flow is not None:
                    self.on_flow(False)
            yield msg


class Transport:
    def __init__(self, endpoint: str, on_control: ControlHandler, stream_buffer: int = STREAM_BUFFER):
        self.endpoint = endpoint
        self.stream_buffer = stream_buffer
        self._on_control = on_control
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SNDHWM, HWM)
        self._sock.setsockopt(zmq.RCVHWM, HWM)
        self._sock.bind(endpoint)
        self._known: set[bytes] = set()
        self._streams: dict[str, RequestStream] = {}
        self._task: asyncio.Task[None] | None = None
        self.dropped = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._recv_loop(), name="transport-recv")

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._sock.close(0)
        self._ctx.term()

    def allow(self, worker_id: str) -> None:
        self._known.add(worker_id.encode())

    def forget(self, worker_id: str) -> None:
        self._known.discard(worker_id.encode())

    def open_stream(self, request_id: str, worker_id: str) -> RequestStream:
        s = RequestStream(request_id, worker_id, self.send, self.stream_buffer)
        self._streams[request_id] = s
        return s

    def hold(self, request_id: str, held: bool) -> None:
        """Pause (True) or let go (False) one request on the supervisor's word (a park)."""
        s = self._streams.get(request_id)
        if s is not None and not s.finished:
            s.hold(held)

    def close_stream(self, request_id: str) -> None:
        self._streams.pop(request_id, None)

    def fail_worker(self, worker_id: str, message: str, code: str = "worker_crashed") -> int:
        """End every open stream of a worker with an error; returns how many."""
        n = 0
        for s in list(self._streams.values()):
            if s.worker_id == worker_id and not s.finished:
                s.overflowed = False  # an end always gets through
                s.put(p.Error(id=s.request_id, message=message, status=503, code=code))
                n += 1
        return n

    def fail_request(self, request_id: str, message: str, code: str, status: int = 503) -> bool:
        s = self._streams.get(request_id)
        if s is None or s.finished:
            return False
        s.overflowed = False
        s.put(p.Error(id=request_id, message=message, status=status, code=code))
        return True

    def streams_of(self, worker_id: str) -> list[str]:
        return [r for r, s in self._streams.items() if s.worker_id == worker_id and not s.finished]

    def send(self, worker_id: str, msg: p.Base) -> bool:
        """Queue a message to a worker; False if the worker is not connected."""
        # An asyncio socket reports a failed non-blocking send (ROUTER_MANDATORY: peer gone) on
        # the returned future, not by raising; unread, it also logs "exception never retrieved".
        try:
            fut = cast("asyncio.Future[Any]", self._sock.send_multipart(
                [worker_id.encode(), p.encode(msg)], flags=zmq.NOBLOCK))
            e = fut.exception() if fut.done() else None
        except zmq.ZMQError as exc:
            e = exc
        if e is not None:
            log.debug("send to %s failed: %s", worker_id, e)
            return False
        return True

    async def _recv_loop(self) -> None:
        # A plain (synchronous) view of the same socket, for draining without the asyncio
        # machinery; used only from this task, so the socket still has one user at a time.
        sync: zmq.Socket[bytes] = zmq.Socket.shadow(self._sock.underlying)
        while True:
            try:
                self._dispatch_safely(await self._sock.recv_multipart())
                # Take what else has already arrived in one bounded burst (each asyncio receive
                # costs tens of microseconds), then yield: an awaited receive that finds a message
                # ready never yields, so a fast worker would otherwise starve the SSE routes.
                for _ in range(RECV_BURST):
                    try:
                        frames = sync.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._dispatch_safely(frames)
            except zmq.ZMQError as e:  # pragma: no cover - socket closed under us
                log.error("transport receive failed: %s", e)
                return
            await asyncio.sleep(0)

    def _dispatch_safely(self, frames: list[bytes]) -> None:
        try:
            self._dispatch(frames)
        except Exception:  # never let one bad frame kill the loop
            log.exception("error handling a worker frame")

    def _dispatch(self, frames: list[bytes]) -> None:
        if len(frames) != 2:
            self.dropped += 1
            log.warning("dropped a frame with %d parts", len(frames))
            return
        wid, payload = frames
        if wid.endswith(p.DATA_SUFFIX):  # the worker's MLX-thread socket: same worker
            wid = wid[: -len(p.DATA_SUFFIX)]
        if wid not in self._known:
            self.dropped += 1
            log.warning("dropped a message from unknown routing id %r", wid[:64])
            return
        try:
            msg = p.decode_from_worker(payload)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            self.dropped += 1
            log.warning("dropped an undecodable message from %s: %s", wid.decode(errors="replace"), e)
            return
        if isinstance(msg, p.Hello) and msg.protocol != p.PROTOCOL_VERSION:
            self._known.discard(wid)  # its later frames would be misread: drop them
            msg = p.LoadFailed(reason=f"worker speaks protocol version {msg.protocol}, this "
                               f"gateway speaks version {p.PROTOCOL_VERSION} (mixed installs?)")
            log.error("worker %s: %s", wid.decode(errors="replace"), msg.reason)
        rid = getattr(msg, "id", None)
        if rid is not None:
            stream = self._streams.get(rid)
            if stream is not None and stream.worker_id == wid.decode():
                stream.put(msg)
            return
        self._on_control(wid.decode(), msg)
