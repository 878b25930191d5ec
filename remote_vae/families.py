"""Model families as data: one JSON file in configs/ per family.

Adding a VAE is adding a file; nothing in the request path branches on a
family's name. A family says where its weights live, which diffusers class
builds it, its latent layout and scaling, and the full diffusers model config
(`architecture`) so the model can be built with random weights and no download.

Video families add `temporal_compression` (latent frames T decode to
`temporal_compression * (T - 1) + 1` frames). Families normalised per channel
(Wan) give `latents_mean` / `latents_std` instead of a scalar scaling factor.
`tile_above_pixels` switches the model's own tiled decoding on for frames
larger than that many pixels, with `tiling_options` passed to `enable_tiling`.
`streams_frames` says that the model's untiled decode calls its decoder once
per latent frame, in order, and each call returns finished frames (Wan's
causal decoder): the service then writes an MP4 while later frames decode.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

OPERATIONS = ("decode", "encode")
DTYPES = ("float16", "bfloat16", "float32")


class FamilyError(ValueError):
    """A family name or config file that cannot be used."""


@dataclass(frozen=True)
class Family:
    name: str
    hub_repo: str
    model_class: str
    architecture: dict[str, Any]
    latent_channels: int
    spatial_compression: int
    scaling_factor: float | None = None
    shift_factor: float | None = None
    hub_subfolder: str | None = None
    compute_dtype: dict[str, str] = field(default_factory=lambda: {"cuda": "float16", "cpu": "float32"})
    operations: tuple[str, ...] = OPERATIONS
    description: str = ""
    temporal_compression: int | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    tile_above_pixels: int | None = None
    tiling_options: dict[str, Any] = field(default_factory=dict)
    streams_frames: bool = False

    @property
    def is_video(self) -> bool:
        return self.temporal_compression is not None

    def frames_for(self, latent_frames: int) -> int:
        """Decoded frames for T latent frames: the first latent frame is one frame, each further one is several."""
        return self.temporal_compression * (latent_frames - 1) + 1

    def dtype_for(self, device_type: str) -> str:
        """The compute dtype this family runs in on a device type ('cuda', 'cpu', ...)."""
        return self.compute_dtype.get(device_type, self.compute_dtype.get("cpu", "float32"))

    def serves(self, operation: str) -> bool:
        return operation in self.operations

    def client_scaling(self) -> dict[str, Any]:
        """The scaling arguments a client passes to diffusers' remote_decode / remote_encode for this family."""
        if self.latents_mean is not None:  # per channel: the server holds the statistics
            return {"do_scaling": True}
        factors = {"scaling_factor": self.scaling_factor, "shift_factor": self.shift_factor}
        return {name: value for name, value in factors.items() if value is not None}


def _family_from_dict(data: dict[str, Any], source: str) -> Family:
    required = ("name", "hub_repo", "model_class", "architecture", "latent_channels", "spatial_compression")
    missing = [key for key in required if key not in data]
    if missing:
        raise FamilyError(f"{source}: missing keys {missing}")
    known = set(Family.__dataclass_fields__)
    unknown = sorted(set(data) - known)
    if unknown:
        raise FamilyError(f"{source}: unknown keys {unknown}; known keys are {sorted(known)}")
    values = dict(data)
    values["operations"] = tuple(values.get("operations", OPERATIONS))
    bad_ops = [op for op in values["operations"] if op not in OPERATIONS]
    if bad_ops:
        raise FamilyError(f"{source}: unknown operations {bad_ops}; expected a subset of {list(OPERATIONS)}")
    for device_type, dtype in values.get("compute_dtype", {}).items():
        if dtype not in DTYPES:
            raise FamilyError(f"{source}: compute_dtype[{device_type!r}] = {dtype!r}; expected one of {list(DTYPES)}")
    if values.get("scaling_factor") == 0:
        raise FamilyError(f"{source}: scaling_factor must not be 0")
    temporal = values.get("temporal_compression")
    if temporal is not None and not (isinstance(temporal, int) and temporal >= 1):
        raise FamilyError(f"{source}: temporal_compression must be a positive integer or null")
    for key in ("latents_mean", "latents_std"):
        stats = values.get(key)
        if stats is None:
            continue
        if not (isinstance(stats, list) and len(stats) == values["latent_channels"] and all(isinstance(v, (int, float)) for v in stats)):
            raise FamilyError(f"{source}: {key} must be a list of {values['latent_channels']} numbers (one per latent channel)")
        values[key] = tuple(float(v) for v in stats)
    if (values.get("latents_mean") is None) != (values.get("latents_std") is None):
        raise FamilyError(f"{source}: latents_mean and latents_std come together")
    if values.get("latents_std") and 0 in values["latents_std"]:
        raise FamilyError(f"{source}: latents_std must not contain 0")
    if values.get("latents_mean") and values.get("scaling_factor") is not None:
        raise FamilyError(f"{source}: give either scaling_factor/shift_factor or latents_mean/latents_std, not both")
    tile_above = values.get("tile_above_pixels")
    if tile_above is not None and not (isinstance(tile_above, int) and tile_above >= 0):
        raise FamilyError(f"{source}: tile_above_pixels must be a non-negative integer or null (never tile)")
    if not isinstance(values.get("streams_frames", False), bool):
        raise FamilyError(f"{source}: streams_frames must be true or false")
    return Family(**values)


def available() -> list[str]:
    """Names of the families shipped in configs/."""
    return sorted(path.stem for path in CONFIG_DIR.glob("*.json"))


def load_family(name_or_path: str) -> Family:
    """A family by name (a file in configs/) or by the path of a config file."""
    path = Path(name_or_path)
    if not (path.suffix == ".json" and path.is_file()):
        path = CONFIG_DIR / f"{name_or_path}.json"
        if not path.is_file():
            raise FamilyError(f"unknown family {name_or_path!r}; known families: {', '.join(available())} (or pass a config file path)")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise FamilyError(f"{path}: cannot read family config: {exc}") from exc
    if not isinstance(data, dict):
        raise FamilyError(f"{path}: a family config is a JSON object")
    return _family_from_dict(data, str(path))


def match_model_config(config: dict[str, Any]) -> Family:
    """The shipped family whose class, latent channels and scaling factor match a diffusers model config."""
    channels = config_latent_channels(config)
    candidates = [
        family
        for family in map(load_family, available())
        if family.model_class == config.get("_class_name") and family.latent_channels == channels
    ]
    exact = [family for family in candidates if family.scaling_factor == config.get("scaling_factor")]
    if len(exact) == 1 or (not exact and len(candidates) == 1):
        return (exact or candidates)[0]
    names = [family.name for family in (exact or candidates)]
    raise FamilyError(
        f"cannot tell the family of a {config.get('_class_name')} with {channels} latent channels "
        f"(candidates: {names or 'none'}); set REMOTE_VAE_FAMILIES"
    )


def config_latent_channels(config: dict[str, Any]) -> int | None:
    """Latent channels from a diffusers model config (Wan calls them z_dim)."""
    return config.get("latent_channels", config.get("z_dim"))
