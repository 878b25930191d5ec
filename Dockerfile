# remote-vae: the VAE half of diffusion models behind HTTP, on a GPU.
#
#   docker build -t remote-vae .
#   docker run --gpus all -p 8000:8000 -v remote-vae-hub:/data/huggingface -e REMOTE_VAE_FAMILIES="sd15 sdxl flux" remote-vae
#
# Configured by environment alone: every `serve` option has a REMOTE_VAE_* variable (README, "Serving").
# Weights, first match wins: a model repository mounted at /repository (Inference Endpoints mounts it there);
# weights baked in with --build-arg BAKE_FAMILIES="sd15 flux"; else the Hub, cached in the /data/huggingface volume.

# Any image with CUDA, Python >= 3.10 and torch >= 2.4 on PATH as `python` will do.
ARG BASE_IMAGE=pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ARG BAKE_FAMILIES=""

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/data/huggingface \
    HF_MODEL_DIR=/repository \
    REMOTE_VAE_WEIGHTS_DIR=/opt/remote-vae/weights \
    REMOTE_VAE_FAMILIES=sd15 \
    REMOTE_VAE_PORT=8000

WORKDIR /opt/remote-vae

# The base image's torch is built for its CUDA: pin it, so requirements.txt cannot replace it.
COPY requirements.txt .
RUN python -c "import torch; print('torch==' + torch.__version__)" > /tmp/keep-base-torch.txt \
    && python -m pip install -c /tmp/keep-base-torch.txt -r requirements.txt \
    && rm /tmp/keep-base-torch.txt

COPY configs/ configs/
COPY remote_vae/ remote_vae/
COPY handler.py .

# Baked weights are root-owned and read-only; the Hub cache belongs to the service user.
RUN if [ -n "${BAKE_FAMILIES}" ]; then HF_HOME=/tmp/bake-cache python -m remote_vae download ${BAKE_FAMILIES} --to "${REMOTE_VAE_WEIGHTS_DIR}" && rm -rf /tmp/bake-cache; fi \
    && useradd --uid 10001 --no-log-init --create-home --shell /usr/sbin/nologin remote-vae \
    && mkdir -p /data/huggingface /repository \
    && chown 10001 /data/huggingface

USER 10001
VOLUME ["/data/huggingface"]
EXPOSE 8000

# Loading a video VAE from the Hub can take minutes: failures count only after the start period.
HEALTHCHECK --interval=30s --timeout=10s --start-period=600s --retries=3 \
    CMD ["python", "-m", "remote_vae", "health"]

# exec form: SIGTERM reaches the server, which finishes in-flight requests and exits 0.
ENTRYPOINT ["python", "-m", "remote_vae", "serve"]
