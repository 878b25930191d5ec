"""The vae stage in process: whole batches or one sample at a time, out-of-memory escalation, streaming frames,
and the device path's layout and transfers (their CUDA branches run where a GPU is lent: test_cuda.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import seeded

from remote_vae import device as device_path
from remote_vae.decoders import VideoFile
from remote_vae.device import (
    CPU_WHOLE_BATCH_PIXELS,
    BatchBudget,
    DevicePath,
    PeakMemory,
    memory_format,
    to_device,
    to_host,
)
from remote_vae.families import load_family
from remote_vae.latents import Scaling
from remote_vae.media import Mp4Options
from remote_vae.service import DecodeRequest, Limits, RawTensor, VaeService
from remote_vae.vae import load_vae

CPU = torch.device("cpu")


def loaded(model_dirs, name: str, **options):
    return load_vae(load_family(name), str(model_dirs[name]), CPU, torch.float32, **options)


def test_a_batch_runs_whole_within_the_budget_and_sliced_beyond_it(model_dirs, reference):
    latents = seeded(4, 4, 8, 8, seed=1)  # four 64x64 images: 16384 pixels
    with torch.no_grad():
        expected = reference["sd15"].decode(latents).sample
    for budget, mode in (
        (BatchBudget(), "whole"),
        (BatchBudget(pixels=4096), "sliced"),
        (BatchBudget(pixels=16384), "whole"),
    ):
        vae = loaded(model_dirs, "sd15", budget=budget)
        torch.testing.assert_close(vae.decode(latents), expected, atol=1e-4, rtol=1e-4)
        assert vae.calls == {"whole": 0, "sliced": 0, "tiled": 0} | {mode: 1}
    assert BatchBudget().limit(CPU) == CPU_WHOLE_BATCH_PIXELS


def test_the_cuda_budget_is_what_fits_the_free_memory(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(device_path, "available_memory", lambda device: 10 * 2**30)
    unmeasured, measured = BatchBudget(), BatchBudget(bytes_per_pixel=2048.0)
    assert unmeasured.limit(cuda) == int(0.8 * 10 * 2**30 / 4096)  # about 2 million pixels: two 1024x1024 images
    assert measured.limit(cuda) == 2 * unmeasured.limit(cuda)
    assert measured.allows(4 * 1024 * 1024, cuda) and not unmeasured.allows(4 * 1024 * 1024, cuda)
    assert BatchBudget(pixels=5).limit(cuda) == 5  # --batch-pixel-budget wins


@pytest.mark.parametrize("tiling", ["exact", "blend"])
def test_out_of_memory_runs_again_sliced_then_tiled(model_dirs, reference, tiling):
    """Out of memory: one sample at a time, then tiled (exactly, by default: the untiled pixels), then 503. Blended
    tiles asked for run from the start, where a local enable_tiling() tiles: out of memory, one sample at a time."""
    vae = loaded(model_dirs, "sd15", tile_above_pixels=None, band_pixels=128 * 16)
    conv_out = vae.model.decoder.conv_out.forward
    limits = {}

    def forward(
        x, *args, **kwargs
    ):  # the decoder's last layer sees the whole batch, one image, or a tile or band of it
        if x.shape[0] > limits["batch"] or x.shape[-2] * x.shape[-1] > limits["pixels"]:
            raise torch.cuda.OutOfMemoryError("injected")
        return conv_out(x, *args, **kwargs)

    vae.model.decoder.conv_out.forward = forward
    sd = reference["sd15"]
    with torch.no_grad():
        untiled = sd.decode(seeded(2, 4, 16, 16, seed=2)).sample
        sd.enable_tiling()
        blended = sd.decode(seeded(2, 4, 16, 16, seed=2)).sample
        small_blended = sd.decode(seeded(2, 4, 8, 8, seed=3)).sample
        sd.disable_tiling()
        whole = sd.decode(seeded(2, 4, 8, 8, seed=3)).sample
    exact = tiling == "exact"
    limits.update(batch=1, pixels=1 << 20)  # a batch does not fit, one image does
    first = vae.decode(seeded(2, 4, 8, 8, seed=3), tiling=tiling)
    torch.testing.assert_close(first, whole if exact else small_blended, atol=1e-4, rtol=1e-4)
    assert vae.oom_events == {"retried_sliced": 1, "retried_tiled": 0, "refused": 0}
    assert vae.calls["sliced" if exact else "tiled"] == 1
    limits.update(pixels=80 * 64)  # nor does one whole 128x128 image: its 64x64 tiles or 16-row bands do
    expected = untiled if exact else blended
    torch.testing.assert_close(vae.decode(seeded(2, 4, 16, 16, seed=2), tiling=tiling), expected, atol=1e-4, rtol=1e-4)
    assert vae.oom_events == {"retried_sliced": 2, "retried_tiled": 1 if exact else 0, "refused": 0}
    assert vae.calls["tiled"] == (1 if exact else 2)
    assert (blended - untiled).abs().max() > 1e-3  # the two tiled paths really differ
    limits.update(pixels=1)  # nothing fits: 503, and the model lives on
    with pytest.raises(Exception, match="ran out of memory on this request even tiled") as refused:
        vae.decode(seeded(1, 4, 8, 8), tiling=tiling)
    assert refused.value.status == 503 and vae.oom_events["refused"] == 1


def mp4_job(service: VaeService, latents: torch.Tensor):
    raw = RawTensor(tuple(latents.shape), "float32", latents.numpy().tobytes())
    return service.prepare_decode(DecodeRequest(raw, form="mp4", scaling=Scaling(), mp4=Mp4Options(crf=0)))


@pytest.mark.parametrize("name,streams", [("wan21", True), ("hunyuanvideo", False)])
def test_frames_stream_to_the_mp4_while_the_model_decodes_where_the_model_allows(model_dirs, name, streams):
    service = VaeService(loaded(model_dirs, name, tile_above_pixels=None), Limits())
    latents = seeded(2, 16, 3, 4, 6, seed=4)  # two clips of 9 frames of 48x32
    job = mp4_job(service, latents)
    service.vae.decode(job.inputs, service.frame_router([job]))
    # Wan's decoder emits finished frames call by call: the MP4 has them all when the model returns.
    assert job.stream.complete is streams
    job.stream.close()
    frames = service.post.uint8(service.vae.decode(job.inputs))
    served = mp4_job(service, latents)  # as the server runs it
    data = served.finish(service.run([served])[0])
    with VideoFile(data) as video:
        back = video.frames(max_frames=18)
    assert back.shape == (18, 32, 48, 3)  # clip 0's frames, then clip 1's
    assert np.abs(back.astype(int) - frames.numpy().astype(int)).mean() < 3


def test_the_device_path_layout_and_transfers():
    path, plain = DevicePath(channels_last=True), DevicePath(channels_last=False)
    assert memory_format(4, path) is torch.channels_last and memory_format(5, path) is torch.channels_last_3d
    assert memory_format(3, path) is torch.contiguous_format and memory_format(4, plain) is torch.contiguous_format
    images = torch.randn(2, 3, 8, 8)
    on_device = to_device(images, CPU, torch.float16, path)
    assert on_device.dtype == torch.float16 and on_device.is_contiguous(memory_format=torch.channels_last)
    back = to_host(on_device, path)
    assert back.is_contiguous() and torch.equal(back, images.half())  # what the wire sends is plain C order
    assert DevicePath.default(CPU) == DevicePath(channels_last=False, cudnn_benchmark=False, pinned_memory=False)
    assert DevicePath.default(torch.device("cuda"), compile=True, channels_last="off") == DevicePath(
        False, True, True, device_path.COMPILE_STANCES
    )
    with PeakMemory(CPU) as peak:
        torch.ones(10)
    assert peak.bytes is None  # only CUDA's allocator keeps a peak


def test_compiling_is_off_and_said_on_a_torch_without_compile_stances(monkeypatch, caplog):
    """torch before 2.6 has no torch.compiler.set_stance, which keeps compiling out of requests: --compile is off
    there."""
    monkeypatch.setattr(device_path, "COMPILE_STANCES", False)
    assert DevicePath.default(CPU, compile=True).compile is False
    assert "--compile needs torch >= 2.6" in caplog.text
    monkeypatch.setattr(device_path, "COMPILE_STANCES", True)
    assert DevicePath.default(CPU, compile=True).compile is True


def test_channels_last_on_the_cpu_keeps_groupnorm_exact():
    """torch's channels-last GroupNorm on the CPU is off by ~0.07 on a 16-million-element group; the device path
    normalises contiguously."""
    x = torch.randn(1, 2, 2896, 2896, generator=torch.Generator().manual_seed(1)) * 3 + 5
    model = device_path.set_up_model(torch.nn.Sequential(torch.nn.GroupNorm(1, 2)), CPU, DevicePath(channels_last=True))
    with torch.inference_mode():
        out = model(to_device(x, CPU, torch.float32, DevicePath(channels_last=True)))
        exact = torch.nn.functional.group_norm(x.double(), 1)
    assert (out.double() - exact).abs().max() < 1e-4


def test_a_family_names_its_default_tiling_and_a_request_may_name_another(model_dirs):
    """Wan and HunyuanVideo 1.5 tile exactly unless asked for blend; LTX's config keeps diffusers' blend by default (it
    decodes a whole clip per call, and tiles only after running out of memory), while tiling=exact still gets the exact
    path; CogVideoX has none to ask for."""
    wan, hv15, ltx, cogvideox = (
        loaded(model_dirs, name, tile_above_pixels=0) for name in ("wan21", "hunyuanvideo15", "ltxvideo", "cogvideox")
    )
    assert (wan.tiling_for(None), wan.tiling_for("blend")) == ("exact", "blend")
    assert (hv15.tiling_for(None), hv15.tiling_for("blend")) == ("exact", "blend")
    assert (ltx.tiling_for(None), ltx.tiling_for("exact")) == ("blend", "exact")
    assert cogvideox.tiling_for(None) == "blend"
    with pytest.raises(Exception, match="no exact tiled path"):
        cogvideox.tiling_for("exact")
