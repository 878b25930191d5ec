"""The CPU deadline every decode of a file runs under: in proportion to its pixels, enforced between Pillow's reads
and, for a child process (ffmpeg, a progressive JPEG's Pillow), by RLIMIT_CPU and a watchdog reading its CPU time."""

from __future__ import annotations

import io
import os
import resource
import subprocess
import threading
import time

import numpy as np

from ..errors import RequestError
from ..settings import Limits

# The CPU a decode may use: a floor, plus 5x the slowest measured cost per pixel (Pillow's PNG, 48 ns/px with the
# conversion to RGB on this project's CI machine; JPEG 18, WebP 41, ffmpeg's H.264 under 10), capped by the setting.
DECODE_FLOOR_SECONDS = 1.0


DECODE_SECONDS_PER_PIXEL = 250e-9


DEFAULT_DECODE_CPU_SECONDS = Limits.decode_cpu_seconds


def decode_cpu_seconds(pixels: int, cap: float = DEFAULT_DECODE_CPU_SECONDS) -> float:
    """CPU seconds allowed to decode `pixels` pixels (over every frame)."""
    return min(cap, DECODE_FLOOR_SECONDS + pixels * DECODE_SECONDS_PER_PIXEL)


def too_slow(what: str, seconds: float) -> RequestError:
    return RequestError(
        f"decoding the {what} took more than its {seconds:.3g} s of CPU (1 s plus 250 ns a pixel, at most "
        "--decode-cpu-seconds); send a simpler file of the same pixels (e.g. a baseline JPEG or a PNG)",
        status=413,
    )


class DecodeDeadline(Exception):
    pass


class DeadlineReader(io.BytesIO):
    """File bytes for Pillow that end its decode once the thread has used `seconds` of CPU from `start()`.

    Pillow decodes as it reads, a block at a time, so the check between reads bounds the work."""

    deadline: float | None = None

    def start(self, seconds: float) -> None:
        self.deadline = time.thread_time() + seconds

    def read(self, size: int | None = -1) -> bytes:
        if self.deadline is not None and time.thread_time() > self.deadline:
            raise DecodeDeadline()
        return super().read(size)


def limit_cpu(process: subprocess.Popen, seconds: float) -> None:
    """RLIMIT_CPU on a child just started: SIGXCPU, then SIGKILL a second later, if it decodes past its deadline."""
    limit = max(1, int(seconds + 0.999))
    try:
        resource.prlimit(process.pid, resource.RLIMIT_CPU, (limit, limit + 1))
    except (OSError, ValueError, AttributeError):  # not Linux, or the child has exited already
        pass


KILLED = (-9, -24)  # SIGKILL (the watchdog, or RLIMIT_CPU's hard limit), SIGXCPU (its soft limit): past the deadline


def run_into(out: np.ndarray, command: list[str], cpu_seconds: float) -> tuple[int, int, str]:
    """Run a decoder that writes raw pixels to its stdout straight into `out` (no copy held twice), under RLIMIT_CPU and
    a
    wall-clock watchdog (a stalled pipe, not just CPU, ends it). (bytes filled, return code, the last of its stderr)."""
    process = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0
    )
    limit_cpu(process, cpu_seconds)
    errors = bytearray()

    def read_errors() -> None:  # all of it, so the child never blocks on a full pipe; the last 64 KB kept
        while chunk := process.stderr.read(1 << 16):
            errors[:] = (errors + chunk)[-(1 << 16) :]

    reader = threading.Thread(target=read_errors, name="decoder-errors", daemon=True)
    reader.start()
    finished = threading.Event()
    killed = []

    def watch() -> None:  # RLIMIT_CPU counts whole seconds: the child's CPU time is read here every 20 ms as well
        wall_deadline = time.monotonic() + cpu_seconds * 4 + 5
        while not finished.wait(0.02):
            if _cpu_seconds(process.pid) > cpu_seconds or time.monotonic() > wall_deadline:
                killed.append(True)
                process.kill()
                return

    watchdog = threading.Thread(target=watch, name="decoder-deadline", daemon=True)
    watchdog.start()
    filled = 0
    try:
        view = memoryview(out).cast("B")
        while filled < len(view):
            count = process.stdout.readinto(view[filled:])
            if not count:
                break
            filled += count
        process.stdout.close()
        returncode = process.wait()
    finally:
        finished.set()
        if process.poll() is None:
            process.kill()
            process.wait()
        reader.join(timeout=5)
        watchdog.join(timeout=5)
    return filled, KILLED[0] if killed else returncode, bytes(errors).decode("utf-8", errors="replace")


_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _cpu_seconds(pid: int) -> float:
    """A running child's user + system CPU time, all its threads (Linux /proc; 0 elsewhere)."""
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICKS
    except (OSError, IndexError, ValueError):
        return 0.0


def last_line(text: str) -> str:
    """A child's last words on stderr: ffmpeg and Python both end with the error that stopped them."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return (lines[-1] if lines else "ffmpeg failed")[:300]
