"""Admission: a bounded queue in front of the device.

A request takes a place once its body has been read (what its body and decoded
pixels hold is bounded by the memory budget, memory.py, not by the queue), and
holds it while it is checked, its file decodes, it waits for the device, runs and
its reply is rendered; not while the reply is sent. At most `1 + max_waiting`
places exist; beyond that the server answers 503 with Retry-After at once. A
request waits for the device (batching.py: it may share a model call with
others), gives up with a 503 after `wait_timeout` seconds, and has its work
dropped unrun if the client disconnects while it waits. One model call runs at
a time.

Retry-After is the measured device time per request: when a place is likely to
be free again. Idle time between calls is not counted, or a lull before a burst
would tell the burst to wait as long as the lull.

Everything here runs on the event loop, so the counters need no lock.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

from ..errors import RequestError
from ..settings import QueueSettings

RATE_WINDOW = 64  # model calls the service rate is measured over
RATE_SECONDS = 60.0


class ClientGone(Exception):
    """The client disconnected while its request waited: nothing is left to answer."""


class WorkQueue:
    def __init__(self, settings: QueueSettings | None = None):
        settings = settings or QueueSettings()
        self.settings = settings
        self.receiving = 0  # in front of the queue: their bodies being read, no place held
        self.admitted = 0  # holding a place: decoding, waiting, running or rendering
        self.waiting = 0  # waiting for the device (batching.py counts them)
        self.running = 0  # requests in the model calls now on the device
        self.current_batch = 0  # images or videos in those requests
        # The last model calls, for Retry-After: when each ended, the seconds it took, the requests it answered
        self._calls: deque[tuple[float, float, int]] = deque(maxlen=RATE_WINDOW)
        self._call_started: float | None = None
        self._device = asyncio.Semaphore(1)  # one model call at a time; binds to the running loop on first use

    @property
    def capacity(self) -> int:
        return 1 + self.settings.max_waiting

    def service_interval(self) -> float | None:
        """Device seconds per request over the last RATE_WINDOW model calls (those of the last minute); before any,
        the time the call now running has taken; None when idle from the start."""
        now = time.monotonic()
        recent = [(seconds, requests) for ended, seconds, requests in self._calls if now - ended <= RATE_SECONDS]
        if recent:
            return sum(seconds for seconds, _ in recent) / max(1, sum(requests for _, requests in recent))
        return now - self._call_started if self._call_started is not None else None

    def retry_after(self) -> int:
        """Seconds until a place is likely free: the measured interval between requests leaving the device, 1 to 60."""
        interval = self.service_interval()
        return max(1, min(60, math.ceil(interval if interval is not None else 1.0)))

    @asynccontextmanager
    async def place(self) -> AsyncIterator[None]:
        """Hold a place in the queue for the whole request, or raise 503 at once when there is none."""
        if self.admitted >= self.capacity:
            raise RequestError(
                f"the server is busy: {self.running} request(s) running and {self.admitted - self.running} queued, "
                f"the most it holds; retry after the Retry-After seconds",
                status=503,
                headers={"Retry-After": str(self.retry_after())},
            )
        self.admitted += 1
        try:
            yield
        finally:
            self.admitted -= 1

    @asynccontextmanager
    async def device(self) -> AsyncIterator[None]:
        """Wait for the device, then hold it for one model call."""
        await self._device.acquire()
        try:
            yield
        finally:
            self._device.release()

    @contextmanager
    def running_batch(self, requests: int, images: int) -> Iterator[None]:
        """Count `requests` holding `images` images or videos as on the device, and time them for Retry-After."""
        self.running += requests
        self.current_batch += images
        self._call_started = time.monotonic()
        try:
            yield
        finally:
            ended = time.monotonic()
            self._calls.append((ended, ended - self._call_started, requests))
            self._call_started = None
            self.running -= requests
            self.current_batch -= images

    def timed_out(self) -> RequestError:
        return RequestError(
            f"waited {self.settings.wait_timeout:g} s for the device without a turn; the server is overloaded, "
            "retry after the Retry-After seconds",
            status=503,
            headers={"Retry-After": str(self.retry_after())},
        )
