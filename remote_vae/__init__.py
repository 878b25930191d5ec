"""remote-vae: the VAE half of diffusion models, served over HTTP.

A request flows through one module per stage:
wire (parse, negotiate) -> latents (check, unpack, scale) -> vae (encode / decode)
-> media (tensor bytes, images) -> wire (render). service.py runs the middle
stages for both front ends: server/ (HTTP) and handler.py (Inference Endpoints).
"""

__version__ = "0.1.0"

__all__ = ["RemoteVae"]


def __getattr__(name: str):
    # `from remote_vae import RemoteVae` imports diffusers only when asked: the server's modules do not need it here
    if name == "RemoteVae":
        from .diffusers_vae import RemoteVae

        return RemoteVae
    raise AttributeError(f"module 'remote_vae' has no attribute {name!r}")
