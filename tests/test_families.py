"""Families are data: every shipped config describes a buildable model, and a new family is just a file."""

import json

import pytest
import torch
from conftest import LiveServer, TINY_BLOCKS, offline_env, seeded
from diffusers import AutoencoderKL
from diffusers.utils.remote_utils import remote_decode, remote_encode

from remote_vae import families
from remote_vae.families import FamilyError, load_family, match_model_config
from remote_vae.vae import default_source, model_class

EXPECTED_FACTORS = {"sd15": (0.18215, None), "sdxl": (0.13025, None), "flux": (0.3611, 0.1159)}


def test_shipped_families():
    assert set(EXPECTED_FACTORS) <= set(families.available())


@pytest.mark.parametrize("name", families.available())
def test_config_builds_its_architecture(name):
    family = load_family(name)
    with torch.device("meta"):  # full size, no memory, no download
        model = model_class(family).from_config(family.architecture)
    assert model.config.latent_channels == family.latent_channels
    assert 2 ** (len(model.config.block_out_channels) - 1) == family.spatial_compression
    assert model.config.scaling_factor == family.scaling_factor
    if name in EXPECTED_FACTORS:
        assert (family.scaling_factor, family.shift_factor) == EXPECTED_FACTORS[name]


def test_bad_configs_are_refused(tmp_path):
    with pytest.raises(FamilyError, match="unknown family"):
        load_family("nope")
    path = tmp_path / "broken.json"
    path.write_text(json.dumps({"name": "broken", "hub_repo": "a/b"}))
    with pytest.raises(FamilyError, match="missing keys"):
        load_family(str(path))
    path.write_text(json.dumps({**json.loads((families.CONFIG_DIR / "sd15.json").read_text()), "colour": "red"}))
    with pytest.raises(FamilyError, match="unknown keys"):
        load_family(str(path))


def test_match_model_config():
    assert match_model_config({"_class_name": "AutoencoderKL", "latent_channels": 4, "scaling_factor": 0.13025}).name == "sdxl"
    assert match_model_config({"_class_name": "AutoencoderKL", "latent_channels": 16}).name == "flux"
    with pytest.raises(FamilyError):
        match_model_config({"_class_name": "AutoencoderKL", "latent_channels": 4, "scaling_factor": 1.0})


def test_default_source(tmp_path):
    sd15, flux = load_family("sd15"), load_family("flux")
    assert default_source(sd15, None, several=False) == "stabilityai/sd-vae-ft-mse"
    assert default_source(flux, str(tmp_path), several=False) == "black-forest-labs/FLUX.1-schnell/vae"
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text("{}")
    assert default_source(flux, str(tmp_path), several=False) == str(tmp_path)  # a mounted pipeline repo
    (tmp_path / "sd15").mkdir()
    (tmp_path / "sd15" / "config.json").write_text("{}")
    assert default_source(sd15, str(tmp_path), several=True) == str(tmp_path / "sd15")


def test_a_new_family_is_a_file(tmp_path, tmp_path_factory):
    """A config file outside configs/, served with --random-weights: no code change, no download."""
    architecture = {"_class_name": "AutoencoderKL", "latent_channels": 8, **{k: list(v) if isinstance(v, tuple) else v for k, v in TINY_BLOCKS.items()}}
    family = {
        "name": "tiny8", "hub_repo": "example/tiny8", "model_class": "AutoencoderKL", "architecture": architecture,
        "latent_channels": 8, "spatial_compression": 8, "scaling_factor": 0.5, "operations": ["decode"],
    }
    path = tmp_path / "tiny8.json"
    path.write_text(json.dumps(family))
    server = LiveServer([str(path), "--random-weights"], offline_env(), tmp_path_factory.mktemp("logs") / "tiny8.log")
    try:
        torch.manual_seed(0)
        expected_model = AutoencoderKL.from_config(architecture).eval()
        latents = seeded(1, 8, 4, 4)
        out = remote_decode(server.url + "/", tensor=latents, output_type="pt", return_type="pt", do_scaling=True)
        with torch.no_grad():
            expected = expected_model.decode(latents / 0.5).sample
        torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
        with pytest.raises(RuntimeError, match="does not encode"):
            remote_encode(server.url + "/encode", torch.zeros(1, 3, 16, 16))
    finally:
        server.stop()
