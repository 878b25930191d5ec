"""Host memory: a budget that admitted requests reserve from, and handing freed memory back to the system.

Every byte a request holds on the host outside the model call is reserved before
it exists: the body as it arrives, then, once the request's sizes are read from
its shape or its file's headers, what its decoded pixels, frames, results and
reply will hold (service.py estimates it). A reservation that does not fit
waits, oldest first; it gets 503 with Retry-After when its wait runs out, and
413 at once when it could never fit. So the server's resident memory is its idle
size plus at most the budget, plus one model call's working memory (on a GPU
that is device memory), plus small per-connection buffers (docs/reliability.md).

Waiting cannot deadlock: a request holding part of the budget may wait for more
(a body still arriving, a decode about to start). If every reserved byte belongs
to a waiting request, none will be released, so the newest waiter is refused at
once and its bytes go to the others.

Everything here runs on the event loop but `Reservation.try_grow`, which a worker thread calls to go on at once when
the memory is free (the common case, saving a second trip to a thread); a lock keeps the counters whole.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import RequestError

# What a body costs the budget per byte received: the chunks and their join (2), or for JSON the text, its parse and
# the base64 payload decoded (4), or for a safetensors body of named tensors the chunks, their join and the copy of
# each tensor safetensors' deserialize makes (3).
BODY_COST, JSON_BODY_COST, SAFETENSORS_BODY_COST = 2, 4, 3

log = logging.getLogger("remote_vae")

MIB = 1 << 20
# --memory-budget auto: this share of the memory the process may use (its cgroup's limit, else the machine's).
AUTO_SHARE = 0.4
MIN_AUTO_BUDGET = 512 * MIB


def machine_memory() -> int:
    """Bytes this process may use: the cgroup's memory limit when one is set, else the machine's physical memory."""
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):  # cgroup v2, v1
        try:
            text = open(path).read().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < physical:
            return int(text)
    return physical


def auto_budget() -> int:
    return max(MIN_AUTO_BUDGET, int(machine_memory() * AUTO_SHARE))


def size_text(count: int) -> str:
    return f"{count / MIB:.1f} MiB" if count >= MIB else f"{count} bytes"


@dataclass(eq=False)
class _Waiter:
    reservation: Reservation
    extra: int
    granted: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class MemoryBudget:
    """`limit` bytes shared by the requests in flight; see the module's docstring."""

    def __init__(self, limit: int, retry_after: Callable[[], int] = lambda: 1):
        self.limit = limit
        self.retry_after = retry_after  # seconds to advise in a 503 (admission.py measures the service rate)
        self.in_use = 0
        self.peak = 0
        self.refused = 0
        self._waiters: deque[_Waiter] = deque()
        self._held_by_waiters = 0
        self._on_idle: list[Callable[[int], None]] = []
        self._peak_since_idle = 0
        self._lock = threading.RLock()  # the counters, against try_grow from worker threads

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def reservation(self) -> Reservation:
        return Reservation(self)

    def when_idle(self, callback: Callable[[int], None]) -> None:
        """Call `callback(peak)` each time the last reserved byte is released, with the most reserved since the last
        time."""
        self._on_idle.append(callback)

    def _grant(self, reservation: Reservation, extra: int) -> None:
        self.in_use += extra
        self.peak = max(self.peak, self.in_use)
        self._peak_since_idle = max(self._peak_since_idle, self.in_use)
        reservation.held += extra

    def _fits(self, extra: int) -> bool:
        return self.in_use + extra <= self.limit

    def _busy(self, reason: str) -> RequestError:
        self.refused += 1
        return RequestError(
            f"the server is at its memory budget ({size_text(self.limit)} for requests in flight, --memory-budget): "
            f"{reason}; "
            "retry after the Retry-After seconds",
            status=503,
            headers={"Retry-After": str(self.retry_after())},
        )

    def _too_large(self, reservation: Reservation, extra: int) -> RequestError | None:
        if reservation.held + extra <= self.limit:
            return None
        return RequestError(
            f"this request needs {size_text(reservation.held + extra)} of host memory ({reservation.purpose}); "
            f"this server's --memory-budget holds {size_text(self.limit)} for all requests at once",
            status=413,
        )

    def _take_now(self, reservation: Reservation, extra: int) -> bool:
        """Grant at once if nobody waits and it fits (any thread)."""
        with self._lock:
            if self._waiters or not self._fits(extra):
                return False
            self._grant(reservation, extra)
            return True

    async def _acquire(self, reservation: Reservation, extra: int, timeout: float) -> None:
        if error := self._too_large(reservation, extra):
            raise error
        if self._take_now(reservation, extra):
            return
        waiter = _Waiter(reservation, extra)
        with self._lock:
            self._waiters.append(waiter)
            self._held_by_waiters += reservation.held
        self._settle()
        try:
            await asyncio.wait_for(asyncio.shield(waiter.granted), timeout)
        except asyncio.TimeoutError:  # the builtin TimeoutError from Python 3.11, a class of its own on 3.10
            pass
        finally:
            if not waiter.granted.done():
                self._remove(waiter)
                waiter.granted.cancel()
                self._settle()
        if waiter.granted.cancelled():
            raise self._busy(f"waited {timeout:g} s for {size_text(extra)}")
        waiter.granted.result()  # raises the refusal, if it was refused

    def _remove(self, waiter: _Waiter) -> None:
        with self._lock:
            self._waiters.remove(waiter)
            self._held_by_waiters -= waiter.reservation.held

    def _settle(self) -> None:
        with self._lock:
            self._settle_locked()

    def _settle_locked(self) -> None:
        """Grant waiters in order while they fit; refuse the newest while only waiters hold memory (nothing will be
        released)."""
        while self._waiters:
            head = self._waiters[0]
            if self._fits(head.extra):
                self._remove(head)
                self._grant(head.reservation, head.extra)
                head.granted.set_result(None)
            elif self.in_use == self._held_by_waiters:
                newest = self._waiters[-1]
                self._remove(newest)
                newest.granted.set_exception(self._busy("every byte of it is held by requests waiting for more"))
                newest.granted.exception()  # retrieved here; the waiter raises it
                self.in_use -= newest.reservation.held
                newest.reservation.held = 0
            else:
                return

    def _release(self, count: int) -> None:
        with self._lock:
            self.in_use -= count
        self._settle()
        if self.in_use == 0:
            peak, self._peak_since_idle = self._peak_since_idle, 0
            for callback in self._on_idle:
                callback(peak)


class Reservation:
    """One request's share of the budget: grown as it needs more, shrunk once its reply is rendered, released when
    sent."""

    def __init__(self, budget: MemoryBudget):
        self.budget = budget
        self.held = 0
        self.purpose = "its body"

    async def grow(self, extra: int, timeout: float, purpose: str | None = None) -> None:
        """Reserve `extra` bytes more, waiting at most `timeout` seconds (then 503); 413 if the request could never
        fit."""
        if purpose:
            self.purpose = purpose
        if extra > 0:
            await self.budget._acquire(self, extra, timeout)

    def try_grow(self, extra: int, purpose: str | None = None) -> bool:
        """Reserve `extra` bytes more if that needs no wait (from any thread); 413 if the request could never fit."""
        if purpose:
            self.purpose = purpose
        if error := self.budget._too_large(self, extra):
            raise error
        return extra <= 0 or self.budget._take_now(self, extra)

    def shrink_to(self, total: int) -> None:
        if total < self.held:
            freed, self.held = self.held - total, total
            self.budget._release(freed)

    def release(self) -> None:
        self.shrink_to(0)


# -- the allocator ---------------------------------------------------------------
# glibc keeps freed memory for reuse: its mmap threshold rises to the largest block freed (up to 32 MiB), after which
# large buffers come from the heaps and stay resident, and each thread has its own heap. Seen after a flood of large
# requests: resident memory stayed at 1.6-6 GB instead of returning to its idle 341 MB. malloc_trim hands every heap's
# free pages back (measured: 16 encodes of 4096x4096 at once, 1071 MiB at the peak, 384 MiB two seconds after, idle
# 369). A fixed mmap threshold would return them too, but made the model's CPU decode 20-30% slower (a page fault on
# every fresh activation), so it is not set.


def _libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None  # glibc's; musl and others have none


_LIBC = _libc()


# Each thread's heap (arena) keeps its own free pages, which malloc_trim returns only where whole pages are free: after
# 16 concurrent 2048² PNG encodes, resident memory settled 25-45 MiB above where it began with glibc's default of 8
# arenas a core (74 MiB once, past the attack test's 64 MiB bound), -23 to +21 MiB with 2 set here at start-up
# (tests/live/test_attacks.py, three runs each, 2026-12-04). MALLOC_ARENA_MAX, where set, wins.
HEAP_ARENAS = 2
M_ARENA_MAX = -8  # glibc's mallopt parameter


def limit_heaps(arenas: int = HEAP_ARENAS) -> bool:
    """Cap glibc's per-thread heaps at `arenas` (mallopt M_ARENA_MAX), unless MALLOC_ARENA_MAX says otherwise; call
    before the server's threads start. Whether it was set."""
    if _LIBC is None or not hasattr(_LIBC, "mallopt") or os.environ.get("MALLOC_ARENA_MAX"):
        return False
    return bool(_LIBC.mallopt(M_ARENA_MAX, arenas))


def trim_heaps() -> None:
    """Hand the heaps' free pages back to the system now (glibc's malloc_trim; elsewhere nothing to do)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


_trims = threading.Lock()  # guards the two flags below
_trimming = False  # a trim thread is running its schedule
_released_again = False  # a release came while it ran: it runs the schedule once more, from its end
# Seconds after the last release: soon, again when the stragglers (a reply's bytes, a job's tensors) are surely gone,
# and once more after a cut connection's buffers are (unread replies left 42-48 MiB after 1 s, of a 64 MiB margin).
TRIM_DELAYS = (0.2, 1.0, 4.0)
TRIM_AFTER_BYTES = 16 * MIB  # after smaller requests trimming would only cost time: their memory is reused at once


def release_free_memory(reserved: int = TRIM_AFTER_BYTES) -> None:
    """After `reserved` bytes of requests have come and gone: hand the heaps' free pages back to the system, in a thread
    (it takes milliseconds on a large heap), at each of TRIM_DELAYS after this release.

    One thread trims at a time; a release while it runs has it run its schedule again from its end, so every release
    is followed by all three trims (before, a burst's last stragglers could be freed after the final trim and stay
    resident: 72 MiB over the baseline, once in several runs of the image-bomb attack)."""
    global _trimming, _released_again
    if _LIBC is None or reserved < TRIM_AFTER_BYTES:
        return
    with _trims:
        if _trimming:
            _released_again = True
            return
        _trimming = True

    def trim() -> None:
        global _trimming, _released_again
        done = False
        try:
            while not done:
                # The requests' last objects (a reply's bytes, a job's tensors) are freed as they unwind.
                for delay in TRIM_DELAYS:
                    time.sleep(delay)
                    trim_heaps()
                with _trims:  # checked and cleared under the lock: no release falls between the two
                    done, _released_again = not _released_again, False
                    _trimming = not done
        finally:
            if not done:  # failed: the next release starts a thread again
                with _trims:
                    _trimming = False

    try:
        threading.Thread(target=trim, name="malloc-trim", daemon=True).start()
    except RuntimeError:  # no thread to be had now: the next release tries again
        with _trims:
            _trimming = False
