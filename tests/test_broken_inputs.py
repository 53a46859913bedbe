"""The broken-input set: each bad file gets a clear message naming it, and nothing is dropped unreported.

All inputs are made here from PIL pictures and hand-written XML.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageDraw

from utils.data.validation import format_summary, validate_dataset, write_clean_outputs
from utils.data.voc import parse_voc

W, H = 128, 96
GOOD = [("with_mask", (10, 10, 40, 40))]


def picture(seed: int, size=(W, H)) -> Image.Image:
    """Random filled shapes: distinct seeds are far apart in perceptual hash."""
    rng = np.random.default_rng(seed)
    colour = lambda: tuple(int(v) for v in rng.integers(0, 256, 3))  # noqa: E731
    image = Image.new("RGB", size, colour())
    draw = ImageDraw.Draw(image)
    for _ in range(10):
        x0, y0 = rng.uniform(0, size[0]), rng.uniform(0, size[1])
        box = [x0, y0, x0 + rng.uniform(10, size[0] / 2), y0 + rng.uniform(10, size[1] / 2)]
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour())
    return image


def voc_xml(objects, width=W, height=H, filename="x.jpg") -> str:
    body = "".join(
        f"<object><name>{name}</name><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin>"
        f"<xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>" for name, (x0, y0, x1, y1) in objects)
    return (f"<annotation><filename>{filename}</filename><size><width>{width}</width>"
            f"<height>{height}</height><depth>3</depth></size>{body}</annotation>")


def build_broken_set(root):
    """Write the broken-input set; returns the number of objects in each XML file."""
    images, annotations = root / "images", root / "annotations"
    images.mkdir(parents=True)
    annotations.mkdir(parents=True)
    objects_in = {}

    def xml(stem, objects=GOOD, width=W, height=H, text=None):
        (annotations / f"{stem}.xml").write_text(text if text is not None else voc_xml(objects, width, height))
        objects_in[f"{stem}.xml"] = len(objects)

    seed = iter(range(1000))
    picture(next(seed)).save(images / "good.jpg")
    xml("good")
    # Truncated JPEG: the header is fine (size readable), decoding fails.
    buffer = io.BytesIO()
    picture(next(seed)).save(buffer, "JPEG", quality=95)
    (images / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    xml("truncated")
    # PNG with alpha: usable (composited on white).
    rgba = picture(next(seed)).convert("RGBA")
    rgba.putalpha(Image.new("L", (W, H), 128))
    rgba.save(images / "alpha.png")
    xml("alpha")
    # 16-bit greyscale PNG: usable.
    grey16 = (np.asarray(picture(next(seed)).convert("L"), dtype=np.uint16) * 257)
    Image.fromarray(grey16).save(images / "grey16.png")
    assert Image.open(images / "grey16.png").mode.startswith("I")
    xml("grey16")
    # A text file named .png.
    (images / "text.png").write_text("this is not a picture\n")
    xml("text")
    # Grey (L) JPEG: usable.
    picture(next(seed)).convert("L").save(images / "grey.jpg")
    xml("grey")
    # EXIF-rotated JPEG: stored 96x128 with orientation 6 (rotate 90), displayed 128x96 as annotated.
    rotated = picture(next(seed), size=(H, W))
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated.save(images / "exif_rotated.jpg", exif=exif)
    xml("exif_rotated", objects=[("with_mask", (80, 50, 120, 90))])
    # Unknown label next to a known one: the unknown object is dropped, the image stays.
    picture(next(seed)).save(images / "unknown_label.jpg")
    xml("unknown_label", objects=GOOD + [("mask_on_chin", (50, 50, 70, 70))])
    # Only unknown labels: nothing left, image excluded.
    picture(next(seed)).save(images / "only_unknown.jpg")
    xml("only_unknown", objects=[("person", (50, 50, 70, 70))])
    # XML that is not well-formed; XML lacking <size> (the image's size stands in, reported).
    picture(next(seed)).save(images / "malformed.jpg")
    xml("malformed", text="<annotation><size><width>128</width><height>96</height></size><object>")
    picture(next(seed)).save(images / "no_size.jpg")
    xml("no_size", text=voc_xml(GOOD).replace(f"<size><width>{W}</width><height>{H}</height><depth>3</depth></size>",
                                              ""))
    # Box far outside the image (dropped) next to a good one.
    picture(next(seed)).save(images / "outside.jpg")
    xml("outside", objects=GOOD + [("without_mask", (100, 60, 160, 140))])
    # Box overshooting by <= 2 px: clipped and kept.
    picture(next(seed)).save(images / "overshoot.jpg")
    xml("overshoot", objects=[("mask_weared_incorrect", (-1.5, 20, 30, 97.5))])
    # Zero-area box next to a good one.
    picture(next(seed)).save(images / "zero_area.jpg")
    xml("zero_area", objects=GOOD + [("with_mask", (30, 30, 30, 60))])
    # XML with no objects at all.
    picture(next(seed)).save(images / "empty_xml.jpg")
    xml("empty_xml", objects=[])
    # Wrong <size> in the XML: reported, the real size is used.
    picture(next(seed)).save(images / "wrong_size.jpg")
    xml("wrong_size", width=640, height=480)
    # Image without XML, XML without image.
    picture(next(seed)).save(images / "no_xml.jpg")
    xml("no_image")
    # Exact duplicate of good.jpg, and a near duplicate (resized re-encode) of good.jpg.
    (images / "good_copy.jpg").write_bytes((images / "good.jpg").read_bytes())
    xml("good_copy")
    Image.open(images / "good.jpg").resize((W - 12, H - 9)).save(images / "good_near.jpg", quality=85)
    xml("good_near", width=W - 12, height=H - 9)
    # Two images sharing one stem.
    picture(next(seed)).save(images / "twin.jpg")
    picture(next(seed)).save(images / "twin.png")
    xml("twin")
    return objects_in


EXPECTED = {
    # file: (kind, excluded, words the message must contain)
    "truncated.jpg": ("unreadable_image", True, "truncated"),
    "text.png": ("unreadable_image", True, "not an image"),
    "unknown_label.xml": ("unknown_class", False, "mask_on_chin"),
    "only_unknown.xml": ("unknown_class", False, "person"),
    "only_unknown.jpg": ("no_objects", True, "dropped"),
    "malformed.xml": ("bad_annotation", True, "not well-formed"),
    "no_size.xml": ("size_missing", False, "no <size> in the XML: no_size.jpg's own"),
    "outside.xml": ("box_out_of_bounds", False, "outside"),
    "overshoot.xml": ("box_clipped", False, "clipped"),
    "zero_area.xml": ("zero_area_box", False, "zero or negative area"),
    "empty_xml.jpg": ("no_objects", True, "no objects"),
    "wrong_size.xml": ("size_mismatch", False, "640x480"),
    "no_xml.jpg": ("missing_annotation", True, "no_xml.xml"),
    "no_image.xml": ("missing_image", True, "no_image"),
    "good_copy.jpg": ("exact_duplicate", True, "good.jpg"),
    "good_near.jpg": ("near_duplicate", True, "good.jpg"),
    "twin.png": ("ambiguous_name", True, "twin.jpg"),
}
USABLE = {"good.jpg", "alpha.png", "grey16.png", "grey.jpg", "exif_rotated.jpg", "unknown_label.jpg",
          "outside.jpg", "overshoot.jpg", "zero_area.jpg", "wrong_size.jpg", "no_size.jpg", "twin.jpg"}


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    root = tmp_path_factory.mktemp("broken")
    objects_in = build_broken_set(root)
    result = validate_dataset(root / "images", root / "annotations", progress=False)
    return root, objects_in, result


def test_each_broken_file_has_a_clear_message(broken):
    _, _, result = broken
    problems = result.report["problems"]
    for file, (kind, excluded, words) in EXPECTED.items():
        matching = [p for p in problems if p["file"] == file and p["kind"] == kind]
        assert matching, f"{file}: expected a {kind} problem, got {[p for p in problems if p['file'] == file]}"
        assert matching[0]["excluded"] is excluded
        assert words in matching[0]["problem"], matching[0]
    # Usable odd formats raise no problem at all.
    for file in ("alpha.png", "grey16.png", "grey.jpg", "exif_rotated.jpg", "good.jpg"):
        assert not [p for p in problems if p["file"] in (file, file.rsplit(".", 1)[0] + ".xml")], file


def test_usable_set_and_nothing_dropped_unreported(broken):
    root, objects_in, result = broken
    report = result.report
    assert {p.image.name for p in result.clean_pairs} == USABLE
    assert report["images_total"] == len(list((root / "images").iterdir()))
    assert report["images_total"] == report["images_usable"] + len(report["images_excluded"])
    excluded_images = {p["image"] for p in report["problems"] if p["excluded"]}
    assert set(report["images_excluded"]) == excluded_images - {None}
    assert {p["file"] for p in report["problems"] if p["image"] is None} == {"no_image.xml"}
    bad_xml = next(p for p in report["problems"] if p["file"] == "malformed.xml")
    assert bad_xml["image"] == "malformed.jpg" and "malformed.jpg" in report["images_excluded"]
    # Every object of a usable image is kept or has a problem saying it was dropped.
    for pair in result.clean_pairs:
        dropped = [p for p in report["problems"] if p["file"] == pair.annotation.name
                   and p["kind"] in ("unknown_class", "box_out_of_bounds", "zero_area_box")]
        kept = result.annotations[pair.image.name].objects
        assert len(kept) + len(dropped) == objects_in[pair.annotation.name], pair
    assert report["objects_dropped"] == 4 and report["objects_clipped"] == 1
    assert result.duplicate_groups == [["good.jpg", "good_copy.jpg", "good_near.jpg"]]
    assert sum(report["problem_counts"].values()) == len(report["problems"])


def test_clean_annotations_hold_clipped_boxes_and_real_sizes(broken, tmp_path):
    _, _, result = broken
    outputs = write_clean_outputs(result, tmp_path)
    overshoot = parse_voc(outputs["annotations_clean"] / "overshoot.xml")
    assert [o.box for o in overshoot.objects] == [(0, 20, 30, 96)]
    wrong_size = parse_voc(outputs["annotations_clean"] / "wrong_size.xml")
    assert (wrong_size.width, wrong_size.height) == (W, H)
    assert [o.name for o in parse_voc(outputs["annotations_clean"] / "unknown_label.xml").objects] == ["with_mask"]
    assert sorted(p.name for p in outputs["annotations_clean"].iterdir()) == sorted(
        name.rsplit(".", 1)[0] + ".xml" for name in USABLE)
    summary = format_summary(result.report)
    assert f"{len(USABLE)} usable" in summary and "unreadable_image=2" in summary


def run_cli(root, *args):
    return subprocess.run([sys.executable, str(root / "bin" / "validate_data.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def test_cli_on_broken_set_succeeds_and_reports(broken, root, tmp_path):
    data, _, _ = broken
    proc = run_cli(root, "--images", data / "images", "--annotations", data / "annotations", "--output-dir", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"{len(USABLE)} usable" in proc.stdout and "missing_image=1" in proc.stdout
    report = json.loads((tmp_path / "validation_report.json").read_text())
    assert {p["file"] for p in report["problems"]} >= set(EXPECTED)


@pytest.mark.parametrize("case", ["empty folders", "missing folder", "only broken files"])
def test_cli_fails_clearly_without_usable_images(case, root, tmp_path):
    images, annotations = tmp_path / "images", tmp_path / "annotations"
    if case != "missing folder":
        images.mkdir()
        annotations.mkdir()
    if case == "only broken files":
        (images / "a.png").write_text("text")
        (annotations / "a.xml").write_text(voc_xml(GOOD))
        (annotations / "b.xml").write_text("<annotation>")
    proc = run_cli(root, "--images", images, "--annotations", annotations, "--output-dir", tmp_path / "out")
    assert proc.returncode == 2
    line = proc.stderr.strip()
    assert "\n" not in line and "Traceback" not in line
    expected = {"empty folders": f"{images}: no images found",
                "missing folder": f"{images}: does not exist (expected a folder or a .tar archive)",
                "only broken files": "none of the 1 images is usable"}[case]
    assert expected in line


def test_of_two_images_sharing_a_stem_the_one_the_xml_names_keeps_it(tmp_path):
    """twin.jpg and twin.png with a twin.xml drawn on twin.png: validation and preprocess kept the first by name,
    twin.jpg, with twin.png's boxes (of the same size: nothing said it), and called twin.png the ambiguous one."""
    from utils.data.preprocess import preprocess_set

    images, annotations = tmp_path / "images", tmp_path / "annotations"
    images.mkdir()
    annotations.mkdir()
    picture(1).save(images / "twin.jpg")
    picture(2).save(images / "twin.png")
    (annotations / "twin.xml").write_text(voc_xml(GOOD, filename="twin.png"))
    result = validate_dataset(images, annotations, progress=False)
    assert [p.image.name for p in result.clean_pairs] == ["twin.png"]
    assert [(p["file"], p["kind"]) for p in result.report["problems"]] == [("twin.jpg", "ambiguous_name")]
    report = preprocess_set(images, annotations, "val_", output_dir=tmp_path / "out", progress=False)
    assert [s["file"] for s in report["skipped"]] == ["twin.jpg"]
    assert (tmp_path / "out" / "val_twin.png").read_bytes() == (images / "twin.png").read_bytes()
