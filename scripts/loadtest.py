#!/usr/bin/env python
"""Load test: N concurrent clients against the real server on 127.0.0.1, for a bounded time.

    python scripts/loadtest.py --clients 64 --seconds 60 [--invalid 0.25] [--max-queue 16] [--size 128] [--device
    cpu|cuda]

Starts `python -m remote_vae serve sd15` on a free loopback port with a
seeded SD-architecture VAE (the test suite's tiny widths unless --real) saved
to a temporary directory, and builds the same model in this process for the
expected pixels. Each client loops until the deadline, sending either a valid
decode (one of a few fixed latents, uint8 output) or one of several invalid
requests. A 503 is the server's deliberate backpressure: the client waits
Retry-After (at most 2 s) and goes on.

It reports p50 / p99 latency of answered decodes, their throughput, status
counts, the server's peak RSS, and every failure: a valid decode not
answered 200 or 503, pixels more than 1 off diffusers', an invalid request not
answered 4xx JSON, a 5xx other than 503, a client error or timeout. Exit
status 1 when there was any failure.
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import platform
import random
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import requests
import torch
from diffusers import AutoencoderKL
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import start_server  # noqa: E402

TINY_SD = dict(
    block_out_channels=(8, 16, 16, 16),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=1,
    norm_num_groups=8,
    sample_size=64,
)
REAL_SD = dict(
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    norm_num_groups=32,
    sample_size=512,
)
LATENTS = 4  # distinct valid latents, so a mixed-up reply would be caught
TENSOR = {"Content-Type": "tensor/binary"}


def truncated_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buffer, format="PNG")
    return buffer.getvalue()[:80]


INVALID = {  # name -> (query, body, headers)
    "byte count": ({"shape": [1, 4, 16, 16], "dtype": "float16"}, bytes(100), TENSOR),
    "dtype": ({"shape": [1, 4, 16, 16], "dtype": "float64"}, bytes(8 * 1024), TENSOR),
    "huge shape": ({"shape": [1, 4, 10**5, 10**5], "dtype": "float16"}, bytes(2048), TENSOR),
    "nan": ({"shape": [1, 4, 2, 2], "dtype": "float32"}, np.full(16, np.nan, np.float32).tobytes(), TENSOR),
    "truncated png": ({}, truncated_png(), {"Content-Type": "image/png"}),
    "bad json": ({}, b'{"inputs": "@@"}', {"Content-Type": "application/json"}),
}


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    statuses: collections.Counter = field(default_factory=collections.Counter)
    latencies: list[float] = field(default_factory=list)  # answered valid decodes
    failures: list[str] = field(default_factory=list)
    valid_sent: int = 0
    invalid_sent: int = 0

    def fail(self, message: str) -> None:
        with self.lock:
            if len(self.failures) < 1000:
                self.failures.append(message)


def client(index: int, url: str, args, latents, expected, tally: Tally, deadline: float) -> None:
    rng = random.Random(index)
    session = requests.Session()
    for _ in range(10**6):  # bounded; the deadline ends it long before
        if time.monotonic() >= deadline:
            return
        valid = rng.random() >= args.invalid
        if valid:
            which = rng.randrange(LATENTS)
            query, body, headers = (
                {
                    "shape": list(latents[which].shape),
                    "dtype": "float32",
                    "output_type": "pt",
                    "partial_postprocess": "True",
                },
                latents[which].numpy().tobytes(),
                TENSOR,
            )
        else:
            name = rng.choice(sorted(INVALID))
            query, body, headers = INVALID[name]
        started = time.monotonic()
        try:
            response = session.post(url, params=query, data=body, headers=headers, timeout=args.timeout)
        except requests.RequestException as exc:
            tally.fail(f"client {index}: {type(exc).__name__}: {exc}")
            continue
        seconds = time.monotonic() - started
        status = response.status_code
        with tally.lock:
            tally.statuses[status] += 1
            tally.valid_sent += valid
            tally.invalid_sent += not valid
        if status == 503:
            time.sleep(min(2.0, float(response.headers.get("Retry-After", 1))))
            continue
        if valid:
            if status != 200:
                tally.fail(f"valid decode answered {status}: {response.text[:200]}")
                continue
            got = np.frombuffer(response.content, dtype=np.uint8).reshape(json.loads(response.headers["shape"]))
            if np.abs(got.astype(int) - expected[which].astype(int)).max() > 1:
                tally.fail(f"valid decode of latent {which}: pixels differ from diffusers'")
                continue
            with tally.lock:
                tally.latencies.append(seconds)
        elif not (
            400 <= status < 500
            and response.headers.get("content-type") == "application/json"
            and "error" in response.json()
        ):
            tally.fail(f"invalid request {name!r} answered {status}: {response.text[:200]}")


def peak_rss_mib(pid: int) -> tuple[float, float]:
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(status["VmRSS"].split()[0]) / 1024, int(status["VmHWM"].split()[0]) / 1024


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--invalid", type=float, default=0.25, help="share of invalid requests")
    parser.add_argument(
        "--max-queue", type=int, default=16, help="the server's --max-queue (smaller than --clients: some 503s)"
    )
    parser.add_argument("--size", type=int, default=128, help="decoded image side, pixels")
    parser.add_argument(
        "--real", action="store_true", help="the real SD VAE architecture (seeded weights) instead of the tiny one"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--timeout", type=float, default=300, help="client timeout per request, seconds")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = AutoencoderKL(latent_channels=4, scaling_factor=0.18215, **(REAL_SD if args.real else TINY_SD)).eval()
    side = args.size // 8
    latents = [torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(seed)) for seed in range(LATENTS)]
    processor = VaeImageProcessor(vae_scale_factor=8)
    with torch.no_grad():
        expected = [
            (processor.postprocess(model.decode(z).sample, output_type="np") * 255).round().astype(np.uint8)
            for z in latents
        ]

    with tempfile.TemporaryDirectory(prefix="loadtest-") as folder:
        model.save_pretrained(folder)
        process, url = start_server(
            "sd15", args.device, ["--model", folder, "--max-queue", str(args.max_queue), "--queue-timeout", "60"]
        )
        tally = Tally()
        try:
            rss_start, _ = peak_rss_mib(process.pid)
            deadline = time.monotonic() + args.seconds
            threads = [
                threading.Thread(target=client, args=(i, url, args, latents, expected, tally, deadline), daemon=True)
                for i in range(args.clients)
            ]
            started = time.monotonic()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=args.seconds + args.timeout + 30)
            elapsed = time.monotonic() - started
            hung = sum(thread.is_alive() for thread in threads)
            if hung:
                tally.fail(f"{hung} client(s) still waiting after the deadline")
            healthy = requests.get(url + "health", timeout=10).status_code == 200
            if not healthy:
                tally.fail("server not healthy after the run")
            rss_end, rss_peak = peak_rss_mib(process.pid)
        finally:
            process.terminate()
            process.wait(timeout=60)

    gpu = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "none"
    summary = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, GPU {gpu}",
        "clients": args.clients,
        "seconds": round(elapsed, 1),
        "server_max_queue": args.max_queue,
        "model": "SD VAE, real architecture" if args.real else "SD VAE, tiny test widths",
        "image": f"{args.size}x{args.size}",
        "requests": sum(tally.statuses.values()),
        "valid_sent": tally.valid_sent,
        "invalid_sent": tally.invalid_sent,
        "statuses": dict(sorted(tally.statuses.items())),
        "decodes_answered": len(tally.latencies),
        "decodes_per_second": round(len(tally.latencies) / elapsed, 1),
        "p50_ms": round(1000 * percentile(tally.latencies, 0.5), 1),
        "p99_ms": round(1000 * percentile(tally.latencies, 0.99), 1),
        "server_rss_mib": {"start": round(rss_start), "end": round(rss_end), "peak": round(rss_peak)},
        "failures": len(tally.failures),
    }
    print(json.dumps(summary, indent=1))
    for failure in tally.failures[:20]:
        print("FAILURE:", failure, file=sys.stderr)
    return 1 if tally.failures else 0


if __name__ == "__main__":
    sys.exit(main())
