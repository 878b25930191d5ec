#!/usr/bin/env python3
"""Prepare the GPU suite's carry folder and print the one device call that runs it.

    python scripts/gpu_carry.py             # wheels into .whl/ (git-ignored), then the call
    python scripts/gpu_carry.py --dry-run   # the pip command and the call; downloads nothing

The GPU machine (the device tool's nvidia-h100-x1 / nvidia-h200: Python 3.12, torch 2.11 for CUDA 13, huggingface_hub,
safetensors, Pillow, numpy, requests, prometheus-client, pytest already there) reaches no package index. What the
service needs beyond that travels as wheels for Python 3.12 on manylinux x86_64, in the call's `carry`, which holds
64 MiB with the working tree. scripts/gpu_suite.py installs them offline and runs every stage within its budget.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CARRY = ".whl"
# What the GPU image lacks, at the versions this environment (the one CI tests) has; imageio-ffmpeg at 0.7.0, whose
# wheel is 29 MB with its ffmpeg, where 0.8's is 68 MB, over the carry's 64 MiB.
PACKAGES = ("diffusers", "importlib_metadata", "starlette", "uvicorn", "swagger-ui-bundle")
PINNED = {"imageio-ffmpeg": "0.7.0"}
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux2010_x86_64",
    "manylinux1_x86_64",
)
CARRY_LIMIT = 60 * 2**20  # the 64 MiB of a call, less room for the working tree
BUDGET_S = 400
# The call's limit: the suite's budget, its offline install and the watchdog's last write, under 7 minutes.
TIMEOUT_S = 420


def requirements() -> list[str]:
    return [f"{name}=={importlib.metadata.version(name)}" for name in PACKAGES] + [
        f"{name}=={version}" for name, version in PINNED.items()
    ]


def download_command(folder: Path) -> list[str]:
    platforms = [option for platform in PLATFORMS for option in ("--platform", platform)]
    return [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        "3.12",
        "--implementation",
        "cp",
        *platforms,
        "-d",
        str(folder),
        *requirements(),
    ]


def device_call() -> dict:
    command = f'PYTHONUNBUFFERED=1 python3 scripts/gpu_suite.py --wheels {CARRY} --out "$OUT" --budget {BUDGET_S}'
    return {"command": command, "carry": [CARRY], "timeout_s": TIMEOUT_S}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="print the download command and the device call only")
    args = parser.parse_args(argv)
    folder = ROOT / CARRY
    command = download_command(folder)
    if args.dry_run:
        print(" ".join(command))
    else:
        for stale in folder.glob("*.whl"):  # one version of each: two stop the install there
            stale.unlink()
        subprocess.run(command, check=True)
        size = sum(path.stat().st_size for path in folder.glob("*.whl"))
        print(f"{folder}: {size / 2**20:.1f} MiB in {len(list(folder.glob('*.whl')))} wheels")
        if size > CARRY_LIMIT:
            print(f"error: over the {CARRY_LIMIT >> 20} MiB a call can carry", file=sys.stderr)
            return 1
    print("The device call (the device tool's run):")
    print(json.dumps(device_call(), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
