"""The media stage: tensor bytes, image files, postprocessing against diffusers."""

import io

import numpy as np
import pytest
import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from remote_vae.errors import RequestError
from remote_vae.media import Postprocessor, is_image_file, open_image, tensor_from_bytes, tensor_to_bytes


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.uint8])
def test_tensor_bytes_round_trip(dtype):
    tensor = (torch.randn(2, 3, 5) * 50).to(dtype)
    data = tensor_to_bytes(tensor)
    assert len(data) == tensor.numel() * tensor.element_size()
    assert torch.equal(tensor_from_bytes(data, (2, 3, 5), dtype), tensor)


def test_wire_bytes_are_what_diffusers_sends():
    import safetensors.torch

    tensor = torch.randn(1, 4, 2, 2, dtype=torch.bfloat16)
    assert tensor_to_bytes(tensor) == safetensors.torch._to_ndarray(tensor)[0].tobytes()


def test_postprocess_matches_vae_image_processor():
    sample = torch.randn(2, 3, 16, 8) * 1.5
    post, reference = Postprocessor(8), VaeImageProcessor(vae_scale_factor=8)
    expected = np.stack([np.asarray(image) for image in reference.postprocess(sample, output_type="pil")])
    assert np.array_equal(post.uint8(sample).numpy(), expected)
    assert np.array_equal(np.stack([np.asarray(image) for image in post.image(sample)]), expected)
    assert torch.equal(post.unit(sample), reference.postprocess(sample, output_type="pt"))


def test_open_image_refuses_oversized_before_decoding():
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buffer, format="PNG")
    assert open_image(buffer.getvalue(), 64 * 64).size == (64, 64)
    with pytest.raises(RequestError) as error:
        open_image(buffer.getvalue(), 64 * 63)
    assert error.value.status == 413


def test_image_magic():
    assert is_image_file(b"RIFF\x00\x00\x00\x00WEBPVP8 ")
    assert not is_image_file(b"\x00" * 16)
