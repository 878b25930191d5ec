"""Our ComfyUI nodes (comfyui/), loaded as ComfyUI loads a custom node folder and called as it calls nodes
(INPUT_TYPES, FUNCTION, RETURN_TYPES), against a live server: their IMAGEs and LATENTs equal diffusers' in-process
decode and encode of the same latents, in ComfyUI's conventions (a LATENT holds what ComfyUI's own VAE returns;
IMAGE is [B, H, W, 3] in 0..1; a video is one IMAGE batch of its frames). The loader's VAE goes through the calls
ComfyUI's stock VAE Decode / VAE Encode / tiled nodes make of a VAE (nodes.py, ComfyUI 0.33.0)."""

from __future__ import annotations

import importlib.util
import sys
import time

import pytest
import torch
from conftest import ROOT, free_port, seeded
from diffusers import Flux2Pipeline, LTXPipeline

from remote_vae.families import available, load_family
from remote_vae.vae import latent_of

# Not offered by the nodes yet: audio families, SVD's frames-as-batch latent, RGBA images, decode-only Allegro
# (docs/comfyui.md)
FAMILIES = [
    name
    for name in available()
    if not (
        load_family(name).is_audio
        or load_family(name).frames_as_batch
        or load_family(name).pixel_channels == 4
        or load_family(name).sound
    )
    and "encode" in load_family(name).operations
]
PIXEL = 1 / 255 + 1e-6  # uint8 pixels: one step


def load_custom_nodes(name: str = "remote-vae"):
    """The folder as ComfyUI's nodes.load_custom_node imports it: its __init__.py as a module named for the folder."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "comfyui" / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def nodes(every_family_server, monkeypatch_module):
    monkeypatch_module.setenv("REMOTE_VAE_URL", every_family_server.url)
    module = load_custom_nodes()
    yield module.NODE_CLASS_MAPPINGS
    sys.modules.pop("remote-vae", None)
    sys.modules.pop("remote-vae.remote_vae_nodes", None)


@pytest.fixture(scope="module")
def monkeypatch_module():
    patch = pytest.MonkeyPatch()
    yield patch
    patch.undo()


def run_node(nodes, name: str, **inputs):
    """As ComfyUI's execution does: the class's FUNCTION on an instance, a tuple as long as RETURN_TYPES."""
    cls = nodes[name]
    declared = cls.INPUT_TYPES()
    assert set(inputs) <= set(declared["required"]) | set(declared.get("optional", {}))
    assert set(declared["required"]) <= set(inputs)
    result = getattr(cls(), cls.FUNCTION)(**inputs)
    assert isinstance(result, tuple) and len(result) == len(cls.RETURN_TYPES)
    return result


def loaded(nodes, server, family: str):
    return run_node(nodes, "RemoteVAELoader", url=f"{server.url}/{family}/", family="auto")[0]


def model(reference, family: str):
    return reference[family]


def comfyui_latent(family: str) -> torch.Tensor:
    """A LATENT's samples for the family as ComfyUI holds them: [B, C, h, w], [B, C, T, h, w] for video, Qwen-Image's
    one-frame [B, 16, 1, h, w], Flux.2's patchified 128 channels."""
    spec = load_family(family)
    comfy = spec.comfyui_parameters()
    channels = comfy["latent_channels"]
    if spec.layout.frame_axis:
        return seeded(1, channels, 1, 8, 4, seed=41)
    if spec.is_video:
        step = spec.spatial_compression
        return seeded(1, channels, 3, 64 // step, 32 // step, seed=41)
    return seeded(2, channels, 64 // comfy["spatial_compression"], 32 // comfy["spatial_compression"], seed=41)


def diffusers_decode(vae, family: str, samples: torch.Tensor) -> torch.Tensor:
    """What ComfyUI's own VAE makes of the LATENT, by diffusers in-process: [B, 3, (F,) H, W] about -1..1."""
    with torch.no_grad():
        if family == "flux2":  # batch-norm statistics, then the 2x2 cells unfolded (ComfyUI's Flux.2 latent)
            mean, std = vae.bn.running_mean.view(1, -1, 1, 1), torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + 1e-4)
            return vae.decode(Flux2Pipeline._unpatchify_latents(samples * std + mean)).sample
        if family == "ltxvideo":  # per-channel statistics, then timestep 0.05 with 0.025 noise (ComfyUI's LTXV VAE)
            raw = LTXPipeline._denormalize_latents(samples, vae.latents_mean, vae.latents_std, 1.0)
            noise = torch.randn(raw.shape, generator=torch.Generator().manual_seed(0))
            return vae.decode(0.975 * raw + 0.025 * noise, temb=torch.full((1,), 0.05)).sample
        spec = load_family(family)
        if spec.model_latents == "normalised":  # taesd: ComfyUI's latents are the full VAE's, raw
            return vae.decode((samples - (spec.shift_factor or 0.0)) * spec.scaling_factor).sample
        return vae.decode(samples).sample


def as_image(decoded: torch.Tensor) -> torch.Tensor:
    """[B, 3, (F,) H, W] about -1..1 -> ComfyUI's IMAGE [B(*F), H, W, 3] in 0..1, rounded to uint8 steps."""
    if decoded.ndim == 5:
        decoded = decoded.permute(0, 2, 1, 3, 4).reshape(-1, *decoded.shape[1:2], *decoded.shape[3:])
    pixels = ((decoded / 2 + 0.5).clamp(0, 1) * 255).round() / 255
    return pixels.permute(0, 2, 3, 1)


def test_the_folder_loads_as_comfyui_loads_it_and_declares_its_nodes(nodes):
    assert set(nodes) == {"RemoteVAELoader", "RemoteVAEDecode", "RemoteVAEEncode"}
    loader = nodes["RemoteVAELoader"]
    assert loader.RETURN_TYPES == ("VAE",) and nodes["RemoteVAEDecode"].RETURN_TYPES == ("IMAGE",)
    assert nodes["RemoteVAEEncode"].RETURN_TYPES == ("LATENT",)
    families = loader.INPUT_TYPES()["required"]["family"][0]
    # listed from REMOTE_VAE_URL's /families: the families the nodes take
    assert families[0] == "auto" and set(families[1:]) == set(FAMILIES)
    assert loader.VALIDATE_INPUTS(family="not-listed") is True


@pytest.mark.parametrize("family", FAMILIES)
def test_decode_node_gives_diffusers_pixels_in_comfyuis_conventions(nodes, every_family_server, reference, family):
    vae = loaded(nodes, every_family_server, family)
    samples = comfyui_latent(family)
    (image,) = run_node(nodes, "RemoteVAEDecode", samples={"samples": samples}, vae=vae)
    expected = as_image(diffusers_decode(model(reference, family), family, samples))
    assert image.shape == expected.shape and image.dtype == torch.float32
    assert (image - expected).abs().max() <= PIXEL


@pytest.mark.parametrize("family", FAMILIES)
def test_encode_node_gives_diffusers_latents_in_comfyuis_conventions(nodes, every_family_server, reference, family):
    spec = load_family(family)
    vae = loaded(nodes, every_family_server, family)
    frames = 2 * spec.frame_step + 1 if spec.is_video else 2  # a video family encodes the IMAGE batch as one video
    pixels = torch.rand(frames, 64, 32, 3, generator=torch.Generator().manual_seed(42))
    (latent,) = run_node(nodes, "RemoteVAEEncode", pixels=pixels, vae=vae)
    x = pixels.movedim(-1, 1) * 2 - 1
    x = x.movedim(0, 1).unsqueeze(0) if spec.is_video else x.unsqueeze(2) if spec.layout.frame_axis else x
    local = model(reference, family)
    with torch.no_grad():
        encoded = local.encode(x)
    expected = latent_of(encoded)  # the distribution's mean, or the latent (taesd, DC-AE)
    if spec.model_latents == "normalised":
        expected = expected / spec.scaling_factor + (spec.shift_factor or 0.0)
    if family == "flux2":
        folded = Flux2Pipeline._patchify_latents(expected)
        mean, std = local.bn.running_mean.view(1, -1, 1, 1), torch.sqrt(local.bn.running_var.view(1, -1, 1, 1) + 1e-4)
        expected = (folded - mean) / std
    if family == "ltxvideo":
        expected = LTXPipeline._normalize_latents(expected, local.latents_mean, local.latents_std, 1.0)
    assert latent["samples"].shape == expected.shape
    torch.testing.assert_close(latent["samples"], expected, atol=1e-4, rtol=1e-4)


def test_the_stock_nodes_take_the_loaders_vae(nodes, every_family_server, reference):
    """VAE Decode, VAE Decode (Tiled), VAE Encode and VAE Encode (Tiled) call these of a VAE (ComfyUI nodes.py)."""
    for family in ("sd15", "wan21"):
        vae, local = loaded(nodes, every_family_server, family), model(reference, family)
        samples = comfyui_latent(family)
        images = vae.decode(samples)  # VAEDecode: then [B, F, H, W, 3] -> [-1, H, W, 3]
        expected = as_image(diffusers_decode(local, family, samples))
        flat = images.reshape(-1, *images.shape[-3:]) if images.ndim == 5 else images
        assert (flat - expected).abs().max() <= PIXEL
        compression = vae.spacial_compression_decode()  # VAEDecodeTiled: tile sizes in latent units
        temporal = vae.temporal_compression_decode()
        assert compression == 8 and temporal == (4 if family == "wan21" else None)
        tiled = vae.decode_tiled(
            samples, tile_x=512 // compression, tile_y=512 // compression, overlap=64 // compression
        )
        assert (tiled.reshape(flat.shape) - expected).abs().max() <= PIXEL
        pixels = torch.rand(9, 64, 32, 4, generator=torch.Generator().manual_seed(43))  # RGBA: VAEEncode drops alpha
        latents = vae.encode(pixels[:, :, :, :3])
        assert torch.equal(vae.encode_tiled(pixels[:, :, :, :3], tile_x=512, tile_y=512, overlap=64), latents)
        assert vae.latent_channels == load_family(family).latent_channels and vae.spacial_compression_encode() == 8
    assert vae.downscale_index_formula == (4, 8, 8) and vae.upscale_ratio[0](3) == 9  # video nodes' frame counts


def test_errors_carry_the_servers_message(nodes, every_family_server):
    with pytest.raises(RuntimeError, match="serves .*choose one as family"):
        run_node(nodes, "RemoteVAELoader", url=every_family_server.url, family="auto")
    with pytest.raises(RuntimeError, match="does not serve 'nope'"):
        run_node(nodes, "RemoteVAELoader", url=every_family_server.url, family="nope")
    vae = loaded(nodes, every_family_server, "flux")
    with pytest.raises(RuntimeError, match="400 from .*flux.*latent"):
        run_node(nodes, "RemoteVAEDecode", samples={"samples": seeded(1, 4, 8, 8, seed=1)}, vae=vae)
    # the server root with a family named, and an API key read from the variable named (this server takes none)
    (vae,) = run_node(
        nodes, "RemoteVAELoader", url=every_family_server.url, family="sd3", api_key="", api_key_variable="NO_SUCH"
    )
    assert vae.latent_channels == 16


def test_tiled_nodes_tile_exactly_only_where_the_model_can_and_videos_encode_whole_frame_counts(
    nodes, every_family_server, reference
):
    """VAE Decode (Tiled) on CogVideoX (no exact path) gets its default, not a 400; a video family encodes an IMAGE
    batch of any length, as ComfyUI's own VAE does, from its last whole k * step + 1 frames."""
    cogvideox = loaded(nodes, every_family_server, "cogvideox")
    samples = comfyui_latent("cogvideox")
    expected = as_image(diffusers_decode(reference["cogvideox"], "cogvideox", samples))
    assert (cogvideox.decode_tiled(samples).reshape(expected.shape) - expected).abs().max() <= PIXEL
    wan = loaded(nodes, every_family_server, "wan21")
    pixels = torch.rand(11, 64, 32, 3, generator=torch.Generator().manual_seed(44))
    assert torch.equal(wan.encode(pixels), wan.encode(pixels[:9]))


def test_the_family_list_does_not_wait_for_a_server_that_is_not_there(monkeypatch):
    module = load_custom_nodes("remote-vae-offline")
    module = sys.modules["remote-vae-offline.remote_vae_nodes"]
    monkeypatch.setattr(module, "DEFAULT_URL", f"http://127.0.0.1:{free_port()}/")
    module._listed_families.at = -10.0
    started = time.monotonic()
    assert module.RemoteVAELoader.INPUT_TYPES()["required"]["family"][0][0] == "auto"
    assert time.monotonic() - started < 3  # one short try, no retries: ComfyUI's UI asks this on every load
