"""The POST path, from the body's first byte to the reply's last.

A POST goes: API key (auth.py) -> read the body at a minimum rate, each chunk
reserved from the memory budget as it arrives (memory.py) -> a place in the
bounded queue (admission.py) -> parse and check it from its numbers and headers,
reserve what it will hold, decode its file or build its latents (a worker
thread; if its memory is not free at once, it waits for it between the check and
the decode) -> wait for the device, perhaps joined by other
requests for one model call (batching.py) -> the model and on-device
postprocessing (a worker thread) -> media encoding (a worker thread) -> leave
the queue -> send the reply, a chunk at a time, then release its memory. Only
the model step is serialised, so a bad request is answered at once and MP4 /
PNG encoding overlaps the next model call.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from contextlib import ExitStack

from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from ..errors import ERROR_MEDIA_TYPE, RequestError, error_body
from ..memory import BODY_COST, JSON_BODY_COST, SAFETENSORS_BODY_COST, MemoryBudget, Reservation
from ..service import VaeService
from ..settings import Limits, Settings
from ..vocabulary import SAFETENSORS_TYPE
from ..wire import (
    JSON_TYPES,
    HttpCall,
    HttpReply,
    Inspected,
    Prepared,
    failure_reply,
    inspect_call,
    json_too_large,
    media_type,
    prepare_inspected,
    render,
)
from .admission import ClientGone, WorkQueue
from .batching import Batcher
from .observability import Metrics, StageTimer

REPLY_CHUNK = 256 * 1024  # a reply is written this much at a time, so the connection's buffer never holds a whole copy


def json_error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return Response(error_body(message), status, headers, media_type=ERROR_MEDIA_TYPE)


class ReplyResponse(Response):
    """A reply written REPLY_CHUNK bytes at a time (uvicorn waits for each to drain), calling `sent()` when done or
    abandoned."""

    def __init__(self, reply: HttpReply, sent: Callable[[], None]):
        super().__init__(reply.body, status_code=reply.status, media_type=reply.media_type, headers=reply.headers)
        self.sent = sent

    async def __call__(self, scope, receive, send) -> None:
        body, self.body = self.body, b""  # bytes, as ASGI requires (Ray Serve pickles each message)
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            for start in range(0, max(1, len(body)), REPLY_CHUNK):  # a chunk's slice is a copy of the chunk only
                more = start + REPLY_CHUNK < len(body)
                await send({"type": "http.response.body", "body": body[start : start + REPLY_CHUNK], "more_body": more})
        finally:
            del body  # freed before its memory is released, so the allocator can hand it back
            self.sent()


async def read_body(request: Request, limits: Limits, options: Settings, reservation: Reservation) -> bytes:
    """The body, each chunk reserved from the memory budget as it arrives. 413 past the body limit (JSON bodies: their
    own, smaller one), from Content-Length before reading; 408 if it arrives slower than the minimum rate after the
    grace
    period, or not within the body timeout. Waiting for memory does not count against the client."""
    kind = media_type(request.headers.get("content-type"))
    json_body = kind in JSON_TYPES
    limit, cost = (limits.max_json_bytes, JSON_BODY_COST) if json_body else (limits.max_body_bytes, BODY_COST)
    cost = SAFETENSORS_BODY_COST if kind == SAFETENSORS_TYPE else cost
    declared = request.headers.get("content-length")
    if declared is not None and not declared.isdigit():
        raise RequestError(f"Content-Length {declared!r} is not a byte count")
    if declared is not None and int(declared) > limit:
        raise _too_large(declared, limit, limits, json_body)
    rate, grace, total = options.connections.min_rate, options.connections.rate_grace, options.body_timeout
    chunks, size, waited = [], 0, 0.0
    started = time.monotonic()
    stream = request.stream()
    while True:
        elapsed = time.monotonic() - started - waited
        by_rate = grace + size / rate - elapsed if rate else float("inf")
        left = min(total - elapsed, by_rate)
        try:
            if left <= 0:
                raise asyncio.TimeoutError
            chunk = await asyncio.wait_for(stream.__anext__(), left)
        except StopAsyncIteration:
            break
        except asyncio.TimeoutError:
            raise _too_slow(size, elapsed, rate, grace, total, by_rate < total - elapsed) from None
        size += len(chunk)
        if size > limit:
            raise _too_large(f"over {limit}", limit, limits, json_body)
        if chunk:
            before = time.monotonic()
            await reservation.grow(len(chunk) * cost, max(0.0, total - elapsed), "its body")
            waited += time.monotonic() - before
            chunks.append(chunk)
    return b"".join(chunks)


def _too_large(size: str, limit: int, limits: Limits, json_body: bool) -> RequestError:
    if json_body:
        return json_too_large(size, limits)
    return RequestError(f"body is {size} bytes; this server accepts at most {limit}", status=413)


def _too_slow(size: int, elapsed: float, rate: int, grace: float, total: float, by_rate: bool) -> RequestError:
    if by_rate:
        return RequestError(
            f"the body arrived at {size / max(elapsed, 1e-9):.0f} bytes/s ({size} bytes in "
            f"{elapsed:.1f} s); this server needs at least {rate} bytes/s after the first {grace:g} s",
            status=408,
        )
    return RequestError(f"the body did not arrive within {total:g} s", status=408)


def until_disconnected(request: Request) -> Callable[[], Awaitable[None]]:
    """A waiter that returns once the client has closed its connection (the body already read)."""

    async def wait() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            await asyncio.sleep(0.05)  # nothing else should arrive; never spin if it does

    return wait


class PostPipeline:
    """One POST through the memory budget, the queue, its family's batcher and the steps of wire.py, each step timed."""

    def __init__(self, queue: WorkQueue, memory: MemoryBudget, metrics: Metrics, options: Settings):
        self.queue = queue
        self.memory = memory
        self.metrics = metrics
        self.options = options
        self.batchers: dict[str, Batcher] = {}

    def batcher(self, service: VaeService) -> Batcher:
        name = service.family.name
        if name not in self.batchers:
            self.batchers[name] = Batcher(service, self.queue, self.options.batching, self.metrics)
        return self.batchers[name]

    async def serve(self, request: Request, service: VaeService, operation: str | None) -> Response:
        """The reply; the request's memory stays reserved until it has been sent (or abandoned)."""
        reservation = self.memory.reservation()
        try:
            reply = await self._answer(request, service, operation, reservation)
        except ClientGone:
            reservation.release()
            return Response(status_code=499)  # nginx's "client closed request": for the log and metrics only
        except ClientDisconnect:
            reservation.release()
            return Response(status_code=400)
        except Exception as exc:
            reply = failure_reply(exc)
        except BaseException:  # cancelled (shutdown): nothing left to send
            reservation.release()
            raise
        reservation.shrink_to(len(reply.body))  # what is left of the request now: its reply
        return ReplyResponse(reply, sent=reservation.release)

    async def _answer(
        self, request: Request, service: VaeService, operation: str | None, reservation: Reservation
    ) -> HttpReply:
        timer = StageTimer(self.metrics, service.family.name)
        batcher = self.batcher(service)
        started = time.monotonic()
        with ExitStack() as arriving:  # a forming batch may wait for this request until it is prepared
            arriving.enter_context(batcher.arrival())
            self.queue.receiving += 1
            try:
                body = await read_body(request, service.limits, self.options, reservation)
            finally:
                self.queue.receiving -= 1
            call = HttpCall(
                body,
                request.url.query,
                request.headers.get("content-type", ""),
                request.headers.get("accept", ""),
                operation,
            )
            del body
            async with self.queue.place():
                inspected, prepared = await run_in_threadpool(prepare_if_memory_is_free, service, call, reservation)
                del call
                request.state.operation = inspected.operation
                try:
                    if prepared is None:  # wait for its memory, then decode
                        await reservation.grow(
                            inspected.checked.hold_bytes, self.queue.settings.wait_timeout, inspected.checked.purpose
                        )
                        prepared = await run_in_threadpool(prepare_inspected, service, inspected)
                finally:
                    inspected.close()
                arriving.close()
                timer.observe("parse", started)
                result = await batcher.run(
                    prepared.job, until_disconnected(request)
                )  # times the queue and inference stages
                started = time.monotonic()
                reply = await run_in_threadpool(render, prepared, result)
                timer.observe("media", started)
                return reply


def prepare_if_memory_is_free(
    service: VaeService, call: HttpCall, reservation: Reservation
) -> tuple[Inspected, Prepared | None]:
    """In a worker thread: check the request, and if what it will hold can be reserved at once, decode it too."""
    inspected = inspect_call(service, call)
    try:
        if reservation.try_grow(inspected.checked.hold_bytes, inspected.checked.purpose):
            return inspected, prepare_inspected(service, inspected)
    except BaseException:
        inspected.close()
        raise
    return inspected, None
