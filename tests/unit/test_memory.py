"""The memory budget on its own: reservations granted, waited for in order, refused when they cannot fit, never
deadlocked;
and the log filter that keeps a connection flood from flooding the log."""

import asyncio
import logging
import time

import pytest
from conftest import wait_until

from remote_vae import memory
from remote_vae.errors import RequestError
from remote_vae.memory import MemoryBudget, release_free_memory
from remote_vae.server.connections import RateLimitedLog


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 10))


def test_reservations_fit_wait_in_order_and_are_released():
    async def scenario():
        budget = MemoryBudget(100)
        first, second, third = budget.reservation(), budget.reservation(), budget.reservation()
        await first.grow(60, 1)
        assert budget.in_use == 60
        waiting = asyncio.ensure_future(second.grow(50, 5))
        small = asyncio.ensure_future(third.grow(10, 5))  # would fit, but waits its turn behind the older one
        await asyncio.sleep(0.05)
        assert budget.waiting == 2 and not waiting.done() and not small.done()
        first.shrink_to(20)  # a rendered reply is all that is left
        await asyncio.wait_for(asyncio.gather(waiting, small), 1)
        assert budget.in_use == 80 and budget.peak == 80
        for reservation in (first, second, third):
            reservation.release()
        assert budget.in_use == 0

    run(scenario())


def test_a_request_larger_than_the_budget_is_413_and_a_wait_that_runs_out_503():
    async def scenario():
        budget = MemoryBudget(100, retry_after=lambda: 7)
        with pytest.raises(RequestError) as too_large:
            await budget.reservation().grow(101, 1, "a decode to 9 pixels")
        assert too_large.value.status == 413 and "a decode to 9 pixels" in too_large.value.message
        holder = budget.reservation()
        await holder.grow(90, 1)
        with pytest.raises(RequestError) as busy:
            await budget.reservation().grow(20, 0.1)
        assert busy.value.status == 503 and busy.value.headers["Retry-After"] == "7" and budget.waiting == 0
        assert budget.in_use == 90 and budget.refused == 1

    run(scenario())


def test_when_only_waiters_hold_memory_the_newest_is_refused_and_the_oldest_proceeds():
    """Two bodies half read, each needing more than is left: nothing would ever be released, so no waiting for a
    timeout."""

    async def scenario():
        budget = MemoryBudget(100)
        older, newer = budget.reservation(), budget.reservation()
        await older.grow(40, 1)
        await newer.grow(40, 1)
        older_wait = asyncio.ensure_future(older.grow(50, 30))
        await asyncio.sleep(0.01)
        newer_wait = asyncio.ensure_future(newer.grow(50, 30))
        done, _ = await asyncio.wait({older_wait, newer_wait}, timeout=1, return_when=asyncio.ALL_COMPLETED)
        assert len(done) == 2
        assert older_wait.exception() is None and older.held == 90
        assert isinstance(newer_wait.exception(), RequestError) and newer_wait.exception().status == 503
        assert newer.held == 0 and budget.in_use == 90

    run(scenario())


def test_the_last_release_reports_the_peak_for_the_allocator():
    async def scenario():
        budget = MemoryBudget(1000)
        peaks = []
        budget.when_idle(peaks.append)
        one, two = budget.reservation(), budget.reservation()
        await one.grow(300, 1)
        await two.grow(500, 1)
        one.release()
        assert peaks == []
        two.release()
        assert peaks == [800]

    run(scenario())
    release_free_memory(1 << 40)


def test_a_release_while_trimming_has_the_trims_run_again_after_it(monkeypatch):
    """Each release is followed by every trim of the schedule, even one that comes while a trim thread runs."""
    if memory._LIBC is None:
        pytest.skip("no glibc malloc_trim here: nothing is trimmed")
    trims = []
    monkeypatch.setattr(memory, "TRIM_DELAYS", (0.05, 0.05, 0.05))
    monkeypatch.setattr(memory, "trim_heaps", lambda: trims.append(time.monotonic()))
    wait_until(lambda: not memory._trimming, 10, lambda: "an earlier trim thread still runs")
    trims.clear()  # an earlier thread's, made while it finished
    release_free_memory(1 << 30)
    time.sleep(0.08)  # during the first schedule
    released = time.monotonic()
    release_free_memory(1 << 30)
    wait_until(lambda: not memory._trimming, 10, lambda: f"trims still running: {len(trims)} so far")
    assert len(trims) == 6 and sum(at > released + 0.04 for at in trims) >= 3


def test_a_trim_thread_that_cannot_start_does_not_stop_later_trims(monkeypatch):
    if memory._LIBC is None:
        pytest.skip("no glibc malloc_trim here: nothing is trimmed")
    wait_until(lambda: not memory._trimming, 10, lambda: "an earlier trim thread still runs")

    def refuse(self):
        raise RuntimeError("can't start new thread")

    with monkeypatch.context() as patch:
        patch.setattr(memory.threading.Thread, "start", refuse)
        release_free_memory(1 << 30)
    assert not memory._trimming  # so the next release starts a thread again
    trims = []
    monkeypatch.setattr(memory, "TRIM_DELAYS", (0.01,))
    monkeypatch.setattr(memory, "trim_heaps", lambda: trims.append(1))
    release_free_memory(1 << 30)
    wait_until(lambda: trims, 10, lambda: "no trim after the failed start")


def test_repeated_log_records_are_rate_limited_and_counted():
    filter_ = RateLimitedLog(interval=60)

    def record():
        return logging.LogRecord(
            "asyncio", logging.ERROR, __file__, 1, "socket.accept() out of system resource\nsocket: <x>", None, None
        )

    passed = [filter_.filter(record()) for _ in range(1000)]
    assert passed.count(True) == 1
    other = logging.LogRecord("asyncio", logging.ERROR, __file__, 1, "another message", None, None)
    assert filter_.filter(other)
    filter_.interval = 0
    last = record()
    assert filter_.filter(last) and "999 more like it" in last.msg


def test_heaps_are_capped_unless_malloc_arena_max_says_otherwise(monkeypatch):
    from remote_vae import memory

    if memory._LIBC is None or not hasattr(memory._LIBC, "mallopt"):
        pytest.skip("no glibc mallopt here")
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    assert memory.limit_heaps() is True
    monkeypatch.setenv("MALLOC_ARENA_MAX", "8")
    assert memory.limit_heaps() is False  # the operator's setting stands
