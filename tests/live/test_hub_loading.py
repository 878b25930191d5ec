"""`serve sd15` with no --model reads the family's Hub repo from the Hugging Face cache (HF_HUB_OFFLINE=1)."""

import requests
import torch
from conftest import seeded
from diffusers.utils.remote_utils import remote_decode, remote_encode
from diffusers_reference import SD, decode_locally


def test_single_family_served_at_root_from_hub_cache(hub_server, reference):
    assert requests.get(hub_server.url + "/").json() == {"status": "ok", "families": {"sd15": "ready"}}
    assert "loading sd15 from stabilityai/sd-vae-ft-mse" in hub_server.log_path.read_text()
    latents = seeded(1, 4, 8, 8)
    for path in ("/", "/predict", "/decode", "/sd15/"):
        out = remote_decode(
            hub_server.url + path, tensor=latents, output_type="pt", return_type="pt", scaling_factor=SD
        )
        torch.testing.assert_close(out, decode_locally(reference["sd15"], latents, SD), atol=1e-4, rtol=1e-4)


def test_encode_and_decode_share_the_root_url(hub_server):
    images = torch.rand(1, 3, 32, 32) * 2 - 1
    latents = remote_encode(hub_server.url + "/", images, scaling_factor=SD)
    assert latents.shape == (1, 4, 4, 4)
    out = remote_decode(hub_server.url + "/", tensor=latents, output_type="pt", return_type="pt", scaling_factor=SD)
    assert out.shape == (1, 3, 32, 32)
