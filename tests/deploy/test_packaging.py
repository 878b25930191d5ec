"""The package as a user installs it: `pip install .` into a fresh virtual environment gives the `remote-vae`
command, with the family configs inside the package; --help and `families` answer without torch."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from conftest import ROOT

from remote_vae import families

pytestmark = [pytest.mark.deployment, pytest.mark.slow]

# What a source distribution of the project holds: the package, its configs and the files pyproject.toml reads.
SOURCES = [
    "pyproject.toml",
    "README.md",
    "requirements.txt",
    "requirements-dev.txt",
    "requirements-ray.txt",
    "remote_vae",
    "configs",
]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv with the project installed, seeing the packages of the environment running the tests (so nothing is
    downloaded but the build backend) through a .pth file: `--system-site-packages` would show the base interpreter's
    instead, which has none of them when the tests themselves run in a virtual environment."""
    folder = tmp_path_factory.mktemp("install")
    source = folder / "source"
    source.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, source / name)
    venv = folder / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    site = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout.strip()
    outer = dict.fromkeys(
        sysconfig.get_paths()[kind] for kind in ("purelib", "platlib")
    )  # after the venv's own: its copy wins
    (Path(site) / "outer_environment.pth").write_text("\n".join(outer) + "\n")
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--no-deps", "--quiet", str(source)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    return venv


def run(venv: Path, *args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(venv / "bin" / "remote-vae"), *args], cwd=cwd, capture_output=True, text=True, timeout=120, env=env
    )


def test_the_console_command_runs_from_anywhere_with_its_configs(installed, tmp_path):
    listing = run(installed, "families", cwd=tmp_path)
    assert listing.returncode == 0, listing.stderr
    assert {block.split(" ", 1)[0] for block in listing.stdout.strip().split("\n\n")} == set(families.available())
    where = subprocess.run(
        [
            str(installed / "bin" / "python"),
            "-c",
            "import remote_vae, remote_vae.families as f; print(remote_vae.__file__); print(f.CONFIG_DIR)",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    package, configs = where.stdout.split()
    # The installed copy, not the clone
    assert str(installed) in package and Path(configs) == Path(package).parent / "configs"
    assert run(installed, "serve", "--help", cwd=tmp_path).stdout.startswith("usage: remote-vae serve")


def test_help_and_families_answer_without_torch(installed, tmp_path):
    """A torch that cannot be imported shadows the real one: --help, families and a client command's --help still
    work."""
    blocker = tmp_path / "blocker" / "torch"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('torch was imported')\n")
    env = {"PYTHONPATH": str(blocker.parent), "PATH": "/usr/bin:/bin"}
    for args in (["--help"], ["families"], ["decode", "--help"], ["encode", "--help"]):
        done = run(installed, *args, cwd=tmp_path, env=env)
        assert done.returncode == 0 and "torch was imported" not in done.stderr, (args, done.stderr)
    served = run(installed, "serve", "sd15", "--random-weights", cwd=tmp_path, env=env)
    assert served.returncode != 0 and "torch was imported" in served.stderr  # the blocker works: serving needs torch
