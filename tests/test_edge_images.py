"""A decompression bomb (a 12 KB PNG claiming 10000 x 10000 pixels) is refused from its header, never decoded,
wherever an image is opened: a counted, listed problem in data validation, a listed skip in predict, and the
shared check the service may call on an upload (issue #23)."""

from __future__ import annotations

import subprocess
import sys
import tracemalloc
import warnings

import pytest
from PIL import Image

from helpers import REFUSAL_MB, load_script, peak_mb
from utils import defaults as D
from utils.cli import run_job
from utils.data.images import ImageError, PixelLimitError, check_image_pixels, image_size, load_rgb, load_rgb_bytes


@pytest.fixture(scope="module")
def bomb(tmp_path_factory):
    """The issue's file: 10000 x 10000 1-bit PNG, about 12 KB on disk, 100 M pixels claimed."""
    path = tmp_path_factory.mktemp("bomb") / "bomb.png"
    Image.new("1", (10_000, 10_000)).save(path, optimize=True)
    assert path.stat().st_size < 100_000 and 10_000 * 10_000 > D.IMAGE_MAX_PIXELS
    return path


def picture(path, size=(96, 64)):
    Image.new("RGB", size, (120, 80, 40)).save(path)
    return path


def test_the_header_check_refuses_a_bomb_from_a_path_bytes_or_an_open_file(bomb):
    tracemalloc.start()
    with pytest.raises(PixelLimitError, match=r"bomb\.png: image too large"):
        check_image_pixels(bomb)
    with pytest.raises(ImageError, match=r"^upload 3: image too large"):
        check_image_pixels(bomb.read_bytes(), name="upload 3")
    with bomb.open("rb") as file:
        file.seek(0)
        with pytest.raises(ImageError, match="image too large"):
            check_image_pixels(file, name="upload")
        assert file.tell() == 0  # left where it was, so the caller can still read it
    assert peak_mb() < REFUSAL_MB  # nothing was decoded


def test_a_lower_limit_is_the_callers_and_the_message_gives_the_size(tmp_path):
    small = picture(tmp_path / "small.png")
    assert check_image_pixels(small) == (96, 64)
    with pytest.raises(ImageError, match=r"small\.png: image too large: 96x64 = 6,144 pixels, over the limit of 1,000"):
        check_image_pixels(small, limit=1000)


def test_a_bomb_over_pillows_own_guard_is_said_with_the_limit_that_applies_not_pillows_text(bomb):
    # Pillow's guard fires in Image.open, before the caller's check: its text quoted 64 M to the service's
    # 413 (--max-image-pixels 25 M) and called the upload a "decompression bomb DOS attack".
    expected = "image too large: 100,000,000 pixels, over the limit of {:,} (not decoded)"
    with warnings.catch_warnings():  # as utils/data/images.py sets it in a job or the service; pytest records them
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(PixelLimitError) as caught:
            check_image_pixels(bomb.read_bytes(), limit=25_000_000, name="upload.png")
        assert str(caught.value) == "upload.png: " + expected.format(25_000_000)
        with pytest.raises(PixelLimitError) as caught:
            load_rgb(bomb)
        assert str(caught.value) == f"{bomb}: " + expected.format(D.IMAGE_MAX_PIXELS)


def test_loading_or_sizing_a_bomb_is_a_one_line_image_error_without_decoding(bomb):
    for load in (load_rgb, image_size, lambda p: load_rgb_bytes(p.read_bytes(), "upload.png")):
        tracemalloc.start()
        with pytest.raises(ImageError, match="image too large") as caught:
            load(bomb)
        assert peak_mb() < REFUSAL_MB and "\n" not in str(caught.value)


def test_pillow_alone_refuses_it_too(root, bomb):
    """Code that opens an image without utils.data.images still meets the project's limit once it is imported
    (in a fresh process: pytest records warnings instead of applying the module's filter)."""
    code = ("import sys; import utils.data.images; from PIL import Image\n"
            "try:\n    Image.open(sys.argv[1]).load()\n"
            "except Image.DecompressionBombWarning:\n    sys.exit(3)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(bomb)], cwd=root, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 3, proc.stderr


def test_validation_counts_and_lists_the_bomb_as_an_unreadable_image(bomb, tmp_path):
    from utils.data.validation import validate_dataset

    folder = tmp_path / "set"
    folder.mkdir()
    picture(folder / "good.png")
    (folder / "bomb.png").write_bytes(bomb.read_bytes())
    for stem in ("good", "bomb"):
        (folder / f"{stem}.xml").write_text(
            "<annotation><size><width>96</width><height>64</height><depth>3</depth></size><object><name>with_mask"
            "</name><bndbox><xmin>10</xmin><ymin>10</ymin><xmax>40</xmax><ymax>40</ymax></bndbox></object>"
            "</annotation>")
    tracemalloc.start()
    report = validate_dataset(folder, folder, workers=0, progress=False).report
    assert peak_mb() < REFUSAL_MB
    listed = [p for p in report["problems"] if p["file"] == "bomb.png"]
    assert [p["kind"] for p in listed] == ["unreadable_image"] and "image too large" in listed[0]["problem"]
    assert report["problem_counts"]["unreadable_image"] == 1 and report["images_usable"] == 1


def test_predict_skips_the_bomb_and_lists_it(root, tiny_model_file, bomb, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    picture(images / "good.png")
    (images / "bomb.png").write_bytes(bomb.read_bytes())
    script = load_script(root, "predict")
    argv = ["--images", str(images), "--model", str(tiny_model_file), "--output-dir", str(tmp_path / "out"),
            "--no-annotated", "--workers", "0", "--device", "cpu"]
    assert run_job(script.main, script.get_args_parser(), argv, job="predict") == 0
    err = capsys.readouterr().err
    assert f"skipped {images / 'bomb.png'}: image too large" in err or "bomb.png: image too large" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("mode", ["F", "I", "I;16"])
def test_high_bit_depth_images_convert_in_bands_not_whole_image_float_copies(tmp_path, mode):
    """A float or 32-bit TIFF (an allowed upload) was scaled through whole-image float64 copies, ~25 bytes a
    pixel past the service's 3-bytes-a-pixel budget; now numpy holds the 1-byte result and one band of rows.
    The scaling is unchanged: 16-bit by 257 rounded, 32-bit and float by the image's own range, truncated."""

    import numpy as np

    from utils.data.images import CONVERT_BAND_PIXELS, _to_rgb

    width, height = 1500, 1400  # 2.1 M pixels: several bands
    ramp = (np.arange(width * height, dtype=np.float64).reshape(height, width) % 65_536) - 1000.0
    if mode == "I;16":
        values = (ramp + 1000.0).astype(np.uint16)
        image = Image.fromarray(values)
        expected = np.clip(np.round(values.astype(np.float64) / 257.0), 0, 255).astype(np.uint8)
    else:
        values = ramp.astype(np.float32 if mode == "F" else np.int32)
        image = Image.fromarray(values)
        low, high = float(values.min()), float(values.max())
        expected = ((values.astype(np.float64) - low) / (high - low) * 255.0).clip(0, 255).astype(np.uint8)
    path = tmp_path / "deep.tif"
    image.save(path)
    loaded = Image.open(path)
    loaded.load()  # decoded outside the measure: Pillow's reading buffers are not the conversion's
    assert loaded.mode == mode
    tracemalloc.start()
    try:
        rgb = _to_rgb(loaded)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert rgb.mode == "RGB" and rgb.size == (width, height)
    got = np.asarray(rgb)[:, :, 0].astype(int)
    assert np.abs(got - expected.astype(int)).max() <= 1  # float32 against float64 arithmetic at a .0 boundary
    # The 1-byte result and one band's three copies (bytes, array, float32), with room to spare; not 25 B/pixel.
    assert peak < width * height + CONVERT_BAND_PIXELS * 16 + 1_000_000, f"{peak:,} bytes traced"
