"""The bounded queue on its own: places, turns, timeouts and clients that go away."""

import asyncio

import pytest

from remote_vae.errors import RequestError
from remote_vae.server.admission import QueueSettings, WorkQueue


def never():
    return asyncio.Event().wait()


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 10))


def test_places_beyond_capacity_are_refused_with_retry_after():
    async def scenario():
        queue = WorkQueue(QueueSettings(max_waiting=1))
        async with queue.place(), queue.place():
            with pytest.raises(RequestError) as refused:
                async with queue.place():
                    pass
        assert refused.value.status == 503 and 1 <= int(refused.value.headers["Retry-After"]) <= 60
        assert queue.admitted == 0

    run(scenario())


def test_the_device_runs_one_call_at_a_time_and_counts_what_runs():
    async def scenario():
        queue = WorkQueue(QueueSettings(max_waiting=4))
        order = []

        async def call(name, requests, images):
            async with queue.device():
                with queue.running_batch(requests, images):
                    order.append((name, queue.running, queue.current_batch))
                    await asyncio.sleep(0.05)
                order.append((name, "done"))

        await asyncio.gather(call("a", 3, 5), call("b", 1, 2))
        assert order == [("a", 3, 5), ("a", "done"), ("b", 1, 2), ("b", "done")]
        assert (queue.running, queue.current_batch) == (0, 0)
        assert queue.retry_after() == 1  # nothing ahead

    run(scenario())


def test_a_timeout_is_503_with_retry_after():
    queue = WorkQueue(QueueSettings(wait_timeout=0.2))
    error = queue.timed_out()
    assert error.status == 503 and "waited 0.2 s" in error.message and 1 <= int(error.headers["Retry-After"]) <= 60


def test_retry_after_is_device_time_per_request_not_the_idle_time_between_calls(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr("remote_vae.server.admission.time.monotonic", lambda: clock[0])
    queue = WorkQueue()
    for calls, requests, seconds, idle in ((1, 2, 1.5, 40.0), (3, 1, 1.5, 0.0)):
        for _ in range(calls):
            with queue.running_batch(requests, requests):
                clock[0] += seconds
            clock[0] += idle  # a lull after the first call: the device waits for work, it is not slow
    # four calls, five requests, 6 s on the device: 1.2 s a request, rounded up (the 40 s lull would have made it 10)
    assert queue.service_interval() == pytest.approx(1.2) and queue.retry_after() == 2
    clock[0] += 61  # a minute later those calls no longer count: idle from then on
    assert queue.service_interval() is None and queue.retry_after() == 1
