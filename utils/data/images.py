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

A reader that uses a photo at a bounded size (predict: the model's working size, the annotated
copies' cap) gets it at most at that size (SizeBound, load_photo_hashed, load_photo_span): decoded whole,
as load_rgb decodes it, then reduced by reduced_to, a function of those pixels and the bound alone, which
evaluate applies to the same pixels (utils.detection.inference.model_input_at_size): so one photo is the
same model input in both. Not Pillow's JPEG draft mode, which scales while decoding: its pixels depend
on how the file was decoded, which a decoded image does not record. A photo at or below the bound is
load_rgb's, pixel for pixel.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePath

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .. import defaults as D
from ..errors import InputError

Image.MAX_IMAGE_PIXELS = D.IMAGE_MAX_PIXELS
warnings.filterwarnings("error", category=Image.DecompressionBombWarning)
TOO_LARGE = (Image.DecompressionBombError, Image.DecompressionBombWarning)  # Pillow's guard, raised by Image.open

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
# The formats of those extensions, the only ones Image.open may try: left to itself Pillow tries every plugin,
# and some load the whole image on open (ICO: a 249 KB file holding an 8000x8000 PNG cost 400 MB and 0.8 s before
# its size could be refused). A file of another format (GIF, ICO, text named .jpg) is "not an image file".
# The rule of every path (a folder's or archive's files, a file named, an upload, a VOC pair): a file is a photo
# when its bytes are an image of these formats, whatever its name (.jfif, .jpe, .JPG, none, a PNG named .jpg);
# any other file is skipped with NotAnImageError's reason, the same on each path. A name of IMAGE_EXTENSIONS only
# spares the header read when a folder is listed (not_an_image): the decode says what is wrong with such a file.
IMAGE_FORMATS = ("JPEG", "PNG", "BMP", "TIFF", "WEBP")
# Camera RAW files: Pillow opens those built on TIFF as TIFFs and reads their first picture, the camera's preview or
# thumbnail (a 160x120 one in a NEF), not the photo; beside the camera's JPEG of the same shot, read, it would be
# counted twice. Refused by name on every path (check_image_pixels, _decode), as no image of IMAGE_FORMATS. Every
# maker's: the still formats of GIMP's raw loaders (dcraw's and LibRaw's), with Pentax .ptx, Canon .cr3, GoPro .gpr,
# and TIFF-based ones ExifTool knows that those lists lack: Sony .arq, Olympus .ori, Mamiya .mfw, Kodak .dcs and .drf.
CAMERA_RAW_EXTENSIONS = (".3fr", ".ari", ".arq", ".arw", ".bay", ".cap", ".cr2", ".cr3", ".crw", ".cs1", ".dc2", ".dcr",
                         ".dcs", ".dng", ".drf", ".erf", ".fff", ".gpr", ".ia", ".iiq", ".k25", ".kc2", ".kdc", ".mdc",
                         ".mef", ".mfw", ".mos", ".mrw", ".nef", ".nrw", ".orf", ".ori", ".pef", ".ptx", ".pxn", ".qtk",
                         ".raf", ".raw", ".rdc", ".rw2", ".rwl", ".sr2", ".srf", ".srw", ".sti", ".x3f")
# NewSubfileType (TIFF tag 254) bits of an IFD that is no page of its own: a reduced-resolution copy of a page
# (bit 0: the thumbnail cameras and scanners write after the picture) or a transparency mask (bit 2).
TIFF_NOT_A_PAGE = 0b101


class ImageError(InputError):
    """An image file that cannot be used; str() names the file and the problem."""

    def __init__(self, file, problem: str):
        self.file = str(file)
        self.problem = problem
        super().__init__(f"{self.file}: {problem}")


def is_image_name(path) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def is_annotation_name(path) -> bool:
    """A VOC file's name (.xml): beside the photos by design, never read as one."""
    return str(path).lower().endswith(".xml")


def not_an_image(source, name) -> str | None:
    """The reason every path skips the file *name* when the first bytes of *source* (a path, or an open binary file,
    left where it was) are no image of IMAGE_FORMATS (NotAnImageError's problem); None when they are one, or when
    its header fails otherwise (too large, damaged, unreadable): its decode, which reads it as a photo, says so."""
    try:
        check_image_pixels(source, name=name)
    except NotAnImageError as error:
        return error.problem
    except ImageError:
        pass
    return None


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return Image.fromarray(_high_bit_depth_to_8bit(img), "L").convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


# Rows of a high bit-depth image converted at once hold at most this many pixels: about 3 MB of work
# (Pillow's bytes of the band, numpy's array of them, the float32 copy scaled in place).
CONVERT_BAND_PIXELS = 1 << 18


def _high_bit_depth_to_8bit(img: Image.Image) -> np.ndarray:
    """16-bit, 32-bit integer and float greyscale scaled to 0..255 by the type's range (16-bit) or the image's
    own (I, F), not by clipping, as uint8 rows.

    Converted a band of rows at a time in float32, so beside the decoded image and the 1 byte a pixel of the
    result only one band is held: the whole-image float64 copies it replaced cost about 25 bytes a pixel,
    eight times the 3 bytes a pixel the service budgets for an upload it decodes.
    """
    width, height = img.size
    if img.mode.startswith("I;16"):
        low, scale, rounded = 0.0, 1 / 257.0, True
    else:
        low, high = img.getextrema()  # in C, without a copy
        scale, rounded = (255.0 / (high - low) if high > low else 0.0), False
    result = np.empty((height, width), np.uint8)
    rows = max(1, CONVERT_BAND_PIXELS // max(1, width))
    for top in range(0, height, rows):
        bottom = min(height, top + rows)
        band = np.array(img.crop((0, top, width, bottom)), dtype=np.float32)
        band -= low
        band *= scale
        if rounded:
            np.rint(band, out=band)
        np.clip(band, 0, 255, out=band)
        result[top:bottom] = band  # the cast truncates, as the float images' scaling always did
    return result


class PixelLimitError(ImageError):
    """An image whose header claims more pixels than the limit (the service answers it 413, other bad images 422)."""


class NotAnImageError(ImageError):
    """A file that is no image of IMAGE_FORMATS (the service answers it 415)."""


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
        with _pillow_errors(name, "read image header", limit), Image.open(source, formats=IMAGE_FORMATS) as img:
            _check_not_camera_raw(img, name)
            _check_pixels(img, limit, name)
            return img.size
    finally:
        if start is not None:
            source.seek(start)


def _check_not_camera_raw(img: Image.Image, name) -> None:
    """NotAnImageError naming *name* when it is a camera RAW file that Pillow opened as a TIFF: its picture here
    would be the camera's preview, not the photo. Named so (CAMERA_RAW_EXTENSIONS), or under any other name (a
    .tif, none) when its first picture is a reduced-resolution copy (TIFF_NOT_A_PAGE's bit 0), as a NEF's, DNG's
    or ARW's first is: the photo is elsewhere in the file, where Pillow does not read."""
    if img.format != "TIFF":
        return
    suffix = PurePath(str(name)).suffix.lower()
    if suffix in CAMERA_RAW_EXTENSIONS:
        what = f"a camera RAW file ({suffix})"
    elif img.tag_v2.get(254, 0) & 1:
        what = "a TIFF whose first picture is a reduced-resolution copy, as in a camera RAW file"
    else:
        return
    raise NotAnImageError(name, f"{what}: not read (the TIFF picture in it is the camera's preview, not the "
                                "photo; read the camera's JPEG of it, or a TIFF or PNG developed from it)")


def _check_pixels(img: Image.Image, limit: int, name) -> None:
    width, height = img.size
    if width * height > limit:
        raise PixelLimitError(name, f"image too large: {width}x{height} = {width * height:,} pixels, over the "
                                    f"limit of {limit:,} (not decoded)")


@dataclass(frozen=True)
class SizeBound:
    """The largest size a photo is used at. Each frame (shorter side, longer side) fits a photo in it at the
    scale min(shorter / the photo's shorter side, longer / its longer side): a detector's transform (min_size,
    max_size) resizes each image so, and a cap of N px a side is the frame (N, N). The photo is needed at the
    largest of its frames' scales, never above its own size. A scale does not depend on the photo's
    orientation, so it is the same for the stored pixels and the EXIF-turned ones."""

    frames: tuple[tuple[float, float], ...]

    def scale(self, width: int, height: int) -> float:
        shorter, longer = max(1, min(width, height)), max(1, width, height)
        return min(1.0, max(min(short / shorter, long / longer) for short, long in self.frames))

    def size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) of a *width* x *height* photo at its scale: rounded up (to 6 decimals first: 895.9999
        is 896), so that no side is shorter than a frame scales it to (a thin photo's 1.4 px row is 2 px, which a
        smaller frame then shrinks to 1.1 px as it would the photo's own, not 0.8: too thin)."""
        scale = self.scale(width, height)
        if scale >= 1.0:
            return width, height
        return max(1, math.ceil(round(width * scale, 6))), max(1, math.ceil(round(height * scale, 6)))


@dataclass
class Photo:
    """A decoded photo: *image* (8-bit RGB, EXIF orientation applied), at most at the size a SizeBound allows;
    *size*, the photo's own (width, height) as displayed, which *image* was reduced from (image.size when not);
    *copy*, when asked for, the picture at most at another bound's size (*image* itself when of its size), so
    that *image* does not depend on whether a copy was asked for."""

    image: Image.Image
    size: tuple[int, int]
    copy: Image.Image | None = None


def load_rgb(path) -> Image.Image:
    """Decode *path* fully into an 8-bit RGB PIL image with EXIF orientation applied."""
    path = Path(path)
    return _decode(path, path).image


def load_rgb_hashed(path) -> tuple[Image.Image | None, str | None, ImageError | None]:
    """load_rgb of *path* with the file's sha256 (utils.provenance.file_sha256's value) from one open (the hash
    reads after the decode, from the page cache), so a job that records its inputs' hashes (predict's run record)
    does not read a collection twice: (image, sha256, None), or (None, sha256, the ImageError load_rgb raises)
    for a file that is no usable image, still an input read (sha256 None when it cannot be opened). The header is
    checked on the open file first; the image is decoded from the open file, then the file hashed in blocks: no
    file is held whole."""
    photo, sha256, error = load_photo_hashed(path)
    return (photo.image if photo is not None else None), sha256, error


def load_photo_hashed(path, bound: SizeBound | None = None,
                      copy_bound: SizeBound | None = None) -> tuple[Photo | None, str | None, ImageError | None]:
    """load_rgb_hashed's (photo, sha256, error), the photo decoded whole and reduced to *bound*'s size (reduced_to;
    None: its own), with a copy at most at *copy_bound*'s size when given (Photo)."""
    path = Path(path)
    try:
        with _pillow_errors(path, "decode image"), open(path, "rb") as handle:
            try:
                with _pillow_errors(path, "decode image"), Image.open(handle, formats=IMAGE_FORMATS) as img:
                    _check_pixels(img, D.IMAGE_MAX_PIXELS, path)
                handle.seek(0)
                # from the open file, as load_rgb: never held whole
                image, error = _decode(handle, path, bound, copy_bound), None
            except ImageError as exc:
                image, error = None, exc
            # the bytes the decode just read, again from the page cache, in blocks: read whole with handle.read()
            # to be decoded and hashed, a file held twice its size (a 200 MB one that is a small image with data
            # after it: 419 MB, against 0.07 MB for load_rgb)
            handle.seek(0)
            return image, hashlib.file_digest(handle, "sha256").hexdigest(), error
    except ImageError as exc:
        return None, None, exc


def load_photo_span(path, offset: int, size: int, name: str, bound: SizeBound | None = None,
                    copy_bound: SizeBound | None = None) -> Photo:
    """The photo of the *size* bytes at *offset* in *path* (a member of an uncompressed .tar, read where it lies:
    utils.data.pairs.members_in_place), decoded as load_photo_hashed decodes a file, errors naming *name*. Read
    through tarfile's window on the member, as a file is: the header is checked before the rest is read, and a
    large member that is no image is never held."""
    import tarfile

    with _pillow_errors(name, "decode image"), tarfile.open(path, "r:") as archive:  # reads the first header only
        end = os.fstat(archive.fileobj.fileno()).st_size
        if end < offset + size:  # a short read would pass for a truncated or unknown image
            raise ImageError(name, f"cannot decode image: the archive {Path(path).name} ends at byte {end:,}, "
                                   f"before this member's last byte ({offset + size:,}): it was truncated or "
                                   "changed after it was listed")
        member = tarfile.TarInfo(name)  # a regular file's: its data where the listing found it
        member.offset_data, member.size = offset, size
        return _decode(archive.extractfile(member), name, bound, copy_bound)


def load_rgb_bytes(data: bytes, name: str) -> Image.Image:
    """load_rgb for bytes held in memory (an upload), errors naming *name*; nothing touches the disk."""
    return _decode(io.BytesIO(data), name).image


def _decode(source, path, bound: SizeBound | None = None, copy_bound: SizeBound | None = None) -> Photo:
    with _pillow_errors(path, "decode image"), Image.open(source, formats=IMAGE_FORMATS) as img:
        _check_not_camera_raw(img, path)
        _check_pixels(img, D.IMAGE_MAX_PIXELS, path)  # from the header: a bomb is never decoded
        _check_one_picture(img, path)
        img.load()  # full decode now, so truncated files fail here and not later
        whole = _to_rgb(ImageOps.exif_transpose(img))
    image = reduced_to(whole, bound)
    copy = None
    if copy_bound is not None:
        copy = image if copy_bound.size(*whole.size) == image.size else reduced_to(whole, copy_bound)
    return Photo(image, whole.size, copy)


def _check_one_picture(img: Image.Image, name) -> None:
    """ImageError naming *name* when the file holds several pictures, one of which would be read and the others
    left out unsaid. An MPO (the JPEG that phones and stereo cameras write) is read, as its first picture: by the
    CIPA multi-picture standard that is the photo, and the others are the same shot's depth map, second view or
    preview. The pages of a TIFF and the frames of an animated PNG or WebP are refused with their count: which page
    is the photo is unknown, faces on the pages not read would be missing from the figure without a word, and an
    animation is not a photo (a GIF is not read either; predict_video reads videos). A TIFF's reduced-resolution
    copies and masks (TIFF_NOT_A_PAGE) are no pages: such a TIFF is its first page's photo. Each path decodes
    through here, so each refuses such a file with this reason."""
    frames = getattr(img, "n_frames", 1)
    if frames < 2 or img.format == "MPO":
        return
    if img.format == "TIFF":
        pages = 0
        for frame in range(frames):
            img.seek(frame)
            pages += not img.tag_v2.get(254, 0) & TIFF_NOT_A_PAGE
        img.seek(0)
        if pages > 1:
            raise ImageError(name, f"a TIFF of {pages} pages: which one is the photo is unknown, and one read alone "
                                   "would leave the faces of the others uncounted; save each page as its own file")
        return
    raise ImageError(name, f"an animation of {frames} frames ({img.format}), not a photo: save the frame to read as "
                           "its own file (bin/predict_video.py reads videos)")


def reduced_to(image: Image.Image, bound: SizeBound | None) -> Image.Image:
    """*image* (8-bit RGB) at *bound*'s size for it (SizeBound.size; None: its own), or *image* itself when of that
    size. Antialiased: Lanczos, the sharpest of Pillow's filters, for the smallest faces. A function of the pixels
    and the bound alone (no state of the decode), so that predict's decode workers and evaluate, given the same
    photo, make the same model input of it."""
    size = image.size if bound is None else bound.size(*image.size)
    return image if size == image.size else image.resize(size, Image.Resampling.LANCZOS)


@contextmanager
def _pillow_errors(name, action: str, limit: int = D.IMAGE_MAX_PIXELS):
    """What Pillow and the OS raise while reading *name*, as one ImageError line naming it."""
    try:
        yield
    except ImageError:
        raise
    except TOO_LARGE as exc:
        # Pillow's own guard (at Image.MAX_IMAGE_PIXELS) fires in Image.open, before the caller's check: said as
        # that check says it, with the limit that applies, not Pillow's text ("could be decompression bomb DOS attack")
        # and its 64 M limit where the caller's (the service's --max-image-pixels) is lower.
        claimed = re.search(r"\((\d+) pixels\)", str(exc))
        pixels = f"{int(claimed[1]):,} pixels, over" if claimed else "over"
        raise PixelLimitError(name, f"image too large: {pixels} the limit of "
                                    f"{min(limit, Image.MAX_IMAGE_PIXELS):,} (not decoded)") from None
    except FileNotFoundError:
        raise ImageError(name, "file does not exist") from None
    except UnidentifiedImageError:
        raise NotAnImageError(name, "not an image file (format not recognised; read here: "
                                    f"{', '.join(IMAGE_FORMATS)})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        message = str(exc) or exc.__class__.__name__
        if "truncated" in message.lower():
            message = f"truncated image file ({message})"
        raise ImageError(name, f"cannot {action}: {message}") from None


def stored_size_and_orientation(path) -> tuple[tuple[int, int], int]:
    """((width, height) as stored, before the EXIF orientation turns it; the EXIF orientation, 1 when none),
    read from the header only."""
    path = Path(path)
    with _pillow_errors(path, "read image header"), Image.open(path, formats=IMAGE_FORMATS) as img:
        orientation = img.getexif().get(0x0112, 1)
        return img.size, orientation if orientation in range(1, 9) else 1


def file_encoding(path) -> str | None:
    """The file's encoding, Pillow's format name ("JPEG", "MPO", "PNG", ...), read from the header only."""
    path = Path(path)
    with _pillow_errors(path, "read image header"), Image.open(path, formats=IMAGE_FORMATS) as img:
        return img.format


def image_size(path) -> tuple[int, int]:
    """(width, height) as displayed, read from the header only (EXIF rotation applied)."""
    path = Path(path)
    with _pillow_errors(path, "read image header"), Image.open(path, formats=IMAGE_FORMATS) as img:
        _check_pixels(img, D.IMAGE_MAX_PIXELS, path)  # a size the decode would refuse is refused here too
        width, height = img.size
        orientation = img.getexif().get(0x0112, 1)
    # Orientations 5-8 swap width and height.
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def escaped_name(name) -> str:
    """*name* (a path or str) printable and encodable whatever bytes it was read from: bytes that are not
    UTF-8 (kept by Python as surrogates) shown as \\xNN, e.g. 'caf\\xe9.jpg'."""
    return os.fsencode(str(name)).decode("utf-8", "backslashreplace")


def valid_utf8_name(name) -> bool:
    """Whether *name* (a path or str read from the disk) is valid UTF-8, as JSON, CSV and tar members need."""
    try:
        str(name).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


NOT_UTF8 = "the name is not valid UTF-8"


@dataclass(frozen=True)
class ListedFile:
    """A file found by list_files: the path to read, and its path below the folder listed (posix)."""

    path: Path
    relative: str


def list_files(root, prefix: str = "", exclude=(), seen: dict | None = None) -> tuple[list[ListedFile], list[dict]]:
    """Every regular file below the folder *root*, subfolders included, in path order; and what was left out,
    [{file, reason}] with *file* named *prefix* + its path below *root*.

    Symbolic links are followed, to files and to folders; a link back to a folder the walk is inside (a
    loop) is left out with its reason, as are links to nothing, names that are not valid UTF-8, anything
    that is not a file or folder, and the paths in *exclude* (a run's own outputs). A file already listed
    (the same file once its links are resolved), here or in an earlier call given the same *seen*
    ({resolved path: name}), is left out as a duplicate. Hidden names (a leading dot: editor swap files,
    macOS metadata) are not inputs and are not listed.
    """
    root = Path(root)
    excluded = {Path(path).resolve() for path in exclude}
    seen = {} if seen is None else seen
    files, skipped = [], []

    def skip(relative: str, reason: str) -> None:
        skipped.append({"file": escaped_name(f"{prefix}{relative}"), "reason": reason})

    def walk(folder: Path, relative: str, inside: frozenset) -> None:
        try:
            entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
        except OSError as error:
            skip(relative.rstrip("/") or ".", f"cannot list the folder ({error.strerror or error})")
            return
        for entry in entries:
            name = f"{relative}{entry.name}"
            if entry.name.startswith("."):
                continue
            if not valid_utf8_name(entry.name):
                skip(name, NOT_UTF8)
                continue
            path = Path(entry.path)
            try:
                real = path.resolve(strict=True)
            except (OSError, RuntimeError):  # RuntimeError: a loop of links (Python before 3.13)
                target = os.readlink(path) if entry.is_symlink() else "?"
                skip(name, f"a symbolic link to nothing (its target {escaped_name(target)} does not exist)")
                continue
            if real in excluded:
                skip(name, "an output of this run, not an input")
            elif real.is_dir():
                if real in inside:
                    skip(name, f"a symbolic link to a folder it is inside ({escaped_name(real)}): a loop, not followed")
                else:
                    walk(path, f"{name}/", inside | {real})
            elif real.is_file():
                if real in seen:
                    skip(name, f"the same file as {seen[real]} (listed once)")
                else:
                    seen[real] = escaped_name(f"{prefix}{name}")
                    files.append(ListedFile(path, name))
            else:
                skip(name, "not a regular file")

    walk(root, "", frozenset({root.resolve()}))
    return files, skipped
