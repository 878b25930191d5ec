#!/usr/bin/env python3
"""The GPU suite: every CUDA path exercised and the headline table measured, in one call of the device tool.

    python3 scripts/gpu_suite.py --wheels .whl --out "$OUT"             # on the GPU machine (scripts/gpu_carry.py
    prints the call)
    python scripts/gpu_suite.py --device cpu --tiny --out /tmp/suite    # proven here, in under 90 s
    (tests/deploy/test_gpu_suite.py)

A GPU is lent to a session rarely and for 15 minutes of device time, a few of which go to starting it, so
everything runs in one command that cannot die of a typo: it installs the carried wheels offline (the GPU image has
torch but no diffusers, starlette, uvicorn or imageio-ffmpeg, and reaches no index), then runs the stages below
within a wall-clock budget it enforces itself. Each stage gets its share of what is left; one that cannot fit its
minimum is skipped with a note; each finished stage prints one line and rewrites results.json and results.md under
--out, so a run cut off still tells what it reached (a watchdog writes them and exits at the budget's end).

  environment  GPU, memory, driver, CUDA, torch, cuDNN, diffusers; which fast paths are on (nvJPEG, pinned memory,
               channels-last, cuDNN autotuning)
  cuda_tests   tests/live/test_cuda.py (the CUDA-only paths), its summary
  headline     SD1.5, SDXL, Flux: decode at 512² and 1024², encode at 1024²; diffusers in-process as a user runs it
               (vae.decode + VaeImageProcessor.postprocess + the PNG, synchronised, median after warm-up), the
               service's device path in-process, the service end to end over loopback HTTP with diffusers'
               remote_decode / remote_encode; ratios, peak device memory, the server's time by stage, pixels checked
  throughput   1 and 8 concurrent clients, SD1.5 512² and SDXL 1024², batching on and off
  compile      --compile: Flux 1024² decode, compile time apart from decode time
  large        SDXL 4096² exact tiled against untiled (time, peak memory, PSNR); Wan 2.1 832x480x81 to MP4 (time,
               peak memory, the server's model and media time: how much the MP4 writing overlaps the decode); LTX-2
               768x512x121 with its sound in one request, to an MP4 with the sound track and to the two tensors
  profile      a torch profiler trace of one SDXL 1024² request through the server's stages (trace.json.gz)

Models are the families' real architectures (--tiny: the tests' widths, at small sizes) with seeded random weights,
initialised on the device in the family's GPU dtype and saved to a temporary directory the server loads too.
Servers fork from one parent that has imported torch and never touches CUDA (scripts/forkserver.py), as the test
suite's do; their start-up times are therefore without the imports (about 3 s on the CPU). REMOTE_VAE_TEST_FORK=0
starts each as a command instead.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

from forkserver import ServerForker

ROOT = Path(__file__).resolve().parent.parent
SITE = Path(tempfile.gettempdir()) / "remote-vae-suite-site"

# Each stage: its share of the time left when it starts (over the shares of the stages still to run), and the
# least it needs on a GPU (on the CPU with --tiny, a tenth): below that it is skipped, not begun.
# In this order: what matters most first, the slowest to start (compiling) last, so an overrun costs the least.
STAGES = {
    "environment": (0.02, 2),
    "cuda_tests": (0.13, 20),
    "headline": (0.27, 60),
    "throughput": (0.14, 30),
    "profile": (0.06, 10),
    "large": (0.23, 40),
    "compile": (0.15, 30),
}
# Sizes: the real ones, and --tiny's (the tests' widths make these quick on two CPU cores).
SIZES = {
    False: {
        "decode": (512, 1024),
        "encode": (1024,),
        "throughput": {"sd15": 512, "sdxl": 1024},
        "compile": 1024,
        "tiled": 4096,
        "wan": (832, 480, 81),
        "ltx2": (768, 512, 121),
        "profile": 1024,
        "repeats": 5,
        "warm": 2,
        "calls_per_client": 6,
    },
    True: {
        "decode": (64, 128),
        "encode": (128,),
        "throughput": {"sd15": 64, "sdxl": 128},
        "compile": 64,
        "tiled": 512,
        "wan": (64, 48, 9),
        "ltx2": (64, 64, 9),
        "profile": 128,
        "repeats": 2,
        "warm": 1,
        "calls_per_client": 2,
    },
}


def install_wheels(folder: Path) -> None:
    """The carried wheels into SITE, offline, without touching the image's own packages; SITE first on every path."""
    wheels = sorted(str(path) for path in folder.glob("*.whl"))
    if not wheels:
        raise SystemExit(f"{folder} holds no wheels: run scripts/gpu_carry.py first")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-index",
            "--no-deps",
            "--no-compile",
            "--no-cache-dir",
            "--upgrade",
            "--target",
            str(SITE),
            *wheels,
        ],
        check=True,
    )
    sys.path.insert(0, str(SITE))


def python_path() -> str:
    """What a child process (the server, pytest) needs on its path: the carried packages and the repository."""
    return os.pathsep.join(
        filter(None, [str(SITE) if SITE.is_dir() else "", str(ROOT), os.environ.get("PYTHONPATH", "")])
    )


def child_environment() -> dict[str, str]:
    """A child process's (the server's, pytest's) environment: this one, with python_path()."""
    return {**os.environ, "PYTHONPATH": python_path()}


class Suite:
    def __init__(self, args: argparse.Namespace):
        self.args, self.out = args, Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.started = time.monotonic()
        self.deadline = self.started + args.budget
        self.results: dict = {"budget_s": args.budget, "tiny": args.tiny, "device": args.device, "stages": {}}
        self.scratch = Path(tempfile.mkdtemp(prefix="remote-vae-suite-"))
        self.servers: dict[tuple, Server] = {}
        self.models: dict[str, Path] = {}
        # Servers fork from a parent that has imported torch once (about 3 s of each start on the CPU's tiny run)
        self.forker = ServerForker(ROOT, child_environment)
        self._lock = threading.Lock()

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, stages: dict) -> None:
        names = list(stages)
        for index, name in enumerate(names):
            share, minimum = STAGES[name]
            minimum = minimum / 10 if self.args.tiny else minimum
            pending = sum(STAGES[later][0] for later in names[index:])
            allowance = self.left() * share / pending
            began = time.monotonic()
            if allowance < minimum:
                record = {
                    "status": "skipped",
                    "note": f"needs about {minimum:.0f} s, {allowance:.0f} s of the budget was left for it",
                }
            else:
                try:
                    record = {"status": "done", **stages[name](self, began + allowance)}
                except Exception as exc:  # a stage that breaks is recorded; the others still run
                    record = {
                        "status": "failed",
                        "error": f"{type(exc).__name__}: {exc}",
                        "traceback": traceback.format_exc()[-3000:],
                    }
            record["seconds"] = round(time.monotonic() - began, 1)
            with self._lock:
                self.results["stages"][name] = record
            print(f"[{name}] {record['status']} in {record['seconds']} s: {summary(record)}", flush=True)
            self.write()

    def write(self, note: str | None = None) -> None:
        with self._lock:
            if note:
                self.results["note"] = note
            self.results["elapsed_s"] = round(time.monotonic() - self.started, 1)
            self.results["servers"] = {"started": len(self.servers), "forked": self.forker.count}
            results = rounded(self.results)
            (self.out / "results.json").write_text(json.dumps(results, indent=1, default=str))
            (self.out / "results.md").write_text(markdown(results))

    def close(self) -> None:
        for server in self.servers.values():
            server.stop()
        self.forker.close()
        shutil.rmtree(self.scratch, ignore_errors=True)

    # -- models and servers, shared by the stages -----------------------------------

    def model_dir(self, family_name: str) -> Path:
        """The family's architecture, seeded random weights made on the device, saved once for the server and
        in-process."""
        if family_name not in self.models:
            import torch

            from remote_vae.families import load_family
            from remote_vae.vae import RANDOM_WEIGHTS_SEED, model_class
            from remote_vae.vae.loading import vocoder_class

            family = load_family(family_name)
            folder = self.scratch / family_name
            # A family with sound as its pipeline's folder holds it (LTX-2: vae/, audio_vae/, vocoder/), which the
            # server serves both from; any other the VAE's own folder
            parts = [(model_class(family), family.architecture, family.hub_subfolder if family.sound else "")]
            if family.sound:
                sound = load_family(family.sound)
                parts.append((model_class(sound), sound.architecture, sound.hub_subfolder))
                parts.append((vocoder_class(sound), sound.vocoder["architecture"], sound.vocoder["hub_subfolder"]))
            for cls, architecture, subfolder in parts:
                architecture = dict(architecture)
                if self.args.tiny:
                    from bench import TINY_ARCHITECTURES

                    architecture.update(TINY_ARCHITECTURES[cls.__name__])
                torch.manual_seed(RANDOM_WEIGHTS_SEED)
                with torch.device(self.args.device):
                    model = cls.from_config(architecture)
                model.save_pretrained(folder / subfolder)
            self.models[family_name] = folder
        return self.models[family_name]

    def server(self, family_name: str, *options: str, config: Path | None = None) -> Server:
        """A server of the family (as `config` describes it, where given) with these options, started once."""
        key = (family_name, options, config)
        if key not in self.servers:
            self.servers[key] = Server(self, family_name, list(options), config)
        return self.servers[key]

    def in_process(self, family_name: str):
        """diffusers in this process as a user runs it, and with the service's device path: one load, two copies."""
        import torch
        from bench import InProcess

        from remote_vae.families import load_family
        from remote_vae.vae import model_class, resolve_dtype

        family = load_family(family_name)
        device = torch.device(self.args.device)
        model = model_class(family).from_pretrained(self.model_dir(family_name)).eval()
        dtype = resolve_dtype("auto", family, device)
        return (
            InProcess(model, family, device, dtype, fast=False),
            InProcess(model, family, device, dtype, fast=True),
            family,
        )


class Server:
    """`remote-vae serve FAMILY --model DIR` on a loopback port, its log in the scratch folder; start-up timed."""

    def __init__(self, suite: Suite, family: str, options: list[str], config: Path | None = None):
        import requests

        port = free_port()
        self.url = f"http://127.0.0.1:{port}/"
        self.log = suite.scratch / f"server-{family}-{port}.log"
        command = [
            sys.executable,
            "-m",
            "remote_vae",
            "serve",
            str(config or family),
            "--model",
            str(suite.model_dir(family)),
            "--device",
            suite.args.device,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            *options,
        ]
        began = time.monotonic()
        until = began + max(30.0, suite.left())
        env = child_environment()
        with open(self.log, "wb") as log:
            self.process = suite.forker.start(command, env, self.log) or subprocess.Popen(
                command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env
            )
        while time.monotonic() < until:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}: {self.log.read_text()[-2000:]}")
            try:
                if requests.get(self.url + "health", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.2)
        else:
            self.stop()
            raise RuntimeError(f"the server was not healthy in time: {self.log.read_text()[-2000:]}")
        self.start_seconds = time.monotonic() - began

    def stages(self) -> dict[str, float]:
        """The server's seconds so far per stage (its Prometheus histograms' sums) and its request count."""
        import requests

        sums = {}
        for line in requests.get(self.url + "metrics", timeout=10).text.splitlines():
            if line.startswith("remote_vae_stage_duration_seconds_sum"):
                sums[line.split('stage="')[1].split('"')[0]] = float(line.split()[-1])
            elif line.startswith("remote_vae_request_duration_seconds_count") and 'operation="health"' not in line:
                sums["requests"] = sums.get("requests", 0.0) + float(line.split()[-1])
        return sums

    def peak_mib(self) -> float | None:
        from bench import server_cuda_peak_mib

        return server_cuda_peak_mib(self.url)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def synchronize(device: str):
    import torch

    return (lambda: torch.cuda.synchronize()) if device.startswith("cuda") else (lambda: None)


def median_ms(call, repeats: int, warm: int, device: str) -> tuple[float, object]:
    """bench.timed's median after `warm` calls, in milliseconds."""
    from bench import timed

    for _ in range(warm):
        call()
    seconds, result = timed(call, repeats, synchronize(device))
    return round(1000 * seconds, 2), result


# -- the stages ------------------------------------------------------------------------


def environment(suite: Suite, deadline: float) -> dict:
    import diffusers
    import torch

    from remote_vae.device import DevicePath
    from remote_vae.media import jpeg_encoder_for

    device = torch.device(suite.args.device)
    found = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "diffusers": diffusers.__version__,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cpu_cores": os.cpu_count(),
    }
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        found |= {
            "gpu": properties.name,
            "gpu_memory_gib": round(properties.total_memory / 2**30, 1),
            "multiprocessors": properties.multi_processor_count,
        }
        if shutil.which("nvidia-smi"):
            found["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            ).stdout.strip()
    path = DevicePath.default(device)
    found["fast_paths"] = {
        "nvjpeg": jpeg_encoder_for(device) is not None,
        "pinned_memory": path.pinned_memory,
        "channels_last": path.channels_last,
        "cudnn_benchmark": path.cudnn_benchmark,
    }
    return found


def cuda_tests(suite: Suite, deadline: float) -> dict:
    junit = suite.scratch / "cuda-tests.xml"
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-o",
        "addopts=",  # one process: the GPU image has no pytest-xdist, and the CUDA tests share one device
        "tests/live/test_cuda.py",
        f"--junitxml={junit}",
    ]
    try:
        done = subprocess.run(
            command,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=max(5.0, deadline - time.monotonic()),
            # its own options only: a PYTEST_ADDOPTS meant for the caller's run (a plugin, say) is not this run's
            env={key: value for key, value in child_environment().items() if key != "PYTEST_ADDOPTS"},
        )
    except subprocess.TimeoutExpired as exc:
        # Bytes even with text=True
        output = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
        return {"summary": "timed out", "output": output[-3000:]}
    lines = [line for line in done.stdout.strip().splitlines() if line.strip()]
    failures = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
    return {
        "exit_code": done.returncode,
        "summary": lines[-1] if lines else "",
        "failures": failures,
        "output": done.stdout[-4000:] if done.returncode else "",
    }


def headline(suite: Suite, deadline: float) -> dict:
    import numpy as np
    import torch
    from bench import PeakMemory
    from diffusers.utils.remote_utils import remote_decode, remote_encode
    from PIL import Image

    sizes = SIZES[suite.args.tiny]
    device, repeats, warm = suite.args.device, sizes["repeats"], sizes["warm"]
    rows = []
    for family_name in ("sd15", "sdxl", "flux"):
        if time.monotonic() > deadline:
            rows.append({"family": family_name, "skipped": "the stage's time ran out"})
            continue
        plain, fast, family = suite.in_process(family_name)
        server = suite.server(family_name, *warmed(sizes))
        for size in sizes["decode"]:
            side = size // family.spatial_compression
            latents = torch.randn(1, family.latent_channels, side, side, generator=torch.Generator().manual_seed(size))
            with PeakMemory(torch.device(device)) as peak:
                plain_ms, files = median_ms(lambda: plain.decode(latents, "png"), repeats, warm, device)
            fast_ms, _ = median_ms(lambda: fast.decode(latents, "png"), repeats, warm, device)
            before = server.stages()
            served_ms, image = median_ms(
                lambda: remote_decode(
                    endpoint=server.url,
                    tensor=latents.to(fast.dtype),
                    do_scaling=False,
                    output_type="pil",
                    image_format="png",
                ),
                repeats,
                warm,
                device,
            )
            after = server.stages()
            local = np.asarray(Image.open(io.BytesIO(files[0])))
            difference = np.abs(np.asarray(image).astype(int) - local.astype(int))
            rows.append(
                {
                    "family": family_name,
                    "operation": "decode",
                    "size": size,
                    "dtype": str(fast.dtype).removeprefix("torch."),
                    "diffusers_ms": plain_ms,
                    "device_path_ms": fast_ms,
                    "service_ms": served_ms,
                    "service_over_diffusers": round(served_ms / plain_ms, 3),
                    "device_path_over_diffusers": round(fast_ms / plain_ms, 3),
                    "diffusers_peak_mib": round(peak.used_mib, 1),
                    "server_peak_mib": server.peak_mib(),
                    "server_stage_ms": per_request(before, after),
                    "max_pixel_difference": int(difference.max()),
                    "pixels_within_1": round(float((difference <= 1).mean()), 5),
                }
            )
        for size in sizes["encode"]:
            ramp = np.add.outer(np.arange(size), np.arange(size)) / (2 * size)
            image = Image.fromarray((np.stack([ramp, ramp[::-1], ramp.T], axis=-1) * 255).astype(np.uint8))
            plain_ms, local = median_ms(lambda: plain.encode([image]), repeats, warm, device)
            fast_ms, _ = median_ms(lambda: fast.encode([image]), repeats, warm, device)
            before = server.stages()
            served_ms, latents = median_ms(
                lambda: remote_encode(endpoint=server.url, image=image), repeats, warm, device
            )
            after = server.stages()
            rows.append(
                {
                    "family": family_name,
                    "operation": "encode",
                    "size": size,
                    "diffusers_ms": plain_ms,
                    "device_path_ms": fast_ms,
                    "service_ms": served_ms,
                    "service_over_diffusers": round(served_ms / plain_ms, 3),
                    "server_stage_ms": per_request(before, after),
                    "max_latent_difference": float((latents.float().cpu() - local.float().cpu()).abs().max()),
                }
            )
        plain = fast = None  # their models' memory, before the next family's
        free(device)
    return {"rows": rows}


def warmed(sizes: dict) -> tuple[str, ...]:
    return ("--warmup-sizes", *[f"{size}x{size}" for size in sizes["decode"]])


def per_request(before: dict, after: dict) -> dict:
    requests = after.get("requests", 0) - before.get("requests", 0)
    return {
        stage: round(1000 * (after[stage] - before.get(stage, 0)) / requests, 2)
        for stage in after
        if stage != "requests" and requests
    }


def throughput(suite: Suite, deadline: float) -> dict:
    import torch
    from bench import pooled, under_load
    from diffusers.utils.remote_utils import remote_decode

    from remote_vae.families import load_family

    sizes = SIZES[suite.args.tiny]
    rows = []
    for family_name, size in sizes["throughput"].items():
        family = load_family(family_name)
        side = size // family.spatial_compression
        latents = torch.randn(1, family.latent_channels, side, side, generator=torch.Generator().manual_seed(7)).half()
        for batching, options in (("on", ()), ("off", ("--max-batch-images", "1"))):
            if time.monotonic() > deadline:
                rows.append({"family": family_name, "batching": batching, "skipped": "the stage's time ran out"})
                continue
            server = suite.server(family_name, *warmed(sizes), *options)  # batching on: the headline's server
            call = lambda: remote_decode(
                endpoint=server.url,
                tensor=latents,
                do_scaling=False,
                output_type="pt",
                partial_postprocess=True,  # noqa: E731
                return_type="pt",
            )
            call()
            row = {"family": family_name, "size": size, "batching": batching}
            for clients in (1, 8):
                row[f"clients_{clients}"] = pooled([under_load(call, clients, clients * sizes["calls_per_client"])], 1)
            row["speedup_8_over_1"] = round(row["clients_8"]["images_per_s"] / row["clients_1"]["images_per_s"], 2)
            rows.append(row)
    return {"rows": rows}


def compile_stage(suite: Suite, deadline: float) -> dict:
    import torch
    from diffusers.utils.remote_utils import remote_decode

    sizes = SIZES[suite.args.tiny]
    size = sizes["compile"]
    side = size // 8
    latents = torch.randn(1, 16, side, side, generator=torch.Generator().manual_seed(3))
    # Flux's decode alone, batches of one: each further operation or batch size is another graph to compile (about a
    # minute each on a GPU), which this stage's share cannot pay for.
    from remote_vae.families import CONFIG_DIR

    config = suite.scratch / "flux.json"
    config.write_text(json.dumps(json.loads((CONFIG_DIR / "flux.json").read_text()) | {"operations": ["decode"]}))
    options = ("--warmup-sizes", f"{size}x{size}", "--max-batch-images", "1")
    eager = suite.server("flux", *options, config=config)
    compiled = suite.server("flux", *options, "--compile", config=config)
    dtype = torch.bfloat16 if suite.args.device.startswith("cuda") else torch.float32
    call = lambda server: (
        lambda: remote_decode(
            endpoint=server.url,
            tensor=latents.to(dtype),
            do_scaling=False,
            output_type="pt",  # noqa: E731
            partial_postprocess=True,
            return_type="pt",
        )
    )
    eager_ms, _ = median_ms(call(eager), sizes["repeats"], sizes["warm"], suite.args.device)
    compiled_ms, _ = median_ms(call(compiled), sizes["repeats"], sizes["warm"], suite.args.device)
    log = compiled.log.read_text()
    return {
        "size": size,
        "eager_start_s": round(eager.start_seconds, 1),
        "compiled_start_s": round(compiled.start_seconds, 1),
        "compile_s": round(compiled.start_seconds - eager.start_seconds, 1),
        "eager_ms": eager_ms,
        "compiled_ms": compiled_ms,
        "compiled_over_eager": round(compiled_ms / eager_ms, 3),
        "compiled": "(compiled)" in log,
        "log": "\n".join(line for line in log.splitlines() if "compil" in line.lower())[-1500:],
    }


def large(suite: Suite, deadline: float) -> dict:
    import numpy as np
    import torch
    from bench import PeakMemory
    from diffusers.utils.remote_utils import remote_decode

    from remote_vae.families import load_family
    from remote_vae.media import uint8_images
    from remote_vae.vae import load_vae, resolve_dtype

    sizes = SIZES[suite.args.tiny]
    device = torch.device(suite.args.device)
    found: dict = {}
    family = load_family("sdxl")
    size = sizes["tiled"]
    vae = load_vae(
        family, str(suite.model_dir("sdxl")), device, resolve_dtype("auto", family, device), tile_above_pixels=None
    )
    latents = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(11))
    ways = {}
    for way, threshold in (("untiled", None), ("exact", 0)):
        vae.tile_above_pixels = threshold
        free(suite.args.device)
        try:
            with PeakMemory(device) as peak:
                ms, sample = median_ms(
                    lambda: uint8_images(vae.decode(latents, tiling="exact")).cpu(), 1, 0, suite.args.device
                )
            # An out-of-memory error would have been retried sliced, then tiled: the counts say how each way really ran.
            ways[way] = {
                "ms": ms,
                "peak_mib": round(peak.peak / 2**20, 1),
                "calls": dict(vae.calls),
                "oom_events": dict(vae.oom_events),
                "pixels": sample,
            }
            vae.calls, vae.oom_events = dict.fromkeys(vae.calls, 0), dict.fromkeys(vae.oom_events, 0)
        except Exception as exc:  # untiled may not fit: that is what the exact path is for
            ways[way] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    if "pixels" in ways.get("untiled", {}) and "pixels" in ways.get("exact", {}):
        difference = (ways["untiled"]["pixels"].int() - ways["exact"]["pixels"].int()).abs()
        mse = float((difference.double() ** 2).mean())
        found["exact_vs_untiled"] = {
            "max_difference": int(difference.max()),
            "within_1": round(float((difference <= 1).double().mean()), 6),
            "psnr_db": round(10 * np.log10(255**2 / mse), 1) if mse else "identical",
            "time_ratio": round(ways["exact"]["ms"] / ways["untiled"]["ms"], 3),
        }
    found["sdxl_tiled"] = {
        "size": size,
        "dtype": str(vae.dtype).removeprefix("torch."),
        **{way: {k: v for k, v in row.items() if k != "pixels"} for way, row in ways.items()},
    }
    vae = ways = None
    free(suite.args.device)
    if time.monotonic() > deadline:
        return found | {"wan": "skipped: the stage's time ran out"}
    width, height, frames = sizes["wan"]
    wan = load_family("wan21")
    latent = torch.randn(
        1, 16, (frames - 1) // 4 + 1, height // 8, width // 8, generator=torch.Generator().manual_seed(13)
    )
    server = suite.server("wan21")
    before = server.stages()
    began = time.perf_counter()
    mp4 = remote_decode(endpoint=server.url, tensor=latent, do_scaling=False, output_type="mp4", return_type="mp4")
    seconds = time.perf_counter() - began
    stages = per_request(before, server.stages())
    found["wan_mp4"] = {
        "width": width,
        "height": height,
        "frames": frames,
        "dtype": wan.dtype_for(device.type),
        "seconds": round(seconds, 2),
        "mp4_bytes": len(mp4),
        "server_peak_mib": server.peak_mib(),
        "server_stage_ms": stages,
        "media_share": round(stages.get("media", 0) / max(1e-9, sum(stages.values())), 3),
    }
    if time.monotonic() > deadline:
        return found | {"ltx2": "skipped: the stage's time ran out"}
    return found | {"ltx2_with_sound": ltx2_with_sound(suite, sizes["ltx2"])}


def ltx2_with_sound(suite: Suite, size: tuple[int, int, int]) -> dict:
    """LTX-2's video and its sound in one request (its pipeline folder served: vae/, audio_vae/, vocoder/), to an MP4
    with the sound track and to the two tensors: seconds, bytes, the server's peak and stage times."""
    import requests
    import torch
    from safetensors.torch import save

    width, height, frames = size
    generator = torch.Generator().manual_seed(17)
    video = torch.randn(1, 128, (frames - 1) // 8 + 1, height // 32, width // 32, generator=generator)
    steps = -(-frames * 25 // 24)  # LTX-2's 25 audio latent steps a second, for the clip's frames at 24 fps
    body = save({"latents": video, "audio_latents": torch.randn(1, 8, steps, 16, generator=generator)})
    server = suite.server("ltx2")
    found = {"width": width, "height": height, "frames": frames, "audio_steps": steps}
    for output_type in ("mp4", "pt"):
        before = server.stages()
        began = time.perf_counter()
        reply = requests.post(
            server.url + "ltx2/",
            data=body,
            params={"output_type": output_type, "fps": 24},
            headers={"Content-Type": "application/safetensors"},
            timeout=600,
        )
        reply.raise_for_status()
        found[output_type] = {
            "seconds": round(time.perf_counter() - began, 2),
            "bytes": len(reply.content),
            "samples": int(reply.headers["sample-count"]),
            "server_stage_ms": per_request(before, server.stages()),
        }
    found["server_peak_mib"] = server.peak_mib()
    return found


def profile(suite: Suite, deadline: float) -> dict:
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from remote_vae.families import load_family
    from remote_vae.launch import load_service
    from remote_vae.settings import read_settings
    from remote_vae.wire import HttpCall, prepare_call, render

    size = SIZES[suite.args.tiny]["profile"]
    family = load_family("sdxl")
    options = read_settings(["sdxl", "--device", suite.args.device, "--warmup-sizes", f"{size}x{size}"])
    service = load_service(family, str(suite.model_dir("sdxl")), options)
    latents = torch.randn(1, 4, size // 8, size // 8).half()
    query = "&".join([f"shape={n}" for n in latents.shape] + ["dtype=float16", "output_type=pil", "image_format=png"])
    call = HttpCall(latents.numpy().tobytes(), query, "tensor/binary", "image/png", None)

    def request():
        prepared = prepare_call(service, call)
        return render(prepared, service.call(prepared.job))

    request()  # warm
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if suite.args.device.startswith("cuda") else [])
    with torch_profile(activities=activities, record_shapes=False) as profiler:
        reply = request()
        synchronize(suite.args.device)()
    trace = suite.scratch / "trace.json"
    profiler.export_chrome_trace(str(trace))
    with open(trace, "rb") as source, gzip.open(suite.out / "trace.json.gz", "wb") as target:
        shutil.copyfileobj(source, target)
    sort = "device_time_total" if suite.args.device.startswith("cuda") else "cpu_time_total"
    return {
        "size": size,
        "reply_status": reply.status,
        "reply_bytes": len(reply.body),
        "trace": "trace.json.gz",
        "top": profiler.key_averages().table(sort_by=sort, row_limit=12),
    }


def free(device: str) -> None:
    import gc

    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


STAGE_FUNCTIONS = {
    "environment": environment,
    "cuda_tests": cuda_tests,
    "headline": headline,
    "throughput": throughput,
    "compile": compile_stage,
    "large": large,
    "profile": profile,
}


# -- reports ---------------------------------------------------------------------------


def rounded(value):
    """Floats to four significant digits, through dicts and lists: timings are not more precise than that."""
    if isinstance(value, float):
        return float(f"{value:.4g}")
    if isinstance(value, dict):
        return {key: rounded(item) for key, item in value.items()}
    if isinstance(value, list):
        return [rounded(item) for item in value]
    return value


def summary(record: dict) -> str:
    if record["status"] != "done":
        return record.get("note") or record.get("error", "")
    keys = [key for key in record if key not in ("status", "seconds", "rows", "traceback", "output", "top", "log")]
    parts = [f"{key}={record[key]}" for key in keys if not isinstance(record[key], (dict, list))]
    if "rows" in record:
        parts.append(f"{len(record['rows'])} rows")
    return ", ".join(parts)[:300]


def markdown(results: dict) -> str:
    lines = [
        f"# GPU suite: {results['stages'].get('environment', {}).get('gpu', results['device'])}",
        f"budget {results['budget_s']} s, elapsed {results.get('elapsed_s')} "
        f"s{', tiny models' if results['tiny'] else ''}",
    ]
    if results.get("note"):
        lines.append(f"\n**{results['note']}**")
    for name, record in results["stages"].items():
        lines.append(f"\n## {name}: {record['status']} ({record.get('seconds')} s)\n")
        rows = record.get("rows")
        if rows:
            columns = list(dict.fromkeys(key for row in rows for key in row))
            lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            lines += [
                "| "
                + " | ".join(
                    json.dumps(row.get(column, "")) if isinstance(row.get(column), dict) else str(row.get(column, ""))
                    for column in columns
                )
                + " |"
                for row in rows
            ]
        for key, value in record.items():
            if key in ("status", "seconds", "rows"):
                continue
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            lines.append(f"- {key}:\n\n```\n{text}\n```" if "\n" in text else f"- {key}: {text}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--out", required=True, help="folder for results.json, results.md and trace.json.gz ($OUT on the device)"
    )
    parser.add_argument(
        "--budget", type=float, default=400, help="wall-clock seconds for every stage together (default 400)"
    )
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument(
        "--tiny", action="store_true", help="the tests' tiny widths at small sizes: proves every stage on a CPU"
    )
    parser.add_argument(
        "--wheels",
        type=Path,
        help="install these carried wheels offline first (the GPU image lacks diffusers, starlette, ...)",
    )
    parser.add_argument("--stages", nargs="*", choices=list(STAGES), default=list(STAGES), help="a subset, in order")
    args = parser.parse_args(argv)
    if args.wheels:
        install_wheels(args.wheels)
    sys.path[:0] = [
        str(ROOT),
        str(ROOT / "scripts"),
    ]  # the package, and bench.py's helpers (imported after the wheels: they need diffusers)
    os.environ["PYTHONPATH"] = python_path()
    suite = Suite(args)

    def cut_off() -> None:  # the budget is spent and a stage is still running: write what there is and stop
        suite.write(note=f"cut off at the budget's end ({args.budget:g} s) while a stage ran")
        print("[suite] cut off at the budget's end", flush=True)
        for server in list(suite.servers.values()):
            server.stop()
        os._exit(3)

    watchdog = threading.Timer(args.budget + 5, cut_off)
    watchdog.daemon = True
    watchdog.start()
    try:
        suite.run({name: STAGE_FUNCTIONS[name] for name in args.stages})
    finally:
        watchdog.cancel()
        suite.close()
    suite.write()
    done = sum(record["status"] == "done" for record in suite.results["stages"].values())
    print(
        f"[suite] {done} of {len(args.stages)} stages done in {suite.results['elapsed_s']} s; results in {suite.out}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
