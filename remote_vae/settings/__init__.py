"""Serve settings: every `remote-vae serve` option once, with its default, its environment variable, its parser and
its help (options.py), read into one frozen `Settings` (values.py) and checked there.

The command line, the server, handler.py and the Ray application all build their settings here (`read_settings`),
so a container configured by REMOTE_VAE_* variables alone, a toolkit endpoint and a Ray replica see the same values.
Nothing here imports torch: `--help` and the client commands answer in a fraction of a second.
"""

from .options import (
    OPTIONS,
    add_arguments,
    byte_budget,
    option,
    pixel_budget,
    read_settings,
    settings_from,
    tile_threshold,
    warmup_size,
)
from .values import (
    ENV_PREFIX,
    GPU_MAX_PIXELS,
    BatchSettings,
    ConnectionSettings,
    Limits,
    ModelSettings,
    QueueSettings,
    ServedFamilies,
    Settings,
    SettingsError,
    env,
    env_flag,
    model_sources,
    warmup_sizes_for,
)

__all__ = [
    "ENV_PREFIX",
    "GPU_MAX_PIXELS",
    "OPTIONS",
    "BatchSettings",
    "ConnectionSettings",
    "Limits",
    "ModelSettings",
    "QueueSettings",
    "ServedFamilies",
    "Settings",
    "SettingsError",
    "add_arguments",
    "byte_budget",
    "env",
    "env_flag",
    "model_sources",
    "option",
    "pixel_budget",
    "read_settings",
    "settings_from",
    "tile_threshold",
    "warmup_size",
    "warmup_sizes_for",
]
