"""A family the installed diffusers cannot build (too old for its min_diffusers, or without its model class) is
unavailable by name, with the release it needs, while the server's other families serve."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import diffusers
import numpy as np
import pytest
import requests
from conftest import ROOT, LiveServer, offline_env, seeded
from diffusers.utils.remote_utils import remote_decode
from diffusers_reference import SD, assert_pixels_close, decode_locally, uint8_locally
from packaging.version import Version

from remote_vae import families
from remote_vae.vae import UnsupportedFamily, model_class


def family_config(folder: Path, name: str, **changes) -> Path:
    data = json.loads((families.CONFIG_DIR / "sd15.json").read_text()) | {"name": name, **changes}
    path = folder / f"{name}.json"
    path.write_text(json.dumps(data))
    return path


@pytest.fixture(scope="module")
def configs(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("configs")
    return {
        "future": family_config(folder, "future", min_diffusers="99.0"),
        "renamed": family_config(folder, "renamed", model_class="AutoencoderKLNotInThisDiffusers", min_diffusers=None),
    }


@pytest.fixture(scope="module")
def server(model_dirs, configs, tmp_path_factory):
    args = ["sd15", str(configs["future"]), str(configs["renamed"]), "--model", f"sd15={model_dirs['sd15']}"]
    live = LiveServer(args, offline_env(), tmp_path_factory.mktemp("logs") / "server.log")
    yield live
    live.stop()
    assert live.process.returncode == 0  # SIGTERM ends it cleanly: an unavailable family is no failure of the server


def test_the_error_names_the_family_the_class_and_the_release(configs):
    with pytest.raises(
        UnsupportedFamily,
        match=r"family future needs diffusers >= 99.0 for its model class AutoencoderKL; the installed diffusers "
        rf"{diffusers.__version__}",
    ):
        model_class(families.load_family(str(configs["future"])))
    with pytest.raises(UnsupportedFamily, match="renamed.*has no AutoencoderKLNotInThisDiffusers"):
        model_class(families.load_family(str(configs["renamed"])))


def test_every_shipped_family_builds_on_a_diffusers_as_new_as_it_says():
    """Here and on the toolkit stack's older diffusers: each family's min_diffusers is a release that builds it; a
    family that needs a newer one (stableaudio3's AutoencoderSAME, 0.40, on the toolkit's 0.37.1) says so by name."""
    for name in families.available():
        family = families.load_family(name)
        assert family.min_diffusers, f"{name} says no min_diffusers"
        if Version(diffusers.__version__) >= Version(family.min_diffusers):
            model_class(family)
        else:
            with pytest.raises(UnsupportedFamily, match=rf"{name} needs diffusers >= {family.min_diffusers}"):
                model_class(family)


def test_the_others_serve_and_the_unavailable_ones_say_why(server, reference):
    health = requests.get(server.url + "/health", timeout=10)
    assert health.status_code == 200
    assert {name: doc["status"] for name, doc in health.json()["families"].items()} == {
        "sd15": "ready",
        "future": "unavailable",
        "renamed": "unavailable",
    }
    refused = requests.post(
        server.url + "/future/", data=b"\0" * 64, params={"shape": "1,4,2,2", "dtype": "float32"}, timeout=10
    )
    assert (
        refused.status_code == 501
        and "diffusers >= 99.0" in refused.json()["error"]
        and "AutoencoderKL" in refused.json()["error"]
    )
    assert requests.get(server.url + "/renamed/health", timeout=10).json()["status"] == "unavailable"
    listed = requests.get(server.url + "/families", timeout=10).json()["families"]
    assert "AutoencoderKLNotInThisDiffusers" in listed["renamed"]["error"] and "error" not in listed["sd15"]
    latents = seeded(1, 4, 8, 8)
    image = remote_decode(
        endpoint=server.url + "/sd15/", tensor=latents, scaling_factor=SD, output_type="pil", image_format="png"
    )
    assert_pixels_close(np.asarray(image)[None], uint8_locally(decode_locally(reference["sd15"], latents, SD)))


def test_families_report_the_weights_they_loaded(server, model_dirs):
    listed = requests.get(server.url + "/families", timeout=10).json()["families"]
    assert listed["sd15"]["weights"] == str(
        model_dirs["sd15"]
    )  # the --model directory, not the family's Hub repository
    assert listed["future"]["weights"] == "stabilityai/sd-vae-ft-mse"  # never loaded


def test_serving_only_unavailable_families_exits_2_with_the_reason(configs):
    done = subprocess.run(
        [sys.executable, "-m", "remote_vae", "serve", str(configs["future"]), "--random-weights", "--port", "0"],
        cwd=ROOT,
        env=offline_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "needs diffusers >= 99.0" in done.stderr, done.stderr


def test_an_architecture_module_this_diffusers_lacks_costs_only_its_exact_path(monkeypatch):
    from remote_vae.tiling import architectures, steps

    assert steps._classes("diffusers.models.autoencoders.autoencoder_kl_from_the_future", "Decoder") == ()
    assert steps._classes("diffusers.models.autoencoders.vae", "Decoder", "NoSuchEncoder") == ()
    missing = "diffusers.models.autoencoders.autoencoder_kl_from_the_future"
    monkeypatch.setitem(architectures._BUILDERS, missing, lambda module: module.FutureDecoder)
    assert architectures._architecture_in(missing) is None
    renamed = "diffusers.models.autoencoders.vae"  # there, but without the classes a builder names
    monkeypatch.setitem(architectures._BUILDERS, renamed, lambda module: module.RenamedDecoder3d)
    try:
        assert architectures._architecture_in(renamed) is None
    finally:
        architectures._architecture_in.cache_clear()  # what it found under the patched table
