"""A family config's keys checked one group at a time (families._family_from_dict calls each): every refusal names the
file, the key and what was expected."""

from __future__ import annotations

import re
from typing import Any

from .errors import FamilyError
from .vocabulary import COMPUTE_DTYPES, PIXEL_MODES, ModelLatents, Operation, Packing, Tiling

OPERATIONS = Operation.words()


def check_values(values: dict[str, Any], source: str) -> None:
    """Every key of a config (as `values`, a copy of it) checked, and turned into the types Family holds."""
    values["operations"] = tuple(values.get("operations", OPERATIONS))
    bad_ops = [op for op in values["operations"] if op not in OPERATIONS]
    if bad_ops:
        raise FamilyError(f"{source}: unknown operations {bad_ops}; expected a subset of {list(OPERATIONS)}")
    values["operations"] = tuple(Operation(op) for op in values["operations"])
    for device_type, dtype in values.get("compute_dtype", {}).items():
        if dtype not in COMPUTE_DTYPES:
            raise FamilyError(
                f"{source}: compute_dtype[{device_type!r}] = {dtype!r}; expected one of {list(COMPUTE_DTYPES)}"
            )
    _check_counts(values, source)
    _check_normalisation(values, source)
    _check_layout(values, source)
    _check_stats_in_weights(values, source)
    _check_clients(values, source)
    _check_audio(values, source)
    _check_pixel_channels(values, source)


def _check_clients(values: dict[str, Any], source: str) -> None:
    """The pipelines and repos a family serves (lists of names, kept as tuples) and how ComfyUI holds its latents."""
    for key in ("pipelines", "hub_repos"):
        names = values.get(key, [])
        if not (isinstance(names, list) and all(isinstance(name, str) for name in names)):
            raise FamilyError(f"{source}: {key} is a list of names")
        values[key] = tuple(names)
    comfyui = values.get("comfyui", {})
    latents = comfyui.get("latents", "raw") if isinstance(comfyui, dict) else None
    if latents not in ("raw", "normalised") or set(comfyui) - {"latents", "decode"}:
        raise FamilyError(f'{source}: comfyui is {{"latents": "raw" or "normalised", "decode": {{parameters}}}}')


def _check_counts(values: dict[str, Any], source: str) -> None:
    """The keys that are counts, switches, names and release numbers."""
    temporal = values.get("temporal_compression")
    if temporal is not None and not (isinstance(temporal, int) and temporal >= 1):
        raise FamilyError(f"{source}: temporal_compression must be a positive integer or null")
    tile_above = values.get("tile_above_pixels")
    if tile_above is not None and not (isinstance(tile_above, int) and tile_above >= 0):
        raise FamilyError(f"{source}: tile_above_pixels must be a non-negative integer or null (never tile)")
    for key in ("streams_frames", "latent_frames_odd", "frames_as_batch", "first_frame_alone", "decoded_frames_first"):
        if not isinstance(values.get(key, False), bool):
            raise FamilyError(f"{source}: {key} must be true or false")
    if values.get("default_tiling", "exact") not in TILINGS:
        raise FamilyError(f"{source}: default_tiling must be one of {list(TILINGS)}")
    minimum = values.get("min_diffusers")
    if minimum is not None and not (isinstance(minimum, str) and re.fullmatch(r"\d+(\.\d+)*", minimum)):
        raise FamilyError(f'{source}: min_diffusers must be a release number like "0.36.0", or null')
    if values.get("frames_as_batch") and temporal != 1:
        raise FamilyError(f"{source}: frames_as_batch is for a video family whose temporal_compression is 1")
    video_only = ["first_frame_alone", "decoded_frames_first", "tiled_only"]
    if temporal is None and any(key in values for key in video_only):
        raise FamilyError(f"{source}: {video_only} are for video families")
    tiled_only = values.get("tiled_only")
    if tiled_only is not None and not (
        isinstance(tiled_only, dict)
        and set(tiled_only) == {"frames", "side"}
        and isinstance(tiled_only["frames"], int)
        and not isinstance(tiled_only["frames"], bool)
        and tiled_only["frames"] >= 1
        and tiled_only["side"] in values.get("architecture", {})
    ):
        raise FamilyError(
            f'{source}: tiled_only is {{"frames": T, "side": key}}: the latent frames of one of the model\'s tiles, '
            "and the architecture's key for a tile's side in pixels (Allegro: sample_size), or null"
        )
    if tiled_only is not None and "encode" in values.get("operations", ["encode"]):
        raise FamilyError(f'{source}: a tiled_only family decodes only (list operations: ["decode"])')
    side = values.get("min_latent_side", 1)
    if not (isinstance(side, int) and not isinstance(side, bool) and side >= 1):
        raise FamilyError(f"{source}: min_latent_side is a positive integer (latent cells a side)")
    per_call = values.get("samples_per_call")
    if per_call is not None and not (isinstance(per_call, int) and per_call >= 1):
        raise FamilyError(f"{source}: samples_per_call must be a positive integer or null (any batch)")
    if not isinstance(values.get("decode_timestep") or "", str):
        raise FamilyError(
            f"{source}: decode_timestep is the name of the decode argument that takes the timestep "
            "(e.g. 'temb'), or null"
        )


def _check_normalisation(values: dict[str, Any], source: str) -> None:
    """Scalar factors or per-channel statistics, not both; and what a preview decoder's latents need."""
    if values.get("scaling_factor") == 0:
        raise FamilyError(f"{source}: scaling_factor must not be 0")
    frames = values.get("latents_stats_frames")
    if frames is not None and not (
        isinstance(frames, int) and not isinstance(frames, bool) and frames >= 1 and values.get("temporal_compression")
    ):
        raise FamilyError(
            f"{source}: latents_stats_frames is the number of latent frames a video family's statistics cover (C x F "
            "values each), a positive integer"
        )
    for key in ("latents_mean", "latents_std"):
        stats = values.get(key)
        if stats is None:
            continue
        channels = values["latent_channels"]
        count, each = (channels, "one per latent channel") if frames is None else (channels * frames, "channel-major")
        if not (isinstance(stats, list) and len(stats) == count and all(isinstance(v, (int, float)) for v in stats)):
            raise FamilyError(f"{source}: {key} must be a list of {count} numbers ({each})")
        values[key] = tuple(float(v) for v in stats)
    if (values.get("latents_mean") is None) != (values.get("latents_std") is None):
        raise FamilyError(f"{source}: latents_mean and latents_std come together")
    if frames is not None and values.get("latents_mean") is None:
        raise FamilyError(f"{source}: latents_stats_frames describes latents_mean and latents_std; give them")
    if values.get("latents_std") and 0 in values["latents_std"]:
        raise FamilyError(f"{source}: latents_std must not contain 0")
    # Per-frame statistics take a scaling factor too (Cosmos: z * std / sigma_data + mean); per-channel ones do not
    factors = values.get("shift_factor") is not None or (values.get("scaling_factor") is not None and frames is None)
    if values.get("latents_mean") and factors:
        raise FamilyError(f"{source}: give either scaling_factor/shift_factor or latents_mean/latents_std, not both")
    if values.get("model_latents", "raw") not in MODEL_LATENTS:
        raise FamilyError(f"{source}: model_latents must be one of {list(MODEL_LATENTS)}")
    values["model_latents"] = ModelLatents(values.get("model_latents", "raw"))
    if values.get("model_latents") == ModelLatents.NORMALISED and values.get("scaling_factor") is None:
        raise FamilyError(
            f"{source}: model_latents 'normalised' needs the full family's scaling_factor (the space "
            "the model works in)"
        )


MODEL_LATENTS = ModelLatents.words()
TILINGS = Tiling.words()
LAYOUT_KEYS = {"patch": int, "frames_first": bool, "frame_axis": bool, "paired_frames": bool, "packing": str}
PACKINGS = Packing.words()


def _check_layout(values: dict[str, Any], source: str) -> None:
    layout = values.get("latent_layout", {})
    if not isinstance(layout, dict):
        raise FamilyError(f"{source}: latent_layout must be an object with keys among {sorted(LAYOUT_KEYS)}")
    for key, value in layout.items():
        kind = LAYOUT_KEYS.get(key)
        if kind is None or not isinstance(value, kind) or isinstance(value, bool) != (kind is bool):
            raise FamilyError(
                f"{source}: latent_layout.{key} = {value!r}; expected keys {sorted(LAYOUT_KEYS)} (patch: int, "
                "packing: str, others: true/false)"
            )
    if layout.get("patch", 1) < 1:
        raise FamilyError(f"{source}: latent_layout.patch must be at least 1")
    if layout.get("packing", "none") not in PACKINGS:
        raise FamilyError(f"{source}: latent_layout.packing must be one of {list(PACKINGS)}")
    video = values.get("temporal_compression") is not None
    if video and (layout.get("frame_axis") or layout.get("patch", 1) > 1):
        raise FamilyError(f"{source}: frame_axis and patch are for image families")
    if not video and values.get("audio") is None and layout.get("frames_first"):
        raise FamilyError(f"{source}: frames_first is for video and audio families")
    if values.get("audio") is not None and set(layout) - {"frames_first"}:
        raise FamilyError(f"{source}: an audio family's latent_layout says only frames_first (its latent [B, T, C])")
    if layout.get("paired_frames") and not (layout.get("frame_axis") and layout.get("patch", 1) == 1):
        raise FamilyError(f"{source}: paired_frames is for an image family with frame_axis and no patch")
    if video and layout.get("packing") == "patches":
        raise FamilyError(f"{source}: a video family packs 'tokens' or 'none'")


def _check_stats_in_weights(values: dict[str, Any], source: str) -> None:
    stats = values.get("latents_stats_in_weights")
    if stats is None:
        return
    forms = ({"mean", "std"}, {"mean", "variance", "eps"})
    if not (isinstance(stats, dict) and set(stats) in forms and all(isinstance(v, str) for v in stats.values())):
        raise FamilyError(
            f"{source}: latents_stats_in_weights names the model's buffers: {{mean, std}} or {{mean, variance, eps}} "
            '(eps: a model config key), e.g. {"mean": "bn.running_mean", "variance": "bn.running_var", "eps": '
            '"batch_norm_eps"}'
        )
    if values.get("latents_mean") is not None or values.get("shift_factor") is not None:
        raise FamilyError(
            f"{source}: latents_stats_in_weights takes an optional scaling_factor, not latents_mean or shift_factor"
        )


AUDIO_KEYS = ("sampling_rate", "channels", "hop_length")
AUDIO_OPTIONAL_KEYS = ("first_step_samples", "latent_bins")
VOCODER_KEYS = {"model_class", "module", "hub_subfolder", "architecture"}
PIPELINE_LATENTS = ("normalised", "denormalised")


def _check_pixel_channels(values: dict[str, Any], source: str) -> None:
    """RGB, or RGBA for an image family (MP4 has no alpha)."""
    channels = values.get("pixel_channels", 3)
    if channels not in PIXEL_MODES or isinstance(channels, bool):
        raise FamilyError(f"{source}: pixel_channels is 3 (RGB) or 4 (RGBA)")
    if channels == 4 and values.get("temporal_compression") is not None:
        raise FamilyError(f"{source}: pixel_channels 4 (RGBA) is for an image family; an MP4 has no alpha")


def _check_audio(values: dict[str, Any], source: str) -> None:
    """An audio family's sound: three positive integers, and none of the image and video keys."""
    if values.get("pipeline_latents", "normalised") not in PIPELINE_LATENTS:
        raise FamilyError(f"{source}: pipeline_latents is one of {list(PIPELINE_LATENTS)}")
    sound = values.get("sound")
    if sound is not None and not (isinstance(sound, str) and values.get("temporal_compression")):
        raise FamilyError(f"{source}: sound names the audio family that decodes a video family's sound, or is null")
    vocoder = values.get("vocoder")
    if vocoder is not None and not (
        isinstance(vocoder, dict)
        and set(vocoder) == VOCODER_KEYS
        and all(isinstance(vocoder[key], str) for key in VOCODER_KEYS - {"architecture"})
        and isinstance(vocoder["architecture"], dict)
        and values.get("audio") is not None
    ):
        raise FamilyError(
            f"{source}: vocoder (an audio family's) is {{{', '.join(sorted(VOCODER_KEYS))}}}: the diffusers class, "
            "the module that has it, the subfolder beside the VAE's, and its config"
        )
    audio = values.get("audio")
    if audio is None:
        return
    keys = set(audio) if isinstance(audio, dict) else set()
    if not (set(AUDIO_KEYS) <= keys <= set(AUDIO_KEYS + AUDIO_OPTIONAL_KEYS)) or not all(
        isinstance(audio[key], int) and not isinstance(audio[key], bool) and audio[key] >= 1 for key in keys
    ):
        raise FamilyError(
            f'{source}: audio is {{"sampling_rate": Hz, "channels": n, "hop_length": samples per latent step}} and '
            f"optionally {list(AUDIO_OPTIONAL_KEYS)}, each a positive integer"
        )
    if audio.get("first_step_samples", 0) > audio["hop_length"]:
        raise FamilyError(f"{source}: audio.first_step_samples is at most hop_length")
    image_keys = ("spatial_compression", "temporal_compression", "pixel_channels")
    pictures = [key for key in image_keys if key in values]
    if pictures:
        raise FamilyError(f"{source}: an audio family has no {pictures}; its latent is [B, C, T]")
