"""The gateway's bus (an observer that raises is logged, the rest still run; one bus per gateway)
and the transport's protocol-version check, on a real ROUTER socket with a DEALER posing as a
worker of another version."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import msgspec
import pytest
import zmq
import zmq.asyncio

from mlx_supervisor.gateway.api.gateway import Gateway
from mlx_supervisor.gateway.api.run import Outcome, RequestEvent
from mlx_supervisor.gateway.bus import Bus
from mlx_supervisor.gateway.supervisor import events as ev
from mlx_supervisor.gateway.supervisor.transport import Transport
from mlx_supervisor.shared import protocol as p
from mlx_supervisor.shared.config import Config


def test_an_observer_that_raises_is_logged_and_the_others_still_hear(
        caplog: pytest.LogCaptureFixture) -> None:
    bus, heard = Bus(), []

    def broken(e: ev.SupervisorEvent) -> None:
        raise RuntimeError("observer bug")

    bus.subscribe(ev.SupervisorEvent, broken)
    bus.subscribe(ev.Spawning, heard.append)
    bus.subscribe(RequestEvent, lambda e: heard.append(e))
    bus.publish(ev.Spawning(model="m"))
    assert heard == [ev.Spawning(model="m")]
    assert "observer" in caplog.text and "broken" in caplog.text and "observer bug" in caplog.text
    assert "Spawning" in caplog.text


async def test_two_gateways_in_one_process_hear_only_their_own_events(tmp_path: Path) -> None:
    gws = [Gateway.build(Config(), {}, {}, 10**9, f"ipc://{tmp_path}/g{i}.sock")
           for i in range(2)]
    try:
        heard: list[list[msgspec.Struct]] = [[], []]
        for gw, got in zip(gws, heard, strict=True):
            gw.bus.subscribe(msgspec.Struct, got.append)
        gws[0].observe("queued", Outcome(request_id="r", model="m", route="chat"))
        gws[0].sup.fx.emit(ev.Evicted(model="m", pid=1, reason="x"))
        assert [type(e) for e in heard[0]] == [RequestEvent, ev.Evicted] and heard[1] == []
    finally:
        for gw in gws:
            await gw.sup.transport.close()


async def test_a_hello_of_another_protocol_version_is_a_load_failure_naming_both(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, "mlx_supervisor.transport")
    got: asyncio.Queue[tuple[str, p.FromWorker]] = asyncio.Queue()
    endpoint = f"ipc://{tmp_path}/gw.sock"
    t = Transport(endpoint, lambda wid, msg: got.put_nowait((wid, msg)))
    t.allow("m#1")
    t.allow("m#2")
    t.start()
    ctx = zmq.asyncio.Context()
    socks = []
    try:
        for wid, version in (("m#1", p.PROTOCOL_VERSION + 1), ("m#2", p.PROTOCOL_VERSION)):
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.IDENTITY, wid.encode())
            s.connect(endpoint)
            socks.append(s)
            await s.send(p.encode(p.Hello(pid=7, protocol=version)))
        seen = dict([await asyncio.wait_for(got.get(), 10) for _ in range(2)])
        failed = seen["m#1"]
        assert isinstance(failed, p.LoadFailed), failed
        assert f"version {p.PROTOCOL_VERSION + 1}" in failed.reason
        assert f"version {p.PROTOCOL_VERSION}" in failed.reason
        assert seen["m#2"] == p.Hello(pid=7, protocol=p.PROTOCOL_VERSION)
        # Whatever else the mismatched worker sends is dropped, not misread.
        await socks[0].send(p.encode(p.Heartbeat(memory=p.Memory(1, 0, 0, 0))))
        await socks[1].send(p.encode(p.Heartbeat(memory=p.Memory(1, 0, 0, 0))))
        wid, msg = await asyncio.wait_for(got.get(), 10)
        assert wid == "m#2" and isinstance(msg, p.Heartbeat) and got.empty()
        assert "protocol version" in caplog.text
    finally:
        for s in socks:
            s.close()
        ctx.term()
        await t.close()


def test_a_worker_from_before_versions_reads_as_version_0() -> None:
    old = msgspec.msgpack.encode({"t": "hello", "pid": 3})
    assert p.decode_from_worker(old) == p.Hello(pid=3, protocol=0)
