"""Dynamic batching: concurrent requests that can share a model call get one.

Each family served has a Batcher. A checked request's job waits in it for the
device. Jobs with the same batch key (operation, one sample's input shape and
dtype) are coalesced: when the device is free, the oldest waiting job leads,
and the waiting jobs with its key join it, oldest first, up to `max_images_per_call`
images or videos per call, and no more than run whole within the pixel budget
(beyond it a call runs one sample at a time, and sharing it would only make
requests wait for each other). A request larger than that runs alone. Output
forms, formats and scaling factors may differ within a call: each job
postprocesses its own rows (service.py).

Waiting for a batch to fill costs latency, so the leader waits only while the
batch has room and other requests for the family are still being read or
parsed (they may join), and never past `wait` seconds after its own arrival.
While the device is busy, batches fill as they wait for it anyway. The oldest
job always leads, so none waits longer than the wait plus the model calls
ahead of it, and jobs with other keys go in the calls that follow.

A job still waiting when its client disconnects is dropped unrun; one still
waiting after the queue's wait timeout gets a 503. Everything here runs on the
event loop; only the model call runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from starlette.concurrency import run_in_threadpool

from ..service import Job, VaeService
from ..settings import BatchSettings
from .admission import ClientGone, WorkQueue
from .observability import Metrics


@dataclass(eq=False)
class _Waiting:
    job: Job
    arrived: float
    result: asyncio.Future


def _retrieve(future: asyncio.Future) -> None:
    """Mark a result's exception as seen, so asyncio does not warn about answers nobody was left to read."""
    if not future.cancelled():
        future.exception()


class Batcher:
    def __init__(self, service: VaeService, queue: WorkQueue, settings: BatchSettings, metrics: Metrics):
        self.service = service
        self.queue = queue
        self.settings = settings
        self.metrics = metrics
        self.pending: list[_Waiting] = []  # in arrival order
        self.arriving = 0  # requests for this family being read or parsed
        self._news = asyncio.Event()  # a job arrived, or a request stopped arriving
        self._dispatcher: asyncio.Future | None = None

    @contextmanager
    def arrival(self) -> Iterator[None]:
        """Around reading and parsing a request: a forming batch may wait for it."""
        self.arriving += 1
        try:
            yield
        finally:
            self.arriving -= 1
            self._news.set()

    async def run(self, job: Job, disconnected: Callable[[], Awaitable[None]]) -> Any:
        """The job's result from the model stage, once a model call has run it; `disconnected()` returns when the client
        goes away."""
        entry = _Waiting(job, time.monotonic(), asyncio.get_running_loop().create_future())
        entry.result.add_done_callback(_retrieve)
        self.pending.append(entry)
        self.queue.waiting += 1
        self._news.set()
        if self._dispatcher is None:
            self._dispatcher = asyncio.ensure_future(self._dispatch())
        watch = asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait(
                {entry.result, watch}, timeout=self.queue.settings.wait_timeout, return_when=asyncio.FIRST_COMPLETED
            )
            if not entry.result.done():
                if self._withdraw(entry):  # still waiting: it leaves the queue unrun
                    raise ClientGone() if watch.done() else self.queue.timed_out()
                if watch.done():
                    raise ClientGone()  # on the device already; nobody is left to answer
                await asyncio.shield(entry.result)
            return entry.result.result()
        finally:
            self._withdraw(entry)
            watch.cancel()
            if watch.done() and not watch.cancelled():
                watch.exception()

    def _withdraw(self, entry: _Waiting) -> bool:
        """Take a job out of the waiting list; False if it was not there (taken into a model call already)."""
        if entry not in self.pending:
            return False
        self.pending.remove(entry)
        self.queue.waiting -= 1
        return True

    async def _dispatch(self) -> None:
        """One model call after another while jobs wait."""
        try:
            while self.pending:
                async with self.queue.device():
                    batch = await self._gather()
                    if batch:
                        await self._run(batch)
        finally:
            self._dispatcher = None

    async def _gather(self) -> list[_Waiting]:
        """The oldest job and those that join it, once the batch is full or waiting more cannot pay."""
        while self.pending:
            head = self.pending[0]
            room = min(self.settings.max_images_per_call, self.service.images_per_call(head.job))
            batch = self._joining(head, room)
            left = head.arrived + self.settings.wait - time.monotonic()
            if sum(entry.job.count for entry in batch) >= room or left <= 0 or not self.arriving:
                for entry in batch:
                    self._withdraw(entry)
                return batch
            self._news.clear()
            try:
                await asyncio.wait_for(self._news.wait(), left)
            except asyncio.TimeoutError:
                pass
        return []  # everyone left while the device was being waited for

    def _joining(self, head: _Waiting, room: int) -> list[_Waiting]:
        """The head, and the waiting jobs with its key that fit in `room` images with it, oldest first."""
        key, batch, images = head.job.batch_key, [head], head.job.count
        for entry in self.pending[1:]:
            if images >= room:
                break
            if entry.job.batch_key == key and images + entry.job.count <= room:
                batch.append(entry)
                images += entry.job.count
        return batch

    async def _run(self, batch: list[_Waiting]) -> None:
        jobs = [entry.job for entry in batch]
        family, operation = self.service.family.name, jobs[0].operation
        images = sum(job.count for job in jobs)
        started = time.monotonic()
        for entry in batch:
            self.metrics.stage_seconds.labels(family, "queue").observe(started - entry.arrived)
            self.metrics.batch_size.labels(family, operation).observe(entry.job.count)
        self.metrics.model_call_images.labels(family, operation).observe(images)
        self.metrics.model_call_requests.labels(family, operation).observe(len(jobs))
        try:
            with self.queue.running_batch(len(jobs), images):
                outcomes = await run_in_threadpool(self.service.run, jobs)
        except Exception as exc:  # service.run answers per job; this is only a safety net
            outcomes = [exc] * len(jobs)
        seconds = time.monotonic() - started
        for entry, outcome in zip(batch, outcomes, strict=True):
            self.metrics.stage_seconds.labels(family, "inference").observe(seconds)
            if entry.result.done():
                continue
            if isinstance(outcome, BaseException):
                entry.result.set_exception(outcome)
            else:
                entry.result.set_result(outcome)
