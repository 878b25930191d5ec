"""remote-vae: the VAE half of diffusion models, served over HTTP.

A request flows through one module per stage:
wire (parse, negotiate) -> latents (check, unpack, scale) -> vae (encode / decode)
-> media (tensor bytes, images) -> wire (render). service.py runs the middle
stages for both front ends: server/ (HTTP) and handler.py (Inference Endpoints).
"""

__version__ = "0.1.0"
