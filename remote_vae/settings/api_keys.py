"""API keys as the settings give them: --api-key and/or --api-key-file, checked at start-up (server/auth.py checks
them on each POST)."""

from __future__ import annotations

from pathlib import Path


class ApiKeyError(ValueError):
    """An API key setting that cannot be used."""


def load_api_keys(key: str | None, key_file: str | None) -> tuple[str, ...]:
    """Keys from --api-key and/or --api-key-file (one per line, '#' comments; several allow rotation)."""
    keys = [key.strip()] if key and key.strip() else []
    if key_file:
        try:
            lines = Path(key_file).read_text().splitlines()
        except OSError as exc:
            raise ApiKeyError(f"cannot read --api-key-file {key_file}: {exc.strerror or exc}") from None
        keys += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        if not keys:
            raise ApiKeyError(f"--api-key-file {key_file} holds no key")
    for candidate in keys:
        if len(candidate) < 16 or not candidate.isprintable() or any(char.isspace() for char in candidate):
            raise ApiKeyError(
                "an API key must be at least 16 printable characters without spaces (e.g. `openssl rand -hex 32`)"
            )
    return tuple(keys)
