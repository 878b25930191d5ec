"""The latents stage: shape plans, Flux unpacking against diffusers, scaling rules."""

import pytest
import torch
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

from remote_vae import latents
from remote_vae.errors import RequestError
from remote_vae.families import load_family

FLUX = load_family("flux")
SD15 = load_family("sd15")


# diffusers' slow remote tests sweep every pair of these sides.
SIDES = (320, 512, 640, 704, 896, 1024, 1208, 1384, 1536, 1608, 1864, 2048)


@pytest.mark.parametrize("height", SIDES)
def test_unpack_matches_diffusers_for_every_protocol_size(height):
    for width in SIDES:
        h, w = 2 * (height // 16), 2 * (width // 16)
        packed = torch.randn(1, (h // 2) * (w // 2), 64)
        plan = latents.plan_decode(tuple(packed.shape), FLUX, height, width)
        expected = FluxPipeline._unpack_latents(packed, height, width, 8)
        assert torch.equal(latents.unpack(packed, plan), expected)
        assert plan.output_pixels(FLUX) == expected.shape[2] * 8 * expected.shape[3] * 8


@pytest.mark.parametrize("side", [s for s in SIDES if s % 16])
def test_encode_sizes_multiple_of_8_not_16_are_accepted(side):
    latents.check_image_size(1, side, side, FLUX, 2048 * 2048)


def test_plan_ignores_height_width_for_4d():
    plan = latents.plan_decode((1, 4, 64, 64), SD15, 1, 1)
    assert (plan.height, plan.width, plan.packed) == (64, 64, False)
    assert plan.output_pixels(SD15) == 512 * 512


def test_output_limit_is_checked_from_numbers_alone():
    plan = latents.plan_decode((1, 4, 100000, 100000), SD15, None, None)
    with pytest.raises(RequestError) as error:
        latents.check_output_size(plan, SD15, 2048 * 2048)
    assert error.value.status == 413


def test_scaling_rules():
    family = FLUX
    assert latents.Scaling().factors(family) == (None, None)
    assert latents.Scaling(do_scaling=False).factors(family) == (None, None)
    assert latents.Scaling(do_scaling=True).factors(family) == (0.3611, 0.1159)
    assert latents.Scaling(0.5, None, do_scaling=True).factors(family) == (0.5, None)  # explicit wins
    assert latents.Scaling(0.5, 0.1, do_scaling=False).factors(family) == (0.5, 0.1)


def test_scale_inverts_unscale():
    z = torch.randn(1, 16, 4, 4, dtype=torch.float64)
    factors = (0.3611, 0.1159)
    torch.testing.assert_close(latents.scale(latents.unscale(z, factors), factors), z)
    torch.testing.assert_close(latents.unscale(z, factors), z / 0.3611 + 0.1159)
