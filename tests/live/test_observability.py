"""GET /metrics (Prometheus text) and the access log with request ids, on the live server."""

from __future__ import annotations

import re

import requests
import torch
from conftest import seeded
from diffusers.utils.remote_utils import remote_decode, remote_encode
from PIL import Image

STAGES = ("parse", "queue", "inference", "media")


def test_metrics_count_requests_and_time_every_stage(multi_server, sd):
    before = multi_server.metrics()
    remote_decode(sd, tensor=seeded(2, 4, 8, 8), output_type="pt", return_type="pt", do_scaling=False)
    remote_encode(sd, image=Image.new("RGB", (64, 64), "red"), scaling_factor=0.18215)
    requests.post(
        sd, params={"shape": [1, 4, 8, 8], "dtype": "float16"}, data=b"short", headers={"Content-Type": "tensor/binary"}
    )
    after = multi_server.metrics()

    def grew(name, by=1.0, **labels):
        key = (name, tuple(sorted(labels.items())))
        assert after.get(key, 0) - before.get(key, 0) == by, (key, after.get(key))

    grew("remote_vae_requests_total", family="sd15", operation="decode", status="200")
    grew("remote_vae_requests_total", family="sd15", operation="encode", status="200")
    grew("remote_vae_requests_total", family="sd15", operation="-", status="400")  # refused while parsing
    for stage in STAGES:
        grew("remote_vae_stage_duration_seconds_count", by=2, family="sd15", stage=stage)
    grew("remote_vae_batch_size_sum", by=2, family="sd15", operation="decode")
    grew("remote_vae_batch_size_count", family="sd15", operation="encode")
    for gauge in ("inf_queue_size", "inf_batch_current_size", "remote_vae_queue_length", "remote_vae_running"):
        assert after[(gauge, ())] == 0
    # The host's resident set is ProcessCollector's; remote_vae_device_memory_bytes is CUDA's alone.
    assert after[("process_resident_memory_bytes", ())] > 50 * 2**20
    assert not any(name == "remote_vae_device_memory_bytes" for name, _ in after)
    assert ("remote_vae_out_of_memory_total", (("family", "flux"), ("outcome", "refused"))) in after


def test_metrics_is_prometheus_text(multi_server):
    response = requests.get(multi_server.url + "/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert "# TYPE remote_vae_stage_duration_seconds histogram" in response.text


def test_request_id_comes_back_and_starts_one_log_line_without_payload(multi_server, sd):
    latent = seeded(1, 4, 8, 8)
    response = requests.post(
        sd,
        params={"shape": [1, 4, 8, 8], "dtype": "float32", "output_type": "pt", "scaling_factor": "0.123456"},
        data=latent.numpy().tobytes(),
        headers={"Content-Type": "tensor/binary", "X-Request-Id": "trace-42.a"},
    )
    assert response.status_code == 200 and response.headers["x-request-id"] == "trace-42.a"
    fresh = requests.get(
        multi_server.url + "/health", headers={"X-Request-Id": "bad id with spaces &; rm -rf"}
    ).headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", fresh)
    error = requests.post(sd, data=b"junk")
    assert re.fullmatch(r"[0-9a-f]{32}", error.headers["x-request-id"])

    log = multi_server.log_path.read_text()
    lines = [line for line in log.splitlines() if "trace-42.a" in line]
    assert len(lines) == 1
    assert '"POST /sd15/" 200 in=1024 out=49152' in lines[0] and lines[0].rstrip().endswith("sd15 decode")
    assert "0.123456" not in log and "shape" not in lines[0]  # no query string, no payload
    assert sum(error.headers["x-request-id"] in line for line in log.splitlines()) == 1
    assert not any(
        line.startswith("INFO:") and "HTTP/1.1" in line for line in log.splitlines()
    )  # uvicorn's own access log is off


def test_decoding_through_metrics_does_not_change_results(multi_server, sd, reference):
    latent = seeded(1, 4, 8, 8, seed=9)
    out = remote_decode(sd, tensor=latent, output_type="pt", return_type="pt", do_scaling=False)
    with torch.no_grad():
        torch.testing.assert_close(out, reference["sd15"].decode(latent).sample, atol=1e-4, rtol=1e-4)
