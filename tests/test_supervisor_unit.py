"""The supervisor's handlers driven in-process and synchronously, with a fake ``Effects`` and a
fake clock (as llama-swap's fifo_test.go drives its scheduler): no process, no socket, no task.
Each test plays the events a real run would post (Spawned, Hello, Ready, Exited, Tick) and
checks what the handlers decided and which effects they asked for."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from mlx_supervisor.gateway.catalog import Entry
from mlx_supervisor.gateway.errors import APIError
from mlx_supervisor.gateway.supervisor import events as ev
from mlx_supervisor.gateway.supervisor import timers
from mlx_supervisor.gateway.supervisor.core import Core
from mlx_supervisor.gateway.supervisor.handlers import dispatch
from mlx_supervisor.gateway.supervisor.model import (
    Acquire,
    Control,
    Exited,
    Lease,
    Park,
    ReloadCmd,
    ShutdownCmd,
    Spawned,
    Tick,
    UnloadCmd,
    Waiter,
    Worker,
)
from mlx_supervisor.gateway.supervisor.states import SlotState, State
from mlx_supervisor.shared import protocol as p
from mlx_supervisor.shared.config import Config

MB = 2**20


@dataclass
class FakeProc:
    pid: int
    exited: bool = False
    stderr_tail: collections.deque[str] = field(default_factory=collections.deque)


class FakeEffects:
    """Records every effect asked for; the test posts what a real one would bring back."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.sent: list[tuple[str, p.ToWorker]] = []
        self.emitted: list[ev.SupervisorEvent] = []
        self.posted: list[Any] = []
        self.held: list[tuple[str, bool]] = []

    def spawn(self, worker: Worker, entry: Entry | None) -> None:
        self.calls.append(("spawn", worker.worker_id))

    def stop(self, worker: Worker) -> None:
        self.calls.append(("stop", worker.worker_id))

    def kill(self, worker: Worker) -> None:
        self.calls.append(("kill", worker.worker_id))

    def send(self, worker_id: str, msg: p.ToWorker) -> bool:
        self.sent.append((worker_id, msg))
        return True

    def allow(self, worker_id: str) -> None:
        self.calls.append(("allow", worker_id))

    def forget(self, worker_id: str) -> None:
        self.calls.append(("forget", worker_id))

    def fail_streams(self, worker_id: str, message: str, code: str = "worker_crashed") -> int:
        self.calls.append(("fail_streams", worker_id))
        return 0

    def fail_request(self, request_id: str, message: str, code: str, status: int) -> bool:
        return False

    def hold(self, request_id: str, held: bool) -> None:
        self.held.append((request_id, held))

    def streams_of(self, worker_id: str) -> list[str]:
        return []

    def emit(self, e: ev.SupervisorEvent) -> None:
        self.emitted.append(e)

    def post(self, e: Any) -> None:
        self.posted.append(e)

    def did(self, what: str) -> list[str]:
        return [wid for kind, wid in self.calls if kind == what]

    def kinds(self) -> list[str]:
        return [e.kind for e in self.emitted if not isinstance(e, ev.Transitioned)]


def entry(mid: str, estimate: int = 100 * MB, **kw: Any) -> Entry:
    base: dict[str, Any] = dict(path=f"/m/{mid}", kind="lm", pinned=False, ttl=0.0, aliases=[],
                                max_concurrency=1, max_queue=4, estimate=estimate, context_length=0)
    return Entry(id=mid, **{**base, **kw})


class Sim:
    def __init__(self, *entries: Entry, budget: int = 1000 * MB, **cfg: Any):
        self.loop = asyncio.new_event_loop()
        self.t = 1000.0
        self.fx = FakeEffects()
        self.pids = iter(range(100, 10**6))
        self.waiters: dict[str, list[Waiter]] = {}
        config = Config(**{"warm_spare": False, "recycle_workers": 0, **cfg})
        self.core = Core.build(config, {e.id: e for e in entries}, {}, budget, self.fx,
                               clock=lambda: self.t)

    def close(self) -> None:
        self.loop.close()

    def send(self, e: object) -> None:
        dispatch(self.core, e)
        self.flush()

    def flush(self) -> None:
        while self.fx.posted:  # what a release posts comes back through the loop, in order
            dispatch(self.core, self.fx.posted.pop(0))

    def release(self, lease: Lease) -> None:
        lease.release()
        self.flush()

    def future(self) -> asyncio.Future[Any]:
        return self.loop.create_future()

    def acquire(self, model: str, rid: str = "r") -> Waiter:
        w = Waiter(self.future(), rid)
        self.waiters.setdefault(model, []).append(w)
        self.send(Acquire(model, w))
        return w

    def lease(self, model: str) -> Lease:
        """The lease of the latest request granted for ``model``."""
        for w in reversed(self.waiters[model]):
            if w.fut.done() and not w.fut.cancelled() and w.fut.exception() is None:
                lease: Lease = w.fut.result()
                return lease
        raise AssertionError(f"no lease for {model}")

    def worker(self, model: str) -> Worker:
        w = self.core.slots[model].worker
        assert w is not None, f"{model} has no worker"
        return w

    def boot(self, model: str, footprint: int | None = None) -> Worker:
        """Play a spawned worker's first messages: it connects and loads."""
        w = self.worker(model)
        self.send(Spawned(w, FakeProc(next(self.pids))))
        self.send(Control(w.worker_id, p.Hello(pid=w.pid or 0, protocol=p.PROTOCOL_VERSION)))
        mem = p.Memory(active=footprint or w.estimate, cache=0, peak=0, rss=0)
        self.send(Control(w.worker_id, p.Ready(pid=w.pid or 0, kind="lm", load_seconds=0.1,
                                               memory=mem)))
        return w

    def exit(self, w: Worker, rc: int = 0) -> None:
        self.send(Exited(w, rc))

    def tick(self, dt: float) -> None:
        self.t += dt
        self.send(Tick())

    def use(self, model: str, rid: str = "u") -> None:
        """One whole request: granted, then released."""
        self.release(self.acquire(model, rid).fut.result())


@pytest.fixture
def make() -> Iterator[Any]:
    sims: list[Sim] = []

    def _make(*entries: Entry, **kw: Any) -> Sim:
        sims.append(Sim(*entries, **kw))
        return sims[-1]

    yield _make
    for s in sims:
        s.close()


def lease_of(w: Waiter) -> Lease:
    assert w.fut.done() and w.fut.exception() is None, w.fut
    lease = w.fut.result()
    assert isinstance(lease, Lease)
    return lease


def error_of(w: Waiter) -> APIError:
    assert w.fut.done()
    e = w.fut.exception()
    assert isinstance(e, APIError), e
    return e


# ---------------------------------------------------------------- the loop itself


def test_an_event_without_a_handler_is_logged_and_the_next_one_still_runs(
        make: Any, caplog: pytest.LogCaptureFixture) -> None:
    sim = make(entry("a"))
    sim.send(object())
    assert "no handler for event object" in caplog.text
    w = sim.acquire("a")  # the loop goes on
    assert sim.fx.did("spawn") == ["a#1"] and not w.fut.done()


# ---------------------------------------------------------------- admission


def test_admission_grants_queues_refuses_and_pumps(make: Any) -> None:
    sim = make(entry("a", max_concurrency=1, max_queue=1))
    first = sim.acquire("a", "r1")
    assert sim.fx.did("spawn") == ["a#1"] and not first.fut.done()
    assert sim.core.slots["a"].worker is not None
    assert sim.core.slots["a"].worker.state is State.STARTING
    sim.boot("a")
    lease = lease_of(first)
    assert sim.worker("a").inflight == 1
    second = sim.acquire("a", "r2")  # at max_concurrency: queued
    assert not second.fut.done()
    third = sim.acquire("a", "r3")  # queue full
    assert error_of(third).status == 429 and error_of(third).code == "queue_full"
    sim.release(lease)
    assert lease_of(second).request_id == "r2" and sim.worker("a").inflight == 1
    assert sim.fx.did("spawn") == ["a#1"]  # one process for all of it
    assert sim.fx.kinds() == ["queued", "spawning", "ready", "granted", "queued", "granted"]


def test_a_model_larger_than_the_budget_is_refused_naming_both(make: Any) -> None:
    sim = make(entry("big", estimate=2000 * MB), budget=1000 * MB)
    e = error_of(sim.acquire("big"))
    assert e.status == 503 and "more than the whole memory budget" in e.message
    assert not sim.fx.did("spawn") and sim.core.slots["big"].state is SlotState.COLD


# ---------------------------------------------------------------- eviction


def test_eviction_takes_the_least_recently_used_and_waits_for_its_reap(make: Any) -> None:
    sim = make(entry("a", 400 * MB), entry("b", 400 * MB), entry("c", 400 * MB), budget=1000 * MB)
    for m in ("a", "b"):
        sim.acquire(m)
        sim.boot(m)
        sim.release(sim.lease(m))
        sim.t += 1
    sim.use("a")  # a is now the most recent: b goes first
    sim.t += 1
    c = sim.acquire("c")
    b = sim.worker("b")
    assert b.state is State.STOPPING and sim.fx.did("stop") == [b.worker_id]
    assert sim.core.slots["c"].state is SlotState.PENDING and sim.core.slots["c"].worker is None
    assert "c#3" not in sim.fx.did("spawn")  # the ledger may not go over budget meanwhile
    sim.exit(b)
    assert b.state is State.STOPPED and sim.core.slots["b"].worker is None
    assert sim.fx.did("spawn")[-1] == "c#3" and sim.core.slots["c"].state is SlotState.COLD
    sim.boot("c")
    assert lease_of(c).model_id == "c"
    assert [e.model for e in sim.fx.emitted if isinstance(e, ev.Evicted)] == ["b"]


def test_pinned_and_busy_models_are_never_evicted(make: Any) -> None:
    """A busy holder keeps its memory for its turn (``turn_seconds``), then yields it between
    requests; the pinned one never does; a need that can never fit is refused at once."""
    sim = make(entry("pin", 500 * MB, pinned=True), entry("busy", 400 * MB),
               entry("c", 400 * MB), entry("never", 600 * MB), budget=1000 * MB, turn_seconds=10.0,
               heartbeat_timeout=1000.0)
    sim.core.slots["pin"].pinned = True
    for m in ("pin", "busy"):
        sim.acquire(m)
        sim.boot(m)
    # "busy" still holds the lease of its first request.
    e = error_of(sim.acquire("never"))
    assert e.status == 503 and "not enough memory" in e.message and "(pinned)" in e.message
    assert "pinned models leave too little" in e.message
    c = sim.acquire("c")
    assert not c.fut.done() and sim.core.slots["c"].state is SlotState.WAITING
    sim.tick(5.0)
    assert not sim.fx.did("stop") and sim.worker("busy").state is State.READY  # its turn runs
    sim.tick(5.1)
    busy = sim.worker("busy")
    assert busy.state is State.DRAINING and not sim.fx.did("stop")  # its request finishes first
    sim.release(sim.lease("busy"))
    assert sim.fx.did("stop") == [busy.worker_id]
    sim.exit(busy)
    assert sim.worker("pin").state is State.READY
    sim.boot("c")
    assert lease_of(c).model_id == "c"


def test_under_thrash_busy_models_take_turns(make: Any) -> None:
    """Three models, room for two, every one always busy: the memory rotates, each waiting model
    gets its turn in order (never-served first, then the least recently served)."""
    sim = make(*(entry(m, 400 * MB, max_concurrency=1, max_queue=8) for m in "abc"),
               budget=900 * MB, turn_seconds=5.0, heartbeat_timeout=1000.0)
    served: list[str] = []

    def busy(m: str) -> None:  # a new request the moment one finishes: never idle
        sim.acquire(m, f"{m}{len(served)}")

    for m in "ab":
        busy(m)
        sim.boot(m)
        served.append(m)
    busy("c")
    assert sim.core.slots["c"].state is SlotState.WAITING
    for _ in range(60):  # one second per step, each hot model finishing a request per step
        sim.tick(1.0)
        for m in "abc":
            w = sim.core.slots[m].worker
            if w is None:
                continue
            if w.state is State.STARTING:
                sim.boot(m)
                served.append(m)
            elif w.inflight and w.state in (State.READY, State.DRAINING):
                busy(m)  # queued behind the one in flight (or for the next turn)
                sim.release(sim.lease(m))
            if w.state is State.STOPPING:
                sim.exit(w)
    assert served[:5] == ["a", "b", "c", "a", "b"], served
    assert min(served.count(m) for m in "abc") >= 3, served


# ---------------------------------------------------------------- ttl and timers


def test_ttl_drains_an_idle_worker_after_exactly_its_ttl(make: Any) -> None:
    sim = make(entry("a", ttl=5.0), heartbeat_interval=1.0, heartbeat_timeout=100.0)
    sim.acquire("a")
    sim.boot("a")
    sim.release(sim.lease("a"))
    sim.tick(4.9)
    assert sim.worker("a").state is State.READY and not sim.fx.did("stop")
    sim.tick(0.2)
    w = sim.worker("a")
    assert w.state is State.STOPPING and sim.fx.did("stop") == [w.worker_id]
    assert "ttl" in sim.fx.kinds()
    sim.exit(w)
    assert sim.core.slots["a"].worker is None and not sim.core.workers


def test_timers_are_a_pure_function_of_state_and_time(make: Any) -> None:
    sim = make(entry("a"), heartbeat_interval=1.0, heartbeat_timeout=3.0)
    sim.acquire("a")
    w = sim.boot("a")
    sim.core.last_ping = sim.t
    assert timers.due(sim.core, sim.t + 0.5) == []
    acts = timers.due(sim.core, sim.t + 3.5)
    assert acts[0] == timers.Kill(w.worker_id, "missed heartbeats for 3.5s (hung?)")
    assert timers.Ping() in acts
    assert w.state is State.READY and not sim.fx.did("kill")  # deciding changed nothing
    sim.tick(3.5)
    assert w.state is State.KILLING and sim.fx.did("kill") == [w.worker_id]
    sim.tick(0.2)
    assert sim.fx.did("kill") == [w.worker_id]  # killed once, not on every tick


# ---------------------------------------------------------------- crashes


def test_crashes_back_off_then_mark_the_model_failed_until_the_backoff_ends(make: Any) -> None:
    sim = make(entry("a"), max_crashes=3, crash_window=60.0)
    waiter = sim.acquire("a")
    sim.boot("a")
    lease_of(waiter)
    sim.exit(sim.worker("a"), -9)  # 1st crash: nothing waits, so nothing respawns
    assert sim.core.slots["a"].worker is None and sim.core.slots["a"].last_error
    assert "killed by SIGKILL" in (sim.core.slots["a"].last_error or "")
    w2 = sim.acquire("a", "r2")
    sim.boot("a")
    lease_of(w2)
    sim.exit(sim.worker("a"), 1)  # 2nd crash: the next spawn waits 0.5 s
    w3 = sim.acquire("a", "r3")
    slot = sim.core.slots["a"]
    assert slot.state is SlotState.BACKING_OFF and slot.worker is None
    spawns = len(sim.fx.did("spawn"))
    sim.tick(0.2)
    assert len(sim.fx.did("spawn")) == spawns
    sim.tick(0.4)
    assert len(sim.fx.did("spawn")) == spawns + 1 and slot.state is SlotState.COLD
    sim.boot("a")
    lease_of(w3)
    sim.exit(sim.worker("a"), 1)  # 3rd crash within the window: failed for 5 s
    assert slot.state is SlotState.FAILED
    e = error_of(sim.acquire("a", "r4"))
    assert e.status == 503 and e.code == "model_failed" and "exited with code 1" in e.message
    sim.t += 5.1  # the backoff is over; a request before the next tick is admitted at once
    sim.acquire("a", "r5")
    assert len(sim.fx.did("spawn")) == spawns + 2 and slot.state is SlotState.COLD


def test_a_worker_that_dies_while_loading_fails_its_waiters_with_the_reason(make: Any) -> None:
    sim = make(entry("a"))
    waiter = sim.acquire("a")
    w = sim.worker("a")
    sim.send(Spawned(w, FakeProc(7, stderr_tail=collections.deque(["ImportError: no mlx"]))))
    sim.exit(w, 1)
    e = error_of(waiter)
    assert "failed to load" in e.message and "ImportError: no mlx" in e.message


# ---------------------------------------------------------------- reload, unload, shutdown


def test_load_failed_after_a_reload_removed_the_model_is_a_crash_not_a_keyerror(
        make: Any, caplog: pytest.LogCaptureFixture) -> None:
    sim = make(entry("a"), entry("b"))
    waiter = sim.acquire("a")
    w = sim.worker("a")
    sim.send(Spawned(w, FakeProc(9)))
    sim.send(Control(w.worker_id, p.Hello(pid=9, protocol=p.PROTOCOL_VERSION)))
    sim.send(ReloadCmd({"b": entry("b")}, {}, sim.core.budget, 0, sim.future()))
    assert error_of(waiter).status == 404 and "a" not in sim.core.slots
    assert w.state is State.STOPPING
    sim.send(Control(w.worker_id, p.LoadFailed(reason="bad weights")))
    assert "handler Control failed" not in caplog.text
    assert w.kill_reason == "load failed: bad weights"
    sim.exit(w, p.EXIT_LOAD_FAILED)
    assert w.state is State.CRASHED and not sim.core.workers
    crashed = [e for e in sim.fx.emitted if isinstance(e, ev.WorkerCrashed)]
    assert crashed and "bad weights" in crashed[0].reason


def test_unload_is_answered_by_the_reap_not_by_a_poll(make: Any) -> None:
    sim = make(entry("a"))
    sim.acquire("a")
    w = sim.boot("a")
    sim.release(sim.lease("a"))
    fut = sim.future()
    sim.send(UnloadCmd("a", fut))
    assert w.state is State.STOPPING and not fut.done()
    sim.exit(w)
    assert fut.done() and fut.result() is None and w.state is State.STOPPED


def test_shutdown_waits_for_in_flight_work_then_stops_everything_inside_the_loop(
        make: Any) -> None:
    sim = make(entry("a"), entry("b"))
    sim.acquire("a")
    a = sim.boot("a")
    sim.acquire("b")
    b = sim.boot("b")
    lease_b = sim.lease("b")
    sim.release(sim.lease("a"))
    fut = sim.future()
    sim.send(ShutdownCmd(5.0, fut))
    assert a.state is State.STOPPING and b.state is State.DRAINING  # b still has a request
    assert sim.fx.did("stop") == [a.worker_id] and not fut.done()
    sim.tick(5.1)  # grace is over: b's request ends with an error, b stops
    assert b.inflight == 0 and b.state is State.STOPPING
    assert b.worker_id in sim.fx.did("fail_streams") and b.worker_id in sim.fx.did("stop")
    sim.exit(a)
    assert not fut.done()
    sim.release(lease_b)  # the route hands its lease back late: harmless
    sim.exit(b)
    assert fut.done() and not sim.core.workers
    assert error_of(sim.acquire("a")).code == "shutting_down"


def test_shutdown_with_nothing_in_flight_answers_once_the_last_reap_is_in(make: Any) -> None:
    sim = make(entry("a"))
    sim.acquire("a")
    a = sim.boot("a")
    sim.release(sim.lease("a"))
    fut = sim.future()
    sim.send(ShutdownCmd(30.0, fut))
    assert a.state is State.STOPPING and not fut.done()
    sim.exit(a)
    assert fut.done()


# ---------------------------------------------------------------- the warm spare


def test_the_spare_idles_until_a_load_adopts_it_and_another_follows(make: Any) -> None:
    sim = make(entry("a"), warm_spare=True, heartbeat_interval=1.0)
    sim.tick(0.2)
    spare = sim.core.spare
    assert spare is not None and sim.fx.did("spawn") == [spare.worker_id]
    sim.send(Spawned(spare, FakeProc(50)))
    sim.send(Control(spare.worker_id, p.Hello(pid=50, protocol=p.PROTOCOL_VERSION)))
    assert spare.state is State.IDLE
    waiter = sim.acquire("a")
    assert sim.core.slots["a"].worker is spare and spare.state is State.LOADING
    assert sim.fx.sent[-1] == (spare.worker_id, p.Load(model_id="a", path="/m/a", kind="lm"))
    assert sim.fx.did("spawn") == [spare.worker_id]  # no new process for "a"
    sim.send(Control(spare.worker_id, p.Ready(pid=50, kind="lm", load_seconds=0.1,
                                              memory=p.Memory(1, 0, 0, 0))))
    assert lease_of(waiter).pid == 50
    sim.tick(0.2)
    assert sim.core.spare is not None and sim.core.spare is not spare


def test_a_load_failure_fails_the_waiters_with_its_reason_once_the_worker_is_gone(
        make: Any) -> None:
    sim = make(entry("a"))
    waiter = sim.acquire("a")
    w = sim.worker("a")
    sim.send(Spawned(w, FakeProc(9)))
    reason = "worker speaks protocol version 0, this gateway speaks version 1"
    sim.send(Control(w.worker_id, p.LoadFailed(reason=reason)))  # as the transport turns a Hello
    sim.tick(0.5)
    assert not sim.fx.did("kill")  # it may still exit by itself
    sim.tick(0.7)
    assert sim.fx.did("kill") == [w.worker_id] and w.state is State.KILLING
    sim.exit(w, -9)
    e = error_of(waiter)
    assert e.code == "model_failed" and "failed to load: " + reason in e.message


async def test_the_real_loop_survives_an_unknown_event(tmp_path: Any) -> None:
    from mlx_supervisor.gateway.bus import Bus
    from mlx_supervisor.gateway.supervisor.loop import Supervisor

    sup = Supervisor(Config(warm_spare=False), {}, {}, 10**9, f"ipc://{tmp_path}/gw.sock", Bus())
    await sup.start()
    try:
        sup.events.put_nowait(object())  # type: ignore[arg-type]
        with pytest.raises(APIError) as e:
            await asyncio.wait_for(sup.load("nope"), 5)
        assert e.value.status == 404  # answered: the loop outlived the bad event
    finally:
        await sup.shutdown(0)


# ---------------------------------------------------------------- learned admission


@pytest.mark.parametrize("headroom", [0.25, 0.0])
def test_a_learned_footprint_changes_a_later_admission(make: Any, headroom: float) -> None:
    """a's weights suggest 400 MB but it measured 100 MB: its next admission needs 125 MB
    (with 25% headroom) and fits beside b, where the estimate would have evicted b."""
    sim = make(entry("a", 400 * MB), entry("b", 400 * MB), budget=600 * MB,
               learned_headroom=headroom)
    sim.acquire("a")
    sim.boot("a", footprint=100 * MB)
    sim.release(sim.lease("a"))
    first = sim.worker("a")
    sim.send(UnloadCmd("a", sim.future()))
    sim.exit(first)
    assert sim.core.slots["a"].learned == (125 * MB if headroom else 0)
    sim.acquire("b")
    sim.boot("b", footprint=400 * MB)
    sim.release(sim.lease("b"))
    sim.acquire("a")
    b = sim.worker("b")
    if headroom:
        again = sim.worker("a")
        assert again is not first and again.estimate == 125 * MB  # charged the learned figure
        assert b.state is State.READY and sim.fx.did("stop") == [first.worker_id]
        assert sim.core.used_bytes() <= sim.core.budget
    else:
        assert b.state is State.STOPPING  # the estimate does not fit beside b
        assert sim.core.slots["a"].state is SlotState.PENDING


def test_a_pool_of_spares_covers_misses_in_a_row(make: Any) -> None:
    """warm_spares = 2: two cold models in a row both load in a spare; the pool refills."""
    sim = make(entry("a"), entry("b"), warm_spare=True, warm_spares=2, heartbeat_interval=1.0)
    sim.tick(0.2)
    sim.tick(0.2)
    pool = list(sim.core.spares)
    assert len(pool) == 2 and sim.fx.did("spawn") == [s.worker_id for s in pool]
    for i, s in enumerate(pool):
        sim.send(Spawned(s, FakeProc(60 + i)))
        sim.send(Control(s.worker_id, p.Hello(pid=60 + i, protocol=p.PROTOCOL_VERSION)))
    sim.acquire("a")
    sim.acquire("b")
    assert {sim.worker("a"), sim.worker("b")} == set(pool)  # no fresh process for either
    assert sim.fx.did("spawn") == [s.worker_id for s in pool] and not sim.core.spares
    sim.tick(0.2)
    assert not sim.core.spares  # no new spare takes CPU from the loads under way
    for i, s in enumerate(pool):
        sim.send(Control(s.worker_id, p.Ready(pid=60 + i, kind="lm", load_seconds=0.1,
                                              memory=p.Memory(1, 0, 0, 0))))
    sim.tick(0.2)
    sim.tick(0.2)
    assert len(sim.core.spares) == 2 and not set(sim.core.spares) & set(pool)


def test_an_admission_adopts_the_spare_rather_than_evicting_it(make: Any) -> None:
    """a (400 MB) and the spare (320 MB) leave too little for b (400 MB) beside both, but the
    spare becomes b's worker: nothing is evicted and b does not wait for a fresh process."""
    sim = make(entry("a", 400 * MB), entry("b", 400 * MB), budget=1000 * MB, warm_spare=True,
               heartbeat_interval=1.0)
    sim.acquire("a")
    sim.boot("a", footprint=400 * MB)
    sim.release(sim.lease("a"))
    sim.tick(0.2)
    pool = list(sim.core.spares)
    assert len(pool) == 1
    sim.send(Spawned(pool[0], FakeProc(70)))
    sim.send(Control(pool[0].worker_id, p.Hello(pid=70, protocol=p.PROTOCOL_VERSION)))
    sim.acquire("b")
    assert sim.worker("b") is pool[0] and pool[0].state is State.LOADING
    assert not sim.fx.did("stop") and sim.worker("a").state is State.READY
    assert sim.core.used_bytes() <= sim.core.budget


def test_a_parked_request_lends_its_slot_and_takes_one_back_when_it_reads_again(make: Any) -> None:
    """A request whose client stopped reading (its stream paused it) no longer counts against
    max_concurrency: the next waiter is granted; reading again over-commits rather than waits."""
    sim = make(entry("a", max_concurrency=1, max_queue=4))
    sim.acquire("a", "slow")
    sim.boot("a")
    slow = sim.lease("a")
    waiting = sim.acquire("a", "good")
    assert not waiting.fut.done()
    sim.send(Park(slow, True))
    good = lease_of(waiting)
    w = sim.worker("a")
    assert (w.inflight, w.parked) == (2, 1)
    third = sim.acquire("a", "third")
    assert not third.fut.done()  # the lent slot is taken
    sim.send(Park(slow, False))
    assert (w.inflight, w.parked) == (2, 0) and not third.fut.done()
    sim.send(Park(slow, True))
    assert not third.fut.done()  # good holds the one slot
    sim.release(slow)  # cut off while parked: both counts go down once
    assert (w.inflight, w.parked) == (1, 0) and not third.fut.done()
    sim.release(good)
    sim.release(lease_of(third))
    assert (w.inflight, w.parked) == (0, 0)


# ---------------------------------------------------------------- recycling an evicted worker


def _evict_b_for_c(sim: Any) -> tuple[Worker, Waiter]:
    """a and b ready and idle (b least recent), then c's request evicts b."""
    for m in ("b", "a"):
        sim.acquire(m)
        sim.boot(m, footprint=400 * MB)
        sim.release(sim.lease(m))
        sim.t += 1
    b = sim.worker("b")
    return b, sim.acquire("c")


def test_an_evicted_idle_worker_unloads_and_takes_the_admitted_model(make: Any) -> None:
    sim = make(*(entry(m, 400 * MB) for m in "abc"), budget=1000 * MB, recycle_workers=2)
    b, c = _evict_b_for_c(sim)
    assert b.state is State.UNLOADING and sim.fx.sent[-1] == (b.worker_id, p.Unload(
        reason="evicted (LRU) to make room for c: recycling its process"))
    assert sim.core.slots["b"].worker is None and sim.core.slots["c"].state is SlotState.PENDING
    assert not sim.fx.did("stop") and sim.fx.did("spawn") == ["b#1", "a#2"]
    assert sim.core.used_bytes() <= sim.core.budget
    sim.send(Control(b.worker_id, p.Unloaded(memory=p.Memory(rss=300 * MB))))
    # The same process loads c: no spawn; charged c's need while it loads, never over budget.
    assert sim.worker("c") is b and b.state is State.LOADING and b.recycles == 1
    assert sim.fx.sent[-1] == (b.worker_id, p.Load(model_id="c", path="/m/c", kind="lm"))
    assert sim.fx.did("spawn") == ["b#1", "a#2"] and b.bytes == 400 * MB
    assert sim.core.used_bytes() <= sim.core.budget
    sim.send(Control(b.worker_id, p.Ready(pid=b.pid or 0, kind="lm", load_seconds=0.1,
                                          memory=p.Memory(active=350 * MB))))
    assert lease_of(c).pid == b.pid and b.bytes == 350 * MB


def test_a_worker_that_keeps_its_memory_after_unloading_is_stopped_not_recycled(make: Any) -> None:
    sim = make(*(entry(m, 400 * MB) for m in "abc"), budget=1000 * MB, recycle_workers=2)
    b, _ = _evict_b_for_c(sim)
    sim.send(Control(b.worker_id, p.Unloaded(memory=p.Memory(active=3000 * MB))))
    assert b.state is State.STOPPING and sim.fx.did("stop") == [b.worker_id]
    assert sim.core.slots["c"].worker is None  # c waits for the reap, as for any eviction
    sim.exit(b)
    assert sim.fx.did("spawn")[-1] == sim.worker("c").worker_id


def test_a_worker_recycled_its_limit_of_times_is_stopped_as_before(make: Any) -> None:
    sim = make(*(entry(m, 400 * MB) for m in "abc"), budget=1000 * MB, recycle_workers=1)
    for m in ("b", "a"):
        sim.acquire(m)
        sim.boot(m, footprint=400 * MB)
        sim.release(sim.lease(m))
        sim.t += 1
    sim.worker("b").recycles = 1  # it has had its one recycle already
    b = sim.worker("b")
    sim.acquire("c")
    assert b.state is State.STOPPING and sim.fx.did("stop") == [b.worker_id]


def test_the_pure_recycling_rules() -> None:
    from mlx_supervisor.gateway.supervisor.eviction import Reuse, keep_unloaded, recyclable

    lm, vlm, emb = Reuse("lm", True), Reuse("vlm", True), Reuse("embeddings", True)
    assert all(recyclable(x, y, 0, 8) for x in (lm, vlm, emb) for y in (lm, vlm, emb))
    assert not recyclable(lm, lm, 8, 8) and not recyclable(lm, lm, 0, 0)
    assert not recyclable(Reuse("lm", False), lm, 0, 8)  # sharded, or an env of its own
    assert not recyclable(lm, Reuse("lm", False), 0, 8)
    assert not recyclable(Reuse("fake", True), lm, 0, 8)
    assert keep_unloaded(300 * MB, 0, 320 * MB) and not keep_unloaded(3000 * MB, 0, 320 * MB)
    assert keep_unloaded(430 * MB, 300 * MB, 320 * MB)  # within 25% + 64 MiB of its floor
    assert not keep_unloaded(500 * MB, 300 * MB, 320 * MB)  # it leaks: killed
    assert not keep_unloaded(0, 0, 320 * MB)  # no reading: not trusted


def test_a_crash_while_unloading_is_survived_and_the_admission_spawns(make: Any) -> None:
    sim = make(*(entry(m, 400 * MB) for m in "abc"), budget=1000 * MB, recycle_workers=2)
    b, c = _evict_b_for_c(sim)
    sim.exit(b, -11)
    assert b.state is State.CRASHED and sim.core.slots["b"].state is SlotState.COLD
    new = sim.worker("c")
    assert new is not b and sim.fx.did("spawn")[-1] == new.worker_id
    sim.boot("c")
    assert lease_of(c).model_id == "c" and not sim.core.slots["b"].crashes


def test_a_worker_slow_to_unload_is_killed(make: Any) -> None:
    sim = make(*(entry(m, 400 * MB) for m in "abc"), budget=1000 * MB, recycle_workers=2,
               heartbeat_interval=1.0, heartbeat_timeout=60.0)
    b, _ = _evict_b_for_c(sim)
    for _ in range(12):
        sim.core.workers[b.worker_id].last_heartbeat = sim.t  # alive, but never Unloaded
        sim.tick(1.0)
    assert b.state is State.KILLING and sim.fx.did("kill") == [b.worker_id]
