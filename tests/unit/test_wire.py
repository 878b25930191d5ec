"""The wire stage: parameter parsing as `requests` encodes it, decode/encode detection, negotiation."""

import pytest
from requests.models import RequestEncodingMixin

from remote_vae.errors import RequestError
from remote_vae.wire import Params, infer_operation, negotiate_decode


def query(**params) -> Params:
    return Params.from_query(RequestEncodingMixin._encode_params(params))


def test_params_as_requests_encodes_them():
    params = query(
        shape=[1, 4, 64, 64], dtype="float16", partial_postprocess=True, do_scaling=False, scaling_factor=0.18215
    )
    assert params.shape() == (1, 4, 64, 64)
    assert params.flag("partial_postprocess") is True and params.flag("do_scaling") is False
    assert params.number("scaling_factor") == 0.18215
    assert params.text("dtype") == "float16" and params.text("height") is None


@pytest.mark.parametrize("text", ["True", "true", "TRUE", "1"])
def test_booleans_any_case(text):
    assert Params.from_query(f"do_scaling={text}").flag("do_scaling") is True


def test_json_parameters_fill_in_under_the_query():
    params = Params.from_query("dtype=float32")
    params.overlay_json({"dtype": "float16", "shape": [1, 4, 8, 8], "partial_postprocess": True})
    assert (
        params.text("dtype") == "float32"
        and params.shape() == (1, 4, 8, 8)
        and params.flag("partial_postprocess") is True
    )


def test_bool_is_not_a_number():
    params = Params()
    params.overlay_json({"scaling_factor": True, "shape": [True, 4]})
    with pytest.raises(RequestError):
        params.number("scaling_factor")
    with pytest.raises(RequestError):
        params.shape()


@pytest.mark.parametrize(
    "content_type,data,shape,operation",
    [
        ("tensor/binary", b"", (1, 3, 8, 8), "decode"),
        ("image/png", b"", None, "encode"),
        ("", b"\x89PNG\r\n\x1a\n....", None, "encode"),
        ("", b"\xff\xd8\xff\xe0", None, "encode"),
        ("", b"", (1, 3, 64, 64), "encode"),
        ("", b"", (1, 4, 64, 64), "decode"),
        ("application/json", b"", (1, 4096, 64), "decode"),
        ("", b"\x00\x00\x00\x20ftypisom", None, "encode"),  # MP4
        ("", b"\x1a\x45\xdf\xa3\x01", None, "encode"),  # WebM
        ("video/mp4", b"", None, "encode"),
        ("", b"", (1, 3, 9, 64, 64), "encode"),  # a video tensor
        ("", b"", (1, 16, 3, 8, 8), "decode"),  # a video latent
    ],
)
def test_infer_operation(content_type, data, shape, operation):
    assert infer_operation(content_type, data, shape) == operation


def test_an_rgba_familys_image_tensor_is_an_encode():
    assert infer_operation("", b"", (1, 4, 64, 32), pixel_channels=4) == "encode"
    assert infer_operation("", b"", (1, 64, 1, 4, 2), pixel_channels=4) == "decode"  # its latent
    assert infer_operation("", b"", (1, 4, 64, 32)) == "decode"  # SD's latent has 4 channels


@pytest.mark.parametrize(
    "params,accept,form,fmt",
    [
        (dict(output_type="pt"), "tensor/binary", "raw", None),
        (dict(output_type="pt", partial_postprocess=True), "tensor/binary", "uint8", None),
        (dict(output_type="pil"), "tensor/binary", "unit", None),
        (dict(output_type="pil", image_format="jpg"), "image/jpeg", "image", "JPEG"),
        (dict(output_type="pil", image_format="png"), "image/png", "image", "PNG"),
        (dict(output_type="pil", image_format="png"), "*/*", "image", "PNG"),
        (dict(), "image/webp", "image", "WEBP"),
        (dict(), "tensor/binary", "raw", None),
        (dict(), "application/json", "raw", None),
        (dict(), "", "image", "JPEG"),
        (dict(output_type="mp4"), "text/plain", "mp4", None),
        (dict(), "video/mp4", "mp4", None),
    ],
)
def test_negotiation_table(params, accept, form, fmt):
    chosen, reply = negotiate_decode(query(**params), accept)
    assert chosen == form
    if fmt:
        assert reply.image.format == fmt


def test_image_file_options():
    _, reply = negotiate_decode(query(output_type="pil", image_format="png"), "image/png", png_compression=4)
    assert (reply.image.format, reply.image.png_compression) == ("PNG", 4)  # the server's default
    _, reply = negotiate_decode(
        query(output_type="pil", image_format="png", png_compression="9", quality="70"), "image/png", png_compression=4
    )
    assert (reply.image.png_compression, reply.image.quality) == (9, 70)  # the request's own
    for bad in ("10", "-1", "fast"):
        with pytest.raises(RequestError, match="png_compression"):
            negotiate_decode(query(output_type="pil", png_compression=bad), "image/png")


def test_mp4_options():
    from remote_vae.media import Mp4Options
    from remote_vae.wire import mp4_options

    assert mp4_options(query()) == Mp4Options(fps=24, crf=18)
    assert mp4_options(query(fps="12.5", crf="0")) == Mp4Options(fps=12.5, crf=0)
    assert mp4_options(query(quality="5")) == Mp4Options(crf=25)  # diffusers' export_to_video default
    assert mp4_options(query(quality="5", crf="30")).crf == 30  # crf wins
    for bad in (dict(fps="0"), dict(fps="nan"), dict(crf="52"), dict(quality="11")):
        with pytest.raises(RequestError):
            mp4_options(query(**bad))
