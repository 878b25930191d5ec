"""Families are data: every shipped config describes a buildable model, and a new family is just a file."""

import inspect
import json
import math
import re
import shutil

import diffusers
import pytest
import torch
from conftest import ROOT, TINY_BLOCKS, LiveServer, offline_env, seeded
from diffusers import AutoencoderKL
from diffusers.utils.remote_utils import remote_decode, remote_encode

from remote_vae import families
from remote_vae.families import FamilyError, load_family, match_model_config
from remote_vae.latents import own_normalisation
from remote_vae.tiling import tiler_for
from remote_vae.tiling.group_norm import GroupNormTiler
from remote_vae.tiling.halo import HaloTiler
from remote_vae.vae import default_source, load_vae, model_class, weights_folder

EXPECTED_FACTORS = {
    "sd15": (0.18215, None),
    "sdxl": (0.13025, None),
    "flux": (0.3611, 0.1159),
    "sd3": (1.5305, 0.0609),
    "hunyuanvideo": (0.476986, None),
    "hunyuanvideo15": (1.03682, None),
    "cogvideox": (1.15258426, None),
    "wan21": (None, None),
    "wan22": (None, None),
    "qwenimage": (None, None),
    "flux2": (None, None),  # per channel instead
    "ltxvideo": (1.0, None),  # with per-channel statistics in the weights
    "taesd": (0.18215, None),
    "taesdxl": (0.13025, None),
    "taef1": (0.3611, 0.1159),  # the full family's
    "sana": (0.41407, None),
    "mochi": (None, None),  # per channel, in its config
    "easyanimate": (0.7125, None),
    "stableaudio": (None, None),
    "stableaudio3": (None, None),
    "hunyuanimage21": (0.75289, None),
    "svd": (0.18215, None),
    "cosmos": (0.5, None),  # its scheduler's sigma_data, beside statistics per channel and latent frame
    "qwenimage21": (None, None),  # per channel, in its config
    "hunyuanimage21refiner": (1.03682, None),
    "allegro": (0.13, None),
    "ltx2": (1.0, None),  # with per-channel statistics in the weights
    "ltx2audio": (None, None),  # statistics per channel and latent bin, in the weights
    "acestep": (None, None),
    "cogview4": (1.0, None),  # its pipeline divides by 1.0 and adds no shift
}
VIDEO_FAMILIES = (
    "hunyuanvideo",
    "wan21",
    "wan22",
    "hunyuanvideo15",
    "ltxvideo",
    "cogvideox",
    "mochi",
    "easyanimate",
    "svd",
    "cosmos",
    "allegro",
    "ltx2",
)


def test_shipped_families():
    assert set(EXPECTED_FACTORS) == set(families.available())


def check_vocoded_sound(family, vae) -> None:
    """The sound an audio VAE with a vocoder makes: the vocoder's rate and channels; per latent step, the VAE's mel
    frames (one for the first: it is causal) times the vocoder's upsampling; the latent's bins, the VAE's mel bins
    compressed; and the vocoder reads the VAE's mel channels of all its bins."""
    import importlib.util

    from remote_vae.vae.loading import vocoder_class

    # A module of its own, not a package: diffusers' pipeline packages export their classes only where transformers is
    # installed, and a plain `pip install .` has none (the README's fresh venv served ltx2 without its sound)
    assert importlib.util.find_spec(family.vocoder["module"]).submodule_search_locations is None
    with torch.device("meta"):
        vocoder = vocoder_class(family).from_config(family.vocoder["architecture"])
    upsampling, audio = math.prod(vocoder.config.upsample_factors), family.audio
    assert (vocoder.config.output_sampling_rate, vocoder.config.out_channels) == (audio.sampling_rate, audio.channels)
    assert (audio.first_step_samples, audio.hop_length) == (upsampling, upsampling * vae.temporal_compression_ratio)
    assert audio.latent_bins == vae.config.mel_bins // vae.mel_compression_ratio
    assert vocoder.config.in_channels == vae.config.output_channels * vae.config.mel_bins
    assert vae.config.base_channels == vae.config.latent_channels * audio.latent_bins  # its statistics' features


@pytest.mark.parametrize("name", families.available())
def test_config_builds_its_architecture(name):
    family = load_family(name)
    with torch.device("meta"):  # full size, no memory, no download
        model = model_class(family).from_config(family.architecture)
    config = model.config
    assert families.config_latent_channels(config) == family.latent_channels
    assert (family.scaling_factor, family.shift_factor) == EXPECTED_FACTORS[name]
    if family.vocoder:  # LTX-2: the VAE makes a mel spectrogram; its vocoder, the sound
        check_vocoded_sound(family, model)
        return
    if family.is_audio:  # the sound the family says is the model's: rate, channels, samples per latent step
        hop = getattr(model, "hop_length", None) or model.downsampling_ratio
        audio = family.audio
        assert (config.sampling_rate, config.audio_channels, hop) == (
            audio.sampling_rate,
            audio.channels,
            audio.hop_length,
        )
        return
    spatial = getattr(model, "spatial_compression_ratio", None) or 2 ** (len(config.block_out_channels) - 1)
    assert spatial == family.spatial_compression
    temporal = config.get("temporal_compression_ratio", config.get("scale_factor_temporal"))
    if family.is_video:  # Mochi's is the model's attribute only; SVD's decoder compresses no frames
        temporal = temporal or getattr(model, "temporal_compression_ratio", None) or (family.frames_as_batch and 1)
        assert temporal == family.temporal_compression
    else:  # Qwen-Image 2.1's video architecture has a temporal factor; its pipeline makes images, one frame each
        assert family.temporal_compression is None
    if family.model_latents == "normalised":  # a preview decoder reads the full family's normalised latents
        assert (config.get("scaling_factor"), config.get("shift_factor")) == (1.0, 0.0)
    elif family.latents_mean is not None:  # statistics in the family's config: any scaling there must be 1 (Mochi's)
        assert config.get("scaling_factor", 1.0) == 1.0
    else:
        assert config.get("scaling_factor") == family.scaling_factor
    # One statistic per channel where the pipeline normalises
    for buffer in (family.latents_stats_in_weights or {}).values():
        if buffer in config:
            continue  # an eps
        assert model.get_buffer(buffer).shape == (family.latent_channels * family.latent_layout.get("patch", 1) ** 2,)
    assert tuple(config.get("latents_mean") or ()) == (family.latents_mean or ())
    assert tuple(config.get("latents_std") or ()) == (family.latents_std or ())
    assert (family.scaling_factor, family.shift_factor) == EXPECTED_FACTORS[name]
    assert family.is_video == (name in VIDEO_FAMILIES)


def test_video_frame_arithmetic():
    family = load_family("hunyuanvideo")
    # docs/protocol.md §2's reference case: [1, 16, 3, 40, 64] decodes to 9 frames.
    assert [family.frames_for(t) for t in (1, 2, 3, 33)] == [1, 5, 9, 129]


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
    wan = json.loads((families.CONFIG_DIR / "wan21.json").read_text())
    for change, message in [
        ({"latents_std": wan["latents_std"][:3]}, "16 numbers"),
        ({"latents_std": None}, "come together"),
        ({"scaling_factor": 0.5}, "either scaling_factor"),
        ({"temporal_compression": 0}, "temporal_compression"),
        ({"tile_above_pixels": -1}, "tile_above_pixels"),
        ({"latent_layout": {"patch": 2}}, "image families"),
        ({"latent_layout": {"packing": "zigzag"}}, "packing"),
        ({"latent_layout": {"frames_first": "yes"}}, "latent_layout.frames_first"),
        ({"latents_stats_in_weights": {"mean": "bn.running_mean"}}, "names the model's buffers"),
        ({"model_latents": "scaled"}, "model_latents"),
        ({"samples_per_call": 0}, "samples_per_call"),
        ({"decode_timestep": True}, "decode_timestep"),
        ({"default_tiling": "seamless"}, "default_tiling"),
    ]:
        path.write_text(json.dumps({**wan, **change}))
        with pytest.raises(FamilyError, match=message):
            load_family(str(path))


def test_match_model_config():
    assert (
        match_model_config({"_class_name": "AutoencoderKL", "latent_channels": 4, "scaling_factor": 0.13025}).name
        == "sdxl"
    )
    assert (
        match_model_config({"_class_name": "AutoencoderKL", "latent_channels": 16, "scaling_factor": 0.3611}).name
        == "flux"
    )
    assert (
        match_model_config({"_class_name": "AutoencoderKL", "latent_channels": 16, "scaling_factor": 1.5305}).name
        == "sd3"
    )
    assert match_model_config({"_class_name": "AutoencoderKLWan", "z_dim": 48}).name == "wan22"
    assert (
        match_model_config({"_class_name": "AutoencoderTiny", "latent_channels": 16, "scaling_factor": 1.0}).name
        == "taef1"
    )
    with pytest.raises(FamilyError, match="taesd"):  # taesd and taesdxl share an architecture: the weights cannot say
        match_model_config({"_class_name": "AutoencoderTiny", "latent_channels": 4, "scaling_factor": 1.0})
    with pytest.raises(FamilyError):
        match_model_config({"_class_name": "AutoencoderKL", "latent_channels": 4, "scaling_factor": 1.0})
    assert match_model_config({"_class_name": "AutoencoderKLWan", "z_dim": 16}).name == "wan21"
    assert (
        match_model_config(
            {"_class_name": "AutoencoderKLHunyuanVideo", "latent_channels": 16, "scaling_factor": 0.476986}
        ).name
        == "hunyuanvideo"
    )


def test_default_source(tmp_path):
    sd15, flux = load_family("sd15"), load_family("flux")
    assert default_source(sd15, [None], several=False) == "stabilityai/sd-vae-ft-mse"
    assert default_source(flux, [str(tmp_path)], several=False) == "black-forest-labs/FLUX.1-schnell/vae"
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text("{}")
    assert default_source(flux, [str(tmp_path)], several=False) == str(tmp_path)  # a mounted pipeline repo
    (tmp_path / "sd15").mkdir()
    (tmp_path / "sd15" / "config.json").write_text("{}")
    assert default_source(sd15, [str(tmp_path)], several=True) == str(tmp_path / "sd15")


def test_default_source_prefers_the_mounted_repository_then_baked_weights(tmp_path):
    sd15 = load_family("sd15")
    mounted, baked = tmp_path / "repository", tmp_path / "baked"
    (baked / "sd15").mkdir(parents=True)
    (baked / "sd15" / "config.json").write_text("{}")
    for several in (False, True):  # baked weights sit in DIR/<family>/ however many families are served
        assert default_source(sd15, [str(mounted), str(baked)], several=several) == str(baked / "sd15")
    mounted.mkdir()
    (mounted / "config.json").write_text("{}")
    assert default_source(sd15, [str(mounted), str(baked)], several=False) == str(mounted)
    assert default_source(sd15, [str(mounted), str(baked)], several=True) == str(
        baked / "sd15"
    )  # root weights are one family's
    assert default_source(sd15, [None, None], several=False) == "stabilityai/sd-vae-ft-mse"


def test_a_new_family_is_a_file(tmp_path, tmp_path_factory):
    """A config file outside configs/, served with --random-weights: no code change, no download."""
    architecture = {
        "_class_name": "AutoencoderKL",
        "latent_channels": 8,
        **{k: list(v) if isinstance(v, tuple) else v for k, v in TINY_BLOCKS.items()},
    }
    family = {
        "name": "tiny8",
        "hub_repo": "example/tiny8",
        "model_class": "AutoencoderKL",
        "architecture": architecture,
        "latent_channels": 8,
        "spatial_compression": 8,
        "scaling_factor": 0.5,
        "operations": ["decode"],
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


def test_a_pipeline_repository_is_read_from_its_vae_folder(model_dirs, reference, tmp_path):
    """A whole pipeline's layout (the VAE in `vae/`) loads, and prepare-repo's weights come from that folder too."""
    flux = load_family("flux")
    shutil.copytree(model_dirs["flux"], tmp_path / "pipeline" / "vae")
    (tmp_path / "pipeline" / "model_index.json").write_text("{}")
    assert weights_folder(flux, tmp_path / "pipeline") == tmp_path / "pipeline" / "vae"
    assert weights_folder(flux, model_dirs["flux"]) == model_dirs["flux"]
    assert weights_folder(load_family("sd15"), tmp_path / "pipeline") is None  # sd15 has no subfolder
    vae = load_vae(flux, str(tmp_path / "pipeline"), torch.device("cpu"), torch.float32)
    for name, parameter in reference["flux"].state_dict().items():
        torch.testing.assert_close(vae.model.state_dict()[name], parameter)


def test_families_command_shows_each_familys_client_call(capsys):
    from remote_vae.cli import main

    assert main(["families"]) == 0
    blocks = {block.split(" ", 1)[0]: block for block in capsys.readouterr().out.split("\n\n")}
    assert set(blocks) == set(families.available())
    for name, block in blocks.items():
        family = load_family(name)
        for key, value in family.client_scaling().items():
            assert f"{key}={value}" in block, name
        assert ("decode_timestep" in block) == bool(family.decode_timestep)


EXACT_TILER = {
    "sd15": GroupNormTiler,
    "sdxl": GroupNormTiler,
    "sd3": GroupNormTiler,
    "flux": GroupNormTiler,
    "flux2": GroupNormTiler,
    "hunyuanvideo": GroupNormTiler,
    "wan21": HaloTiler,
    "wan22": HaloTiler,
    "qwenimage": HaloTiler,
    "hunyuanvideo15": HaloTiler,
    "ltxvideo": HaloTiler,
    "ltx2": HaloTiler,
    "cogview4": GroupNormTiler,
}  # the rest (CogVideoX, the preview decoders, Sana's DC-AE: attention across the whole image) tile with blend only


@pytest.mark.parametrize("name", families.available())
def test_the_real_architecture_has_the_exact_tiler_its_tiny_model_is_tested_with(name):
    with torch.device("meta"):
        model = model_class(load_family(name)).from_config(load_family(name).architecture)
    assert tiler_for(model) is EXACT_TILER.get(name)


# VAE classes of the installed diffusers' pipelines that no family serves yet (issue 27), each with what it needs.
NOT_SERVED_YET = {
    "AsymmetricAutoencoderKL": "the asymmetric inpainting VAE (its decode takes the image and mask)",
    "Kandinsky6SRVAE": "Kandinsky 6 super-resolution",
    "LongCatAudioDiTVae": "LongCat audio",
    "RFD4ProteinaAutoencoder": "proteins, not pixels",
}


def installed_pipelines() -> dict[str, tuple[str, ...]]:
    """Every DiffusionPipeline the installed diffusers exports that takes a `vae`, with the VAE class names its
    signature names (one, or a union)."""
    found = {}
    for name in dir(diffusers):
        if "Pipeline" not in name:
            continue
        try:
            cls = getattr(diffusers, name)
        except Exception:  # a pipeline whose optional dependency is missing here
            continue
        if not (inspect.isclass(cls) and issubclass(cls, diffusers.DiffusionPipeline)):
            continue
        parameter = inspect.signature(cls.__init__).parameters.get("vae")
        if parameter is not None:
            found[name] = tuple(re.findall(r"\b(\w*(?:Autoencoder|VAE|Vae)\w*)\b", str(parameter.annotation)))
    return found


@pytest.fixture(scope="module")
def pipelines() -> dict[str, tuple[str, ...]]:
    return installed_pipelines()


def test_every_listed_pipeline_takes_its_familys_vae_class(pipelines):
    for name in families.available():
        family = load_family(name)
        for pipeline in family.pipelines:
            assert pipeline in pipelines, f"{name} lists {pipeline}, which this diffusers does not have"
            assert family.model_class in pipelines[pipeline], (name, pipeline, pipelines[pipeline])


def test_every_vae_class_a_pipeline_uses_is_served_or_named_as_not_yet(pipelines):
    """Fails when a diffusers release brings a pipeline whose VAE class no family covers and nobody has said why."""
    served = {load_family(name).model_class for name in families.available()}
    unknown = {vae: pipeline for pipeline, classes in pipelines.items() for vae in classes if vae not in served}
    assert set(unknown) <= set(NOT_SERVED_YET), {vae: unknown[vae] for vae in set(unknown) - set(NOT_SERVED_YET)}


def test_every_pipeline_of_a_served_vae_class_is_mapped_or_said_to_have_its_own(pipelines):
    """A pipeline whose VAE class we serve either uses one family's VAE as it is (the family lists it), or has weights
    or a normalisation of its own (docs/families.md lists it, with why)."""
    served = {load_family(name).model_class for name in families.available()}
    mapped = {pipeline for name in families.available() for pipeline in load_family(name).pipelines}
    text = (ROOT / "docs" / "families.md").read_text()
    own = set(re.findall(r"`(\w+Pipeline\w*)`", text.split("## Pipelines with a VAE of their own", 1)[-1]))
    unaccounted = {
        pipeline for pipeline, classes in pipelines.items() if set(classes) & served and pipeline not in mapped | own
    }
    assert not unaccounted, sorted(unaccounted)


def test_bad_audio_configs_are_refused(tmp_path):
    audio = json.loads((families.CONFIG_DIR / "stableaudio.json").read_text())
    path = tmp_path / "audio.json"
    for change, message in [
        ({"audio": {"sampling_rate": 44100, "channels": 2}}, "hop_length"),
        ({"audio": {"sampling_rate": 0, "channels": 2, "hop_length": 2048}}, "positive integer"),
        ({"audio": {"sampling_rate": 44100, "channels": True, "hop_length": 2048}}, "positive integer"),
        ({"temporal_compression": 4}, "an audio family has no"),
        ({"spatial_compression": 8}, "an audio family has no"),
    ]:
        path.write_text(json.dumps({**audio, **change}))
        with pytest.raises(FamilyError, match=message):
            load_family(str(path))
    no_audio = {key: value for key, value in audio.items() if key != "audio"}
    path.write_text(json.dumps(no_audio))
    with pytest.raises(FamilyError, match="spatial_compression"):  # not audio, so an image family needs it
        load_family(str(path))
    assert load_family("stableaudio").layout.describe() == "[B, 64, T] (T latent steps)"


def test_bad_per_frame_statistics_are_refused(tmp_path):
    cosmos = json.loads((families.CONFIG_DIR / "cosmos.json").read_text())
    path = tmp_path / "frames.json"
    for change, message in [
        ({"latents_stats_frames": 8}, "128 numbers"),  # 16 channels x 8 frames, not the 256 given
        ({"latents_stats_frames": 0}, "positive integer"),
        ({"latents_stats_frames": True}, "positive integer"),
        ({"latents_mean": None, "latents_std": None}, "give them"),
        ({"latents_stats_frames": None}, "16 numbers"),  # per channel, then
        ({"shift_factor": 0.1}, "not both"),
        ({"temporal_compression": None}, "a video family"),
    ]:
        path.write_text(json.dumps({**cosmos, **change}))
        with pytest.raises(FamilyError, match=message):
            load_family(str(path))
    normalisation = own_normalisation(load_family("cosmos"))
    assert normalisation.mean.shape == (16, 16) and normalisation.scaling_factor == 0.5
    latent = torch.randn(1, 16, 3, 2, 2)
    torch.testing.assert_close(normalisation.unscale(normalisation.scale(latent)), latent)


def test_bad_pixel_channels_are_refused(tmp_path):
    path = tmp_path / "pixels.json"
    for base, change, message in [
        ("qwenimage21", {"pixel_channels": 5}, "3 \\(RGB\\) or 4"),
        ("qwenimage21", {"pixel_channels": True}, "3 \\(RGB\\) or 4"),
        ("wan21", {"pixel_channels": 4}, "an MP4 has no alpha"),
        ("stableaudio", {"pixel_channels": 3}, "an audio family has no"),
    ]:
        path.write_text(json.dumps({**json.loads((families.CONFIG_DIR / f"{base}.json").read_text()), **change}))
        with pytest.raises(FamilyError, match=message):
            load_family(str(path))
    assert load_family("qwenimage21").pixel_mode == "RGBA" and load_family("sd15").pixel_mode == "RGB"


def test_paired_frames_fold_as_the_refiner_pipeline_does(tmp_path):
    from diffusers import HunyuanImageRefinerPipeline

    layout = load_family("hunyuanimage21refiner").layout
    latent = seeded(2, 32, 1, 3, 4, seed=9)
    folded = layout.fold(latent)
    assert torch.equal(folded, HunyuanImageRefinerPipeline._reorder_image_tokens(latent))
    assert torch.equal(layout.unfold(folded), HunyuanImageRefinerPipeline._restore_image_tokens_order(folded))
    assert torch.equal(layout.fold(latent[:, :, 0]), folded)  # the VAE's own latent, with or without its frame axis
    path = tmp_path / "paired.json"
    refiner = json.loads((families.CONFIG_DIR / "hunyuanimage21refiner.json").read_text())
    path.write_text(json.dumps({**refiner, "latent_layout": {"paired_frames": True}}))
    with pytest.raises(FamilyError, match="paired_frames is for an image family with frame_axis"):
        load_family(str(path))


def test_bad_tiled_only_configs_are_refused(tmp_path):
    allegro = json.loads((families.CONFIG_DIR / "allegro.json").read_text())
    path = tmp_path / "tiled.json"
    for change, message in [
        ({"tiled_only": {"frames": 6}}, "tiled_only is"),
        ({"tiled_only": {"frames": 0, "side": "sample_size"}}, "tiled_only is"),
        ({"tiled_only": {"frames": 6, "side": "no_such_key"}}, "tiled_only is"),
        ({"operations": ["decode", "encode"]}, "decodes only"),
        ({"first_frame_alone": "no"}, "true or false"),
        ({"temporal_compression": None}, "for video families"),
    ]:
        path.write_text(json.dumps({**allegro, **change}))
        with pytest.raises(FamilyError, match=message):
            load_family(str(path))
    assert load_family("allegro").frames_for(22) == 88 and load_family("ltxvideo").frames_for(22) == 169
