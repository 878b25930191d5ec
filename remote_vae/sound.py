"""A video's sound in the same request (LTX-2): the request's second latent (`audio_latents`) checked and decoded by
the service of the family's `sound` family, after the video's model call, and the reply made of both: one MP4 with
the sound as its track, or the video's tensor and the waveforms (a safetensors reply, wire/calls.py).

The video's service holds its sound family's service (`VaeService.sound`, linked once both are loaded,
server/app.py); the sound's job is an ordinary audio decode (audio_service.py), its memory reserved with the video's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from .errors import RequestError
from .families import Family
from .jobs import Checked, DecodeRequest, Job
from .media import with_sound
from .vocabulary import OutputForm


class SoundService(Protocol):
    """What of the sound family's service (an AudioService) a video's sound needs."""

    def check_decode(self, request: DecodeRequest, reply_encoding: str = "binary") -> Checked: ...

    def prepare_decode(self, request: DecodeRequest, checked: Checked | None = None) -> Job: ...

    def run(self, jobs: Sequence[Job]) -> list[Any]: ...


# The forms a decode with sound replies in: an MP4 with its sound track, or the video's tensor and the waveforms
SOUND_FORMS = (OutputForm.MP4, OutputForm.RAW, OutputForm.UINT8, OutputForm.UNIT)


def sound_request(family: Family, sound: SoundService | None, request: DecodeRequest) -> DecodeRequest | None:
    """The decode of a request's sound latent by the sound family's service `sound` (its raw waveforms), or None."""
    if request.sound is None:
        return None
    if sound is None:
        why = (
            f"{family.name} has no sound"
            if family.sound is None
            else f"this server does not serve {family.sound}, which decodes {family.name}'s sound"
        )
        raise RequestError(f"{why}: send the video's latent alone (drop audio_latents)")
    return DecodeRequest(latent=request.sound, form=OutputForm.RAW, scaling=request.scaling)


def check_sound(
    family: Family, sound: SoundService | None, request: DecodeRequest, batch: int, reply_encoding: str
) -> Checked | None:
    """The sound's own checks (its latent, its length against the limits) and what it will hold; None without one."""
    decode = sound_request(family, sound, request)
    if decode is None:
        return None
    if request.form not in SOUND_FORMS:
        raise RequestError(
            "a decode with sound replies as output_type=mp4 (its sound track) or pt (a safetensors body of the video "
            "and audio tensors)"
        )
    checked = sound.check_decode(decode, reply_encoding)
    if checked.plan.batch != batch:
        raise RequestError(f"audio_latents hold {checked.plan.batch} clips' sound, latents {batch} videos")
    return checked


def with_sound_job(family: Family, sound: SoundService | None, job: Job, request: DecodeRequest, frames: int) -> Job:
    """The job with its sound's job, where the request has one: its result becomes an MP4 with the sound track (each
    clip's sound fitted to its `frames` at the request's fps), or the pair (the video's result, the waveforms)."""
    decode = sound_request(family, sound, request)
    if decode is None:
        return job
    job.sound = sound.prepare_decode(decode)
    video, rate = job.finish, job.sound.sampling_rate
    if request.form == OutputForm.MP4:
        seconds = frames / request.mp4.fps
        job.finish = lambda pair: with_sound(video(pair[0]), pair[1], rate, seconds)
    else:
        job.finish = lambda pair: (video(pair[0]), pair[1])
    return job


def sound_of(sound: SoundService | None, job: Job, result: Any) -> Any:
    """A job's result with its sound's waveforms (decoded by the sound family's model after the video's call), or the
    exception either failed with."""
    if job.sound is None or isinstance(result, BaseException):
        return result
    waveforms = sound.run([job.sound])[0]
    return waveforms if isinstance(waveforms, BaseException) else (result, waveforms)
