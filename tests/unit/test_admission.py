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
