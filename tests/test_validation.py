"""validate_dataset and bin/validate_data.py on small synthetic pairs built with PIL."""

from __future__ import annotations

import csv
import os
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageEnhance

from utils.data.pairs import pack_folder, read_pairs_csv
from utils.data.validation import PROBLEM_KINDS, ValidationInputError, validate_dataset, write_clean_outputs
from utils.data.voc import parse_voc


def textured(seed: int, size=(128, 96)) -> Image.Image:
    """A random picture of filled shapes: distinct seeds give far-apart perceptual hashes
    (>= 18 of 64 bits), while resizing or re-encoding one moves its hash by a few bits."""
    rng = np.random.default_rng(seed)
    colour = lambda: tuple(int(v) for v in rng.integers(0, 256, 3))  # noqa: E731
    image = Image.new("RGB", size, colour())
    draw = ImageDraw.Draw(image)
    width, height = size
    for _ in range(10):
        x0, y0 = rng.uniform(0, width), rng.uniform(0, height)
        box = [x0, y0, x0 + rng.uniform(10, width / 2), y0 + rng.uniform(10, height / 2)]
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour())
    return image


def voc_xml(objects, width=128, height=96, filename="a.jpg") -> str:
    body = "".join(
        f"<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated><difficult>0</difficult>"
        f"<bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
        for name, (x0, y0, x1, y1) in objects)
    return (f"<annotation><folder>images</folder><filename>{filename}</filename><size><width>{width}</width>"
            f"<height>{height}</height><depth>3</depth></size>{body}</annotation>")


GOOD_OBJECTS = [("with_mask", (10, 10, 40, 40)), ("without_mask", (60, 20, 90, 60))]


def add_pair(root, stem, image, objects=GOOD_OBJECTS, xml_size=None, suffix=".jpg"):
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    image.save(root / "images" / f"{stem}{suffix}")
    width, height = xml_size or image.size
    (root / "annotations" / f"{stem}.xml").write_text(voc_xml(objects, width, height, f"{stem}{suffix}"))


def run_cli(root, *args):
    return subprocess.run([sys.executable, str(root / "bin" / "validate_data.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def check_nothing_unreported(report):
    """Every image is usable or excluded, and every excluded image has an excluding problem naming it."""
    assert report["images_total"] == report["images_usable"] + len(report["images_excluded"])
    excluded_images = {p["image"] for p in report["problems"] if p["excluded"]}
    assert set(report["images_excluded"]) == excluded_images - {None}
    assert sum(report["problem_counts"].values()) == len(report["problems"])


def test_clean_dataset_is_fully_usable_and_copied(tmp_path):
    for k in range(5):
        add_pair(tmp_path, f"img{k}", textured(k))
    result = validate_dataset(tmp_path / "images", tmp_path / "annotations", progress=False)
    report = result.report
    assert report["images_total"] == report["images_usable"] == 5
    assert report["problems"] == [] and report["duplicate_groups"] == []
    assert report["objects_per_class"] == {"with_mask": 5, "without_mask": 5, "mask_weared_incorrect": 0}
    outputs = write_clean_outputs(result, tmp_path / "out")
    pairs = read_pairs_csv(outputs["manifest"])
    assert [p.image.name for p in pairs] == [f"img{k}.jpg" for k in range(5)]
    for pair in pairs:
        # Unchanged annotations are copied byte for byte into annotations_clean/.
        assert pair.annotation.parent == outputs["annotations_clean"]
        assert pair.annotation.read_bytes() == (tmp_path / "annotations" / pair.annotation.name).read_bytes()
        assert pair.image.exists()


def test_clipped_box_and_size_mismatch_are_fixed_in_clean_annotation(tmp_path):
    add_pair(tmp_path, "clip", textured(1), objects=[("with_mask", (100, 50, 129.5, 97))])
    add_pair(tmp_path, "size", textured(2), xml_size=(256, 192))
    add_pair(tmp_path, "fine", textured(3))
    result = validate_dataset(tmp_path / "images", tmp_path / "annotations", progress=False)
    kinds = {(p["file"], p["kind"]) for p in result.report["problems"]}
    assert kinds == {("clip.xml", "box_clipped"), ("size.xml", "size_mismatch")}
    assert result.report["images_usable"] == 3 and result.changed == {"clip.jpg", "size.jpg"}
    size_problem = next(p for p in result.report["problems"] if p["kind"] == "size_mismatch")
    assert "256x192" in size_problem["problem"] and "128x96" in size_problem["problem"]
    outputs = write_clean_outputs(result, tmp_path / "out")
    assert [p.annotation for p in outputs["pairs"]] == [outputs["annotations_clean"] / f"{s}.xml"
                                                        for s in ("clip", "fine", "size")]
    clip = parse_voc(outputs["annotations_clean"] / "clip.xml")
    assert clip.objects[0].box == (100, 50, 128, 96)
    size = parse_voc(outputs["annotations_clean"] / "size.xml")
    assert (size.width, size.height) == (128, 96)
    # A second run replaces the folder as a whole: no stale files from the first run.
    (tmp_path / "images" / "fine.jpg").unlink()
    (tmp_path / "annotations" / "fine.xml").unlink()
    outputs = write_clean_outputs(validate_dataset(tmp_path / "images", tmp_path / "annotations"), tmp_path / "out")
    assert sorted(p.name for p in outputs["annotations_clean"].iterdir()) == ["clip.xml", "size.xml"]


def test_an_annotation_without_size_takes_the_images_size_counted_and_listed_as_a_wrong_one_is(tmp_path):
    # VOC's <size> is often missing in real sets; the image's own size stands in for it, as for a wrong one.
    # It excluded the image ("missing required field <size>") where a wrong <size> only took the real one.
    from utils.data.voc import parse_voc_for_image

    add_pair(tmp_path, "nosize", textured(4))
    add_pair(tmp_path, "fine", textured(5))
    xml = tmp_path / "annotations" / "nosize.xml"
    xml.write_text(xml.read_text().replace("<size><width>128</width><height>96</height><depth>3</depth></size>", ""))
    assert parse_voc(xml).width is None and len(parse_voc(xml).objects) == 2
    ann, turned = parse_voc_for_image(xml, tmp_path / "images" / "nosize.jpg", (128, 96))  # training's reading
    assert ann.width is None and turned is None
    result = validate_dataset(tmp_path / "images", tmp_path / "annotations", progress=False)
    assert result.report["images_usable"] == 2 and result.changed == {"nosize.jpg"}
    assert result.report["problem_counts"]["size_missing"] == 1 and not PROBLEM_KINDS["size_missing"]
    (listed,) = result.report["problems"]
    assert (listed["file"], listed["kind"]) == ("nosize.xml", "size_missing")
    assert listed["problem"] == "no <size> in the XML: nosize.jpg's own 128x96 is used"
    outputs = write_clean_outputs(result, tmp_path / "out")
    clean = parse_voc(outputs["annotations_clean"] / "nosize.xml")
    assert (clean.width, clean.height) == (128, 96) and len(clean.objects) == 2


def test_exact_and_near_duplicates_keep_one_per_group(tmp_path):
    base = textured(10, size=(160, 120))
    add_pair(tmp_path, "a_original", base)
    add_pair(tmp_path, "b_copy", base, objects=GOOD_OBJECTS[:1])  # same bytes, fewer objects
    (tmp_path / "images" / "b_copy.jpg").write_bytes((tmp_path / "images" / "a_original.jpg").read_bytes())
    brighter = ImageEnhance.Brightness(base).enhance(1.08).resize((150, 112))
    add_pair(tmp_path, "c_near", brighter, objects=GOOD_OBJECTS + [("with_mask", (100, 70, 120, 100))])
    add_pair(tmp_path, "d_other", textured(11, size=(160, 120)))
    result = validate_dataset(tmp_path / "images", tmp_path / "annotations", progress=False)
    report = result.report
    # The member with the most objects is kept.
    assert result.duplicate_groups == [["c_near.jpg", "a_original.jpg", "b_copy.jpg"]]
    assert [p.image.name for p in result.clean_pairs] == ["c_near.jpg", "d_other.jpg"]
    by_file = {p["file"]: p for p in report["problems"]}
    assert by_file["a_original.jpg"]["kind"] == "near_duplicate"
    assert "c_near.jpg" in by_file["a_original.jpg"]["problem"]
    assert by_file["b_copy.jpg"]["kind"] == "near_duplicate"  # identical to a, near to the kept c
    check_nothing_unreported(report)

    exact_only = validate_dataset(tmp_path / "images", tmp_path / "annotations", near_duplicate_distance=-1)
    assert exact_only.duplicate_groups == [["a_original.jpg", "b_copy.jpg"]]
    assert {p["file"]: p["kind"] for p in exact_only.report["problems"]} == {"b_copy.jpg": "exact_duplicate"}
    assert "a_original.jpg" in exact_only.report["problems"][0]["problem"]


def test_images_and_annotations_in_one_folder(tmp_path):
    for k in range(3):
        add_pair(tmp_path, f"p{k}", textured(20 + k))
    flat = tmp_path / "flat"
    flat.mkdir()
    for path in list((tmp_path / "images").iterdir()) + list((tmp_path / "annotations").iterdir()):
        path.rename(flat / path.name)
    result = validate_dataset(flat, flat)
    assert result.report["images_total"] == result.report["images_usable"] == 3
    assert result.report["annotations_total"] == 3


def test_missing_folder_is_an_input_error(tmp_path):
    with pytest.raises(ValidationInputError, match="does not exist"):
        validate_dataset(tmp_path / "nope", tmp_path)


def test_report_counts_every_kind(tmp_path):
    add_pair(tmp_path, "x", textured(5))
    report = validate_dataset(tmp_path / "images", tmp_path / "annotations").report
    assert set(report["problem_counts"]) == set(PROBLEM_KINDS)
    for key in ("images_total", "images_usable", "problems", "duplicate_groups", "objects_per_class"):
        assert key in report


def test_cli_writes_report_manifest_and_run_record(tmp_path, root):
    for k in range(4):
        add_pair(tmp_path / "data", f"img{k}", textured(30 + k))
    out = tmp_path / "out"
    proc = run_cli(root, "--images", tmp_path / "data/images", "--annotations", tmp_path / "data/annotations",
                   "--output-dir", out)
    assert proc.returncode == 0, proc.stderr
    assert "4 total, 4 usable" in proc.stdout and "problems: none" in proc.stdout
    report = json.loads((out / "validation_report.json").read_text())
    assert report["images_usable"] == 4
    with open(out / "clean_manifest.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["annotation"] for r in rows] == [f"annotations_clean/img{k}.xml" for k in range(4)]
    record = json.loads((out / "validate_run.json").read_text())
    assert record["job"] == "validate_data" and record["num_inputs"] == 8 and record["inputs_sha256"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_the_run_record_hashes_the_images_from_the_read_that_checked_them(tmp_path, root, monkeypatch):
    # The run record read every image once more to hash it, after validation had hashed its bytes.
    from helpers import run_script
    from utils import provenance

    for k in range(3):
        add_pair(tmp_path / "data", f"img{k}", textured(40 + k))
    hashed, file_sha256 = [], provenance.file_sha256
    monkeypatch.setattr(provenance, "file_sha256", lambda path, *args: hashed.append(os.path.splitext(path)[1])
                        or file_sha256(path, *args))
    assert run_script(root, "validate_data", ["--images", tmp_path / "data/images", "--annotations",
                                              tmp_path / "data/annotations", "--output-dir", tmp_path / "out"]) == 0
    assert hashed == [".xml"] * 3
    monkeypatch.undo()
    inputs = [*(tmp_path / "data/images").iterdir(), *(tmp_path / "data/annotations").iterdir()]
    record = json.loads((tmp_path / "out" / "validate_run.json").read_text())
    assert record["inputs_sha256"] == provenance.inputs_sha256(inputs)


def test_validation_decodes_the_bytes_it_hashed_instead_of_reading_each_image_again(tmp_path, monkeypatch):
    # Each image was read whole to hash it, then again to decode it (and its header once more for its EXIF).
    from helpers import count_opens

    for k in range(3):
        add_pair(tmp_path / "data", f"img{k}", textured(50 + k))
    images = sorted(str(path) for path in (tmp_path / "data/images").iterdir())
    opens = count_opens(monkeypatch, tmp_path / "data/images")
    result = validate_dataset(tmp_path / "data/images", tmp_path / "data/annotations", workers=1, progress=False)
    assert {image: opens.get(image, 0) for image in images} == dict.fromkeys(images, 2)  # the bytes, the header
    assert result.report["images_usable"] == 3


def test_validation_holds_no_file_whole_to_hash_and_decode_it(tmp_path):
    # _inspect_image read each file whole (read_bytes) to hash and decode it: a 24 MB file named .jpg that is no
    # image (a video, a disk image) held 24 MB a validation thread. Now load_rgb_hashed: the header first, the
    # file hashed in blocks; an image decoded from the open file.
    import hashlib
    import tracemalloc

    for k in range(2):
        add_pair(tmp_path / "data", f"img{k}", textured(50 + k))
    big = tmp_path / "data/images/img1.jpg"
    big.write_bytes(b"\0" * (24 << 20))
    tracemalloc.start()
    result = validate_dataset(tmp_path / "data/images", tmp_path / "data/annotations", workers=1, progress=False)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 8 << 20, f"{peak:,} bytes held"
    assert result.report["images_usable"] == 1
    assert result.images_sha256[big] == hashlib.sha256(big.read_bytes()).hexdigest()  # the run record's


def test_cli_accepts_a_tar_holding_both_images_and_annotations(tmp_path, root):
    flat = tmp_path / "flat"
    for k in range(3):
        add_pair(tmp_path / "data", f"t{k}", textured(40 + k))
    flat.mkdir()
    for path in (tmp_path / "data").rglob("*.*"):
        (flat / path.name).write_bytes(path.read_bytes())
    archive = pack_folder(flat, tmp_path / "set.tar")
    out = tmp_path / "out"
    proc = run_cli(root, "--images", archive, "--annotations", archive, "--output-dir", out,
                   "--clean-annotations-tar", out / "annotations_clean.tar")
    assert proc.returncode == 0, proc.stderr
    pairs = read_pairs_csv(out / "clean_manifest.csv", images_dir=flat)
    assert all(p.image.exists() and p.annotation.exists() for p in pairs) and len(pairs) == 3
    assert (out / "annotations_clean.tar").stat().st_size > 0


def test_cli_fails_with_one_line_reason_when_nothing_is_usable(tmp_path, root):
    add_pair(tmp_path, "only", textured(50), objects=[("dog", (1, 1, 20, 20))])
    proc = run_cli(root, "--images", tmp_path / "images", "--annotations", tmp_path / "annotations",
                   "--output-dir", tmp_path / "out")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "none of the 1 images is usable" in proc.stderr
    report = json.loads((tmp_path / "out" / "validation_report.json").read_text())
    assert {p["kind"] for p in report["problems"]} == {"unknown_class", "no_objects"}


def test_sample_data_is_fully_usable(sample_dir):
    """The built-in sample must pass validation: no false duplicates among its generated images."""
    result = validate_dataset(sample_dir / "images", sample_dir / "annotations")
    assert result.report["images_usable"] == result.report["images_total"] == 24, result.report["problems"]


@pytest.mark.parametrize("max_distance", [0, 4, 7])
def test_near_duplicate_search_by_bands_finds_exactly_the_pairs_of_the_all_pairs_search(max_distance):
    from utils.data.near_duplicates import _block_pairs, _hamming_pairs

    rng = np.random.default_rng(max_distance)
    n = 3000  # above the size where the band index is used
    hashes = rng.integers(0, 2**63, n, dtype=np.uint64) | (rng.integers(0, 2, n, dtype=np.uint64) << np.uint64(63))
    for _ in range(300):  # planted near duplicates at distances around the threshold
        a, b = rng.integers(0, n, 2)
        flipped = hashes[a]
        for bit in rng.choice(64, int(rng.integers(0, max_distance + 3)), replace=False):
            flipped ^= np.uint64(1) << np.uint64(int(bit))
        hashes[b] = flipped
    hashes[:40] = hashes[0]  # a crowd of identical images (blank frames)
    banded = list(_hamming_pairs(hashes, max_distance))
    assert len(banded) == len(set(banded))  # each pair once, though several bands may find it
    assert sorted(banded) == sorted(_block_pairs(hashes, np.arange(n), max_distance))
    assert len(banded) >= 40 * 39 // 2


def test_a_long_chain_of_near_duplicates_names_each_ones_nearest_in_steps_linear_in_the_chain(tmp_path, monkeypatch):
    # Each duplicate's nearest member was searched among all its group's members: a chain of burst photos (each near
    # the next only) of 8,000 images took 64 million steps (26 s); 50,000 would take ~17 minutes.
    from utils.data import near_duplicates, validation

    n = 400
    for k in range(n):
        add_pair(tmp_path, f"img{k:04d}", Image.new("RGB", (8, 8)))
    monkeypatch.setattr(validation, "_inspect_image", lambda path: validation._ImageFacts(
        sha256=path.stem, size=(128, 96), phash=int(path.stem[3:]), stored_size=(128, 96)))
    monkeypatch.setattr(near_duplicates, "_hamming_pairs", lambda hashes, distance: (
        (k, k + 1, 1 + k % 3) for k in range(len(hashes) - 1)))  # image k near image k + 1 only
    calls = []

    def counting_min(*args, **kwargs):  # the search's step: a min() over a member's candidates, or within one
        calls.append(1)
        return min(*args, **kwargs)

    for module in (validation, near_duplicates):
        monkeypatch.setattr(module, "min", counting_min, raising=False)
    result = validate_dataset(tmp_path / "images", tmp_path / "annotations", workers=1)
    assert result.report["duplicate_groups"] == [[f"img{k:04d}.jpg" for k in range(n)]]
    near = {item["file"]: item["problem"] for item in result.report["problems"] if item["kind"] == "near_duplicate"}
    assert len(near) == n - 1
    # its nearest: the neighbour at the smaller distance (1 + k % 3 between k and k + 1)
    assert near["img0002.jpg"].startswith("near duplicate of img0001.jpg (perceptual hash distance 2")
    assert near["img0003.jpg"].startswith("near duplicate of img0004.jpg (perceptual hash distance 1")
    assert len(calls) < 4 * n, f"{len(calls)} steps for a chain of {n}"  # the old code: n^2 = 160,000


def test_copies_of_one_picture_are_searched_as_one_hash(tmp_path, monkeypatch):
    # Every pair of images of one perceptual hash was yielded by the search and kept in its set: a crowd of 4,000
    # (a placeholder photo, blank frames) made 8 million pairs (54 s; 10,000 would be 50 million, ~6 GB).
    from utils.data import near_duplicates, validation

    crowd = 300
    for k in range(crowd + 2):
        add_pair(tmp_path, f"img{k:04d}", Image.new("RGB", (8, 8)))
    hashes = {"img0300": 0b1, "img0301": (1 << 40) - 1}  # one bit from the crowd's hash, and far from it
    monkeypatch.setattr(validation, "_inspect_image", lambda path: validation._ImageFacts(
        sha256=path.stem, size=(128, 96), phash=hashes.get(path.stem, 0), stored_size=(128, 96)))
    pairs, search = [], near_duplicates._hamming_pairs

    def counted(values, distance):
        for found in search(values, distance):
            pairs.append(found)
            yield found

    monkeypatch.setattr(near_duplicates, "_hamming_pairs", counted)
    result = validate_dataset(tmp_path / "images", tmp_path / "annotations", workers=1)
    assert result.report["duplicate_groups"] == [[f"img{k:04d}.jpg" for k in range(crowd + 1)]]
    near = {item["file"]: item["problem"] for item in result.report["problems"] if item["kind"] == "near_duplicate"}
    assert len(near) == crowd and "img0301.jpg" not in near
    assert near["img0001.jpg"].startswith("near duplicate of img0000.jpg (perceptual hash distance 0 <= 4)")
    assert near["img0300.jpg"].startswith("near duplicate of img0000.jpg (perceptual hash distance 1 <= 4)")
    assert len(pairs) == 1  # the crowd's hash and its neighbour's; the old search: 300 * 301 / 2 = 45,150 pairs


def test_a_subfolder_of_images_is_reported_not_silently_skipped(tmp_path):
    # The data set is flat; photos filed in a subfolder are not read, and the report must say so.
    add_pair(tmp_path, "top", textured(40))
    nested = tmp_path / "images" / "site-b"
    nested.mkdir()
    textured(41).save(nested / "hidden.jpg")
    (tmp_path / "annotations" / "old").mkdir()
    report = validate_dataset(tmp_path / "images", tmp_path / "annotations").report
    check_nothing_unreported(report)
    assert report["images_total"] == report["images_usable"] == 1
    ignored = {p["file"]: p for p in report["problems"] if p["kind"] == "subfolder_ignored"}
    assert set(ignored) == {"site-b/", "old/"} and report["problem_counts"]["subfolder_ignored"] == 2
    assert "its 1 file(s) are not read" in ignored["site-b/"]["problem"]
    assert ignored["site-b/"]["image"] is None and not ignored["site-b/"]["excluded"]


def test_names_not_utf8_and_links_to_nothing_are_reported_not_fatal_or_lost(root, tmp_path):
    # A name of bytes that are not UTF-8 cannot go into the manifest, the report or an XML file: it crashed the
    # job with a traceback. A link to nothing (or a loop of links) named like an image vanished unreported.
    add_pair(tmp_path, "good", textured(50))
    images, annotations = tmp_path / "images", tmp_path / "annotations"
    textured(51).save(os.fsencode(images) + b"/caf\xe9.jpg", format="JPEG")
    with open(os.fsencode(annotations) + b"/caf\xe9.xml", "w") as handle:
        handle.write(voc_xml(GOOD_OBJECTS))
    os.symlink("loop_b.jpg", images / "loop_a.jpg")
    os.symlink("loop_a.jpg", images / "loop_b.jpg")
    os.symlink("gone.xml", annotations / "gone.xml")
    report = validate_dataset(images, annotations).report
    check_nothing_unreported(report)
    assert report["images_usable"] == 1
    not_read = {p["file"]: p["problem"] for p in report["problems"] if p["kind"] == "file_not_read"}
    assert set(not_read) == {"caf\\xe9.jpg", "caf\\xe9.xml", "loop_a.jpg", "loop_b.jpg", "gone.xml"}
    assert "not valid UTF-8" in not_read["caf\\xe9.jpg"] and "link to nothing" in not_read["loop_a.jpg"]
    out = tmp_path / "out"
    proc = run_cli(root, "--images", images, "--annotations", annotations, "--output-dir", out)
    assert proc.returncode == 0, proc.stderr
    assert "file_not_read=5" in proc.stdout
    assert [row["image"] for row in csv.DictReader(open(out / "clean_manifest.csv"))] == [str(images / "good.jpg")]


@pytest.mark.parametrize("orientation", [5, 6, 7, 8])
def test_boxes_drawn_on_the_stored_pixels_of_an_exif_turned_image_are_turned_with_them(root, tmp_path, orientation):
    # A tool that ignores EXIF (LabelImg) writes the stored size and boxes on the stored pixels. The image is read
    # turned, so the boxes were checked against the turned size: some dropped as outside, the rest kept in the
    # wrong place with only "size mismatch; the real size is used" said.
    from helpers import write_exif_turned_pair

    write_exif_turned_pair(tmp_path / "images", tmp_path / "annotations", orientation)
    result = validate_dataset(tmp_path / "images", tmp_path / "annotations")
    report = result.report
    check_nothing_unreported(report)
    assert report["problem_counts"]["boxes_turned"] == 1 and report["objects_dropped"] == 0
    assert report["problem_counts"]["size_mismatch"] == 0
    ann = result.annotations["turned.jpg"]
    from utils.data.images import load_rgb

    shown_image = np.asarray(load_rgb(tmp_path / "images" / "turned.jpg"))
    assert (ann.width, ann.height) == (90, 160) == shown_image.shape[1::-1]
    (box,) = [o.box for o in ann.objects]
    x0, y0, x1, y1 = map(int, box)
    assert (x1 - x0, y1 - y0) == (30, 50)
    inside = shown_image[y0 + 2:y1 - 2, x0 + 2:x1 - 2].reshape(-1, 3)
    assert (inside[:, 0] > 200).all() and (inside[:, 1] < 60).all()  # the box is on the red face, turned
    outputs = write_clean_outputs(result, tmp_path / "out")
    assert parse_voc(outputs["annotations_clean"] / "turned.xml").objects == ann.objects


def test_an_output_folder_that_is_an_input_folder_is_refused_in_one_line(root, tmp_path):
    # The report, manifest, run record and annotations_clean/ went into the data folder, and the next run read
    # them back as 3 images without annotation and a subfolder.
    add_pair(tmp_path, "good", textured(60))
    for role in ("images", "annotations"):
        proc = run_cli(root, "--images", tmp_path / "images", "--annotations", tmp_path / "annotations",
                       "--output-dir", tmp_path / role)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert proc.stderr.strip() == (f"validate_data: error: {tmp_path / role}: the output folder is also the "
                                       f"--{role} folder; write the report, manifest and clean annotations to "
                                       "another folder")
        assert sorted(p.name for p in (tmp_path / role).iterdir()) == [f"good.{'jpg' if role == 'images' else 'xml'}"]


def test_the_clean_copy_of_an_xml_with_a_doctype_leaves_the_doctype_out(tmp_path):
    # An unchanged XML was copied byte for byte, its DOCTYPE too: never read here, but a SYSTEM entity (a local
    # file, a URL) went on to any tool that reads "annotations_clean/" with entities on (lxml's default).
    add_pair(tmp_path, "dtd", textured(1))
    add_pair(tmp_path, "plain", textured(2))
    xml = tmp_path / "annotations" / "dtd.xml"
    xml.write_text('<!DOCTYPE annotation [<!ENTITY secret SYSTEM "file:///etc/hostname">]>\n' + xml.read_text())
    result = validate_dataset(tmp_path / "images", tmp_path / "annotations", progress=False)
    check_nothing_unreported(result.report)
    assert [(p["file"], p["kind"], p["excluded"]) for p in result.report["problems"]] == [
        ("dtd.xml", "doctype_dropped", False)]
    assert result.report["images_usable"] == 2 and result.changed == {"dtd.jpg"}
    outputs = write_clean_outputs(result, tmp_path / "out")
    cleaned = (outputs["annotations_clean"] / "dtd.xml").read_bytes()
    assert b"DOCTYPE" not in cleaned and b"ENTITY" not in cleaned
    assert parse_voc(outputs["annotations_clean"] / "dtd.xml") == parse_voc(xml)  # the same boxes and classes


def test_an_entity_reference_in_a_field_is_named_not_read_as_a_missing_field(tmp_path):
    # <name>&mask;</name> read as "missing required field <name>"; ab&x;cd as "ab", silently
    from utils.data.voc import VocError

    xml = tmp_path / "a.xml"
    xml.write_text('<!DOCTYPE annotation [<!ENTITY mask "with_mask">]>\n'
                   + voc_xml(GOOD_OBJECTS).replace("<name>with_mask</name>", "<name>&mask;</name>"))
    with pytest.raises(VocError, match=r"field <name> in object 0 holds the entity reference &mask;"):
        parse_voc(xml)
