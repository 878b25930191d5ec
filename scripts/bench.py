#!/usr/bin/env python
"""Benchmark: the service against diffusers in-process, same weights, same latents, one run.

    python scripts/bench.py image --family sd15 --sizes 256 512 --repeats 3 [--device cpu|cuda]

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
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import requests
import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.remote_utils import remote_decode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from remote_vae.families import load_family  # noqa: E402
from remote_vae.vae import RANDOM_WEIGHTS_SEED, model_class, resolve_device, resolve_dtype  # noqa: E402

OUTPUTS = {
    "pt": dict(output_type="pt", return_type="pt"),
    "pt-uint8": dict(output_type="pt", partial_postprocess=True, return_type="pt"),
    "png": dict(output_type="pil", image_format="png"),
    "jpg": dict(output_type="pil", image_format="jpg"),
}


def start_server(family: str, device: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "remote_vae", "serve", family, "--random-weights", "--device", device,
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = parser.add_subparsers(dest="mode", required=True)
    image = modes.add_parser("image", help="image decode: service vs diffusers in-process")
    image.add_argument("--family", default="sd15")
    image.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    image.add_argument("--outputs", nargs="+", default=list(OUTPUTS), choices=list(OUTPUTS))
    image.add_argument("--repeats", type=int, default=3)
    image.add_argument("--device", default="auto")
    args = parser.parse_args()
    bench_image(args)


if __name__ == "__main__":
    main()
