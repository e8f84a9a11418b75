"""``GET /metrics``: Prometheus text exposition from a registry owned by this gateway.

Counters and histograms are fed from the gateway's bus by two cheap subscribers: the request
observer acts once per request (on ``finished``, from numbers the ``Outcome`` already holds) and
the lifecycle observer once per supervisor event. Everything that is a *level* (memory, queue depth, in flight, hot
workers) is read from the supervisor at scrape time by a custom collector, so it can never drift
from the truth the way inc/dec gauges do after a crash. The registry is per gateway, never the
process-global default, so several apps (tests) in one process don't collide.
"""

from __future__ import annotations

import signal
from collections import Counter as Tally
from collections.abc import Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from mlx_supervisor.gateway.api.gateway import Gateway
from mlx_supervisor.gateway.api.run import RequestEvent
from mlx_supervisor.gateway.supervisor import events as ev
from mlx_supervisor.gateway.supervisor.events import SupervisorEvent
from mlx_supervisor.gateway.supervisor.states import HOT, State

NS = "mlx_supervisor"
# Seconds: from a few ms (fake/tiny models) to minutes (a long answer from a big model).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
LOAD_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)
TPS_BUCKETS = (1, 2, 5, 10, 20, 30, 50, 75, 100, 150, 200, 300, 500, 1000, 2000)


def crash_reason(reason: str, returncode: int | None) -> str:
    """A bounded label for why a worker died (the full text is in the log and the event stream)."""
    text = reason.lower()
    if "load failed" in text or "failed to load" in text:
        return "load_failed"
    if "heartbeat" in text:
        return "hung"
    if "load_timeout" in text:
        return "load_timeout"
    if returncode is not None and returncode < 0:
        try:
            return signal.Signals(-returncode).name.lower()
        except ValueError:
            return "signal"
    return "exit"


class Metrics:
    """The gateway's instruments; ``observe`` and ``on_hook`` are registered as callbacks."""

    def __init__(self, gw: Gateway):
        self.gw = gw
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(f"{NS}_requests", "Finished model requests.",
                                ["model", "route", "status"], registry=r)
        self.ttft = Histogram(f"{NS}_time_to_first_token_seconds",
                              "From request received to the first generated token.", ["model"],
                              buckets=LATENCY_BUCKETS, registry=r)
        self.latency = Histogram(f"{NS}_request_duration_seconds",
                                 "From request received to the last byte of the answer.", ["model"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram(f"{NS}_queue_wait_seconds",
                                    "Time a request waited for a worker slot (load included).",
                                    ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter(f"{NS}_prompt_tokens", "Prompt tokens processed.", ["model"],
                                     registry=r)
        self.generated_tokens = Counter(f"{NS}_generated_tokens", "Completion tokens generated.",
                                        ["model"], registry=r)
        self.tps = Histogram(f"{NS}_tokens_per_second",
                             "Decode speed of one request: tokens after the first over the time "
                             "after the first.", ["model"], buckets=TPS_BUCKETS, registry=r)
        self.spawns = Counter(f"{NS}_worker_spawns", "Worker processes started for a model.",
                              ["model"], registry=r)
        self.loads = Counter(f"{NS}_model_loads", "Models loaded and ready to serve.", ["model"],
                             registry=r)
        self.load_seconds = Histogram(f"{NS}_model_load_duration_seconds",
                                      "Time to load a model's weights in its worker.", ["model"],
                                      buckets=LOAD_BUCKETS, registry=r)
        self.evictions = Counter(f"{NS}_evictions", "Workers stopped (LRU) to make room.",
                                 ["model"], registry=r)
        self.ttl_unloads = Counter(f"{NS}_ttl_unloads", "Workers stopped after their idle ttl.",
                                   ["model"], registry=r)
        self.stops = Counter(f"{NS}_worker_stops", "Workers that exited after being asked to.",
                             ["model"], registry=r)
        self.crashes = Counter(f"{NS}_worker_crashes",
                               "Workers that exited unasked, failed to load, or were killed as hung.",
                               ["model", "reason"], registry=r)
        r.register(SupervisorCollector(gw))
        ProcessCollector(namespace=f"{NS}_gateway", registry=r)

    def observe(self, ev: RequestEvent) -> None:
        """Request observer: all work happens once, at ``finished``."""
        if ev.phase != "finished":
            return
        o = ev.outcome
        self.requests.labels(o.model, o.route, o.status).inc()
        if o.prompt_tokens:
            self.prompt_tokens.labels(o.model).inc(o.prompt_tokens)
        if o.completion_tokens:
            self.generated_tokens.labels(o.model).inc(o.completion_tokens)
        if o.t_finished is None or o.t_started is None:
            return  # never reached a worker (queue timeout, refused): no latency to speak of
        self.latency.labels(o.model).observe(o.t_finished - o.t_received)
        if o.t_first_token is not None:
            self.ttft.labels(o.model).observe(o.t_first_token - o.t_received)
            decode = o.t_finished - o.t_first_token
            if o.completion_tokens > 1 and decode > 0:
                self.tps.labels(o.model).observe((o.completion_tokens - 1) / decode)

    def on_event(self, e: SupervisorEvent) -> None:
        """Lifecycle counters."""
        model = e.model
        if isinstance(e, ev.Granted):
            self.queue_wait.labels(model).observe(e.waited)
        elif isinstance(e, ev.Spawning):
            self.spawns.labels(model).inc()
        elif isinstance(e, ev.WorkerReady):
            self.loads.labels(model).inc()
            self.load_seconds.labels(model).observe(e.load_seconds)
        elif isinstance(e, ev.Evicted):
            self.evictions.labels(model).inc()
        elif isinstance(e, ev.TtlExpired):
            self.ttl_unloads.labels(model).inc()
        elif isinstance(e, ev.WorkerStopped):
            self.stops.labels(model).inc()
        elif isinstance(e, ev.WorkerCrashed):
            self.crashes.labels(model, crash_reason(e.reason, e.returncode)).inc()

    async def endpoint(self, request: Request) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


class SupervisorCollector(Collector):
    """Levels read from the supervisor at scrape time (the scrape runs on the supervisor's loop,
    so the read is consistent and needs no lock)."""

    def __init__(self, gw: Gateway):
        self.gw = gw

    def collect(self) -> Iterator[Metric]:
        sup = self.gw.sup
        snap = sup.snapshot()
        yield GaugeMetricFamily(f"{NS}_memory_budget_bytes", "Memory budget for all workers.",
                                value=snap["budget_bytes"])
        yield GaugeMetricFamily(f"{NS}_memory_used_bytes",
                                "Ledger: bytes charged to every worker not yet reaped.",
                                value=snap["used_bytes"])
        yield GaugeMetricFamily(f"{NS}_max_models", "Cap on hot workers (0: none).",
                                value=snap["max_models"] or 0)
        hot = [w for w in snap["workers"] if State(w["state"]) in HOT]
        yield GaugeMetricFamily(f"{NS}_hot_workers", "Worker processes alive (any hot state).",
                                value=len(hot))
        by_state: Tally[tuple[str, str]] = Tally()
        mem: Tally[str] = Tally()
        inflight: Tally[str] = Tally()
        for w in snap["workers"]:
            by_state[(w["model"], w["state"])] += 1
            mem[w["model"]] += w["charged_bytes"]
            inflight[w["model"]] += w["inflight"]
        g = GaugeMetricFamily(f"{NS}_workers", "Worker processes by model and state.",
                              labels=["model", "state"])
        for (model, state), n in sorted(by_state.items()):
            g.add_metric([model, state], n)
        yield g
        g = GaugeMetricFamily(f"{NS}_worker_memory_bytes",
                              "Bytes charged per model's worker(s): measured once loaded, else the "
                              "estimate.", labels=["model"])
        for model, b in sorted(mem.items()):
            g.add_metric([model], b)
        yield g
        g = GaugeMetricFamily(f"{NS}_inflight_requests", "Requests being generated.", labels=["model"])
        q = GaugeMetricFamily(f"{NS}_queued_requests", "Requests waiting for a worker slot.",
                              labels=["model"])
        p = GaugeMetricFamily(f"{NS}_model_pinned", "1 when the model is pinned.", labels=["model"])
        for mid, slot in sorted(sup.slots.items()):
            g.add_metric([mid], inflight.get(mid, 0))
            q.add_metric([mid], len(slot.waiters))
            p.add_metric([mid], 1 if slot.pinned else 0)
        yield g
        yield q
        yield p
        yield from self._ledger()
        yield from self._connections()

    def _connections(self) -> Iterator[Metric]:
        source = self.gw.status_sources.get("connections")
        if source is None:
            return
        st = source()
        yield GaugeMetricFamily(f"{NS}_connections_open", "Open client connections.", value=st["open"])
        yield GaugeMetricFamily(f"{NS}_connections_max", "The connection cap (max_connections, "
                                "fitted to the open-files limit).", value=st["max"])
        for key, what in (("closed_idle_for_room", "idle connections closed to make room past the cap"),
                          ("refused", "connections answered 503 past the cap, all busy"),
                          ("timed_out", "connections closed by header/body/write timeouts")):
            yield CounterMetricFamily(f"{NS}_connections_{key}", what.capitalize() + ".",
                                      value=st[key])

    def _ledger(self) -> Iterator[Metric]:
        source = self.gw.status_sources.get("ledger")
        if source is None:
            return
        st = source()
        yield GaugeMetricFamily(f"{NS}_ledger_writing", "1 while the request ledger writes; 0 "
                                "while it is degraded (retrying after a write failure).",
                                value=1 if st["status"] == "ok" else 0)
        yield CounterMetricFamily(f"{NS}_ledger_dropped_records", "Ledger records lost while "
                                  "it could not write (disk full, I/O error) or was backlogged.",
                                  value=st["dropped_records"])


def attach(gw: Gateway) -> Metrics:
    """Plugin entry point (see serve.PLUGINS)."""
    # ``*_created`` series double the scrape for no use here (this process owns its registry).
    disable_created_metrics()
    m = Metrics(gw)
    gw.bus.subscribe(RequestEvent, m.observe)
    gw.bus.subscribe(SupervisorEvent, m.on_event)
    gw.routes.append(Route("/metrics", m.endpoint, methods=["GET"]))
    return m
