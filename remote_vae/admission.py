"""Admission: a bounded queue in front of the device.

A request is admitted before its body is read, so at most `workers +
max_waiting` bodies are ever held in memory; beyond that the server answers
503 with Retry-After at once. An admitted request then waits its turn for a
worker (the device). It gives up with a 503 after `wait_timeout` seconds, and
its work is dropped unrun if the client disconnects while it waits.

Everything here runs on the event loop, so the counters need no lock.
"""

from __future__ import annotations

import asyncio
import math
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable

from .errors import RequestError


class ClientGone(Exception):
    """The client disconnected while its request waited: nothing is left to answer."""


@dataclass(frozen=True)
class QueueSettings:
    workers: int = 1  # requests on the device at once
    max_waiting: int = 32  # admitted requests beyond those, waiting or being parsed
    wait_timeout: float = 120.0  # seconds a request may wait for a worker


class WorkQueue:
    def __init__(self, settings: QueueSettings | None = None):
        settings = settings or QueueSettings()
        self.settings = settings
        self.admitted = 0  # holding a place: reading, parsing, waiting or running
        self.waiting = 0  # waiting for a worker
        self.running = 0
        self.current_batch = 0  # images or videos in the requests now on the device
        self._seconds_per_job = 1.0  # moving average, for Retry-After
        self._workers = asyncio.Semaphore(settings.workers)  # binds to the running loop on first use

    @property
    def capacity(self) -> int:
        return self.settings.workers + self.settings.max_waiting

    def retry_after(self) -> int:
        """Seconds until a place is likely free: the work ahead at the recent pace, 1 to 60."""
        ahead = (self.waiting + self.running) / self.settings.workers
        return max(1, min(60, math.ceil(ahead * self._seconds_per_job)))

    @asynccontextmanager
    async def place(self) -> AsyncIterator[None]:
        """Hold a place in the queue for the whole request, or raise 503 at once when there is none."""
        if self.admitted >= self.capacity:
            raise RequestError(
                f"the server is busy: {self.running} request(s) running and {self.admitted - self.running} queued, "
                f"the most it holds; retry after the Retry-After seconds",
                status=503, headers={"Retry-After": str(self.retry_after())},
            )
        self.admitted += 1
        try:
            yield
        finally:
            self.admitted -= 1

    @asynccontextmanager
    async def turn(self, disconnected: Callable[[], Awaitable[None]], batch: int = 1) -> AsyncIterator[None]:
        """Wait for a worker, then hold it; `disconnected()` returns when the client goes away."""
        acquire = asyncio.ensure_future(self._workers.acquire())
        watch = asyncio.ensure_future(disconnected())
        granted = False
        self.waiting += 1
        try:
            await asyncio.wait({acquire, watch}, timeout=self.settings.wait_timeout, return_when=asyncio.FIRST_COMPLETED)
            if watch.done():
                watch.cancelled() or watch.exception()  # retrieved, so asyncio does not warn about it
                raise ClientGone()
            if not acquire.done():
                raise RequestError(
                    f"waited {self.settings.wait_timeout:g} s for the device without a turn; the server is overloaded, "
                    "retry after the Retry-After seconds",
                    status=503, headers={"Retry-After": str(self.retry_after())},
                )
            granted = True
        finally:
            self.waiting -= 1
            watch.cancel()
            if not granted:
                self._let_go(acquire)
        self.running += 1
        self.current_batch += batch
        started = time.monotonic()
        try:
            yield
        finally:
            self._seconds_per_job = 0.8 * self._seconds_per_job + 0.2 * (time.monotonic() - started)
            self.running -= 1
            self.current_batch -= batch
            self._workers.release()

    def _let_go(self, acquire: asyncio.Future) -> None:
        """Give back a worker acquired just as the request gave up, or stop waiting for one."""
        if acquire.done() and not acquire.cancelled() and acquire.exception() is None:
            self._workers.release()
        else:
            acquire.cancel()
