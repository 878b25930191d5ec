"""Connections: a cap on how many are open, deadlines for idle and slow ones, and logs that cannot flood.

uvicorn on its own keeps a connection that never sends a request open forever,
and one whose client never reads its reply pins that reply; at the open-file
limit, new connections fail and every failed accept logs a traceback. Here
(one protocol class per server, `protocol_class`):
- a connection must deliver a request's head within `header_timeout` seconds of
  opening, or of its previous reply, else it gets 408 (or, if it sent nothing, is
  closed); an idle keep-alive connection is closed after uvicorn's keep-alive
  timeout;
- at most `max_connections` are open: past that the connection idle longest (no
  request in progress) is closed to make room, and when none is idle the new one
  gets 503 and is closed. An idle flood thus costs legitimate clients nothing;
- a reply that the client stops reading is aborted once it drains slower than
  `min_rate` bytes a second over `header_timeout` seconds, which frees its buffers.
Bodies are read by the app, which applies its own rate (server.read_body).
"""

from __future__ import annotations

import logging
import resource
import time
from dataclasses import dataclass, field

from uvicorn.protocols.http.h11_impl import H11Protocol

from ..errors import ERROR_MEDIA_TYPE, error_body
from ..settings import ConnectionSettings

log = logging.getLogger("remote_vae")

# File descriptors kept free of connections: the listening socket, model files, logs, ffmpeg's pipes and temporary
# files.
RESERVED_FILES = 256


@dataclass
class ConnectionStats:
    """Shared by a server's connections and read by /metrics."""

    settings: ConnectionSettings = field(default_factory=ConnectionSettings)
    open: int = 0
    limit: int = 0  # the cap in force: max_connections, lowered to fit the open-file limit
    closed: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(("header_timeout", "evicted_idle", "refused_full", "write_stalled"), 0)
    )
    idle: dict = field(
        default_factory=dict
    )  # connections with no request in progress, the longest idle first (insertion order)


def raise_open_file_limit() -> int:
    """Raise this process's soft open-file limit to its hard limit; returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def connection_limit(settings: ConnectionSettings) -> int:
    """The cap in force: --max-connections, lowered where the open-file limit could not hold that many."""
    files = raise_open_file_limit()
    fitting = max(16, files - RESERVED_FILES) if files != resource.RLIM_INFINITY else settings.max_connections
    if fitting < settings.max_connections:
        log.warning(
            "at most %d connections at once: the open-file limit is %d (ulimit -n); --max-connections asked for %d",
            fitting,
            files,
            settings.max_connections,
        )
    return min(settings.max_connections, fitting)


def raw_reply(status: int, reason: str, message: str) -> bytes:
    """A whole HTTP/1.1 reply with a JSON error body that closes the connection, for answers given outside any
    request."""
    body = error_body(message)
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: {ERROR_MEDIA_TYPE}\r\ncontent-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode() + body


class GuardedProtocol(H11Protocol):
    """uvicorn's h11 protocol with this server's connection rules (the module's docstring); `protocol_class` binds it
    to a server's ConnectionStats."""

    stats: ConnectionStats

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.stats.open += 1
        self._request_seen = None  # the cycle of the latest request whose head arrived
        self._received = 0  # bytes since that request
        self._head_timer = None
        self._stall_timer = None
        self._arm_head_timer()
        if len(self.connections) > self.stats.limit:
            self._make_room()
        if not self.transport.is_closing():
            self.stats.idle[self] = None

    def connection_lost(self, exc) -> None:
        self.stats.open -= 1
        self.stats.idle.pop(self, None)
        for timer in (self._head_timer, self._stall_timer):
            if timer is not None:
                timer.cancel()
        super().connection_lost(exc)

    @property
    def idle(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _make_room(self) -> None:
        while self.stats.idle:
            oldest = next(iter(self.stats.idle))
            del self.stats.idle[oldest]
            if oldest.transport.is_closing():
                continue
            self.stats.closed["evicted_idle"] += 1
            # abort, not close: a close waits for an unread reply to drain, holding the connection meanwhile
            oldest.transport.abort() if oldest.transport.get_write_buffer_size() else oldest.transport.close()
            return
        self.stats.closed["refused_full"] += 1
        self.transport.write(
            raw_reply(
                503,
                "Service Unavailable",
                f"the server holds its most connections ({self.stats.limit}), "
                "every one with a request in progress; retry in a few seconds",
            )
        )
        self.transport.close()

    def _arm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_timer = self.loop.call_later(self.stats.settings.header_timeout, self._head_timed_out)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self.idle or self.transport.is_closing():
            return
        self.stats.idle.pop(self, None)
        self.stats.closed["header_timeout"] += 1
        if self._received:  # part of a request arrived: say why it is closed
            self.transport.write(
                raw_reply(
                    408,
                    "Request Timeout",
                    f"the request's head did not arrive within {self.stats.settings.header_timeout:g} s",
                )
            )
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        self._received += len(data)
        super().data_received(data)
        self._note_request()

    def _note_request(self) -> None:
        if self.cycle is not None and self.cycle is not self._request_seen:
            self._request_seen, self._received = self.cycle, 0
            self.stats.idle.pop(self, None)
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

    def on_response_complete(self) -> None:
        super().on_response_complete()  # arms uvicorn's keep-alive timer, may start a pipelined request
        if not self.transport.is_closing():
            self._note_request()
            if self.idle:
                self.stats.idle[self] = None  # now the most recently idle
                self._arm_head_timer()

    def send_400_response(self, msg: str) -> None:
        """A request h11 cannot parse (a malformed request line, a head over 16 KiB): JSON, like every other error."""
        self.transport.write(
            raw_reply(
                400,
                "Bad Request",
                f"{msg.rstrip('.')}: expected an HTTP/1.1 request whose "
                "request line and headers together take at most 16 KiB",
            )
        )
        self.transport.close()

    # -- replies that stop draining --------------------------------------------
    def pause_writing(self) -> None:
        super().pause_writing()
        if not self.stats.settings.min_rate:
            return
        if self._stall_timer is not None:
            self._stall_timer.cancel()
        self._watch_drain(self.transport.get_write_buffer_size(), self.stats.settings.rate_grace)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None

    def _watch_drain(self, buffered: int, seconds: float) -> None:
        self._stall_timer = self.loop.call_later(seconds, self._check_drain, buffered, seconds)

    def _check_drain(self, buffered_before: int, seconds: float) -> None:
        self._stall_timer = None
        # Still watched after a close: it waits for the buffer to drain
        buffered = self.transport.get_write_buffer_size()
        if buffered_before - buffered < self.stats.settings.min_rate * seconds:
            self.stats.closed["write_stalled"] += 1
            log.info(
                "aborted a reply to %s: it drained %d bytes in %g s, slower than %d bytes/s",
                self.client[0] if self.client else "-",
                max(0, buffered_before - buffered),
                seconds,
                self.stats.settings.min_rate,
            )
            self.transport.abort()  # frees the buffered reply now; close() would wait for it to drain
            return
        self._watch_drain(buffered, seconds)


def protocol_class(stats: ConnectionStats) -> type[H11Protocol]:
    """GuardedProtocol for one server: uvicorn makes a protocol per connection from the class it is given."""
    return type("GuardedProtocol", (GuardedProtocol,), {"stats": stats})


class RateLimitedLog(logging.Filter):
    """Passes the first record of each message per `interval` seconds and counts the rest into the next one it passes.

    At the open-file limit, asyncio logs a traceback for every failed accept (227 MB in 40 s was seen).
    """

    def __init__(self, interval: float = 10.0):
        super().__init__()
        self.interval = interval
        self._last: dict[tuple, float] = {}
        self._suppressed: dict[tuple, int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, str(record.msg).split("\n", 1)[0])
        now = time.monotonic()
        if now - self._last.get(key, -self.interval) < self.interval:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return False
        if len(self._last) > 1000:  # bounded whatever the messages
            self._last.clear()
        self._last[key] = now
        if suppressed := self._suppressed.pop(key, 0):
            record.msg = f"{record.msg} [and {suppressed} more like it in the last {self.interval:g} s]"
        return True


def limit_log_floods(interval: float = 10.0) -> None:
    """Rate-limit the loggers a connection flood writes to: asyncio's (failed accepts) and uvicorn's (malformed
    requests)."""
    for name in ("asyncio", "uvicorn.error"):
        logger = logging.getLogger(name)
        if not any(isinstance(existing, RateLimitedLog) for existing in logger.filters):
            logger.addFilter(RateLimitedLog(interval))
