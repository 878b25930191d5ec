"""The latents stage: shape plans, Flux unpacking against diffusers, scaling rules."""

import pytest
import torch
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

from remote_vae import latents
from remote_vae.errors import RequestError
from remote_vae.families import load_family

FLUX = load_family("flux")
SD15 = load_family("sd15")
HUNYUAN = load_family("hunyuanvideo")
WAN = load_family("wan21")


# diffusers' slow remote tests sweep every pair of these sides.
SIDES = (320, 512, 640, 704, 896, 1024, 1208, 1384, 1536, 1608, 1864, 2048)


@pytest.mark.parametrize("height", SIDES)
def test_unpack_matches_diffusers_for_every_protocol_size(height):
    for width in SIDES:
        h, w = 2 * (height // 16), 2 * (width // 16)
        packed = torch.randn(1, (h // 2) * (w // 2), 64)
        plan = latents.plan_decode(tuple(packed.shape), FLUX, height, width)
        expected = FluxPipeline._unpack_latents(packed, height, width, 8)
        assert torch.equal(latents.to_canonical(packed, plan, FLUX.layout), expected)
        assert plan.output_pixels(FLUX) == expected.shape[2] * 8 * expected.shape[3] * 8


@pytest.mark.parametrize("side", [s for s in SIDES if s % 16])
def test_encode_sizes_multiple_of_8_not_16_are_accepted(side):
    latents.check_image_size(1, side, side, FLUX, 2048 * 2048)


def test_plan_ignores_height_width_for_4d():
    plan = latents.plan_decode((1, 4, 64, 64), SD15, 1, 1)
    assert (plan.height, plan.width, plan.arrangement) == (64, 64, "canonical")
    assert plan.output_pixels(SD15) == 512 * 512


def test_output_limit_is_checked_from_numbers_alone():
    plan = latents.plan_decode((1, 4, 100000, 100000), SD15, None, None)
    with pytest.raises(RequestError) as error:
        latents.check_output_size(plan, SD15, 2048 * 2048)
    assert error.value.status == 413


def test_scaling_rules():
    family = FLUX
    none = latents.ScalarFactors()
    assert latents.Scaling().normalisation(latents.own_normalisation(family)) == none
    assert latents.Scaling(do_scaling=False).normalisation(latents.own_normalisation(family)) == none
    assert latents.Scaling(do_scaling=True).normalisation(latents.own_normalisation(family)) == latents.ScalarFactors(
        0.3611, 0.1159
    )
    assert latents.Scaling(0.5, None, do_scaling=True).normalisation(
        latents.own_normalisation(family)
    ) == latents.ScalarFactors(0.5, None)  # explicit wins
    assert latents.Scaling(0.5, 0.1, do_scaling=False).normalisation(
        latents.own_normalisation(family)
    ) == latents.ScalarFactors(0.5, 0.1)


def test_wan_scaling_rules():
    own = latents.Scaling(do_scaling=True).normalisation(latents.own_normalisation(WAN))
    assert own == latents.ChannelStats(WAN.latents_mean, WAN.latents_std)
    assert latents.Scaling(0.5, do_scaling=True).normalisation(latents.own_normalisation(WAN)) == latents.ScalarFactors(
        0.5, None
    )  # explicit wins
    assert latents.Scaling().normalisation(latents.own_normalisation(WAN)) == latents.ScalarFactors()
    assert latents.Scaling(do_scaling=True).normalisation(latents.own_normalisation(HUNYUAN)) == latents.ScalarFactors(
        0.476986, None
    )


def test_scale_inverts_unscale():
    z = torch.randn(1, 16, 4, 4, dtype=torch.float64)
    factors = latents.ScalarFactors(0.3611, 0.1159)
    torch.testing.assert_close(factors.scale(factors.unscale(z)), z)
    torch.testing.assert_close(factors.unscale(z), z / 0.3611 + 0.1159)


def test_channel_stats_are_per_channel():
    stats = latents.ChannelStats(WAN.latents_mean, WAN.latents_std)
    z = torch.randn(2, 16, 3, 4, 4, dtype=torch.float64)
    mean = torch.tensor(WAN.latents_mean, dtype=torch.float64).view(1, 16, 1, 1, 1)
    std = torch.tensor(WAN.latents_std, dtype=torch.float64).view(1, 16, 1, 1, 1)
    torch.testing.assert_close(stats.unscale(z), z * std + mean)
    torch.testing.assert_close(stats.scale(z), (z - mean) / std)
    torch.testing.assert_close(stats.scale(stats.unscale(z)), z)


def test_video_plans():
    plan = latents.plan_decode((1, 16, 3, 40, 64), HUNYUAN, 7, 7)  # docs/protocol.md §2's reference case
    assert plan.output_frames(HUNYUAN) == 9
    assert plan.output_size(HUNYUAN) == (512, 320)
    assert plan.output_pixels(HUNYUAN) == 9 * 512 * 320
    for shape, message in [((1, 16, 40, 64), "image latent"), ((1, 4096, 64), "packed"), ((1, 4, 3, 8, 8), "channels")]:
        with pytest.raises(RequestError, match=message):
            latents.plan_decode(shape, WAN, None, None)
    huge = latents.plan_decode((1, 16, 10**6, 8, 8), HUNYUAN, None, None)
    with pytest.raises(RequestError) as error:
        latents.check_output_size(huge, HUNYUAN, 1 << 27)
    assert error.value.status == 413 and "3999997 frames" in error.value.message


@pytest.mark.parametrize("frames, nearest", [(2, "1 or 5"), (8, "5 or 9"), (10, "9 or 13"), (16, "13 or 17")])
def test_frame_counts_must_be_4k_plus_1(frames, nearest):
    with pytest.raises(RequestError, match=nearest):
        latents.check_frame_count(frames, WAN)


def test_valid_frame_counts():
    for frames in (1, 5, 9, 13, 129):
        latents.check_video_size(1, frames, 64, 64, HUNYUAN, 1 << 27)
    with pytest.raises(RequestError, match="multiples of 8"):
        latents.check_video_size(1, 9, 60, 64, HUNYUAN, 1 << 27)


def test_token_packed_latents_unpack_as_their_pipelines_do():
    """Flux.2's and LTX's token sequences, as the pipelines' tensors lie in memory and C-contiguous, against their
    _unpack."""
    from diffusers import Flux2Pipeline, LTXPipeline

    flux2, ltx = load_family("flux2"), load_family("ltxvideo")
    folded = torch.randn(2, 128, 5, 3)
    packed = Flux2Pipeline._pack_latents(folded)  # a transposed view: its memory is [B, C, seq]
    memory = packed.contiguous()  # a C-contiguous [B, seq, C]
    for packed_memory, wire in (
        ("tokens_first", memory),
        (None, packed.transpose(1, 2).contiguous().view(packed.shape)),
    ):
        plan = latents.plan_decode(tuple(packed.shape), flux2, 80, 48, packed_memory)
        assert (plan.height, plan.width) == (10, 6)
        assert torch.equal(latents.to_canonical(wire, plan, latents.LatentLayout.of(flux2)), folded)
    video = torch.randn(1, 128, 3, 2, 4)
    tokens = LTXPipeline._pack_latents(video)
    plan = latents.plan_decode(tuple(tokens.shape), ltx, 64, 128, "tokens_first")
    assert plan.latent_frames == 3
    assert torch.equal(latents.to_canonical(tokens, plan, ltx.layout), LTXPipeline._unpack_latents(tokens, 3, 2, 4))
    assert torch.equal(latents.LatentLayout.of(flux2).unfold(folded), Flux2Pipeline._unpatchify_latents(folded))
    assert torch.equal(latents.LatentLayout.of(flux2).fold(Flux2Pipeline._unpatchify_latents(folded)), folded)
