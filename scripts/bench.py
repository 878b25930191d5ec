#!/usr/bin/env python
"""Benchmarks: the service against diffusers in-process, same weights, same inputs, one run.

    python scripts/bench.py image --family sd15 --tiny --sizes 512 --batches 1 4 --clients 1 2 4 8 16 [--device cuda]
    [--compile]
    python scripts/bench.py device-path --family sd15 --size 512 [--tiny] [--device cuda] [--compile]
    python scripts/bench.py png --images photo.png ... [--size 720]
    python scripts/bench.py mp4-overlap --family wan21 --tiny --size 256 --frames 81
    python scripts/bench.py video --family hunyuanvideo --sizes 64 128 --frames 9 17 33 65 [--tiny] [--device cpu|cuda]
    python scripts/bench.py tiling --family sd15 --tiny --sizes 1024 2048 4096 [--device cuda] [--pictures docs/tiling]
    [--operation encode]
    python scripts/bench.py tiling --family wan21 --tiny --sizes 512 1024 --frames 5
    python scripts/bench.py tiling --family hunyuanvideo15 --tiny --sizes 512 768 --frames 9
    python scripts/bench.py ray --family sd15 --tiny --size 256 --clients 1 4 [--device cuda]
    python scripts/bench.py preview --family taesd [--preview-model DIR --full-model DIR] --size 512 [--device cuda]

Models are a family's real architecture with seeded random weights (or
--tiny: the test suite's widths), saved to a temporary directory that the
server loads too. `image` measures, per workload (family x size x operation x
output x batch):
  in-process:  what a user runs instead: diffusers' vae.decode +
               VaeImageProcessor.postprocess + the same file encoding (or
               preprocess + vae.encode), same dtype and device;
  in-process, fast path: the same with the service's device path
               (channels-last weights, uint8 made on the device);
  service:     diffusers' remote_decode / remote_encode end to end over HTTP
               against `remote_vae serve` on 127.0.0.1;
the ratios service / in-process, peak memory of each process, and for decodes
throughput and p50 / p99 latency with 1, 2, 4, 8, 16 concurrent clients,
against a server with batching on and one with it off. It checks the
service's pixels against diffusers'. Results go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests
import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.remote_utils import remote_decode, remote_encode
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from remote_vae.device import DevicePath, set_up_model, to_device, to_host  # noqa: E402
from remote_vae.families import Family, load_family  # noqa: E402
from remote_vae.media import PNG_COMPRESSION, uint8_images  # noqa: E402
from remote_vae.vae import RANDOM_WEIGHTS_SEED, model_class, resolve_device, resolve_dtype  # noqa: E402

OUTPUTS = {
    "pt": dict(output_type="pt", return_type="pt"),
    "pt-uint8": dict(output_type="pt", partial_postprocess=True, return_type="pt"),
    "png": dict(output_type="pil", image_format="png"),
    "jpg": dict(output_type="pil", image_format="jpg"),
}
TINY_ARCHITECTURES = {
    # The test suite's tiny shapes: the real block structure, far fewer channels.
    "AutoencoderKL": dict(block_out_channels=[8, 16, 16, 16], layers_per_block=1, norm_num_groups=8),
    "AutoencoderKLHunyuanVideo": dict(block_out_channels=[8, 16, 16, 16], layers_per_block=1, norm_num_groups=8),
    "AutoencoderKLWan": dict(base_dim=8, dim_mult=[1, 2, 2, 2], num_res_blocks=1),
    "AutoencoderKLHunyuanVideo15": dict(block_out_channels=[8, 16, 16, 64, 64], layers_per_block=1),
    "AutoencoderKLLTX2Video": dict(
        block_out_channels=[8, 8, 16, 16],
        layers_per_block=[1, 1, 1, 1, 1],
        decoder_block_out_channels=[16, 32, 64],
        decoder_layers_per_block=[1, 1, 1, 1],
    ),
    "AutoencoderKLLTX2Audio": dict(ch_mult=[1, 1, 1], num_res_blocks=1),  # 128 base channels: its statistics' count
    "LTX2Vocoder": dict(hidden_channels=32, resnet_kernel_sizes=[3], resnet_dilations=[[1]]),
}


def start_server(family: str, device: str, serve_options: list[str] | None = None) -> tuple[subprocess.Popen, str]:
    """`serve FAMILY` on a free loopback port with serve_options (default: --random-weights), once healthy."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [
        sys.executable,
        "-m",
        "remote_vae",
        "serve",
        family,
        *(serve_options or ["--random-weights"]),
        "--device",
        device,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    process = subprocess.Popen(command, cwd=ROOT)
    url = f"http://127.0.0.1:{port}/"
    for _ in range(2400):  # at most 20 minutes (compiling at start-up)
        if process.poll() is not None:
            raise SystemExit(f"server exited with {process.returncode}")
        try:
            if requests.get(url + "health", timeout=2).ok:
                return process, url
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    process.kill()
    raise SystemExit("server did not become healthy")


def timed(function, repeats: int, synchronize) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def build_model(family: Family, tiny: bool) -> torch.nn.Module:
    architecture = dict(family.architecture)
    if tiny:
        architecture.update(TINY_ARCHITECTURES[family.model_class])
    torch.manual_seed(RANDOM_WEIGHTS_SEED)
    return model_class(family).from_config(architecture).eval()


def machine(device: torch.device) -> str:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "no GPU"
    return (
        f"{time.strftime('%Y-%m-%d')}; CPU {platform.processor() or platform.machine()} x{os.cpu_count()} cores, "
        f"{torch.get_num_threads()} torch threads; {gpu}; torch {torch.__version__}"
    )


# -- peak memory ---------------------------------------------------------------------


class ProcessPeak:
    """A process's peak memory during a block: on a GPU the CUDA allocator's peak (weights included) of this
    process; else the whole process's resident set at its highest (VmHWM, first reset to the current RSS
    through clear_refs). Absolute rather than above a start: memory freed by earlier calls and reused is
    part of what a call needs."""

    def __init__(self, pid: int, device: torch.device, own: bool):
        self.pid, self.device, self.own = pid, device, own
        self.mib: float | None = None

    def _status(self, key: str) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        return 0

    def __enter__(self) -> ProcessPeak:
        if self.device.type == "cuda" and self.own:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        elif self.device.type != "cuda":
            try:
                Path(f"/proc/{self.pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            except OSError:
                pass
        return self

    def __exit__(self, *exc_info) -> None:
        if self.device.type == "cuda" and self.own:
            torch.cuda.synchronize()
            self.mib = torch.cuda.max_memory_allocated() / 2**20
        elif self.device.type != "cuda":
            self.mib = self._status("VmHWM") / 2**20


def server_cuda_peak_mib(url: str) -> float | None:
    """The server's CUDA allocator peak so far, from /metrics."""
    for line in requests.get(url + "metrics", timeout=10).text.splitlines():
        if line.startswith("remote_vae_device_memory_bytes") and 'kind="peak_allocated"' in line:
            return float(line.split()[-1]) / 2**20
    return None


# -- image workloads -------------------------------------------------------------------


def sample_image(size: int, photo: str | None) -> Image.Image:
    """A photo cropped and scaled to size², or a smooth synthetic image."""
    if photo:
        return Image.open(photo).convert("RGB").resize((size, size), Image.Resampling.LANCZOS)
    ramp = np.add.outer(np.arange(size), np.arange(size)) / (2 * size)
    return Image.fromarray((np.stack([ramp, ramp[::-1], ramp.T], axis=-1) * 255).astype(np.uint8))


def encode_file(images: list[Image.Image], output: str) -> list[bytes]:
    """The file a user writes locally for each image, as the service writes it."""
    files = []
    for image in images:
        buffer = io.BytesIO()
        if output == "png":
            image.save(buffer, format="PNG", compress_level=PNG_COMPRESSION)
        else:
            image.save(buffer, format="JPEG", quality=90, subsampling=0)
        files.append(buffer.getvalue())
    return files


class InProcess:
    """diffusers in this process: as a user runs it (plain) or with the service's device path (fast)."""

    def __init__(self, model: torch.nn.Module, family: Family, device: torch.device, dtype: torch.dtype, fast: bool):
        self.path = DevicePath.default(device) if fast else DevicePath(False, False, False)
        self.model = set_up_model(copy.deepcopy(model).to(dtype=dtype), device, self.path)
        self.device, self.dtype, self.fast = device, dtype, fast
        self.processor = VaeImageProcessor(vae_scale_factor=family.spatial_compression)

    def decode(self, latents: torch.Tensor, output: str):
        with torch.inference_mode():
            inputs = (
                to_device(latents, self.device, self.dtype, self.path)
                if self.fast
                else latents.to(self.device, self.dtype)
            )
            sample = self.model.decode(inputs).sample
            if output == "pt":
                return to_host(sample, self.path) if self.fast else sample.cpu()
            if self.fast:
                pixels = to_host(uint8_images(sample), self.path).numpy()
            else:
                pixels = (self.processor.postprocess(sample, output_type="np") * 255).round().astype("uint8")
            if output == "pt-uint8":
                return pixels
            return encode_file([Image.fromarray(image) for image in pixels], output)

    def encode(self, images: list[Image.Image] | torch.Tensor):
        with torch.inference_mode():
            pixels = images if isinstance(images, torch.Tensor) else self.processor.preprocess(images[0])
            inputs = (
                to_device(pixels, self.device, self.dtype, self.path)
                if self.fast
                else pixels.to(self.device, self.dtype)
            )
            latents = self.model.encode(inputs).latent_dist.mean
            return to_host(latents, self.path) if self.fast else latents.cpu()


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def under_load(call, clients: int, total: int) -> tuple[list[float], float]:
    """`total` calls from `clients` threads at once: each call's latency, and the wall time of all."""
    latencies: list[float] = []
    lock = threading.Lock()
    per_client = [total // clients + (index < total % clients) for index in range(clients)]
    start = threading.Barrier(clients + 1)

    def run(count: int) -> None:
        start.wait()
        for _ in range(count):
            began = time.perf_counter()
            call()
            with lock:
                latencies.append(time.perf_counter() - began)

    threads = [threading.Thread(target=run, args=(count,)) for count in per_client]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    return latencies, time.perf_counter() - began


def pooled(runs: list[tuple[list[float], float]], images_per_call: int) -> dict:
    latencies = [latency for run in runs for latency in run[0]]
    wall = sum(run[1] for run in runs)
    return {
        "images_per_s": len(latencies) * images_per_call / wall,
        "p50_ms": 1000 * percentile(latencies, 0.5),
        "p99_ms": 1000 * percentile(latencies, 0.99),
    }


def bench_image(args: argparse.Namespace) -> None:
    device = resolve_device(args.device)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rows, loads = [], []
    for name in args.family:
        family = load_family(name)
        dtype = resolve_dtype(args.dtype, family, device)
        model = build_model(family, args.tiny)
        plain, fast = (
            InProcess(model, family, device, dtype, fast=False),
            InProcess(model, family, device, dtype, fast=True),
        )
        with tempfile.TemporaryDirectory(prefix="bench-") as folder:
            model.save_pretrained(folder)
            options = ["--model", folder, "--dtype", str(dtype).removeprefix("torch.")]
            if args.compile:
                options += ["--compile", "--warmup-sizes", *[f"{size}x{size}" for size in args.sizes]]
            on, on_url = start_server(name, device.type, options)
            off, off_url = (
                start_server(name, device.type, [*options, "--max-batch-images", "1"]) if args.clients else (None, None)
            )
            try:
                for size in args.sizes:
                    side = size // family.spatial_compression
                    for batch in args.batches:
                        latents = torch.randn(
                            batch,
                            family.latent_channels,
                            side,
                            side,
                            generator=torch.Generator().manual_seed(size + batch),
                        )
                        for output in args.outputs if "decode" in args.operations else []:
                            remote = lambda latents=latents, output=output, url=on_url: remote_decode(
                                endpoint=url, tensor=latents, do_scaling=False, **OUTPUTS[output]
                            )  # noqa: E731
                            rows.append(
                                measure_workload(
                                    args,
                                    device,
                                    synchronize,
                                    on,
                                    on_url,
                                    "decode",
                                    size,
                                    batch,
                                    output,
                                    name,
                                    lambda: plain.decode(latents, output),
                                    lambda: fast.decode(latents, output),
                                    remote,
                                    check=(output == "pt-uint8") and (plain.decode(latents, output), remote),
                                )
                            )
                            if output in args.load_outputs and batch == 1 and args.clients:
                                loads.append(load_rows(args, name, size, output, latents, on_url, off_url))
                        if "encode" in args.operations and family.serves("encode"):
                            images = (
                                [sample_image(size, args.photo)]
                                if batch == 1
                                else torch.rand(batch, 3, size, size) * 2 - 1
                            )
                            sent = images[0] if batch == 1 else images
                            rows.append(
                                measure_workload(
                                    args,
                                    device,
                                    synchronize,
                                    on,
                                    on_url,
                                    "encode",
                                    size,
                                    batch,
                                    "latents",
                                    name,
                                    lambda images=images: plain.encode(images),
                                    lambda images=images: fast.encode(images),
                                    lambda sent=sent: remote_encode(endpoint=on_url, image=sent),
                                    check=None,
                                )
                            )
            finally:
                for process in filter(None, (on, off)):
                    process.terminate()
                    process.wait(timeout=60)
    print_image_tables(args, device, rows, loads)


def measure_workload(
    args, device, synchronize, server, url, operation, size, batch, output, family, plain, fast, remote, check
) -> dict:
    """Median seconds of each way, their calls interleaved over `args.rounds` rounds (on two shared cores,
    drift over a minute is as large as the differences measured), and each process's peak memory."""
    ways = {"plain": plain, "fast": fast, "service": remote}
    for call in ways.values():
        call(), call()  # warm-up: kernels, allocator, connection
    samples: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(args.rounds):
        for name, call in ways.items():
            for _ in range(args.repeats):
                began = time.perf_counter()
                call()
                if name != "service":
                    synchronize()
                samples[name].append(time.perf_counter() - began)
    with ProcessPeak(os.getpid(), device, own=True) as plain_peak:
        plain(), synchronize()
    with ProcessPeak(server.pid, device, own=False) as server_peak:
        remote()
    if device.type == "cuda":
        server_peak.mib = server_cuda_peak_mib(url)
    worst = ""
    if check:
        expected, call = check
        worst = str(np.abs(call().numpy().astype(int) - expected.astype(int)).max())
    seconds = {name: statistics.median(times) for name, times in samples.items()}
    row = dict(
        family=family,
        size=size,
        operation=operation,
        output=output,
        batch=batch,
        plain_s=seconds["plain"],
        fast_s=seconds["fast"],
        service_s=seconds["service"],
        plain_peak_mib=plain_peak.mib,
        service_peak_mib=server_peak.mib,
        max_diff=worst,
    )
    print(json.dumps(row), file=sys.stderr)
    return row


def load_rows(args, family, size, output, latents, on_url, off_url) -> dict:
    """Throughput and latency against the batching server and the unbatched one. The two alternate over
    several rounds and their samples are pooled: on two shared cores, one server process can run a
    steady ~10% faster than an identical other, which a single back-to-back comparison would report."""
    result = dict(family=family, size=size, output=output, levels=[])
    for clients in args.clients:
        total = max(args.load_requests, 2 * clients)
        runs: dict[str, list] = {"on": [], "off": []}
        for round_number in range(args.load_rounds):
            order = (("on", on_url), ("off", off_url)) if round_number % 2 == 0 else (("off", off_url), ("on", on_url))
            for label, url in order:
                call = lambda url=url: remote_decode(endpoint=url, tensor=latents, do_scaling=False, **OUTPUTS[output])  # noqa: E731
                runs[label].append(under_load(call, clients, total))
        level = {"clients": clients, **{label: pooled(samples, latents.shape[0]) for label, samples in runs.items()}}
        result["levels"].append(level)
        print(json.dumps({**result, "levels": [level]}), file=sys.stderr)
    return result


def mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def print_image_tables(args, device, rows, loads) -> None:
    weights = "tiny test-suite architecture" if args.tiny else "real architecture"
    print(
        f"\n{', '.join(args.family)}: {weights} with random weights; {'compiled; ' if args.compile else ''}"
        f"medians of {args.rounds} interleaved rounds of {args.repeats} calls; {machine(device)}\n"
    )
    print(
        "| family | size | op | output | batch | in-process (ms) | in-process, fast path (ms) | service (ms) | "
        "service / in-process | service / fast path | peak memory in-process (MiB) | peak memory service (MiB) | "
        "uint8 max \\|Δ\\| |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['family']} | {row['size']}² | {row['operation']} | {row['output']} | {row['batch']} | "
            f"{1000 * row['plain_s']:.1f} | "
            f"{1000 * row['fast_s']:.1f} | {1000 * row['service_s']:.1f} | {row['service_s'] / row['plain_s']:.2f} | "
            f"{row['service_s'] / row['fast_s']:.2f} | {mib(row['plain_peak_mib'])} | {mib(row['service_peak_mib'])} | "
            f"{row['max_diff']} |"
        )
    for load in loads:
        print(
            f"\nConcurrent clients, {load['family']} decode {load['size']}² to {load['output']}, one image per "
            "request, "
            f"{args.load_rounds} alternating rounds of {args.load_requests} requests pooled (batching on: the "
            "defaults; off: --max-batch-images 1):\n"
        )
        print(
            "| clients | batching on: images/s | p50 (ms) | p99 (ms) | batching off: images/s | p50 (ms) | p99 (ms) | "
            "on / off | on / sequential |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        sequential = load["levels"][0]["off"]["images_per_s"]
        for level in load["levels"]:
            on, off = level["on"], level["off"]
            print(
                f"| {level['clients']} | {on['images_per_s']:.1f} | {on['p50_ms']:.0f} | {on['p99_ms']:.0f} | "
                f"{off['images_per_s']:.1f} | "
                f"{off['p50_ms']:.0f} | {off['p99_ms']:.0f} | {on['images_per_s'] / off['images_per_s']:.2f} | "
                f"{on['images_per_s'] / sequential:.2f} |"
            )
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(device), "rows": rows, "loads": loads}, indent=1))


# -- the device path, one switch at a time ---------------------------------------------


def bench_device_path(args: argparse.Namespace) -> None:
    """Decode to uint8 on the host, in process, with each switch of device.DevicePath on its own and all together."""
    family = load_family(args.family)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, family, device)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    model = build_model(family, args.tiny).to(dtype=dtype)
    side = args.size // family.spatial_compression
    latents = torch.randn(args.batch, family.latent_channels, side, side, generator=torch.Generator().manual_seed(0))
    processor = VaeImageProcessor(vae_scale_factor=family.spatial_compression)
    cuda = device.type == "cuda"
    variants = [
        ("diffusers as a user runs it", DevicePath(False, False, False), False, False),
        ("channels_last", DevicePath(True, False, False), False, False),
        ("uint8 made on the device", DevicePath(False, False, False), True, False),
    ]
    if cuda:
        variants += [
            ("cudnn.benchmark", DevicePath(False, True, False), False, False),
            ("pinned host memory", DevicePath(False, False, True), True, False),
        ]
    variants.append(("all of the above (the service's default)", DevicePath.default(device), True, False))
    if args.compile:
        variants.append(("all of the above + torch.compile", DevicePath.default(device), True, True))
    runs = {}
    for label, path, on_device, compile_it in variants:
        vae = set_up_model(copy.deepcopy(model), device, path)
        if compile_it:
            vae.decoder = torch.compile(vae.decoder)

        def run(vae=vae, path=path, on_device=on_device):
            torch.backends.cudnn.benchmark = path.cudnn_benchmark
            with torch.inference_mode():
                sample = vae.decode(to_device(latents, device, dtype, path)).sample
                if on_device:
                    return to_host(uint8_images(sample), path)
                return (processor.postprocess(sample, output_type="np") * 255).round().astype("uint8")

        first, _ = timed(run, 1, synchronize)  # warm-up (and compile)
        runs[label] = (run, first, [])
    for _ in range(args.rounds):  # interleaved: the machine's drift over minutes is as large as the differences
        for run, _, samples in runs.values():
            seconds, _ = timed(run, args.repeats, synchronize)
            samples.append(seconds)
    rows = [(label, statistics.median(samples), first) for label, (run, first, samples) in runs.items()]
    weights = "tiny test-suite architecture" if args.tiny else "real architecture"
    print(
        f"\n{args.family} decode of {args.batch} x {args.size}² to uint8 on the host, {weights}, "
        f"{str(dtype).removeprefix('torch.')}; "
        f"median over {args.rounds} interleaved rounds of the median of {args.repeats}; {machine(device)}\n"
    )
    print("| device path | ms per call | vs diffusers as a user runs it | first call (ms) |")
    print("|---|---|---|---|")
    for label, seconds, first in rows:
        print(f"| {label} | {seconds * 1000:.1f} | {rows[0][1] / seconds:.2f}x | {first * 1000:.0f} |")


# -- PNG compression levels ----------------------------------------------------------------


def bench_png(args: argparse.Namespace) -> None:
    """Bytes and time of Pillow's PNG writer at zlib levels 0-9, and that every level keeps the pixels."""
    images = {Path(path).stem: Image.open(path).convert("RGB") for path in args.images}
    if args.decoded:
        family = load_family("sd15")
        model, side = build_model(family, tiny=True), args.size // 8
        with torch.inference_mode():
            sample = model.decode(torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(0))).sample
        images["random-weight decode"] = VaeImageProcessor(vae_scale_factor=8).postprocess(sample, output_type="pil")[0]
    print(f"\nPillow {Image.__version__} PNG writer, best of {args.repeats}; {machine(torch.device('cpu'))}\n")
    print("| image | size | " + " | ".join(f"level {level}" for level in range(10)) + " |")
    print("|---|---|" + "---|" * 10)
    for name, image in images.items():
        cells = []
        for level in range(10):
            times = []
            for _ in range(args.repeats):
                buffer = io.BytesIO()
                began = time.perf_counter()
                image.save(buffer, format="PNG", compress_level=level)
                times.append(time.perf_counter() - began)
            back = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
            assert np.array_equal(back, np.asarray(image)), f"level {level} changed the pixels of {name}"
            cells.append(f"{1000 * min(times):.1f} ms, {len(buffer.getvalue()) / 1024:.0f} KiB")
        print(f"| {name} | {image.width}x{image.height} | " + " | ".join(cells) + " |")


# -- MP4 written while decoding --------------------------------------------------------------


def bench_mp4_overlap(args: argparse.Namespace) -> None:
    """How long after the model finishes the MP4 is ready: frames streamed to ffmpeg as the decoder emits
    them (the family's streams_frames), against frames handed over once the decode is done."""
    import dataclasses

    from remote_vae.latents import Scaling
    from remote_vae.media import Mp4Options
    from remote_vae.service import DecodeRequest, Limits, RawTensor, VaeService
    from remote_vae.vae import load_vae

    family = load_family(args.family)
    device = resolve_device(args.device)
    dtype = resolve_dtype("auto", family, device)
    latents = video_latents(family, args.size, args.frames)
    raw = RawTensor(tuple(latents.shape), "float32", latents.numpy().tobytes())
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-") as folder:
        build_model(family, args.tiny).save_pretrained(folder)
        for label, streams in (
            ("frames handed to ffmpeg after the decode", False),
            ("frames streamed to ffmpeg while decoding", True),
        ):
            vae = load_vae(
                dataclasses.replace(family, streams_frames=streams), folder, device, dtype, tile_above_pixels=None
            )
            service = VaeService(vae, Limits(max_video_pixels=1 << 40))
            model_seconds, tail_seconds = [], []
            for attempt in range(args.repeats + 1):  # the first is a warm-up
                job = service.prepare_decode(DecodeRequest(raw, form="mp4", scaling=Scaling(), mp4=Mp4Options()))
                began = time.perf_counter()
                result = service.run([job])[0]  # the model stage: the device is free after it
                ran = time.perf_counter()
                job.finish(result)  # the MP4's bytes
                if attempt:
                    model_seconds.append(ran - began)
                    tail_seconds.append(time.perf_counter() - ran)
            rows.append((label, statistics.median(model_seconds), statistics.median(tail_seconds)))
    weights = "tiny test-suite architecture" if args.tiny else "real architecture"
    print(
        f"\n{args.family}, {weights}, {args.frames} frames of {args.size}², libx264 crf 18; median of {args.repeats}; "
        f"{machine(device)}\n"
    )
    print("| MP4 | model stage (s) | MP4 ready after the model (s) | request (s) |")
    print("|---|---|---|---|")
    for label, model_seconds, tail_seconds in rows:
        print(f"| {label} | {model_seconds:.2f} | {tail_seconds:.3f} | {model_seconds + tail_seconds:.2f} |")


# -- video ---------------------------------------------------------------------


class PeakMemory:
    """Peak memory over a block: CUDA's allocator counter, or on CPU the process RSS sampled every 2 ms."""

    def __init__(self, device: torch.device):
        self.device, self.peak, self._running = device, 0, False

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        while self._running:
            self.peak = max(self.peak, self.rss())
            time.sleep(0.002)

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.base = self.peak = self.rss()
            self._running = True
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._running = False
            self._thread.join()
            self.peak = max(self.peak, self.rss())

    @property
    def used_mib(self) -> float:
        return (self.peak - self.base) / 2**20


def video_latents(family: Family, size: int, frames: int) -> torch.Tensor:
    """The seeded latent of one clip of `frames` frames of size², the same in every process."""
    side = size // family.spatial_compression
    latent_frames = (frames - 1) // family.temporal_compression + 1
    return torch.randn(
        1, family.latent_channels, latent_frames, side, side, generator=torch.Generator().manual_seed(frames)
    )


def video_worker(args: argparse.Namespace) -> None:
    """One measurement in a fresh process (so peaks do not mix): prints a JSON line."""
    from remote_vae.cli import tile_threshold
    from remote_vae.latents import Scaling
    from remote_vae.media import Mp4Options
    from remote_vae.service import DecodeRequest, Limits, RawTensor, VaeService
    from remote_vae.vae import load_vae

    family = load_family(args.family)
    device = resolve_device(args.device)
    dtype = resolve_dtype("auto", family, device)
    tile_above = None if args.way == "whole" else tile_threshold(args.tile_above_pixels)
    vae = load_vae(family, args.model, device, dtype, tile_above_pixels=tile_above)
    if args.way == "whole" and hasattr(vae.model, "use_framewise_decoding"):
        vae.model.use_framewise_decoding = False  # the whole clip in one pass (Wan's causal decoder has no such pass)
    service = VaeService(vae, Limits(max_video_pixels=1 << 40))
    latents = video_latents(family, args.size, args.frames)
    request = DecodeRequest(
        RawTensor(tuple(latents.shape), "float32", latents.numpy().tobytes()),
        form="mp4",
        scaling=Scaling(),
        mp4=Mp4Options(),
    )
    service.decode(request)  # warm-up: kernels, allocator
    if device.type == "cuda":
        torch.cuda.empty_cache()
    seconds, peaks = [], []
    for _ in range(args.repeats):
        with PeakMemory(device) as memory:
            start = time.perf_counter()
            service.decode(request)
            seconds.append(time.perf_counter() - start)
        peaks.append(memory.used_mib)
    print(
        json.dumps(
            {"seconds": statistics.median(seconds), "peak_mib": max(peaks), "tiled": vae.tiles(args.size * args.size)}
        )
    )


def measure(args: argparse.Namespace, model: str, size: int, frames: int, way: str) -> dict:
    command = [
        sys.executable,
        __file__,
        "video-worker",
        "--family",
        args.family,
        "--model",
        model,
        "--device",
        args.device,
        "--size",
        str(size),
        "--frames",
        str(frames),
        "--way",
        way,
        "--repeats",
        str(args.repeats),
        "--tile-above-pixels",
        args.tile_above_pixels,
    ]
    output = subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT).stdout
    return json.loads(output.strip().splitlines()[-1])


def bench_video(args: argparse.Namespace) -> None:
    """Peak memory and time of a video decode to MP4, against frame count and frame size.

    Each point is measured in a fresh process, twice: the service stage as
    served (the model's frame-wise decoding, spatial tiling above the family's
    tile_above_pixels, frames fed to the MP4 encoder one at a time) and
    'whole' (frame-wise decoding and tiling off: the whole clip in one pass,
    where the model allows it). Then the whole service over HTTP
    (remote_decode, output_type=mp4) is timed against the in-process stage. Weights: the family's real
    architecture, or --tiny for the test suite's shapes, seeded and saved to a
    temporary directory that the server and the workers all load.
    """
    import tempfile

    family = load_family(args.family)
    device = resolve_device(args.device)
    architecture = dict(family.architecture)
    if args.tiny:
        architecture.update(TINY_ARCHITECTURES[family.model_class])
    torch.manual_seed(RANDOM_WEIGHTS_SEED)
    with tempfile.TemporaryDirectory(prefix="bench-") as model:
        model_class(family).from_config(architecture).save_pretrained(model)
        process, url = start_server(
            args.family,
            device.type,
            ["--model", model, "--max-video-pixels", str(1 << 40), "--tile-above-pixels", args.tile_above_pixels],
        )
        rows = []
        try:
            for size in args.sizes:
                for frames in args.frames:
                    served = measure(args, model, size, frames, "service")
                    whole = measure(args, model, size, frames, "whole")
                    latents = video_latents(family, size, frames)
                    remote_decode(
                        url, tensor=latents, output_type="mp4", return_type="mp4", do_scaling=False
                    )  # warm-up
                    http_seconds, _ = timed(
                        lambda latents=latents: remote_decode(
                            url, tensor=latents, output_type="mp4", return_type="mp4", do_scaling=False
                        ),
                        args.repeats,
                        lambda: None,
                    )
                    rows.append((size, frames, served, whole, http_seconds))
                    print(f"{size}² x {frames}: {served} {whole} http {http_seconds:.3f}s", file=sys.stderr)
        finally:
            process.terminate()
            process.wait(timeout=30)

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    weights = "tiny test-suite architecture" if args.tiny else "real architecture"
    memory = (
        "CUDA max_memory_allocated above the loaded model"
        if device.type == "cuda"
        else "peak RSS above the loaded model"
    )
    print(
        f"\n{args.family}, {weights} with random weights, "
        f"{str(resolve_dtype('auto', family, device)).removeprefix('torch.')} on {device.type}; "
        f"tile above {args.tile_above_pixels} pixels; median of {args.repeats}; "
        f"{time.strftime('%Y-%m-%d')}; CPU: {platform.processor() or platform.machine()} x{torch.get_num_threads()} "
        f"threads; GPU: {gpu}; "
        f"torch {torch.__version__}; memory = {memory}\n"
    )
    print(
        "| frame size | frames | service stage (s) | service peak (MiB) | spatial tiles | whole clip (s) | whole-clip "
        "peak (MiB) | HTTP remote_decode mp4 (s) | HTTP / stage |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for size, frames, served, whole, http_seconds in rows:
        print(
            f"| {size}² | {frames} | {served['seconds']:.3f} | {served['peak_mib']:.0f} | "
            f"{'yes' if served['tiled'] else 'no'} | "
            f"{whole['seconds']:.3f} | {whole['peak_mib']:.0f} | {http_seconds:.3f} | "
            f"{http_seconds / served['seconds']:.2f} |"
        )


TILINGS = ("untiled", "exact", "exact-held", "blend")  # exact-held: every activation held whole, nothing recomputed


def tiling_worker(args: argparse.Namespace) -> None:
    """One decode in a fresh process (so peaks do not mix): untiled, exact tiled or diffusers' blend; prints a JSON
    line."""
    from remote_vae.vae import load_vae

    device = resolve_device(args.device)
    family = load_family(args.family)
    store_bytes = 1 << 62 if args.way == "exact-held" else args.tile_store_bytes
    vae = load_vae(
        family,
        args.model,
        device,
        resolve_dtype("auto", family, device),
        tile_above_pixels=None if args.way == "untiled" else 0,
        store_bytes=store_bytes,
    )
    side = args.size // family.spatial_compression
    generator = torch.Generator().manual_seed(args.size)
    # A video family's clip: `frames` pixel frames, (frames - 1) / temporal compression + 1 latent frames.
    frames, latent_frames = (
        ((args.frames,), ((args.frames - 1) // family.temporal_compression + 1,)) if family.is_video else ((), ())
    )
    if args.operation == "encode":  # an image (or clip) of uniform noise in -1..1
        inputs, call = torch.rand(1, 3, *frames, args.size, args.size, generator=generator) * 2 - 1, vae.encode
    else:
        inputs, call = (
            torch.randn(1, family.latent_channels, *latent_frames, side, side, generator=generator),
            vae.decode,
        )
    tiling = {"untiled": None, "exact-held": "exact"}.get(args.way, args.way)
    # LTX's decoder is conditioned on a decode timestep: its pipelines' recommended 0.05.
    extra = {"timestep": torch.tensor([0.05])} if family.decode_timestep and args.operation == "decode" else {}
    seconds, peaks = [], []
    for _ in range(args.repeats):
        with PeakMemory(device) as peak:
            start = time.perf_counter()
            result = call(inputs, tiling=tiling, **extra)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - start)
        peaks.append(peak.peak)
    if args.operation == "encode":
        np.save(args.output, result.float().cpu().numpy())  # the latents, compared as floats
    else:
        pixels = ((result[0].float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)  # [3, (F,) H, W]
        np.save(args.output, pixels.permute(*range(1, pixels.ndim), 0).cpu().numpy())
    print(
        json.dumps(
            {"seconds": statistics.median(seconds), "peak_mib": max(peaks) / 2**20, "tiled": vae.calls["tiled"] > 0}
        )
    )


def bench_tiling(args: argparse.Namespace) -> None:
    """Peak memory and time of a decode (or encode) untiled, exactly tiled and blend-tiled, against image size; PSNR
    against untiled."""
    device = resolve_device(args.device)
    family = load_family(args.family)
    clip = f", {args.frames} frames" if family.is_video else ""
    print(
        f"# {machine(device)}; {args.family} ({'tiny' if args.tiny else 'real'} architecture, random weights), "
        f"{args.operation}{clip}"
    )
    within = "share within 1e-4 of peak" if args.operation == "encode" else "share within 1"
    print(
        "| size | way | seconds | peak MiB | x untiled time | PSNR vs untiled | max abs "
        f"diff{'' if args.operation == 'encode' else ' (uint8)'} | {within} |"
    )
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        build_model(family, args.tiny).save_pretrained(folder)
        for size in args.sizes:
            results, images = {}, {}
            for way in args.ways:
                output = os.path.join(folder, f"{way}-{size}.npy")
                command = [
                    sys.executable,
                    __file__,
                    "tiling-worker",
                    "--family",
                    args.family,
                    "--model",
                    folder,
                    "--device",
                    args.device,
                    "--way",
                    way,
                    "--size",
                    str(size),
                    "--repeats",
                    str(args.repeats),
                    "--output",
                    output,
                ]
                command += ["--operation", args.operation, "--frames", str(args.frames)]
                if args.tile_store_bytes is not None:
                    command += ["--tile-store-bytes", str(args.tile_store_bytes)]
                done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
                if done.returncode != 0:
                    print(f"| {size}² | {way} | failed: {done.stderr.strip().splitlines()[-1][:120]} | | | | | |")
                    continue
                results[way] = json.loads(done.stdout.strip().splitlines()[-1])
                images[way] = np.load(output)
            for way, result in results.items():
                untiled = images.get("untiled")
                if untiled is not None and way != "untiled" and args.operation == "encode":
                    # Latents: PSNR against the untiled latents' own peak; the share within 1e-4 of it.
                    difference, peak = np.abs(images[way] - untiled), float(np.abs(untiled).max())
                    mse = float(np.mean(difference.astype(np.float64) ** 2))
                    quality = (
                        f"{10 * np.log10(peak**2 / max(mse, 1e-30)):.1f} | {difference.max():.2e} | "
                        f"{np.mean(difference <= 1e-4 * peak):.5f}"
                    )
                elif untiled is not None and way != "untiled":
                    difference = np.abs(images[way].astype(np.int16) - untiled)
                    mse = float(np.mean(difference.astype(np.float64) ** 2))
                    quality = (
                        f"{10 * np.log10(255**2 / max(mse, 1e-12)):.1f} | {difference.max()} | "
                        f"{np.mean(difference <= 1):.5f}"
                    )
                    if args.pictures and size == args.sizes[0]:
                        save_difference(difference, Path(args.pictures) / f"{args.family}-{size}-{way}-vs-untiled.png")
                else:
                    quality = "– | – | –"
                ratio = f"{result['seconds'] / results['untiled']['seconds']:.2f}" if "untiled" in results else "–"
                print(f"| {size}² | {way} | {result['seconds']:.2f} | {result['peak_mib']:.0f} | {ratio} | {quality} |")


def save_difference(difference: np.ndarray, path: Path) -> None:
    """|tiled − untiled| per pixel (largest of the three channels, and of a clip's frames), amplified 32× and inverted:
    white is equal."""
    path.parent.mkdir(parents=True, exist_ok=True)
    difference = difference.max(axis=-1)
    amplified = np.clip(
        (difference.max(axis=0) if difference.ndim == 3 else difference).astype(np.int32) * 32, 0, 255
    ).astype(np.uint8)
    Image.fromarray(255 - amplified).save(path, optimize=True)


PREVIEW_OF = {"taesd": "sd15", "taesdxl": "sdxl", "taef1": "flux"}


def bench_preview(args: argparse.Namespace) -> None:
    """A preview decoder against its full family, through the service's own path, on the same latents:
    decode time of each, and (with real weights) the PSNR of the preview's pixels against the full VAE's."""
    from remote_vae.latents import Scaling
    from remote_vae.service import DecodeRequest, EncodeRequest, Limits, RawTensor, VaeService
    from remote_vae.vae import load_vae

    device = resolve_device(args.device)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    services = {}
    for name, weights in ((args.family, args.preview_model), (PREVIEW_OF[args.family], args.full_model)):
        family = load_family(name)
        vae = load_vae(
            family, weights, device, resolve_dtype(args.dtype, family, device), random_weights=weights is None
        )
        services[name] = VaeService(vae, Limits(max_pixels=1 << 30))
    full = services[PREVIEW_OF[args.family]]
    # A realistic latent: the full VAE's encoding of an image, normalised as its pipeline holds it.
    pixels = np.array(sample_image(args.size, args.photo))
    image = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 127.5 - 1
    own = Scaling(do_scaling=True)
    latents = full.encode(
        EncodeRequest(tensor=RawTensor(tuple(image.shape), "float32", image.numpy().tobytes()), scaling=own)
    ).float()
    request = DecodeRequest(
        RawTensor(tuple(latents.shape), "float32", latents.numpy().tobytes()), form="uint8", scaling=own
    )
    results = {}
    for name, service in services.items():
        service.decode(request)  # warm
        results[name] = timed(lambda service=service: service.decode(request).value, args.repeats, synchronize)
    (preview_s, preview_px), (full_s, full_px) = results[args.family], results[PREVIEW_OF[args.family]]
    error = (preview_px.float() - full_px.float()).pow(2).mean().item()
    psnr = 10 * np.log10(255**2 / max(error, 1e-12))
    real = args.preview_model and args.full_model
    print(f"# {machine(device)}")
    print("| preview | full | size | preview s | full s | full / preview | PSNR vs full |")
    print("|---|---|---|---|---|---|---|")
    print(
        f"| {args.family} | {PREVIEW_OF[args.family]} | {args.size}² | {preview_s:.3f} | {full_s:.3f} | "
        f"{full_s / preview_s:.1f}x | "
        f"{f'{psnr:.1f} dB' if real else 'n/a (random weights)'} |"
    )


def bench_ray(args: argparse.Namespace) -> None:
    """Ray Serve against the plain server in one run: the same model, latent and clients; throughput and latency with
    the plain server, with Ray and one replica, with Ray and two. Ray's proxy overhead is the one-replica row's."""
    import ray
    from ray import serve

    from remote_vae.ray_serve import family_app

    device = resolve_device(args.device)
    family = load_family(args.family)
    side = args.size // family.spatial_compression
    latent = torch.randn(1, family.latent_channels, side, side, generator=torch.Generator().manual_seed(0))
    body = latent.numpy().tobytes()
    params = {"shape": list(latent.shape), "dtype": "float32", "output_type": "pt", "partial_postprocess": True}

    def call(url: str):
        return lambda: requests.post(
            url, data=body, params=params, headers={"Content-Type": "tensor/binary"}, timeout=600
        ).raise_for_status()

    def measure(url: str) -> dict:
        call(url)()  # warm
        runs = [under_load(call(url), clients, args.requests) for clients in args.clients]
        return {clients: pooled([run], 1) for clients, run in zip(args.clients, runs, strict=True)}

    rows = {}
    with tempfile.TemporaryDirectory() as folder:
        build_model(family, args.tiny).save_pretrained(folder)
        options = ["--model", folder, "--device", device.type]
        process, url = start_server(args.family, device.type, options)
        try:
            rows["plain server"] = measure(url)
        finally:
            process.terminate()
            process.wait(timeout=30)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        ray.init(include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        try:
            for replicas in (1, 2):
                deployment = {
                    "num_replicas": replicas,
                    "ray_actor_options": {"num_cpus": 0, "num_gpus": 1 / replicas if device.type == "cuda" else 0},
                }
                serve.run(
                    family_app({"family": args.family, "options": options, "deployment": deployment}),
                    name=args.family,
                    route_prefix=f"/{args.family}",
                )
                rows[f"Ray Serve, {replicas} replica{'s' * (replicas > 1)}"] = measure(
                    f"http://127.0.0.1:{port}/{args.family}/"
                )
        finally:
            serve.shutdown()
            ray.shutdown()
    weights = "tiny test-suite architecture" if args.tiny else "real architecture"
    print(
        f"# {machine(device)}; ray {ray.__version__}; {args.family} ({weights}, random weights), {args.size}², uint8 "
        "tensors out, "
        f"{args.requests} requests per point"
    )
    print("| server | " + " | ".join(f"{clients} clients: images/s (p50 ms)" for clients in args.clients) + " |")
    print("|---|" + "---|" * len(args.clients))
    for name, points in rows.items():
        print(
            f"| {name} | "
            + " | ".join(
                f"{points[clients]['images_per_s']:.1f} ({points[clients]['p50_ms']:.0f})" for clients in args.clients
            )
            + " |"
        )


def model_mode(modes, name: str, help: str, family: str, repeats: int) -> argparse.ArgumentParser:
    """A mode that builds a family's model: --family, --tiny, --repeats, --device."""
    mode = modes.add_parser(name, help=help)
    mode.add_argument("--family", default=family)
    mode.add_argument("--tiny", action="store_true", help="the test suite's tiny architecture instead of the real one")
    mode.add_argument("--repeats", type=int, default=repeats)
    mode.add_argument("--device", default="auto")
    return mode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = parser.add_subparsers(dest="mode", required=True)
    image = modes.add_parser(
        "image", help="image decode and encode: service vs diffusers in-process, and under concurrent load"
    )
    image.add_argument("--family", nargs="+", default=["sd15"])
    image.add_argument("--tiny", action="store_true", help="the test suite's tiny architecture instead of the real one")
    image.add_argument("--sizes", type=int, nargs="+", default=[512])
    image.add_argument("--operations", nargs="+", default=["decode", "encode"], choices=["decode", "encode"])
    image.add_argument("--outputs", nargs="+", default=list(OUTPUTS), choices=list(OUTPUTS))
    image.add_argument("--batches", type=int, nargs="+", default=[1])
    image.add_argument(
        "--clients",
        type=int,
        nargs="*",
        default=[1, 2, 4, 8, 16],
        help="concurrent clients for the load rows (none: skip)",
    )
    image.add_argument("--load-outputs", nargs="*", default=["pt-uint8", "png"], choices=list(OUTPUTS))
    image.add_argument("--load-requests", type=int, default=32, help="requests per load level and round")
    image.add_argument("--load-rounds", type=int, default=4, help="rounds per load level, alternating the two servers")
    image.add_argument("--repeats", type=int, default=3, help="calls of each way per round")
    image.add_argument(
        "--rounds", type=int, default=4, help="rounds, each calling in-process, fast path and service in turn"
    )
    image.add_argument("--dtype", default="auto", choices=["auto", "float16", "bfloat16", "float32"])
    image.add_argument("--compile", action="store_true", help="serve with --compile, the sizes warmed up")
    image.add_argument(
        "--photo", help="an image file to encode (scaled to each size); default: a smooth synthetic image"
    )
    image.add_argument("--json", help="also write the results here")
    image.add_argument("--device", default="auto")
    path = model_mode(
        modes, "device-path", "decode to uint8 in process with each device-path switch on its own", "sd15", repeats=5
    )
    path.add_argument("--size", type=int, default=512)
    path.add_argument("--batch", type=int, default=1)
    path.add_argument("--rounds", type=int, default=3, help="rounds, each timing every variant in turn")
    path.add_argument("--dtype", default="auto", choices=["auto", "float16", "bfloat16", "float32"])
    path.add_argument("--compile", action="store_true", help="add a torch.compile row")
    png = modes.add_parser("png", help="PNG bytes and time at zlib levels 0-9")
    png.add_argument("--images", nargs="*", default=[], help="image files, e.g. photos")
    png.add_argument("--decoded", action="store_true", help="add a random-weight decoder's output")
    png.add_argument("--size", type=int, default=512)
    png.add_argument("--repeats", type=int, default=5)
    overlap = model_mode(modes, "mp4-overlap", "MP4 written while decoding against after decoding", "wan21", repeats=3)
    overlap.add_argument("--size", type=int, default=256)
    overlap.add_argument("--frames", type=int, default=81)
    video = model_mode(
        modes,
        "video",
        "video decode to MP4: peak memory and time against frames and frame size",
        "hunyuanvideo",
        repeats=3,
    )
    video.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    video.add_argument("--frames", type=int, nargs="+", default=[9, 17, 33, 65])
    video.add_argument("--tile-above-pixels", default="family", help="as serve's option: N, family or never")
    tiling = model_mode(
        modes, "tiling", "decode untiled, exactly tiled and blend-tiled: peak memory, time, PSNR", "sd15", repeats=1
    )
    tiling.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096])
    tiling.add_argument("--ways", nargs="+", default=list(TILINGS), choices=list(TILINGS))
    tiling.add_argument("--pictures", help="write amplified difference pictures of the first size here")
    tiling.add_argument(
        "--tile-store-bytes", type=int, help="the exact way's --tile-store-bytes (default: the service's)"
    )
    tiling.add_argument(
        "--operation",
        choices=["decode", "encode"],
        default="decode",
        help="encode: noise images to latents, compared as floats (max abs diff; share within 1e-4 of the latents' "
        "peak)",
    )
    tiling.add_argument("--frames", type=int, default=5, help="a video family's clip length in pixel frames")
    tiling_worker_mode = modes.add_parser("tiling-worker", help=argparse.SUPPRESS)
    for name in ("--family", "--model", "--device", "--way", "--output"):
        tiling_worker_mode.add_argument(name, required=True)
    tiling_worker_mode.add_argument("--size", type=int, required=True)
    tiling_worker_mode.add_argument("--repeats", type=int, default=1)
    tiling_worker_mode.add_argument("--tile-store-bytes", type=int)
    tiling_worker_mode.add_argument("--operation", choices=["decode", "encode"], default="decode")
    tiling_worker_mode.add_argument("--frames", type=int, default=5)
    preview = modes.add_parser(
        "preview", help="a preview decoder (taesd, taesdxl, taef1) against its full family: speed and PSNR"
    )
    preview.add_argument("--family", default="taesd", choices=list(PREVIEW_OF))
    preview.add_argument(
        "--preview-model", help="the preview's weights (a diffusers model directory); default: random weights"
    )
    preview.add_argument("--full-model", help="the full family's weights; default: random weights")
    preview.add_argument("--size", type=int, default=512)
    preview.add_argument("--repeats", type=int, default=3)
    preview.add_argument("--photo", help="an image file to encode; default: a smooth synthetic image")
    preview.add_argument("--dtype", default="auto", choices=["auto", "float16", "bfloat16", "float32"])
    preview.add_argument("--device", default="auto")
    worker = modes.add_parser("video-worker", help=argparse.SUPPRESS)
    for name in ("--family", "--model", "--device", "--way"):
        worker.add_argument(name, required=True)
    worker.add_argument("--size", type=int, required=True)
    worker.add_argument("--frames", type=int, required=True)
    worker.add_argument("--repeats", type=int, default=3)
    worker.add_argument("--tile-above-pixels", default="family")
    ray_mode = model_mode(
        modes, "ray", "Ray Serve with 1 and 2 replicas against the plain server: throughput, latency", "sd15", repeats=1
    )
    ray_mode.add_argument("--size", type=int, default=256)
    ray_mode.add_argument("--clients", type=int, nargs="+", default=[1, 4])
    ray_mode.add_argument("--requests", type=int, default=40, help="requests per point")
    args = parser.parse_args()
    modes = {
        "image": bench_image,
        "device-path": bench_device_path,
        "png": bench_png,
        "mp4-overlap": bench_mp4_overlap,
        "video": bench_video,
        "video-worker": video_worker,
        "preview": bench_preview,
        "tiling": bench_tiling,
        "tiling-worker": tiling_worker,
        "ray": bench_ray,
    }
    modes[args.mode](args)


if __name__ == "__main__":
    main()
