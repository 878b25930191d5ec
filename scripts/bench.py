#!/usr/bin/env python
"""Benchmark: the service against diffusers in-process, same weights, same latents, one run.

    python scripts/bench.py image --family sd15 --sizes 256 512 --repeats 3 [--device cpu|cuda]
    python scripts/bench.py video --family hunyuanvideo --sizes 64 128 --frames 9 17 33 65 [--tiny] [--device cpu|cuda]

Video mode: see bench_video below.

Starts `python -m remote_vae serve FAMILY --random-weights` on 127.0.0.1 (the
family's real architecture with seeded weights, no download), builds the same
model in this process, and times, per image size and output:
  local:   vae.decode + VaeImageProcessor.postprocess to PIL (what a pipeline does)
  service: diffusers' remote_decode end to end (HTTP, decode, postprocess, transfer)
It checks the service's pixels against the local ones, then prints a Markdown
table with medians and the service/local ratio. Numbers go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import requests
import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.remote_utils import remote_decode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from remote_vae.families import Family, load_family  # noqa: E402
from remote_vae.vae import RANDOM_WEIGHTS_SEED, model_class, resolve_device, resolve_dtype  # noqa: E402

OUTPUTS = {
    "pt": dict(output_type="pt", return_type="pt"),
    "pt-uint8": dict(output_type="pt", partial_postprocess=True, return_type="pt"),
    "png": dict(output_type="pil", image_format="png"),
    "jpg": dict(output_type="pil", image_format="jpg"),
}


def start_server(family: str, device: str, serve_options: list[str] | None = None) -> tuple[subprocess.Popen, str]:
    """`serve FAMILY` on a free loopback port with serve_options (default: --random-weights), once healthy."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "remote_vae", "serve", family, *(serve_options or ["--random-weights"]), "--device", device,
               "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    process = subprocess.Popen(command, cwd=ROOT)
    url = f"http://127.0.0.1:{port}/"
    for _ in range(1200):  # at most 10 minutes
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


def bench_image(args: argparse.Namespace) -> None:
    family = load_family(args.family)
    device = resolve_device(args.device)
    dtype = resolve_dtype("auto", family, device)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(RANDOM_WEIGHTS_SEED)
    vae = model_class(family).from_config(family.architecture).to(device, dtype).eval()
    processor = VaeImageProcessor(vae_scale_factor=family.spatial_compression)
    process, url = start_server(args.family, device.type)
    rows = []
    try:
        for size in args.sizes:
            side = size // family.spatial_compression
            latents = torch.randn(1, family.latent_channels, side, side, generator=torch.Generator().manual_seed(size))

            def local(latents=latents):
                with torch.inference_mode():
                    sample = vae.decode(latents.to(device, dtype)).sample
                    return processor.postprocess(sample, output_type="pil")[0]

            local(), remote_decode(url, tensor=latents, do_scaling=False, **OUTPUTS["png"])  # warm-up both
            local_time, local_image = timed(local, args.repeats, synchronize)
            for name in args.outputs:
                service_time, result = timed(lambda latents=latents, name=name: remote_decode(url, tensor=latents, do_scaling=False, **OUTPUTS[name]), args.repeats, lambda: None)
                check = ""
                if name == "png":
                    worst = np.abs(np.asarray(result).astype(int) - np.asarray(local_image).astype(int)).max()
                    check = f"max |Δ| {worst}"
                rows.append((size, name, local_time, service_time, check))
    finally:
        process.terminate()
        process.wait(timeout=30)

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    print(f"\n{args.family}, real architecture with random weights, {str(dtype).removeprefix('torch.')} on {device.type}; "
          f"median of {args.repeats}; {time.strftime('%Y-%m-%d')}; CPU: {platform.processor() or platform.machine()} "
          f"x{torch.get_num_threads()} threads; GPU: {gpu}; torch {torch.__version__}\n")
    print("| size | output | local decode+postprocess (s) | service remote_decode (s) | service / local | pixels vs local |")
    print("|---|---|---|---|---|---|")
    for size, name, local_time, service_time, check in rows:
        print(f"| {size}² | {name} | {local_time:.3f} | {service_time:.3f} | {service_time / local_time:.2f} | {check} |")


# -- video ---------------------------------------------------------------------

TINY_VIDEO_ARCHITECTURES = {
    # The test suite's tiny shapes: the real block structure, far fewer channels.
    "AutoencoderKLHunyuanVideo": dict(block_out_channels=[8, 16, 16, 16], layers_per_block=1, norm_num_groups=8),
    "AutoencoderKLWan": dict(base_dim=8, dim_mult=[1, 2, 2, 2], num_res_blocks=1),
}


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

    def __enter__(self) -> "PeakMemory":
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
    return torch.randn(1, family.latent_channels, latent_frames, side, side, generator=torch.Generator().manual_seed(frames))


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
    request = DecodeRequest(RawTensor(tuple(latents.shape), "float32", latents.numpy().tobytes()), form="mp4", scaling=Scaling(), mp4=Mp4Options())
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
    print(json.dumps({"seconds": statistics.median(seconds), "peak_mib": max(peaks), "tiled": vae.tiles(args.size * args.size)}))


def measure(args: argparse.Namespace, model: str, size: int, frames: int, way: str) -> dict:
    command = [sys.executable, __file__, "video-worker", "--family", args.family, "--model", model, "--device", args.device,
               "--size", str(size), "--frames", str(frames), "--way", way, "--repeats", str(args.repeats),
               "--tile-above-pixels", args.tile_above_pixels]
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
        architecture.update(TINY_VIDEO_ARCHITECTURES[family.model_class])
    torch.manual_seed(RANDOM_WEIGHTS_SEED)
    with tempfile.TemporaryDirectory(prefix="bench-") as model:
        model_class(family).from_config(architecture).save_pretrained(model)
        process, url = start_server(args.family, device.type, ["--model", model, "--max-video-pixels", str(1 << 40), "--tile-above-pixels", args.tile_above_pixels])
        rows = []
        try:
            for size in args.sizes:
                for frames in args.frames:
                    served = measure(args, model, size, frames, "service")
                    whole = measure(args, model, size, frames, "whole")
                    latents = video_latents(family, size, frames)
                    remote_decode(url, tensor=latents, output_type="mp4", return_type="mp4", do_scaling=False)  # warm-up
                    http_seconds, _ = timed(lambda latents=latents: remote_decode(url, tensor=latents, output_type="mp4", return_type="mp4", do_scaling=False), args.repeats, lambda: None)
                    rows.append((size, frames, served, whole, http_seconds))
                    print(f"{size}² x {frames}: {served} {whole} http {http_seconds:.3f}s", file=sys.stderr)
        finally:
            process.terminate()
            process.wait(timeout=30)

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    weights = "tiny test-suite architecture" if args.tiny else "real architecture"
    memory = "CUDA max_memory_allocated above the loaded model" if device.type == "cuda" else "peak RSS above the loaded model"
    print(f"\n{args.family}, {weights} with random weights, {str(resolve_dtype('auto', family, device)).removeprefix('torch.')} on {device.type}; "
          f"tile above {args.tile_above_pixels} pixels; median of {args.repeats}; "
          f"{time.strftime('%Y-%m-%d')}; CPU: {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads; GPU: {gpu}; "
          f"torch {torch.__version__}; memory = {memory}\n")
    print("| frame size | frames | service stage (s) | service peak (MiB) | spatial tiles | whole clip (s) | whole-clip peak (MiB) | HTTP remote_decode mp4 (s) | HTTP / stage |")
    print("|---|---|---|---|---|---|---|---|---|")
    for size, frames, served, whole, http_seconds in rows:
        print(f"| {size}² | {frames} | {served['seconds']:.3f} | {served['peak_mib']:.0f} | {'yes' if served['tiled'] else 'no'} | "
              f"{whole['seconds']:.3f} | {whole['peak_mib']:.0f} | {http_seconds:.3f} | {http_seconds / served['seconds']:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = parser.add_subparsers(dest="mode", required=True)
    image = modes.add_parser("image", help="image decode: service vs diffusers in-process")
    image.add_argument("--family", default="sd15")
    image.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    image.add_argument("--outputs", nargs="+", default=list(OUTPUTS), choices=list(OUTPUTS))
    image.add_argument("--repeats", type=int, default=3)
    image.add_argument("--device", default="auto")
    video = modes.add_parser("video", help="video decode to MP4: peak memory and time against frames and frame size")
    video.add_argument("--family", default="hunyuanvideo")
    video.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    video.add_argument("--frames", type=int, nargs="+", default=[9, 17, 33, 65])
    video.add_argument("--tiny", action="store_true", help="the test suite's tiny architecture instead of the real one")
    video.add_argument("--repeats", type=int, default=3)
    video.add_argument("--tile-above-pixels", default="family", help="as serve's option: N, family or never")
    video.add_argument("--device", default="auto")
    worker = modes.add_parser("video-worker", help=argparse.SUPPRESS)
    for name in ("--family", "--model", "--device", "--way"):
        worker.add_argument(name, required=True)
    worker.add_argument("--size", type=int, required=True)
    worker.add_argument("--frames", type=int, required=True)
    worker.add_argument("--repeats", type=int, default=3)
    worker.add_argument("--tile-above-pixels", default="family")
    args = parser.parse_args()
    {"image": bench_image, "video": bench_video, "video-worker": video_worker}[args.mode](args)


if __name__ == "__main__":
    main()
