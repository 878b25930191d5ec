"""Admission: a bounded queue in front of the device.

A request is admitted before its body is read, so at most `workers +
max_waiting` bodies are ever held in memory; beyond that the server answers
503 with Retry-After at once. An admitted request then waits for the device
(batching.py: it may share a model call with others). It gives up with a 503
after `wait_timeout` seconds, and its work is dropped unrun if the client
disconnects while it waits. The device runs `workers` model calls at once.

Everything here runs on the event loop, so the counters need no lock.
"""

from __future__ import annotations

import asyncio
import math
import time
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import AsyncIterator, Iterator

from .errors import RequestError


class ClientGone(Exception):
    """The client disconnected while its request waited: nothing is left to answer."""


@dataclass(frozen=True)
class QueueSettings:
    workers: int = 1  # model calls on the device at once
    max_waiting: int = 32  # admitted requests beyond one worker's, waiting or being parsed
    wait_timeout: float = 120.0  # seconds a request may wait for a worker


class WorkQueue:
    def __init__(self, settings: QueueSettings | None = None):
        settings = settings or QueueSettings()
        self.settings = settings
        self.admitted = 0  # holding a place: reading, parsing, waiting or running
        self.waiting = 0  # waiting for the device (batching.py counts them)
        self.running = 0  # requests in the model calls now on the device
        self.current_batch = 0  # images or videos in those requests
        self._seconds_per_job = 1.0  # moving average of device time per request, for Retry-After
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
    async def device(self) -> AsyncIterator[None]:
        """Wait for a worker (the device), then hold it for one model call."""
        await self._workers.acquire()
        try:
            yield
        finally:
            self._workers.release()

    @contextmanager
    def running_batch(self, requests: int, images: int) -> Iterator[None]:
        """Count `requests` holding `images` images or videos as on the device, and time them for Retry-After."""
        self.running += requests
        self.current_batch += images
        started = time.monotonic()
        try:
            yield
        finally:
            self._seconds_per_job = 0.8 * self._seconds_per_job + 0.2 * (time.monotonic() - started) / requests
            self.running -= requests
            self.current_batch -= images

    def timed_out(self) -> RequestError:
        return RequestError(
            f"waited {self.settings.wait_timeout:g} s for the device without a turn; the server is overloaded, "
            "retry after the Retry-After seconds",
            status=503, headers={"Retry-After": str(self.retry_after())},
        )
