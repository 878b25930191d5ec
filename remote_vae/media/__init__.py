"""Media: what results become and what inputs come as.

- tensors.py: tensors to and from the wire's raw bytes, by dtype name;
- images.py: image files out (JPEG / PNG / WebP, on the device where it can);
- pixels.py, postprocess.py: decoder output to pixels, and pixels to encoder input, as diffusers' processors do;
- video.py: MP4 out, written while the decoder still runs;
- audio.py: WAV and FLAC out.

Image and video files coming in are decoders/ (bounded decoding of untrusted files).
"""

from .audio import AudioFile, with_sound, write_audio
from .images import (
    PNG_COMPRESSION,
    ImageFile,
    JpegEncoder,
    encode_image,
    encode_pixels,
    jpeg_encoder_for,
    save_options,
    stack_vertically,
)
from .pixels import denormalize, uint8_images
from .postprocess import PREPROCESS_PIXELS, Postprocessor, VideoPostprocessor
from .tensors import (
    INPUT_DTYPES,
    TENSOR_DTYPES,
    HostCopy,
    byte_count,
    check_byte_count,
    dtype_name,
    host_copy,
    host_tensor,
    parse_dtype,
    tensor_from_bytes,
    tensor_to_bytes,
)
from .video import FrameRouter, Mp4Options, Mp4Stream, write_mp4

__all__ = [
    "AudioFile",
    "FrameRouter",
    "HostCopy",
    "INPUT_DTYPES",
    "ImageFile",
    "JpegEncoder",
    "Mp4Options",
    "Mp4Stream",
    "PNG_COMPRESSION",
    "PREPROCESS_PIXELS",
    "Postprocessor",
    "TENSOR_DTYPES",
    "VideoPostprocessor",
    "byte_count",
    "check_byte_count",
    "denormalize",
    "dtype_name",
    "encode_image",
    "encode_pixels",
    "host_copy",
    "host_tensor",
    "jpeg_encoder_for",
    "parse_dtype",
    "save_options",
    "stack_vertically",
    "tensor_from_bytes",
    "tensor_to_bytes",
    "uint8_images",
    "with_sound",
    "write_audio",
    "write_mp4",
]
