"""Media in: the image, video and audio files an encode may carry, read within limits set before any pixel or sample
is decoded (images.py, video.py, audio.py, each under deadline.py's CPU deadline).

Decoders are the code a request reaches most directly, so each is allowed in
on purpose and bounded three ways:
- **formats**: PNG, JPEG and WebP images (what diffusers' remote_encode, the
  ComfyUI nodes, browsers and cameras send), decoded by Pillow with every other
  format it knows switched off (TIFF, TGA, PCX, EPS through Ghostscript...);
  MP4/MOV, WebM/MKV and GIF videos, with ffmpeg's demuxer forced from the magic
  number (never probed), so a body cannot make ffmpeg open playlists, URLs or
  other files;
- **size**, from the headers: an image's sides from its header (Pillow reads no
  pixels on open); a video's frame size from its stream header and its frame
  count by demuxing it (`-c copy`: packets are counted, none decoded). Both are
  checked, and the memory they need reserved, before the decode starts;
- **work**: a JPEG may have at most MAX_JPEG_SCANS scans (each progressive scan
  is a pass over the whole image: a 797 KB file of repeated scans took 56 s of
  CPU) and MAX_METADATA_BYTES of APPn/COM segments; and every decode has a CPU
  deadline in proportion to its pixels (`cpu_seconds`), enforced between
  Pillow's reads and by RLIMIT_CPU on ffmpeg.
Frames are decoded by ffmpeg straight into one array: no frame is held twice.
"""

from .audio import AUDIO_TYPES, AudioHeader, audio_format, is_audio_file
from .deadline import (
    DECODE_FLOOR_SECONDS,
    DECODE_SECONDS_PER_PIXEL,
    DEFAULT_DECODE_CPU_SECONDS,
    KILLED,
    DeadlineReader,
    DecodeDeadline,
    decode_cpu_seconds,
    last_line,
    limit_cpu,
    run_into,
    too_slow,
)
from .images import (
    IMAGE_DECODERS,
    IMAGE_MAGIC,
    IMAGE_TYPES,
    MAX_JPEG_SCANS,
    MAX_METADATA_BYTES,
    MAX_PNG_TEXT_BYTES,
    PILLOW_CHILD,
    PROGRESSIVE_FRAMES,
    ImageHeader,
    check_jpeg,
    guard_decompression_bombs,
    is_image_file,
    open_image,
    read_image_header,
)
from .video import (
    PACKETS,
    PROBE_CPU_SECONDS,
    STREAM_SIZE,
    VIDEO_DEMUXERS,
    VIDEO_TYPES,
    VideoFile,
    is_video_file,
    video_demuxer,
)

__all__ = [
    "AUDIO_TYPES",
    "AudioHeader",
    "audio_format",
    "is_audio_file",
    "DECODE_FLOOR_SECONDS",
    "DECODE_SECONDS_PER_PIXEL",
    "DEFAULT_DECODE_CPU_SECONDS",
    "DeadlineReader",
    "DecodeDeadline",
    "IMAGE_DECODERS",
    "IMAGE_MAGIC",
    "IMAGE_TYPES",
    "ImageHeader",
    "KILLED",
    "MAX_JPEG_SCANS",
    "MAX_METADATA_BYTES",
    "MAX_PNG_TEXT_BYTES",
    "PACKETS",
    "PILLOW_CHILD",
    "PROBE_CPU_SECONDS",
    "PROGRESSIVE_FRAMES",
    "STREAM_SIZE",
    "VIDEO_DEMUXERS",
    "VIDEO_TYPES",
    "VideoFile",
    "check_jpeg",
    "decode_cpu_seconds",
    "guard_decompression_bombs",
    "is_image_file",
    "is_video_file",
    "last_line",
    "limit_cpu",
    "open_image",
    "read_image_header",
    "run_into",
    "too_slow",
    "video_demuxer",
]
