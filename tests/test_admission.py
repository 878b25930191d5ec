"""The bounded queue on its own: places, turns, timeouts and clients that go away."""

import asyncio

import pytest

from remote_vae.admission import ClientGone, QueueSettings, WorkQueue
from remote_vae.errors import RequestError


def never():
    return asyncio.Event().wait()


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 10))


def test_places_beyond_capacity_are_refused_with_retry_after():
    async def scenario():
        queue = WorkQueue(QueueSettings(workers=1, max_waiting=1))
        async with queue.place(), queue.place():
            with pytest.raises(RequestError) as refused:
                async with queue.place():
                    pass
        assert refused.value.status == 503 and 1 <= int(refused.value.headers["Retry-After"]) <= 60
        assert queue.admitted == 0

    run(scenario())


def test_turns_are_one_at_a_time_and_a_timeout_gives_up_its_place():
    async def scenario():
        queue = WorkQueue(QueueSettings(workers=1, max_waiting=4, wait_timeout=0.2))
        async with queue.turn(never, batch=3):
            assert (queue.running, queue.current_batch) == (1, 3)
            with pytest.raises(RequestError, match="waited 0.2 s"):
                async with queue.turn(never):
                    pass
            assert queue.waiting == 0
        async with queue.turn(never):  # the worker the timed-out request waited for is free
            assert queue.running == 1
        assert (queue.running, queue.current_batch, queue.waiting) == (0, 0, 0)

    run(scenario())


def test_a_client_gone_while_waiting_is_dropped_and_frees_nothing_it_did_not_hold():
    async def scenario():
        queue = WorkQueue(QueueSettings(workers=1, max_waiting=4, wait_timeout=5))
        gone = asyncio.Event()
        async with queue.turn(never):
            waiter = asyncio.ensure_future(queue.turn(gone.wait).__aenter__())
            await asyncio.sleep(0.05)
            assert queue.waiting == 1
            gone.set()
            with pytest.raises(ClientGone):
                await waiter
            assert queue.waiting == 0 and queue.running == 1
        async with queue.turn(never):
            assert queue.running == 1

    run(scenario())
