"""Model families as data: one JSON file in configs/ per family.

Adding a VAE is adding a file; nothing in the request path branches on a
family's name. A family says where its weights live, which diffusers class
builds it, its latent layout and scaling, and the full diffusers model config
(`architecture`) so the model can be built with random weights and no download.

Video families add `temporal_compression` (latent frames T decode to
`temporal_compression * (T - 1) + 1` frames). Families normalised per channel
(Wan) give `latents_mean` / `latents_std` instead of a scalar scaling factor; with `latents_stats_frames`, those
hold statistics per channel and latent frame (Cosmos 1.0), with a `scaling_factor` (its scheduler's sigma_data).
`tile_above_pixels` switches the model's own tiled decoding on for frames
larger than that many pixels, with `tiling_options` passed to `enable_tiling`.
`min_diffusers` is the oldest diffusers release with the model class and every
feature of it the config uses: an older one makes the family unavailable, by
name, while the server's other families serve.
`streams_frames` says that the model's untiled decode calls its decoder once
per latent frame, in order, and each call returns finished frames (Wan's
causal decoder): the service then writes an MP4 while later frames decode.

What each family's pipeline does between its denoiser and `vae.decode` is data too:
  latent_layout         how the pipeline holds the latent (latents.LatentLayout):
                        `patch` (Flux.2 folds 2x2 cells into channels), `frames_first`
                        (CogVideoX's [B, T, C, h, w]), `frame_axis` (Qwen-Image decodes
                        images as one-frame videos), `packing` (its token sequence:
                        "patches" as Flux.1, "tokens" as Flux.2 and LTX, or "none");
  latents_stats_in_weights  per-channel statistics the pipeline reads from the VAE's
                        weights rather than its config (Flux.2's batch norm, LTX's
                        latents_mean / latents_std buffers), with `scaling_factor`;
  model_latents         "normalised" for preview decoders (taesd) that read and write
                        the full family's normalised latents themselves;
  decode_timestep       the keyword of `decode` that takes a decode timestep (LTX), which
                        the pipeline passes with noise mixed into the latent;
  samples_per_call      a model that must see one sample at a time (HunyuanVideo 1.5:
                        its attention mask breaks on batches);
  (an audio family's `latent_layout` may say `frames_first`: ACE-Step holds its latent [B, T, C])
  latent_frames_odd     a video model whose latent frame count must be odd (CogVideoX:
                        an even count decodes to 4T frames, and its pipelines never make one);
  frames_as_batch       a video model that takes a clip's frames as a batch of images and the frame count
                        (SVD: `decode(z, num_frames)`; temporal_compression 1).
`pipelines` and `hub_repos` name the diffusers pipelines that use this VAE as it is and the repos that ship it (a
client finds the family from either; docs/families.md). `comfyui` says how ComfyUI holds its LATENT: "latents": "raw"
(the default) or "normalised" (Flux.2's, LTX's), and "decode": the parameters its decode implies (LTX: timestep 0.05,
noise 0.025); our ComfyUI nodes send what GET /families says.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import FamilyError  # noqa: F401  (raised here; callers import it from families)
from .family_checks import check_values
from .vocabulary import PIXEL_MODES, ModelLatents, Operation, Packing

if TYPE_CHECKING:  # torch is imported where it is used: `remote-vae families` describes layouts without it
    import torch

_PACKAGE = Path(__file__).resolve().parent
# Installed, the configs are the package's own remote_vae/configs/ (see pyproject.toml); in a clone, configs/ beside it.
CONFIG_DIR = _PACKAGE / "configs" if (_PACKAGE / "configs").is_dir() else _PACKAGE.parent / "configs"


@dataclass(frozen=True)
class AudioSpec:
    """An audio family's sound, as its VAE's config says it (a test holds the two equal)."""

    sampling_rate: int  # samples per second, per channel
    channels: int  # audio channels (2: stereo)
    hop_length: int  # samples per latent step: the VAE's downsampling
    # Samples the first latent step decodes to, where a causal decoder makes fewer of it (LTX-2: one mel frame, 240)
    first_step_samples: int | None = None
    # The latent's fourth axis, where it has one: [B, C, T, bins] (LTX-2's 16 latent mel bins); None: [B, C, T]
    latent_bins: int | None = None

    def samples_for(self, latent_steps: int) -> int:
        first = self.hop_length if self.first_step_samples is None else self.first_step_samples
        return first + (latent_steps - 1) * self.hop_length if latent_steps else 0


@dataclass(frozen=True)
class Family:
    name: str
    hub_repo: str
    model_class: str
    architecture: dict[str, Any]
    latent_channels: int
    spatial_compression: int = 1  # pixels per latent cell along a side; audio families have none
    scaling_factor: float | None = None
    shift_factor: float | None = None
    hub_subfolder: str | None = None
    compute_dtype: dict[str, str] = field(default_factory=lambda: {"cuda": "float16", "cpu": "float32"})
    operations: tuple[Operation, ...] = tuple(Operation)
    description: str = ""
    temporal_compression: int | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    # Statistics per channel and latent frame (Cosmos 1.0's, 16 frames): latents_mean / latents_std hold C x F values,
    # channel-major, and scaling_factor divides as in WeightStats
    latents_stats_frames: int | None = None
    tile_above_pixels: int | None = None
    tiling_options: dict[str, Any] = field(default_factory=dict)
    streams_frames: bool = False
    latent_layout: dict[str, Any] = field(default_factory=dict)
    latents_stats_in_weights: dict[str, str] | None = None
    model_latents: ModelLatents = ModelLatents.RAW
    decode_timestep: str | None = None
    samples_per_call: int | None = None
    latent_frames_odd: bool = False
    # The VAE takes a clip's frames as a batch of images [B*F, C, h, w], its decode the frame count (SVD's temporal
    # decoder, `decode(z, num_frames)`), and compresses no frames
    frames_as_batch: bool = False
    # False: every latent frame decodes to temporal_compression frames, the first too (Allegro: 4T frames)
    first_frame_alone: bool = True
    # The model's decode returns frames first, [B, F, C, H, W] (Allegro's tiled decode)
    decoded_frames_first: bool = False
    # The model decodes only in its own tiles (Allegro: the untiled path raises): {"frames": T, "side": config key},
    # a tile's latent frames and the model config's key for its side in pixels; a latent smaller than a tile is refused
    tiled_only: dict[str, Any] | None = None
    # The tiling a call uses when it tiles and the request names none ("exact" where the model has it)
    default_tiling: str = "exact"
    min_diffusers: str | None = None  # the oldest diffusers release that builds this family's model as configured
    comfyui: dict[str, Any] = field(default_factory=dict)
    # The diffusers pipelines whose VAE (weights and normalisation) this is, and Hub repos beside hub_repo that ship it
    pipelines: tuple[str, ...] = ()
    hub_repos: tuple[str, ...] = ()
    # An audio family's sound: its latent is [B, C, T], each step `hop_length` samples of every channel
    audio: AudioSpec | None = None
    # Channels of the pixels the VAE reads and writes: 3 (RGB), or 4 (RGBA: Qwen-Image 2.1, whose pipeline returns RGBA
    # images and encodes its inputs as RGBA)
    pixel_channels: int = 3
    # What the pipeline's output_type="latent" returns: "normalised" (most: the pipeline denormalises before its
    # decode), or "denormalised" (LTX-2: already the VAE's own latent, so a client sends it with no scaling)
    pipeline_latents: str = "normalised"
    # The fewest latent cells a side the decoder takes (LTX-2's pads by reflection, which needs 2): smaller is a 400
    min_latent_side: int = 1
    # The audio family whose model decodes this family's sound, in the same request (LTX-2's video: ltx2audio)
    sound: str | None = None
    # A model the VAE's decoded output runs through before it is the waveform (LTX-2's vocoder: mel -> samples):
    # {"model_class", "module" (where diffusers keeps it), "hub_subfolder" (beside the VAE's), "architecture"}
    vocoder: dict[str, Any] | None = None
    # `latent_layout` parsed, once, when the family is made.
    layout: LatentLayout = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "layout", LatentLayout.of(self))

    @property
    def hub_id(self) -> str:
        """Where the weights are on the Hub: org/name[/subfolder]."""
        return f"{self.hub_repo}/{self.hub_subfolder}" if self.hub_subfolder else self.hub_repo

    @property
    def is_video(self) -> bool:
        return self.temporal_compression is not None

    @property
    def is_audio(self) -> bool:
        return self.audio is not None

    @property
    def pixel_mode(self) -> str:
        """Pillow's mode of the family's images: "RGB", or "RGBA" for a four-channel VAE."""
        return PIXEL_MODES[self.pixel_channels]

    @property
    def kind(self) -> str:
        """What the family decodes to: "image", "video" or "audio"."""
        return "audio" if self.is_audio else "video" if self.is_video else "image"

    @property
    def frame_step(self) -> int:
        """A video has k * frame_step + 1 frames: the temporal compression, twice it where latent frames are odd."""
        return (self.temporal_compression or 1) * (2 if self.latent_frames_odd else 1)

    def frames_for(self, latent_frames: int) -> int:
        """Decoded frames for T latent frames: the first latent frame is one frame, each further one is several (or,
        without `first_frame_alone`, each is several)."""
        if not self.first_frame_alone:
            return self.temporal_compression * latent_frames
        return self.temporal_compression * (latent_frames - 1) + 1

    def dtype_for(self, device_type: str) -> str:
        """The compute dtype this family runs in on a device type ('cuda', 'cpu', ...)."""
        return self.compute_dtype.get(device_type, self.compute_dtype.get("cpu", "float32"))

    def serves(self, operation: str) -> bool:
        return operation in self.operations

    @property
    def per_channel(self) -> bool:
        """Normalised per channel (statistics in the config or in the weights), not by scalar factors."""
        return self.latents_mean is not None or self.latents_stats_in_weights is not None

    @property
    def encode_step(self) -> int:
        """Both sides of an image or frame to encode must be multiples of this: the compression, times any patch the
        pipeline folds."""
        return self.spatial_compression * self.layout.patch

    def client_scaling(self) -> dict[str, Any]:
        """The scaling arguments a client passes to diffusers' remote_decode / remote_encode for this family."""
        if self.pipeline_latents == "denormalised":  # the pipeline's latent is the VAE's own already
            return {"do_scaling": False}
        if self.per_channel:  # the server holds the statistics
            return {"do_scaling": True}
        factors = {"scaling_factor": self.scaling_factor, "shift_factor": self.shift_factor}
        return {name: value for name, value in factors.items() if value is not None}

    def comfyui_parameters(self) -> dict[str, dict[str, Any]]:
        """How ComfyUI holds this family's LATENT, and the query parameters a ComfyUI node sends with one."""
        normalised = self.comfyui.get("latents") == "normalised"
        scaling = self.client_scaling() if normalised else {"do_scaling": False}
        return {
            "latent_channels": self.layout.pipeline_channels if normalised else self.latent_channels,
            "spatial_compression": self.encode_step if normalised else self.spatial_compression,
            # an encode's latent comes back as the pipeline holds it, [B, T, C, h, w]; ComfyUI's is [B, C, T, h, w]
            "frames_first": self.layout.frames_first,
            # an encode's reply is the pipeline's pair of frames in channels; ComfyUI holds the VAE's own, the second
            "paired_frames": self.layout.paired_frames,
            "frame_step": self.frame_step,
            "decode": {**scaling, **self.comfyui.get("decode", {})},
            "encode": scaling,
        }


def _family_from_dict(data: dict[str, Any], source: str) -> Family:
    """A family from its config's keys, each checked; FamilyError naming the file, the key and what was expected."""
    required = ("name", "hub_repo", "model_class", "architecture", "latent_channels")
    required += () if "audio" in data else ("spatial_compression",)
    missing = [key for key in required if key not in data]
    if missing:
        raise FamilyError(f"{source}: missing keys {missing}")
    known = {field.name for field in fields(Family) if field.init}
    unknown = sorted(set(data) - known)
    if unknown:
        raise FamilyError(f"{source}: unknown keys {unknown}; known keys are {sorted(known)}")
    values = dict(data)
    check_values(values, source)
    if values.get("audio") is not None:
        values["audio"] = AudioSpec(**values["audio"])
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
            raise FamilyError(
                f"unknown family {name_or_path!r}; known families: {', '.join(available())} (or pass a config file "
                "path)"
            )
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
    if len(exact) > 1:  # one class and latent for several families (Stable Audio's Oobleck, ACE-Step's): its config
        exact = [family for family in exact if _same_architecture(family, config)] or exact
    if len(exact) == 1 or (not exact and len(candidates) == 1):
        return (exact or candidates)[0]
    names = [family.name for family in (exact or candidates)]
    raise FamilyError(
        f"cannot tell the family of a {config.get('_class_name')} with {channels} latent channels "
        f"(candidates: {names or 'none'}); set REMOTE_VAE_FAMILIES"
    )


def _same_architecture(family: Family, config: dict[str, Any]) -> bool:
    """Whether a model config gives the family's architecture (its rates, strides, widths), where it names them."""

    def plain(value: Any) -> Any:
        return list(value) if isinstance(value, (list, tuple)) else value

    return all(
        plain(config.get(key, value)) == plain(value)
        for key, value in family.architecture.items()
        if not key.startswith("_")
    )


def config_latent_channels(config: dict[str, Any]) -> int | None:
    """Latent channels from a diffusers model config (Wan calls them z_dim; Oobleck decoder_input_channels, SAME
    latent_dim)."""
    for key in ("latent_channels", "z_dim", "decoder_input_channels", "latent_dim"):
        if key in config:
            return config[key]
    return None


@dataclass(frozen=True)
class LatentLayout:
    """How a family's pipeline holds its latent, relative to what its VAE takes (the config's `latent_layout`)."""

    channels: int  # the VAE's latent channels
    compression: int  # pixels per latent cell along a side
    video: bool
    patch: int = 1  # the pipeline folds patch x patch cells into channels (Flux.2)
    frames_first: bool = False  # the pipeline's video latent is [B, T, C, h, w] (CogVideoX)
    frame_axis: bool = False  # the VAE takes images as one-frame videos [B, C, 1, h, w] (Qwen-Image)
    # The pipeline holds its one-frame latent as two frames folded into channels, the first a copy it drops before
    # decoding (HunyuanImage 2.1's refiner: _reorder_image_tokens / _restore_image_tokens_order): [B, 2C, 1, h, w]
    paired_frames: bool = False
    packing: Packing = Packing.NONE  # the pipeline's token sequence
    audio: bool = False  # [B, C, T]: channels, then latent steps in time
    audio_bins: int | None = None  # [B, C, T, bins]: and the latent's bins (LTX-2's mel bins)

    @classmethod
    def of(cls, family: Family) -> LatentLayout:
        packing = family.latent_layout.get("packing", "patches" if family.kind == "image" else "none")
        return cls(
            family.latent_channels,
            family.spatial_compression,
            family.is_video,
            **{**family.latent_layout, "packing": Packing(packing)},
            audio=family.is_audio,
            audio_bins=family.audio.latent_bins if family.audio else None,
        )

    @property
    def pipeline_channels(self) -> int:
        return self.channels * self.patch**2 * (2 if self.paired_frames else 1)

    def describe(self) -> str:
        """The accepted latent forms, for error messages."""
        c = self.pipeline_channels
        if self.audio:
            bins = f", {self.audio_bins}" if self.audio_bins else ""
            held = f"[B, T, {c}] (as the pipeline holds it) or " if self.frames_first else ""
            return f"{held}[B, {c}, T{bins}] (T latent steps)"
        if self.video:
            forms = [
                f"[B, T, {c}, h, w] (as the pipeline holds it) or [B, {c}, T, h, w]"
                if self.frames_first
                else f"[B, {c}, T, h, w]"
            ]
            if self.packing == Packing.TOKENS:
                forms.append(f"packed [B, T*h*w, {c}] with height and width")
            return " or ".join(forms)
        forms = [f"[B, {c}, 1, h, w] or [B, {c}, h, w]" if self.frame_axis else f"[B, {c}, h, w]"]
        if self.paired_frames:
            forms.append(f"the VAE's own [B, {self.channels}, (1,) h, w]")
        if self.patch > 1:
            forms.append(f"the VAE's own [B, {self.channels}, {self.patch}h, {self.patch}w]")
        if self.packing == Packing.PATCHES:
            forms.append(f"packed [B, seq, {c * 4}] with height and width")
        elif self.packing == Packing.TOKENS:
            forms.append(f"packed [B, h*w, {c}] with height and width")
        return " or ".join(forms)

    def fold(self, latents: torch.Tensor) -> torch.Tensor:
        """The VAE's [B, C, h, w] -> canonical [B, C*p*p, h/p, w/p] (Flux2Pipeline._patchify_latents); paired frames:
        the VAE's [B, C, (1,) h, w] -> [B, 2C, 1, h, w], its frame repeated (_reorder_image_tokens)."""
        if self.paired_frames:
            import torch

            frame = latents.unsqueeze(2) if latents.ndim == 4 else latents
            pair = torch.cat((frame[:, :, :1], frame), dim=2)
            b, c, f, h, w = pair.shape
            return pair.permute(0, 2, 1, 3, 4).reshape(b, f // 2, c * 2, h, w).permute(0, 2, 1, 3, 4).contiguous()
        if self.patch == 1:
            return latents
        p, (b, c, h, w) = self.patch, latents.shape
        return latents.view(b, c, h // p, p, w // p, p).permute(0, 1, 3, 5, 2, 4).reshape(b, c * p * p, h // p, w // p)

    def unfold(self, latents: torch.Tensor) -> torch.Tensor:
        """Canonical -> the VAE's latent (Flux2Pipeline._unpatchify_latents; paired frames: the second of the two,
        _restore_image_tokens_order)."""
        if self.paired_frames:
            b, c, f, h, w = latents.shape
            pairs = latents.permute(0, 2, 1, 3, 4).reshape(b, f * 2, c // 2, h, w).permute(0, 2, 1, 3, 4)
            return pairs[:, :, 1:]
        if self.patch == 1:
            return latents
        p, (b, c, h, w) = self.patch, latents.shape
        return (
            latents.reshape(b, c // (p * p), p, p, h, w)
            .permute(0, 1, 4, 2, 5, 3)
            .reshape(b, c // (p * p), h * p, w * p)
        )

    def as_pipeline_holds(self, latents: torch.Tensor) -> torch.Tensor:
        """Canonical -> the layout the pipeline holds (an encode's reply): frames or latent steps first, where it holds
        them so."""
        return latents.transpose(1, 2).contiguous() if self.frames_first else latents
