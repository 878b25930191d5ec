#!/usr/bin/env bash
# Build the image and serve through it, on a machine with no registry access and no GPU.
#
#   sudo bash scripts/container_smoke.sh
#
# Needs buildah, podman and debootstrap (Debian packages), the test requirements on the host
# (diffusers, to build a tiny model and call the container as a client), and PyPI for the builds.
#
# 1. A stand-in for the PyTorch base image: Debian bookworm from debootstrap, with Python and a
#    CPU build of torch in /opt/python (on PATH, as conda's python is in pytorch/pytorch).
# 2. The real Dockerfile, built against it with --build-arg BASE_IMAGE.
# 3. A tiny random-weight SD VAE mounted read-only at /repository, as Inference Endpoints mounts
#    a model repository; an API key in the environment; the port published on 127.0.0.1 only.
# 4. Checks: the health check passes, the server runs as a non-root user, a POST without the key
#    gets 401, diffusers' remote_decode / remote_encode through the container return the pixels
#    and latents diffusers computes in-process on the same weights, and `podman stop` (SIGTERM)
#    ends it with status 0.
#
# Environment: SMOKE_DIR (work folder, default /var/tmp/remote-vae-smoke), SMOKE_PORT (default 18080),
# DEBIAN_MIRROR, KEEP=1 to leave the container running.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
SMOKE_DIR="${SMOKE_DIR:-/var/tmp/remote-vae-smoke}"
PORT="${SMOKE_PORT:-18080}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
BASE_TAG=localhost/remote-vae-smoke-base:bookworm
IMAGE_TAG=localhost/remote-vae:smoke
CONTAINER=remote-vae-smoke
API_KEY="smoke-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"

# runc with lowered limits: sandboxes without CAP_SYS_RESOURCE cannot raise rlimits to podman's defaults,
# and crun refuses hybrid cgroup hierarchies. On an ordinary host these settings change nothing that matters.
RUNTIME=(--runtime "${SMOKE_RUNTIME:-runc}" --ulimit nofile=4096:4096 --ulimit nproc=4096:4096)

step() { printf '\n== %s\n' "$*"; }
mkdir -p "$SMOKE_DIR"

if ! podman image exists "$BASE_TAG"; then
    step "base image: debootstrap bookworm + python3 + torch (CPU)"
    if [ ! -x "$SMOKE_DIR/rootfs/usr/bin/python3" ]; then
        debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$SMOKE_DIR/rootfs" "$MIRROR"
    fi
    rm -rf "$SMOKE_DIR/base" && mkdir -p "$SMOKE_DIR/base"
    tar -C "$SMOKE_DIR/rootfs" -c . | podman import - localhost/remote-vae-smoke-debian:bookworm
    # A CPU torch wheel for the container's Python 3.11 (on machines with a local wheel cache, taken from it).
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.11 --platform manylinux_2_28_x86_64 \
        -d "$SMOKE_DIR/base" "torch==${SMOKE_TORCH:-2.13.0}"
    # The host's trust store, so pip in the builds trusts what the host trusts (a TLS-inspecting proxy's CA, say).
    cp "${SMOKE_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}" "$SMOKE_DIR/base/ca-certificates.crt"
    cat > "$SMOKE_DIR/base/Containerfile" <<'BASE'
FROM localhost/remote-vae-smoke-debian:bookworm
COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    PATH=/opt/python/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
COPY torch-*.whl /tmp/
RUN python3 -m venv /opt/python && /opt/python/bin/pip install --no-cache-dir /tmp/torch-*.whl && rm /tmp/torch-*.whl
BASE
    buildah bud "${RUNTIME[@]}" --network host --format docker -t "$BASE_TAG" "$SMOKE_DIR/base"
fi

step "image: the Dockerfile with --build-arg BASE_IMAGE=$BASE_TAG"
buildah bud "${RUNTIME[@]}" --network host --format docker --build-arg "BASE_IMAGE=$BASE_TAG" -t "$IMAGE_TAG" "$ROOT"

step "a tiny sd15 VAE as the mounted model repository"
rm -rf "$SMOKE_DIR/repository" && mkdir -p "$SMOKE_DIR/repository"
(cd "$ROOT/tests" && python3 -c "import sys; from conftest import tiny_sd_vae; tiny_sd_vae().save_pretrained(sys.argv[1])" "$SMOKE_DIR/repository")
chmod -R a+rX "$SMOKE_DIR/repository"

step "run: published on 127.0.0.1:$PORT, API key from the environment"
podman rm -f "$CONTAINER" >/dev/null 2>&1 || true
podman run "${RUNTIME[@]}" -d --name "$CONTAINER" -p "127.0.0.1:$PORT:8000" \
    -v "$SMOKE_DIR/repository:/repository:ro" \
    -e REMOTE_VAE_FAMILIES=sd15 -e REMOTE_VAE_API_KEY="$API_KEY" -e REMOTE_VAE_MAX_BATCH=8 \
    "$IMAGE_TAG" >/dev/null
trap '[ "${KEEP:-0}" = 1 ] || podman rm -f "$CONTAINER" >/dev/null 2>&1 || true' EXIT

for _ in $(seq 1 120); do
    if podman healthcheck run "$CONTAINER" >/dev/null 2>&1; then break; fi
    if [ "$(podman inspect -f '{{.State.Running}}' "$CONTAINER")" != true ]; then podman logs "$CONTAINER"; exit 1; fi
    sleep 1
done
podman healthcheck run "$CONTAINER" && echo "HEALTHCHECK: healthy"
echo "user in the container: $(podman exec "$CONTAINER" id -u) (image USER $(podman inspect -f '{{.Config.User}}' "$IMAGE_TAG"))"
[ "$(podman exec "$CONTAINER" id -u)" != 0 ]

step "decode and encode through the container with diffusers' client"
(cd "$ROOT/tests" && SMOKE_URL="http://127.0.0.1:$PORT/" SMOKE_KEY="$API_KEY" SMOKE_MODEL="$SMOKE_DIR/repository" python3 - <<'CLIENT'
import os

import requests
import torch
from diffusers import AutoencoderKL
from diffusers.utils import remote_utils
from diffusers.utils.remote_utils import remote_decode, remote_encode

from conftest import seeded
from test_decode import SD, assert_pixels_close, decode_locally, uint8_locally

url = os.environ["SMOKE_URL"]
refused = requests.post(url, data=b"x", headers={"Content-Type": "tensor/binary"})
assert refused.status_code == 401, refused.status_code
print("POST without the key:", refused.status_code, refused.json())

session = requests.Session()
session.headers["Authorization"] = "Bearer " + os.environ["SMOKE_KEY"]
remote_utils.requests = session
reference = AutoencoderKL.from_pretrained(os.environ["SMOKE_MODEL"]).eval()

latents = seeded(2, 4, 32, 32)
expected = decode_locally(reference, latents, SD)
pixels = remote_decode(url, tensor=latents, scaling_factor=SD, output_type="pt", partial_postprocess=True, return_type="pt")
assert_pixels_close(pixels.numpy(), uint8_locally(expected))
floats = remote_decode(url, tensor=latents, scaling_factor=SD, output_type="pt", return_type="pt")
print(f"decode [2, 4, 32, 32] -> {list(pixels.shape)} uint8, same pixels as diffusers in-process (max float error {(floats - expected).abs().max():.2e})")

image = remote_decode(url, tensor=latents[:1], scaling_factor=SD, image_format="png")
print("decode to PNG:", image.format, image.size)

images = torch.rand(1, 3, 256, 256) * 2 - 1
encoded = remote_encode(url, images, scaling_factor=SD)
with torch.no_grad():
    local = reference.encode(images).latent_dist.mean * SD
torch.testing.assert_close(encoded, local, atol=1e-4, rtol=1e-4)
print(f"encode [1, 3, 256, 256] -> {list(encoded.shape)}, same latents as diffusers in-process")
CLIENT
)

step "SIGTERM: podman stop"
podman stop -t 40 "$CONTAINER" >/dev/null
status="$(podman inspect -f '{{.State.ExitCode}}' "$CONTAINER")"
echo "exit status after podman stop: $status"
[ "$status" = 0 ]
podman logs "$CONTAINER" 2>&1 | tail -n 5

step "image"
podman image inspect -f 'size {{.Size}} bytes; user {{.Config.User}}; ports {{.Config.ExposedPorts}}; entrypoint {{.Config.Entrypoint}}; healthcheck {{.Config.Healthcheck.Test}}' "$IMAGE_TAG"
echo
echo "container smoke test passed"
