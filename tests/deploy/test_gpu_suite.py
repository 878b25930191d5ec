"""scripts/gpu_suite.py proven on the CPU: every stage runs with tiny models within 90 s through the code a GPU run
takes, the budget skips what cannot fit, carried wheels install offline, and gpu_carry.py prints a call the device
tool takes. A GPU run is rare and short: it must not die of a typo."""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT, offline_env

pytestmark = [pytest.mark.deployment, pytest.mark.slow]

SUITE = [sys.executable, str(ROOT / "scripts" / "gpu_suite.py")]
# The tiny run's budget: its stages take about 65 s alone on two cores with torch.compile's cache warm, but beside
# another test worker, on one core and compiling cold (a fresh CI machine: about 60 s more), it has taken 252 s. The
# run ends when its stages do.
TINY_BUDGET = 300


def run(*args: str, timeout: float, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*SUITE, *args], cwd=ROOT, env=offline_env(**env), capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("suite")
    # PYTEST_ADDOPTS naming a plugin the suite's own pytest (the cuda_tests stage) cannot load: it must not reach it
    done = run(
        "--device", "cpu", "--tiny", "--out", str(out), "--budget", str(TINY_BUDGET), timeout=TINY_BUDGET + 60,
        PYTEST_ADDOPTS="-p no_such_plugin",
    )  # fmt: skip
    return done, out


def test_every_stage_runs_on_the_cpu_within_its_budget(tiny_run):
    done, out = tiny_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    statuses = {name: record["status"] for name, record in results["stages"].items()}
    assert statuses == dict.fromkeys(
        ["environment", "cuda_tests", "headline", "throughput", "profile", "large", "compile"], "done"
    ), results
    assert results["elapsed_s"] < TINY_BUDGET + 5
    # Its servers fork from a warm parent, as the test suite's do (REMOTE_VAE_TEST_FORK=0 would start commands)
    assert results["servers"]["started"] == results["servers"]["forked"] > 0, results["servers"]
    assert [line.split("]")[0] + "]" for line in done.stdout.splitlines() if line.startswith("[")][:7] == [
        f"[{name}]" for name in statuses
    ]  # one line per stage as it ends, for a run that is cut off


def test_the_results_are_measured_and_checked(tiny_run):
    _, out = tiny_run
    stages = json.loads((out / "results.json").read_text())["stages"]
    # On the CPU, the CUDA tests skip
    assert stages["cuda_tests"]["exit_code"] == 0 and "skipped" in stages["cuda_tests"]["summary"]
    decodes = [row for row in stages["headline"]["rows"] if row["operation"] == "decode"]
    assert {row["family"] for row in decodes} == {"sd15", "sdxl", "flux"} and len(decodes) == 6
    for row in decodes:  # the service's PNG is diffusers' pixels
        assert (
            row["max_pixel_difference"] <= 1
            and row["service_ms"] > 0
            and set(row["server_stage_ms"]) >= {"parse", "inference", "media"}
        )
    assert all(
        row["max_latent_difference"] < 1e-3 for row in stages["headline"]["rows"] if row["operation"] == "encode"
    )
    assert {(row["family"], row["batching"]) for row in stages["throughput"]["rows"]} == {
        (f, b) for f in ("sd15", "sdxl") for b in ("on", "off")
    }
    assert stages["large"]["exact_vs_untiled"]["max_difference"] <= 1 and stages["large"]["wan_mp4"]["mp4_bytes"] > 0
    assert stages["compile"]["compiled"] is True
    assert stages["profile"]["reply_status"] == 200
    trace = json.loads(gzip.decompress((out / "trace.json.gz").read_bytes()))
    assert trace["traceEvents"]
    markdown = (out / "results.md").read_text()
    assert all(f"## {name}: done" in markdown for name in stages)


def test_a_stage_that_cannot_fit_is_skipped_with_a_note(tmp_path):
    done = run(
        "--device",
        "cpu",
        "--tiny",
        "--out",
        str(tmp_path),
        "--budget",
        "4",
        "--stages",
        "environment",
        "headline",
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    stages = json.loads((tmp_path / "results.json").read_text())["stages"]
    assert stages["environment"]["status"] == "done"
    assert stages["headline"]["status"] == "skipped" and "needs about" in stages["headline"]["note"]


def fake_wheel(folder: Path) -> Path:
    """A minimal wheel of a module `suite_probe`, made by hand: nothing to download."""
    files = {
        "suite_probe/__init__.py": b"VALUE = 42\n",
        "suite_probe-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: suite-probe\nVersion: 1.0\n",
        "suite_probe-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: "
        b"py3-none-any\n",
    }
    record = [
        f"{name},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},{len(data)}"
        for name, data in files.items()
    ]
    files["suite_probe-1.0.dist-info/RECORD"] = (
        "\n".join(record + ["suite_probe-1.0.dist-info/RECORD,,"]) + "\n"
    ).encode()
    path = folder / "suite_probe-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        for name, data in files.items():
            wheel.writestr(name, data)
    return path


def test_carried_wheels_install_offline_and_reach_the_stages(tmp_path):
    wheels = tmp_path / "whl"
    wheels.mkdir()
    fake_wheel(wheels)
    done = run(
        "--device",
        "cpu",
        "--wheels",
        str(wheels),
        "--out",
        str(tmp_path / "out"),
        "--stages",
        "environment",
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    sys.path.insert(0, str(ROOT / "scripts"))
    import gpu_suite

    assert (gpu_suite.SITE / "suite_probe" / "__init__.py").read_text() == "VALUE = 42\n"
    assert (
        run(
            "--device", "cpu", "--wheels", str(tmp_path / "empty"), "--out", str(tmp_path / "out"), timeout=60
        ).returncode
        != 0
    )


def test_the_carry_script_prints_the_device_call():
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_carry.py"), "--dry-run"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    download, _, call = done.stdout.partition("The device call (the device tool's run):")
    assert (
        "--python-version 3.12" in download
        and "--only-binary=:all:" in download
        and "imageio-ffmpeg==0.7.0" in download
    )
    assert all(
        f"{name}==" in download
        for name in ("diffusers", "starlette", "uvicorn", "swagger-ui-bundle", "importlib_metadata")
    )
    call = json.loads(call)
    assert call["carry"] == [".whl"] and len(call["command"]) <= 2000 and 400 < call["timeout_s"] <= 420
    assert "--wheels .whl" in call["command"] and '--out "$OUT"' in call["command"]
    assert ".whl/" in (ROOT / ".gitignore").read_text().split()  # the wheels never reach a commit
