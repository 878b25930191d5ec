"""Observability: Prometheus metrics and one access-log line per request.

`/metrics` is rendered from a registry of the app's own (so several apps in
one process do not collide). Requests are counted by family, operation and
status; each stage of the request path has a latency histogram:
  parse (read the body, parse and check it), queue (wait for the device),
  inference (the model and on-device postprocessing), media (MP4 / image /
  tensor encoding).
Batching shows as images and requests per model call; model calls are
counted by how they ran (whole, sliced one sample at a time, or tiled).
Queue length, running work, device memory and out-of-memory events are read
when scraped. The toolkit's own names, inf_queue_size and
inf_batch_current_size, are kept for dashboards built on it.

Every request gets an id: the client's X-Request-Id when it is sane, else a
fresh one; it comes back in the X-Request-Id header and starts the log line.
Log lines hold no payload content, not even the query string.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable, Iterable

import torch
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.datastructures import Headers

from ..memory import MemoryBudget
from ..vae import LoadedVae
from .admission import WorkQueue
from .connections import ConnectionStats

log = logging.getLogger("remote_vae.access")
disable_created_metrics()  # no *_created series: they double the text and no dashboard reads them

STAGES = ("parse", "queue", "inference", "media")
# 1 ms to 10 min: a tiny decode on a GPU up to a long video on a CPU.
SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


class Metrics:
    """The app's metrics; `render()` is the /metrics body."""

    content_type = "text/plain; version=0.0.4; charset=utf-8"

    # long: one declaration per metric, each with its help text
    def __init__(
        self,
        queue: WorkQueue,
        vaes: Callable[[], Iterable[LoadedVae]],
        memory: MemoryBudget | None = None,
        connections: ConnectionStats | None = None,
    ):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "remote_vae_requests",
            "Requests answered, by family, operation and HTTP status",
            ["family", "operation", "status"],
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "remote_vae_request_duration_seconds",
            "Whole-request latency",
            ["family", "operation"],
            buckets=SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.stage_seconds = Histogram(
            "remote_vae_stage_duration_seconds",
            "Latency of each stage: " + ", ".join(STAGES),
            ["family", "stage"],
            buckets=SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "remote_vae_batch_size",
            "Images or videos per request that reached the device",
            ["family", "operation"],
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.model_call_images = Histogram(
            "remote_vae_model_call_images",
            "Images or videos per model call (several requests' when batched)",
            ["family", "operation"],
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.model_call_requests = Histogram(
            "remote_vae_model_call_requests",
            "Requests coalesced into one model call",
            ["family", "operation"],
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes and friends
        self.registry.register(_LiveState(queue, vaes, memory, connections))

    def observe_request(self, family: str, operation: str, status: int, seconds: float) -> None:
        self.requests.labels(family, operation, str(status)).inc()
        self.request_seconds.labels(family, operation).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _LiveState:
    """Gauges read at scrape time: the queue, device memory, out-of-memory events."""

    def __init__(
        self,
        queue: WorkQueue,
        vaes: Callable[[], Iterable[LoadedVae]],
        memory: MemoryBudget | None,
        connections: ConnectionStats | None,
    ):
        self.queue = queue
        self.vaes = vaes
        self.memory = memory
        self.connections = connections

    def describe(self):
        return []  # collected only at scrape time

    def collect(self):
        yield from self._queue()
        if self.memory is not None:
            yield from self._memory(self.memory)
        if self.connections is not None:
            yield from self._connections(self.connections)
        yield from self._models(list(self.vaes()))

    def _queue(self):
        queue = self.queue
        yield GaugeMetricFamily("remote_vae_queue_length", "Requests waiting for the device", value=queue.waiting)
        yield GaugeMetricFamily("remote_vae_running", "Requests on the device now", value=queue.running)
        yield GaugeMetricFamily(
            "remote_vae_receiving", "Requests whose bodies are being read (no place held yet)", value=queue.receiving
        )
        yield GaugeMetricFamily(
            "remote_vae_admitted",
            "Requests holding a place (decoding, waiting, running or rendering)",
            value=queue.admitted,
        )
        yield GaugeMetricFamily(
            "remote_vae_queue_capacity", "Most requests admitted at once; more get 503", value=queue.capacity
        )
        yield GaugeMetricFamily(
            "inf_queue_size", "Requests waiting (the Inference Toolkit's name)", value=queue.waiting
        )
        yield GaugeMetricFamily(
            "inf_batch_current_size",
            "Images or videos on the device now (the Inference Toolkit's name)",
            value=queue.current_batch,
        )

    def _memory(self, budget: MemoryBudget):
        yield GaugeMetricFamily(
            "remote_vae_memory_budget_bytes",
            "Host memory the requests in flight may hold at once (--memory-budget)",
            value=budget.limit,
        )
        yield GaugeMetricFamily(
            "remote_vae_memory_reserved_bytes",
            "Host memory reserved by requests in flight now",
            value=budget.in_use,
        )
        yield GaugeMetricFamily(
            "remote_vae_memory_reserved_peak_bytes", "The most reserved at once since start-up", value=budget.peak
        )
        yield GaugeMetricFamily(
            "remote_vae_memory_waiting", "Requests waiting for their memory to be reserved", value=budget.waiting
        )
        yield CounterMetricFamily(
            "remote_vae_memory_refused", "Requests refused with 503 for memory", value=budget.refused
        )

    def _connections(self, stats: ConnectionStats):
        yield GaugeMetricFamily("remote_vae_connections_open", "HTTP connections open now", value=stats.open)
        yield GaugeMetricFamily(
            "remote_vae_connections_limit",
            "The most connections open at once (--max-connections)",
            value=stats.limit,
        )
        closed = CounterMetricFamily(
            "remote_vae_connections_closed", "Connections the server closed, by reason", labels=["reason"]
        )
        for reason, count in stats.closed.items():
            closed.add_metric([reason], count)
        yield closed

    def _models(self, vaes: list[LoadedVae]):
        memory = GaugeMetricFamily(
            "remote_vae_device_memory_bytes",
            "CUDA memory: torch allocated / reserved / peak, and the device's free and total (the host's resident set "
            "is process_resident_memory_bytes)",
            labels=["device", "kind"],
        )
        for device in sorted({str(vae.device) for vae in vaes if vae.device.type == "cuda"}):
            for kind, value in device_memory(torch.device(device)).items():
                memory.add_metric([device, kind], value)
        yield memory
        oom = CounterMetricFamily(
            "remote_vae_out_of_memory", "Device out-of-memory events, by outcome", labels=["family", "outcome"]
        )
        calls = CounterMetricFamily(
            "remote_vae_model_calls",
            "Model calls, by how they ran: whole batch, sliced (one sample at a time) or tiled",
            labels=["family", "mode"],
        )
        for vae in vaes:
            for outcome, count in vae.oom_events.items():
                oom.add_metric([vae.family.name, outcome], count)
            for mode, count in vae.calls.items():
                calls.add_metric([vae.family.name, mode], count)
        yield oom
        yield calls


def device_memory(device: torch.device) -> dict[str, int]:
    free, total = torch.cuda.mem_get_info(device)
    return {
        "allocated": torch.cuda.memory_allocated(device),
        "reserved": torch.cuda.memory_reserved(device),
        "peak_allocated": torch.cuda.max_memory_allocated(device),
        "free": free,
        "total": total,
    }


class StageTimer:
    """Times the stages of one request into the stage histogram."""

    def __init__(self, metrics: Metrics, family: str):
        self.metrics = metrics
        self.family = family

    def observe(self, stage: str, started: float) -> None:
        self.metrics.stage_seconds.labels(self.family, stage).observe(time.monotonic() - started)


def request_id(headers: Headers) -> str:
    given = headers.get("x-request-id", "")
    return given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex


class RequestLog:
    """Pure ASGI, outermost: request id in and out, one access-log line and the request metrics per request.

    Routes label their requests through the scope's state (family, operation);
    requests no route claims are labelled "-".
    """

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        exchange = _Exchange(scope, self.metrics)

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                exchange.status = message["status"]
                message = {
                    **message,
                    "headers": [*message.get("headers", []), (b"x-request-id", exchange.rid.encode())],
                }
            elif message["type"] == "http.response.body":
                exchange.sent += len(message.get("body", b""))
                if not message.get("more_body", False):
                    exchange.record()  # before the last bytes leave: a client that has its answer finds its log line
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            exchange.record()


class _Exchange:
    """One request as RequestLog sees it: its id, its status and bytes sent, recorded once."""

    def __init__(self, scope, metrics: Metrics):
        self.scope, self.metrics = scope, metrics
        self.headers = Headers(scope=scope)
        self.rid = request_id(self.headers)
        self.state = scope.setdefault("state", {})
        self.state["request_id"] = self.rid
        self.status, self.sent, self.recorded = 500, 0, False
        self.started = time.monotonic()

    def record(self) -> None:
        if self.recorded:
            return
        self.recorded = True
        scope, seconds = self.scope, time.monotonic() - self.started
        family, operation = self.state.get("family", "-"), self.state.get("operation", "-")
        self.metrics.observe_request(family, operation, self.status, seconds)
        client = scope.get("client") or ("-", 0)
        received = self.headers.get("content-length", "-")
        path = scope["path"][:200].encode("unicode_escape").decode("ascii")  # one line, whatever the path holds
        log.info(
            '%s %s "%s %s" %d in=%s out=%d %.1fms %s %s',
            self.rid,
            client[0],
            scope["method"],
            path,
            self.status,
            received[:20],
            self.sent,
            seconds * 1000,
            family,
            operation,
        )
