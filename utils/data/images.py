"""Image loading that copes with what real photo folders contain.

RGBA, LA and palette images (with transparency) are composited on white, 16-bit
and 32-bit greyscale is scaled to 8 bits, CMYK and grey JPEGs become RGB, and the
EXIF orientation is applied so that pixels match what annotators saw. Every
failure is an ImageError naming the file and the problem.

No image is decoded whose header claims more than defaults.IMAGE_MAX_PIXELS pixels
(check_image_pixels): a 12 KB PNG can claim 10000x10000 and take gigabytes to decode.
Pillow's own guard (Image.MAX_IMAGE_PIXELS) is set to the same limit and its
DecompressionBombWarning made an error, so code that opens an image without this module
is refused above it too (Pillow alone only warns up to 179 M pixels).
"""

from __future__ import annotations

import io
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .. import defaults as D
from ..errors import InputError

Image.MAX_IMAGE_PIXELS = D.IMAGE_MAX_PIXELS
warnings.filterwarnings("error", category=Image.DecompressionBombWarning)
TOO_LARGE = (Image.DecompressionBombError, Image.DecompressionBombWarning)  # Pillow's guard, raised by Image.open

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


class ImageError(InputError):
    """An image file that cannot be used; str() names the file and the problem."""

    def __init__(self, file, problem: str):
        self.file = str(file)
        self.problem = problem
        super().__init__(f"{self.file}: {problem}")


def is_image_name(path) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # High bit-depth greyscale: scale to 0..255 by the type's range, not by clipping.
        arr = np.asarray(img)
        if img.mode.startswith("I;16"):
            arr8 = (arr.astype(np.float32) / 257.0).round()
        else:
            arr = arr.astype(np.float64)
            lo, hi = float(arr.min()), float(arr.max())
            arr8 = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        return Image.fromarray(arr8.clip(0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


class PixelLimitError(ImageError):
    """An image whose header claims more pixels than the limit (the service answers it 413, other bad images 422)."""


def check_image_pixels(source, limit: int = D.IMAGE_MAX_PIXELS, name=None) -> tuple[int, int]:
    """(width, height) of the image *source* (a path, an open binary file or bytes) read from its header,
    nothing decoded; PixelLimitError naming *name* (default: the path) when width x height exceeds *limit*,
    ImageError when the header cannot be read.
    An open file is left at the position it was given at."""
    name = name if name is not None else source
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(source)
    start = source.tell() if hasattr(source, "tell") else None
    try:
        with _pillow_errors(name, "read image header"), Image.open(source) as img:
            _check_pixels(img, limit, name)
            return img.size
    finally:
        if start is not None:
            source.seek(start)


def _check_pixels(img: Image.Image, limit: int, name) -> None:
    width, height = img.size
    if width * height > limit:
        raise PixelLimitError(name, f"image too large: {width}x{height} = {width * height:,} pixels, over the "
                                    f"limit of {limit:,} (not decoded)")


def load_rgb(path) -> Image.Image:
    """Decode *path* fully into an 8-bit RGB PIL image with EXIF orientation applied."""
    path = Path(path)
    return _decode(path, path)


def load_rgb_bytes(data: bytes, name: str) -> Image.Image:
    """load_rgb for bytes held in memory (an upload), errors naming *name*; nothing touches the disk."""
    return _decode(io.BytesIO(data), name)


def _decode(source, path) -> Image.Image:
    with _pillow_errors(path, "decode image"), Image.open(source) as img:
        _check_pixels(img, D.IMAGE_MAX_PIXELS, path)  # from the header: a bomb is never decoded
        img.load()  # full decode now, so truncated files fail here and not later
        img = ImageOps.exif_transpose(img)
        return _to_rgb(img)


@contextmanager
def _pillow_errors(name, action: str):
    """What Pillow and the OS raise while reading *name*, as one ImageError line naming it."""
    try:
        yield
    except ImageError:
        raise
    except TOO_LARGE as exc:
        raise PixelLimitError(name, f"image too large: {exc} (not decoded)") from None
    except FileNotFoundError:
        raise ImageError(name, "file does not exist") from None
    except UnidentifiedImageError:
        raise ImageError(name, "not an image file (format not recognised)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        message = str(exc) or exc.__class__.__name__
        if "truncated" in message.lower():
            message = f"truncated image file ({message})"
        raise ImageError(name, f"cannot {action}: {message}") from None


def image_size(path) -> tuple[int, int]:
    """(width, height) as displayed, read from the header only (EXIF rotation applied)."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            _check_pixels(img, D.IMAGE_MAX_PIXELS, path)  # a size the decode would refuse is refused here too
            width, height = img.size
            orientation = img.getexif().get(0x0112, 1)
    except TOO_LARGE as exc:
        raise PixelLimitError(path, f"image too large: {exc} (not decoded)") from None
    except FileNotFoundError:
        raise ImageError(path, "file does not exist") from None
    except UnidentifiedImageError:
        raise ImageError(path, "not an image file (format not recognised)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(path, f"cannot read image header: {exc}") from None
    # Orientations 5-8 swap width and height.
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)
