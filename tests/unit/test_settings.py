"""The settings stage: every serve option once, with its environment variable and its default; the README's table
of them."""

from __future__ import annotations

import dataclasses
import re

import pytest
from conftest import ROOT

from remote_vae.settings import OPTIONS, Settings, SettingsError, read_settings


def test_a_variable_fills_in_what_the_command_line_does_not_say(monkeypatch):
    monkeypatch.setenv("REMOTE_VAE_MAX_QUEUE", "3")
    monkeypatch.setenv("REMOTE_VAE_BATCH_WAIT_MS", "5")
    monkeypatch.setenv("REMOTE_VAE_FAMILIES", "sd15 flux")
    monkeypatch.setenv("REMOTE_VAE_COMPILE", "1")
    monkeypatch.setenv("PORT", "9123")
    settings = read_settings()
    assert (settings.queue.max_waiting, settings.batching.wait) == (3, 0.005)
    assert settings.families == ("sd15", "flux") and settings.model.compile is True and settings.port == 9123
    assert read_settings(["--max-queue", "7"]).queue.max_waiting == 7  # the flag wins


def test_the_defaults_are_the_settings_own():
    settings, defaults = read_settings(), Settings()
    assert settings.limits == defaults.limits and settings.queue == defaults.queue
    assert settings.connections == defaults.connections and settings.model == defaults.model
    assert settings.memory_budget is not None  # auto, resolved when read


def test_settings_are_frozen_and_options_that_clash_are_refused():
    with pytest.raises(dataclasses.FrozenInstanceError):
        read_settings().port = 1
    with pytest.raises(SettingsError, match="both --ssl-certfile and --ssl-keyfile"):
        read_settings(["--ssl-certfile", "cert.pem"])
    with pytest.raises(SystemExit):  # argparse's own refusal of a bad value, naming the option
        read_settings(["--max-queue", "many"])


def test_the_readme_lists_every_option_with_its_variable():
    table = [line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("| `--")]
    documented = {flag: line for line in table for flag in re.findall(r"`(--[a-z-]+)`", line.split("|")[1])}
    flags = {option.flag for option in OPTIONS if option.flag.startswith("--")}
    assert set(documented) == flags, set(documented) ^ flags
    for option in OPTIONS:
        if option.flag in documented:
            assert option.variable in documented[option.flag], option.flag


def test_a_family_with_sound_serves_its_sound_family_from_the_same_pipeline_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("REMOTE_VAE_FAMILIES", raising=False)
    for folder in ("vae", "audio_vae", "vocoder"):  # an LTX-2 pipeline's folders
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "config.json").write_text("{}")
    served = read_settings(["ltx2", "--model", str(tmp_path)]).served
    assert [family.name for family in served.families] == ["ltx2", "ltx2audio"] and served.named == 1
    assert served.sources == {"ltx2": str(tmp_path), "ltx2audio": str(tmp_path)}
    served = read_settings(["ltx2", "--model", str(tmp_path / "vae")]).served  # its vae/ folder: the pipeline's beside
    assert served.sources["ltx2audio"] == str(tmp_path)
    served = read_settings(["ltx2", "--model", "ltx2audio=elsewhere/repo"]).served  # named: that one wins
    assert served.sources == {"ltx2audio": "elsewhere/repo"}
    assert [family.name for family in read_settings(["ltx2", "ltx2audio"]).served.families] == ["ltx2", "ltx2audio"]
