"""Normalising: the factors or per-channel statistics a pipeline scales its latents by, the family's own
(`own_normalisation`) or a request's (`Scaling`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import RequestError
from ..families import Family

if TYPE_CHECKING:  # torch is imported where it is used: `remote-vae families` describes layouts without it
    import torch


@dataclass(frozen=True)
class ScalarFactors:
    """Images and HunyuanVideo: one scaling factor and an optional shift (docs/protocol.md §5)."""

    scaling_factor: float | None = None
    shift_factor: float | None = None

    def unscale(self, latents: torch.Tensor) -> torch.Tensor:
        """Before decode: z / scaling_factor + shift_factor."""
        if self.scaling_factor is not None:
            latents = latents / self.scaling_factor
        if self.shift_factor is not None:
            latents = latents + self.shift_factor
        return latents

    def scale(self, latents: torch.Tensor) -> torch.Tensor:
        """After encode: (z - shift_factor) * scaling_factor."""
        if self.shift_factor is not None:
            latents = latents - self.shift_factor
        if self.scaling_factor is not None:
            latents = latents * self.scaling_factor
        return latents


@dataclass(frozen=True)
class ChannelStats:
    """Wan: latents normalised per channel, z_norm = (z - mean) / std.

    The arithmetic is the Wan pipelines' own (divide by 1/std, multiply by
    1/std), so results match them bit for bit rather than to rounding.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def _stats(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        view = (1, len(self.mean)) + (1,) * (latents.ndim - 2)
        mean = torch.tensor(self.mean).view(view).to(latents.device, latents.dtype)
        inverse_std = (1.0 / torch.tensor(self.std)).view(view).to(latents.device, latents.dtype)
        return mean, inverse_std

    def unscale(self, latents: torch.Tensor) -> torch.Tensor:
        mean, inverse_std = self._stats(latents)
        return latents / inverse_std + mean

    def scale(self, latents: torch.Tensor) -> torch.Tensor:
        mean, inverse_std = self._stats(latents)
        return (latents - mean) * inverse_std


@dataclass(frozen=True, eq=False)
class WeightStats:
    """Flux.2 and LTX: per-channel statistics read from the VAE's weights, z_norm = (z - mean) * scaling_factor / std;
    Cosmos 1.0: statistics per channel and latent frame ([C, F] here), from its config, with its scheduler's
    sigma_data as the scaling factor.

    `std` is computed as the pipeline computes it (Flux.2: sqrt(running_var + eps) in
    the model's dtype); the arithmetic is the pipelines' own.
    """

    mean: torch.Tensor
    std: torch.Tensor
    scaling_factor: float = 1.0

    @property
    def frames(self) -> int | None:
        """The latent frames statistics per frame cover, or None for others."""
        return self.mean.shape[1] if self.mean.ndim == 2 else None

    def _stats(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mean.ndim == 1:
            view = (1, -1) + (1,) * (latents.ndim - 2)
            mean, std = self.mean.view(view), self.std.view(view)
        elif self.frames is None:  # shaped as one sample's latent axes already (LTX-2's audio: [C, 1, bins])
            mean, std = self.mean[None], self.std[None]
        else:  # a clip's first latent frames take the first frames' statistics, as the pipeline slices them
            check_frames_covered(self, latents.shape[2])
            view = (1, *self.mean.shape, 1, 1)
            mean, std = (stats.view(view)[:, :, : latents.shape[2]] for stats in (self.mean, self.std))
        return mean.to(latents.device, latents.dtype), std.to(latents.device, latents.dtype)

    def unscale(self, latents: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(latents)
        return latents * std / self.scaling_factor + mean

    def scale(self, latents: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(latents)
        return (latents - mean) * self.scaling_factor / std


Normalisation = ScalarFactors | ChannelStats | WeightStats


def check_frames_covered(normalisation: Normalisation, latent_frames: int) -> None:
    """Statistics per latent frame normalise at most as many frames as they have (the pipeline's own view of them
    fails past that): a 400 that says so, before anything runs."""
    covered = getattr(normalisation, "frames", None)
    if covered is not None and latent_frames > covered:
        raise RequestError(
            f"this family's latent statistics cover {covered} latent frames; the latent has {latent_frames}. Send at "
            "most that many, or latents already denormalised (do_scaling=false, no scaling_factor)"
        )


def own_normalisation(family: Family, weight_stats: tuple[torch.Tensor, torch.Tensor] | None = None) -> Normalisation:
    """The family's own latent normalisation, what do_scaling=True asks for (`weight_stats`: (mean, std) read from the
    model)."""
    factor = family.scaling_factor if family.scaling_factor is not None else 1.0  # a WeightStats' divisor
    if family.latents_stats_in_weights is not None:
        if weight_stats is None:
            raise ValueError(f"{family.name} normalises with statistics from its weights; none were given")
        if family.audio is not None and family.audio.latent_bins:
            # LTX-2's audio statistics are per feature of its packed tokens [B, T, C * bins], channel-major
            shape = (family.latent_channels, 1, family.audio.latent_bins)
            return WeightStats(*(stats.reshape(shape) for stats in weight_stats), factor)
        return WeightStats(*weight_stats, factor)
    if family.latents_stats_frames is not None:
        import torch

        shape = (family.latent_channels, family.latents_stats_frames)
        mean, std = (torch.tensor(stats).view(shape) for stats in (family.latents_mean, family.latents_std))
        return WeightStats(mean, std, factor)
    if family.latents_mean is not None:
        return ChannelStats(family.latents_mean, family.latents_std)
    return ScalarFactors(family.scaling_factor, family.shift_factor)


@dataclass(frozen=True)
class Scaling:
    """What the client asked for: explicit factors and/or the deprecated do_scaling switch."""

    scaling_factor: float | None = None
    shift_factor: float | None = None
    do_scaling: bool | None = None

    def normalisation(self, own: Normalisation) -> Normalisation:
        """What to undo before decoding (and apply after encoding), given the family's `own` normalisation."""
        # Explicit factors win; do_scaling=True alone means "this family's own normalisation";
        # anything else means the latent is already scaled (ComfyUI sends do_scaling=False).
        if self.scaling_factor is not None or self.shift_factor is not None:
            return ScalarFactors(self.scaling_factor, self.shift_factor)
        if self.do_scaling:
            return own
        return ScalarFactors()
