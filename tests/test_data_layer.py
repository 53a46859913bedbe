"""The VOC data layer: parsing, cleaning, image modes, pairing, tar folders, the Dataset and the training inputs."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from utils.classes import CLASSES, LABEL_OF, NUM_CLASSES
from utils.data.dataset import VocDetectionDataset, collate
from utils.data.images import ImageError, image_size, load_rgb
from utils.data.pairs import Pair, open_folder, pack_folder, pair_folders, read_pairs_csv, write_pairs_csv
from utils.data.voc import VocAnnotation, VocError, VocObject, clean_objects, parse_voc, write_voc


def voc_xml(objects, width=100, height=80, filename="a.jpg") -> str:
    body = "".join(
        f"<object><name>{name}</name><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin>"
        f"<xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
        for name, (x0, y0, x1, y1) in objects
    )
    return (f"<annotation><filename>{filename}</filename><size><width>{width}</width>"
            f"<height>{height}</height><depth>3</depth></size>{body}</annotation>")


def test_label_map_keeps_zero_for_background():
    assert LABEL_OF["background"] == 0
    assert sorted(LABEL_OF[c] for c in CLASSES) == [1, 2, 3]
    assert NUM_CLASSES == 4


def test_parse_and_write_roundtrip(tmp_path):
    ann = VocAnnotation("x.jpg", 100, 80, objects=[VocObject("with_mask", 1, 2, 30, 40),
                                                   VocObject("mask_weared_incorrect", 10.5, 20, 50, 60.25)])
    path = write_voc(tmp_path / "x.xml", ann)
    back = parse_voc(path)
    assert (back.width, back.height, back.filename) == (100, 80, "x.jpg")
    assert [o.box for o in back.objects] == [(1, 2, 30, 40), (10.5, 20, 50, 60.25)]
    assert [o.name for o in back.objects] == ["with_mask", "mask_weared_incorrect"]


@pytest.mark.parametrize("text, message", [
    ("<annotation><size><width>10</width>", "not well-formed"),
    ("", "empty"),
    ("<annotation><filename>a</filename><size><height>10</height></size></annotation>", "<width> in <size>"),
    ("<annotation><size><width>10</width><height>10</height></size>"
     "<object><name>with_mask</name></object></annotation>", "<bndbox>"),
    ("<annotation><size><width>10</width><height>10</height></size><object><name>with_mask</name>"
     "<bndbox><xmin>a</xmin><ymin>1</ymin><xmax>2</xmax><ymax>3</ymax></bndbox></object></annotation>",
     "not a number"),
    ("<root/>", "<annotation>"),
])
def test_parse_errors_name_file_and_problem(tmp_path, text, message):
    path = tmp_path / "bad.xml"
    path.write_text(text)
    with pytest.raises(VocError) as info:
        parse_voc(path)
    assert str(path) in str(info.value) and message in str(info.value)


@pytest.mark.parametrize("size, problem", [
    ("", "no <size> in the XML"),
    ("<size><width>0</width><height>0</height><depth>3</depth></size>", "<size> 0x0 in the XML is not positive"),
    ("<size><width>640</width><height>-1</height></size>", "<size> 640x-1 in the XML is not positive"),
])
def test_an_annotation_without_a_usable_size_is_read_with_why_so_the_images_size_can_stand_in(tmp_path, size, problem):
    # A 0x0 <size> (as some converters write) was refused as the whole file ("not positive"), its image excluded,
    # where a missing or a wrong <size> only has the image's own size used: one kind, one treatment.
    path = tmp_path / "a.xml"
    path.write_text(f"<annotation>{size}<object><name>with_mask</name><bndbox><xmin>1</xmin><ymin>2</ymin>"
                    "<xmax>30</xmax><ymax>40</ymax></bndbox></object></annotation>")
    ann = parse_voc(path)
    assert (ann.width, ann.height, ann.size_problem) == (None, None, problem)
    assert [o.box for o in ann.objects] == [(1, 2, 30, 40)]


def test_parse_refuses_external_entities(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOPSECRET")
    path = tmp_path / "xxe.xml"
    path.write_text(f'<?xml version="1.0"?><!DOCTYPE a [<!ENTITY e SYSTEM "file://{secret}">]>'
                    "<annotation><filename>&e;</filename><size><width>5</width><height>5</height></size>"
                    "</annotation>")
    try:
        ann = parse_voc(path)
    except VocError:
        return
    assert "TOPSECRET" not in ann.filename


def test_clean_objects_clips_small_overshoot_and_drops_the_rest():
    ann = VocAnnotation("a.jpg", 100, 80, objects=[
        VocObject("with_mask", -1.5, 0, 20, 20),      # within 2 px: clipped
        VocObject("without_mask", 10, 10, 105, 30),   # 5 px out: dropped
        VocObject("with_mask", 10, 10, 10, 30),       # zero width: dropped
        VocObject("cat", 1, 1, 5, 5),                 # unknown class: dropped
        VocObject("mask_weared_incorrect", 5, 5, 50, 50),
    ])
    kept, problems = clean_objects(ann, known_classes=CLASSES)
    assert [o.box for o in kept] == [(0.0, 0, 20, 20), (5, 5, 50, 50)]
    assert len(problems) == 4
    assert "clipped" in problems[0] and "dropped" in problems[1]
    assert "zero or negative area" in problems[2] and "unknown class name 'cat'" in problems[3]


def save(img: Image.Image, path, **kw):
    img.save(path, **kw)
    return path


def test_load_rgb_handles_modes(tmp_path):
    rgba = Image.new("RGBA", (8, 6), (255, 0, 0, 0))  # fully transparent red → white background
    assert load_rgb(save(rgba, tmp_path / "a.png")).getpixel((0, 0)) == (255, 255, 255)
    deep = Image.fromarray(np.full((6, 8), 65535, dtype=np.uint16))
    img = load_rgb(save(deep, tmp_path / "d.png"))
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (255, 255, 255)
    pal = Image.new("P", (8, 6), 3)
    pal.putpalette([0, 0, 0] * 3 + [10, 20, 30] + [0, 0, 0] * 252)
    assert load_rgb(save(pal, tmp_path / "p.png")).getpixel((1, 1)) == (10, 20, 30)
    grey = Image.new("L", (8, 6), 128)
    assert load_rgb(save(grey, tmp_path / "g.jpg")).mode == "RGB"


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display
    path = save(img, tmp_path / "r.jpg", exif=exif.tobytes())
    assert image_size(path) == (20, 40)
    assert load_rgb(path).size == (20, 40)


def test_broken_images_raise_clear_errors(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("this is not an image")
    with pytest.raises(ImageError, match="not an image file") as info:
        load_rgb(text)
    assert str(text) in str(info.value)
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(buf, "JPEG")
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageError, match="truncated"):
        load_rgb(truncated)
    with pytest.raises(ImageError, match="does not exist"):
        load_rgb(tmp_path / "missing.jpg")


def make_pair(folder_images, folder_xml, stem, objects, size=(64, 48)):
    folder_images.mkdir(parents=True, exist_ok=True)
    folder_xml.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (90, 90, 90)).save(folder_images / f"{stem}.jpg")
    (folder_xml / f"{stem}.xml").write_text(voc_xml(objects, *size, filename=f"{stem}.jpg"))
    return Pair(folder_images / f"{stem}.jpg", folder_xml / f"{stem}.xml")


def test_pairing_reports_unmatched_both_ways(tmp_path):
    make_pair(tmp_path / "images", tmp_path / "annotations", "a", [])
    Image.new("RGB", (4, 4)).save(tmp_path / "images" / "lonely.png")
    (tmp_path / "annotations" / "orphan.xml").write_text(voc_xml([]))
    pairing = pair_folders(tmp_path / "images", tmp_path / "annotations")
    assert [p.stem for p in pairing.pairs] == ["a"]
    assert [p.name for p in pairing.images_without_annotation] == ["lonely.png"]
    assert [p.name for p in pairing.annotations_without_image] == ["orphan.xml"]


def test_tar_folder_roundtrip_and_flat_pairing(tmp_path):
    flat = tmp_path / "flat"
    make_pair(flat, flat, "a", [("with_mask", (1, 1, 20, 20))])
    make_pair(flat, flat, "b", [("without_mask", (2, 2, 30, 30))])
    archive = pack_folder(flat, tmp_path / "set.tar")
    with tarfile.open(archive) as tar:
        assert sorted(tar.getnames()) == ["a.jpg", "a.xml", "b.jpg", "b.xml"]
    with open_folder(archive) as unpacked:
        assert [p.stem for p in pair_folders(unpacked, unpacked).pairs] == ["a", "b"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        with open_folder(tmp_path / "nope"):
            pass
    # a missing shard among several is said as one missing set is, not "must all be .tar shards" (a typo'd name)
    with pytest.raises(FileNotFoundError) as caught:
        with open_folder([archive, tmp_path / "set-2.tar"]):
            pass
    assert str(caught.value) == f"{tmp_path / 'set-2.tar'}: does not exist (expected a .tar shard)"


def test_pairs_csv_resolves_by_name_in_staging_folder(tmp_path):
    rows = [{"image": "/far/away/a.jpg", "annotation": "/far/away/a.xml", "split": "train"},
            {"image": "/far/away/b.jpg", "annotation": "/far/away/b.xml", "split": "test"}]
    csv_path = write_pairs_csv(tmp_path / "split.csv", rows, ("image", "annotation", "split"))
    pairs = read_pairs_csv(csv_path, images_dir=tmp_path, annotations_dir=tmp_path, split="test")
    assert pairs == [Pair(tmp_path / "b.jpg", tmp_path / "b.xml")]


def test_dataset_returns_torchvision_targets(tmp_path):
    pairs = [
        make_pair(tmp_path / "i", tmp_path / "x", "a", [("with_mask", (1, 2, 20, 30)),
                                                        ("mask_weared_incorrect", (30, 5, 63, 47))]),
        make_pair(tmp_path / "i", tmp_path / "x", "b", [("cat", (1, 1, 5, 5)), ("without_mask", (-1, 0, 10, 10))]),
    ]
    dataset = VocDetectionDataset(pairs)
    image, target = dataset[0]
    assert image.dtype == torch.float32 and tuple(image.shape) == (3, 48, 64) and float(image.max()) <= 1.0
    assert target["labels"].tolist() == [1, 3]
    assert target["boxes"].tolist() == [[1, 2, 20, 30], [30, 5, 63, 47]]
    assert target["area"].tolist() == [19 * 28, 33 * 42]
    _, target = dataset[1]
    assert target["labels"].tolist() == [2] and target["boxes"].tolist() == [[0, 0, 10, 10]]
    problems = dataset.object_problems[str(pairs[1].annotation)]
    assert any("unknown class" in p for p in problems) and any("clipped" in p for p in problems)
    images, targets = collate([dataset[0], dataset[1]])
    assert len(images) == len(targets) == 2


def test_pairs_are_read_with_a_bounded_number_in_flight(monkeypatch):
    # scan_pairs (train, evaluate) and validate_data read a set's pairs with Executor.map, which submits every pair
    # at once: a future of ~1.6 kB a pair until the end (128 MB for 80,000 pairs), for a result of 8 bytes.
    import threading
    import tracemalloc
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path

    from utils.data import pairs as pairs_module
    from utils.parallel import ordered_map

    monkeypatch.setattr(pairs_module, "_read_problem",
                        lambda pair: (None, "0" * 64, (4, 3)) if pair.image.stem != "bad7"
                        else ({"file": str(pair.image), "problem": "truncated"}, None, None))
    peaks = {}
    for n in (2000, 8000):
        pairs = [Pair(Path(f"bad{k}.jpg"), Path(f"bad{k}.xml")) for k in range(n)]
        tracemalloc.start()
        usable, skipped = pairs_module.scan_pairs(pairs)
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert usable == pairs[:7] + pairs[8:] and skipped == [{"file": "bad7.jpg", "problem": "truncated"}]
    per_pair = (peaks[8000] - peaks[2000]) / 6000
    assert per_pair < 300, f"{per_pair:.0f} bytes a pair"  # the old code: ~1,600
    in_flight, most, lock = [0], [0], threading.Lock()

    def work(item):
        with lock:
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])
        return item * 2

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = []
        for result in ordered_map(pool, work, range(1000), ahead=8):
            with lock:
                in_flight[0] -= 1
            results.append(result)
    assert results == [2 * k for k in range(1000)] and most[0] <= 8


@pytest.mark.parametrize("kind", ["parent", "absolute_link"])
def test_a_tar_member_that_would_land_outside_is_refused_as_unsafe(tmp_path, kind):
    from utils.errors import InputError

    archive = tmp_path / "set.tar"
    with tarfile.open(archive, "w") as tar:
        if kind == "parent":
            info = tarfile.TarInfo("../escaped.jpg")
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
        else:
            info = tarfile.TarInfo("photo.jpg")
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
    with pytest.raises(InputError, match="unsafe member") as caught:
        with open_folder(archive):
            pass
    assert "damaged" not in str(caught.value)
    assert not (tmp_path / "escaped.jpg").exists()


def test_training_inputs_are_decoded_in_full_and_subfolders_listed(tmp_path):
    # A truncated JPEG passes a header read and then stopped a training run in its first epoch; photos in a
    # subfolder were left out without a word.
    from utils.data.pairs import open_pairs

    xml = ("<annotation><filename>{}</filename><size><width>64</width><height>48</height><depth>3</depth></size>"
           "<object><name>with_mask</name><bndbox><xmin>5</xmin><ymin>5</ymin><xmax>30</xmax><ymax>30</ymax>"
           "</bndbox></object></annotation>")
    for stem in ("good", "cut"):
        Image.fromarray(np.random.default_rng(1).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(
            tmp_path / f"{stem}.jpg", quality=95)
        (tmp_path / f"{stem}.xml").write_text(xml.format(f"{stem}.jpg"))
    data = (tmp_path / "cut.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    image_size(tmp_path / "cut.jpg")  # the header alone reads fine
    (tmp_path / "site-b").mkdir()
    with open_pairs(tmp_path, tmp_path) as (usable, skipped):
        assert [pair.image.name for pair in usable] == ["good.jpg"]
        problems = {entry["file"]: entry["problem"] for entry in skipped}
        assert any(name.endswith("cut.jpg") for name in problems)
        assert problems[f"{tmp_path}: site-b/"].startswith("a subfolder")


def test_objects_training_would_drop_are_listed(tmp_path):
    from utils.classes import LabelMap
    from utils.data.pairs import object_problems, object_problems_line

    Image.new("RGB", (64, 48)).save(tmp_path / "a.jpg")
    (tmp_path / "a.xml").write_text(
        "<annotation><filename>a.jpg</filename><size><width>64</width><height>48</height><depth>3</depth></size>"
        "<object><name>hat</name><bndbox><xmin>5</xmin><ymin>5</ymin><xmax>30</xmax><ymax>30</ymax></bndbox>"
        "</object><object><name>mask</name><bndbox><xmin>5</xmin><ymin>5</ymin><xmax>30</xmax><ymax>30</ymax>"
        "</bndbox></object></annotation>")
    pair = Pair(tmp_path / "a.jpg", tmp_path / "a.xml")
    problems = object_problems([pair])
    assert len(problems) == 2 and all(item["file"] == str(tmp_path / "a.xml") for item in problems)
    assert "2 object(s) in 1 annotation(s) dropped or clipped" in object_problems_line(problems)
    assert len(object_problems([pair], LabelMap.parse("mask=with_mask"))) == 1  # read as the dataset reads them
    assert object_problems_line([]) is None


def test_training_and_evaluation_read_boxes_on_an_exif_turned_images_stored_pixels_as_preprocess_does(tmp_path):
    # An EXIF-ignoring tool's XML (the stored size, a box on the stored pixels) given to train or evaluate by hand:
    # preprocess turned its boxes with the pixels, the dataset checked them against the turned image unturned.
    from utils.data.pairs import object_problems

    from helpers import write_exif_turned_pair

    pair = Pair(*write_exif_turned_pair(tmp_path, tmp_path))
    image, target = VocDetectionDataset([pair])[0]
    assert tuple(image.shape) == (3, 160, 90)
    assert target["boxes"].tolist() == [[50.0, 100.0, 80.0, 150.0]]  # on the red patch, as shown
    red = image[0, 100:150, 50:80]
    assert float(red.mean()) > 0.9 and float(image[1, 100:150, 50:80].mean()) < 0.1
    assert object_problems([pair]) == []  # nothing dropped: it was checked against the turned size


def test_the_training_data_hash_is_the_same_however_its_archives_unpack(tmp_path, sample_dir):
    # train/set.tar and val/set.tar unpack into folders of random names "set.XXXX": one sort over both sets' full
    # paths put their files in a random order, and a resumed train or hpo refused its own checkpoint or journal
    # as "other training data" about half the time.
    from utils.data.pairs import open_pairs
    from utils.provenance import sets_sha256

    images = sorted((sample_dir / "images").glob("*.jpg"))
    for role, part in (("train", images[:2]), ("val", images[2:4])):
        folder = tmp_path / f"{role}_files"
        folder.mkdir()
        for image in part:
            (folder / image.name).write_bytes(image.read_bytes())
            xml = sample_dir / "annotations" / f"{image.stem}.xml"
            (folder / xml.name).write_bytes(xml.read_bytes())
        (tmp_path / role).mkdir()
        pack_folder(folder, tmp_path / role / "set.tar")
    hashes = set()
    for _ in range(8):
        with open_pairs(tmp_path / "train" / "set.tar", tmp_path / "train" / "set.tar") as (train, _), \
                open_pairs(tmp_path / "val" / "set.tar", tmp_path / "val" / "set.tar") as (val, _):
            hashes.add(sets_sha256(*([p for pair in pairs for p in (pair.image, pair.annotation)]
                                     for pairs in (train, val))))
    assert len(hashes) == 1


def test_an_archive_without_room_in_the_temporary_folder_says_where_and_how_much(tmp_path, monkeypatch):
    """A full disk names no file ('[Errno 28] No space left on device'): the folder a .tar is unpacked into is
    tempfile's, which the user never named."""
    import errno
    import tempfile

    from utils.errors import InputError

    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "a.jpg")
    archive = pack_folder(tmp_path / "images", tmp_path / "set.tar")
    (tmp_path / "small").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "small"))

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tarfile.TarFile, "extractall", full)
    with pytest.raises(InputError) as raised:
        with open_folder(archive):
            pass
    assert str(raised.value) == (f"{archive}: the temporary folder {tmp_path / 'small'} has no room for it (No space "
                                 f"left on device; it needs about {archive.stat().st_size / 1e6:.1f} MB; point TMPDIR "
                                 "at a disk with room)")
    assert list((tmp_path / "small").iterdir()) == []  # the partial unpacking is gone
