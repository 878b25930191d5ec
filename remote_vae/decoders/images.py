"""Image files in: PNG, JPEG and WebP through Pillow, their sides from the header, JPEG scans and metadata counted
before the decode, progressive JPEGs decoded in a child process under the CPU deadline."""

from __future__ import annotations

import logging
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.PngImagePlugin

from ..errors import RequestError
from .deadline import (
    DEFAULT_DECODE_CPU_SECONDS,
    KILLED,
    DeadlineReader,
    DecodeDeadline,
    decode_cpu_seconds,
    last_line,
    run_into,
    too_slow,
)

log = logging.getLogger("remote_vae")

# Magic numbers of the image files an encode request may carry (GIF and BMP too, to be told apart and refused by name).
IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM")
IMAGE_DECODERS = ("PNG", "JPEG", "WEBP")
IMAGE_TYPES = "a PNG, JPEG or WebP file"

MAX_JPEG_SCANS = 100  # libjpeg's own progressive scripts use 10; optimised encoders rarely pass 20
MAX_METADATA_BYTES = 16 << 20  # EXIF, ICC profiles, XMP, comments: Pillow keeps them all in memory
# PNG text and compressed ICC chunks, which Pillow inflates and keeps (its defaults allow 64 MB); none is needed here.
MAX_PNG_TEXT_BYTES = 1 << 20


def guard_decompression_bombs(max_pixels: int) -> None:
    """Pillow's own guards, process-wide: it refuses (DecompressionBombError) images over twice this size on open, and
    PNG text beyond a small bound. open_image checks each image against the request's limit as well."""
    PIL.Image.MAX_IMAGE_PIXELS = max_pixels
    PIL.PngImagePlugin.MAX_TEXT_CHUNK = MAX_PNG_TEXT_BYTES
    PIL.PngImagePlugin.MAX_TEXT_MEMORY = MAX_PNG_TEXT_BYTES


def is_image_file(data: bytes) -> bool:
    return data.startswith(IMAGE_MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


# -- images ------------------------------------------------------------------------


PROGRESSIVE_FRAMES = (0xC2, 0xC6, 0xCA, 0xCE)  # SOFn markers of progressive JPEGs


def check_jpeg(data: bytes) -> bool:
    """Walk a JPEG's markers (no decoding): at most MAX_JPEG_SCANS scans and MAX_METADATA_BYTES of metadata.
    Whether it is progressive."""
    scans = metadata = 0
    progressive = False
    position, end = 2, len(data)
    while position + 4 <= end:
        if data[position] != 0xFF:
            return progressive  # not where a marker should be: Pillow says what is wrong
        while position < end and data[position] == 0xFF:  # fill bytes
            position += 1
        if position >= end:
            return progressive
        marker = data[position]
        position += 1
        if marker == 0xD9:  # end of image
            return progressive
        progressive = progressive or marker in PROGRESSIVE_FRAMES
        if 0xD0 <= marker <= 0xD7 or marker in (0x01, 0x00):  # no length
            continue
        length = int.from_bytes(data[position : position + 2], "big")
        if 0xE0 <= marker <= 0xEF or marker == 0xFE:
            metadata += length
            if metadata > MAX_METADATA_BYTES:
                raise RequestError(
                    f"the JPEG carries more than {MAX_METADATA_BYTES >> 20} MiB of metadata (APPn and COM "
                    "segments); strip it (e.g. save the image again without EXIF)",
                    status=413,
                )
        position += length
        # Start of scan: entropy-coded data follows, up to the next marker that is not 0xFF00 or RSTn
        if marker == 0xDA:
            scans += 1
            if scans > MAX_JPEG_SCANS:
                raise RequestError(
                    f"the JPEG has more than {MAX_JPEG_SCANS} scans, each a pass over the whole image; "
                    "expected a baseline or ordinary progressive JPEG (libjpeg writes 10 scans)",
                    status=413,
                )
            while True:
                position = data.find(b"\xff", position)
                if position < 0 or position + 1 >= end:
                    return progressive
                following = data[position + 1]
                if following != 0 and not 0xD0 <= following <= 0xD7:
                    break
                position += 2
    return progressive


# A progressive JPEG is decoded by Pillow in a child process: libjpeg does the work of all its scans in one call after
# the last byte is read, which no check in this process can interrupt; RLIMIT_CPU ends the child. The same Pillow, so
# the same pixels; 50-80 ms to start. Every other format decodes as it reads, and is checked between reads here.
PILLOW_CHILD = (
    "import sys, PIL.Image as I; I.MAX_IMAGE_PIXELS = None; "
    "sys.stdout.buffer.write(I.open(sys.argv[1], formats=['JPEG']).convert(sys.argv[2]).tobytes())"
)


@dataclass
class ImageHeader:
    """An image file opened, its size read from its header, not a pixel decoded."""

    image: PIL.Image.Image
    reader: DeadlineReader | None  # None: an image handed over decoded already (handler.py)
    width: int
    height: int
    progressive_jpeg: bytes | None = None  # the file, when it is a progressive JPEG

    def pixels(self, cap: float = DEFAULT_DECODE_CPU_SECONDS, mode: str = "RGB") -> np.ndarray:
        """uint8 [H, W, 3] RGB (or [H, W, 4] for mode "RGBA", as Qwen-Image 2.1's pipeline converts its inputs),
        decoded within its CPU deadline."""
        seconds = decode_cpu_seconds(self.width * self.height, cap)
        if self.progressive_jpeg is not None:
            self.image.close()
            return self._pixels_in_child(seconds, mode)
        if self.reader is not None:
            self.reader.start(seconds)
        self.image.decodermaxblock = 16384  # a check every 16 KB of input
        try:
            self.image.load()
            converted = self.image if self.image.mode == mode else self.image.convert(mode)
            pixels = np.asarray(converted)  # Pillow holds 4 bytes a pixel; this is a packed copy of 3 (or 4)
            self.image.close()  # frees Pillow's copy now, not when the request ends
            return pixels
        except DecodeDeadline:
            raise too_slow("image", seconds) from None
        except (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError) as exc:
            raise RequestError(f"image data is corrupt or truncated ({exc}); expected {IMAGE_TYPES}, complete") from exc
        finally:
            if self.reader is not None:
                self.reader.deadline = None

    def _pixels_in_child(self, seconds: float, mode: str) -> np.ndarray:
        out = np.empty((self.height, self.width, len(mode)), dtype=np.uint8)
        with tempfile.TemporaryDirectory(prefix="remote-vae-") as folder:
            path = Path(folder) / "image.jpg"
            path.write_bytes(self.progressive_jpeg)
            filled, returncode, errors = run_into(out, [sys.executable, "-c", PILLOW_CHILD, str(path), mode], seconds)
        if returncode in KILLED:
            raise too_slow("image", seconds)
        if returncode != 0 or filled != out.nbytes:
            raise RequestError(
                f"image data is corrupt or truncated ({last_line(errors)}); expected {IMAGE_TYPES}, complete"
            )
        return out


def read_image_header(data: bytes, max_pixels: int) -> ImageHeader:
    """Open an image file and check its size and structure, refusing it before any pixel is decoded."""
    progressive = data[:3] == b"\xff\xd8\xff" and check_jpeg(data)
    reader = DeadlineReader(data)
    try:
        image = PIL.Image.open(reader, formats=IMAGE_DECODERS)
    except PIL.Image.DecompressionBombError as exc:
        raise RequestError(f"image is too large: {exc}", status=413) from exc
    except (PIL.UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise RequestError(f"body is not a readable image ({exc}); expected {IMAGE_TYPES}") from exc
    width, height = image.size
    if width * height > max_pixels:
        raise RequestError(
            f"image is {width}x{height} = {width * height} pixels; this server accepts at most {max_pixels}", status=413
        )
    return ImageHeader(image, reader, width, height, data if progressive else None)


def open_image(data: bytes, max_pixels: int) -> PIL.Image.Image:
    """An RGB image from file bytes, refusing oversized or over-complex files before decoding their pixels."""
    return PIL.Image.fromarray(read_image_header(data, max_pixels).pixels())


# -- videos ------------------------------------------------------------------------
