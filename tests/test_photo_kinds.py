"""A file is a photo when its bytes are one (utils.data.images.IMAGE_FORMATS), whatever its name, and a file of
several pictures is read or refused by one rule: every path reads the same files and refuses the others with the
same reason, listed. Before, predict and make_shards listed a folder's .jfif, .jpe and extensionless photos as "not
an image file name" while validation, evaluate and a file named read them; the service answered 415 to whatever a
client declared as application/octet-stream (curl: any .jfif, .tif, .webp or extensionless name) and refused a GIF
as an "unsupported type" where the jobs said "not an image file"; a 2-page TIFF, an animated PNG or WebP was read
as its first frame without a word."""

from __future__ import annotations

import io
import re
import json
import tarfile

import pytest
from PIL import Image

from helpers import run_script
from utils.data.voc import VocAnnotation, VocObject, write_voc

# one JPEG's bytes under the names users' photos have; an MPO: a phone's photo with its depth map as picture 2
PHOTOS = ("base.jpg", "camera.jfif", "scan.jpe", "upper.JPG", "no_extension", "phone.jpg", "stereo.mpo",
          "thumbnailed.TIFF")
# refused with the reason each path gives: (the start of the reason, the service's status)
REFUSED = {"notes.txt": ("not an image file (format not recognised; read here: JPEG, PNG, BMP, TIFF, WEBP)", 415),
           "clip.mp4": ("not an image file (format not recognised", 415),
           # a RAW beside the camera's JPEG: Pillow reads its preview as a TIFF, and the shot was counted twice
           "raw.NEF": ("a camera RAW file (.nef): not read (the TIFF picture in it is the camera's preview", 415),
           # a NEF's, DNG's or ARW's first picture is its preview (NewSubfileType 1): without its name, it was read
           "raw_unnamed": ("a TIFF whose first picture is a reduced-resolution copy, as in a camera RAW file: not "
                           "read (the TIFF picture in it is the camera's preview", 415),
           "pages.tiff": ("a TIFF of 2 pages: which one is the photo is unknown", 422),
           "moving.png": ("an animation of 2 frames (PNG), not a photo", 422),
           "animated.webp": ("an animation of 2 frames (WEBP), not a photo", 422)}


@pytest.fixture(scope="module")
def folder(sample_dir, tmp_path_factory):
    """images/ with each file of PHOTOS and REFUSED, annotations/ with a VOC file for each."""
    work = tmp_path_factory.mktemp("kinds")
    images, annotations = work / "images", work / "annotations"
    images.mkdir()
    annotations.mkdir()
    base = Image.open(sample_dir / "images" / "sample_0000.jpg").convert("RGB")
    flipped, small = base.transpose(Image.Transpose.FLIP_LEFT_RIGHT), base.resize((40, 30))
    data = (sample_dir / "images" / "sample_0000.jpg").read_bytes()
    for name in ("base.jpg", "camera.jfif", "scan.jpe", "upper.JPG", "no_extension"):
        (images / name).write_bytes(data)
    for name in ("phone.jpg", "stereo.mpo"):
        base.save(images / name, format="MPO", save_all=True, append_images=[small], quality=95)
    thumbnail = base.resize((40, 30))  # not small: saving it as an MPO's picture left JPEG settings on it
    thumbnail.encoderinfo = {"tiffinfo": {254: 1}}  # NewSubfileType 1: a reduced-resolution copy, no page
    base.save(images / "thumbnailed.TIFF", format="TIFF", save_all=True, append_images=[thumbnail])
    (images / "notes.txt").write_text("a note beside the photos\n")
    base.save(images / "raw.NEF", format="TIFF")
    base.resize((40, 30)).save(images / "raw_unnamed", format="TIFF", tiffinfo={254: 1})
    (images / "clip.mp4").write_bytes(b"\0\0\0\x18ftypmp42" + bytes(4096))
    base.save(images / "pages.tiff", save_all=True, append_images=[flipped])
    base.save(images / "moving.png", save_all=True, append_images=[flipped])
    base.save(images / "animated.webp", save_all=True, append_images=[flipped], lossless=True)
    for name in (*PHOTOS, *REFUSED):
        write_voc(annotations / f"{name.split('.')[0]}.xml", VocAnnotation(name, *base.size, objects=[
            VocObject("with_mask", 10, 10, 60, 60)]))
    with Image.open(images / "stereo.mpo") as img:
        assert (img.format, img.n_frames) == ("MPO", 2)  # the kinds this test is about
    with Image.open(images / "thumbnailed.TIFF") as img:
        assert img.n_frames == 2
    return work


def by_name(entries, key="file") -> dict:
    return {entry[key].rsplit("/", 1)[-1].rsplit(":", 1)[-1]: entry for entry in entries}


def test_predict_on_a_folder_and_an_archive_reads_every_photo_whatever_its_name(root, folder, tiny_model_file,
                                                                                 tmp_path):
    archive = tmp_path / "photos.tar"
    with tarfile.open(archive, "w") as tar:
        for path in sorted((folder / "images").iterdir()):
            tar.add(path, arcname=path.name)
    assert run_script(root, "predict", ["--images", folder / "images", archive, "--model", tiny_model_file,
                                        "--output-dir", tmp_path / "out", "--no-annotated", "--workers", "0",
                                        "--device", "cpu", "--score-threshold", "0.1"]) == 0
    found = json.loads((tmp_path / "out" / "predictions.json").read_text())
    for source in (f"{folder / 'images'}/", "photos.tar:"):  # the folder's and the archive's, alike
        images = by_name(image for image in found["images"] if image["file"].startswith(source))
        skipped = by_name(entry for entry in found["skipped"] if entry["file"].startswith(source))
        assert sorted(images) == sorted(PHOTOS), source
        assert {name: entry["reason"][:len(REFUSED[name][0])] for name, entry in skipped.items()} == \
            {name: reason for name, (reason, _) in REFUSED.items()}, source
        base = images["base.jpg"]
        for name in PHOTOS:  # one photo's pixels: its detections
            assert (images[name]["width"], images[name]["height"]) == (base["width"], base["height"]), name
        for name in ("camera.jfif", "scan.jpe", "upper.JPG", "no_extension"):
            assert images[name]["detections"] == base["detections"], name
        assert images["phone.jpg"]["detections"] == images["stereo.mpo"]["detections"]


def test_make_shards_validation_and_evaluate_read_and_refuse_the_same_files_with_predicts_reasons(folder):
    from utils.data.shards import collect_images
    from utils.data.validation import validate_dataset
    from utils.detection.evaluation import labelled_pairs

    items, skipped = collect_images(folder / "images", folder / "annotations")
    reasons = {name: entry["reason"] for name, entry in by_name(skipped).items() if not name.endswith(".xml")}
    # read to the header: predict refuses the pages and frames (422 from the service) when it decodes them
    assert sorted(reasons) == sorted(name for name, (_, status) in REFUSED.items() if status == 415)
    assert sorted(item.name for item in items) == sorted(set(PHOTOS) | set(REFUSED) - set(reasons))
    pairs, skipped = labelled_pairs(folder / "images", folder / "annotations")
    assert sorted(pair.image.name for pair in pairs) == sorted(PHOTOS)
    skipped = by_name(entry for entry in skipped if not entry["file"].endswith(".xml"))
    assert {name: entry["reason"][:len(REFUSED[name][0])] for name, entry in skipped.items()} == \
        {name: reason for name, (reason, _) in REFUSED.items()}
    assert all(reasons[name] == skipped[name]["reason"] for name in reasons)
    report = validate_dataset(folder / "images", folder / "annotations", progress=False).report
    problems = by_name(problem for problem in report["problems"]
                       if problem["kind"] in ("file_not_read", "unreadable_image"))
    assert {name: problem["problem"] for name, problem in problems.items()} == \
        {name: entry["reason"] for name, entry in skipped.items()}


def test_the_service_reads_the_bytes_whatever_type_is_declared_and_refuses_with_the_jobs_reasons(folder,
                                                                                                 tiny_model_file,
                                                                                                 caplog):
    import gc

    from fastapi.testclient import TestClient

    from utils.service.app import ServiceConfig, create_app

    with TestClient(create_app(ServiceConfig(model_path=tiny_model_file))) as client:
        for name in (*PHOTOS, *REFUSED):
            upload = (name, (folder / "images" / name).read_bytes(), "application/octet-stream")
            answer = client.post("/api/predict", files=[("files", upload)])
            if name in PHOTOS:
                assert answer.status_code == 200, (name, answer.text)
                assert (answer.json()["images"][0]["width"], answer.json()["images"][0]["height"]) == (160, 120)
            else:
                reason, status = REFUSED[name]
                assert answer.status_code == status and answer.json()["detail"].startswith(f"{name}: {reason}"), \
                    (name, answer.text)
    gc.collect()  # a refusal as the upload was decoded left a failure unread, logged with its traceback when freed
    assert not [record for record in caplog.records if "never retrieved" in record.getMessage()]


def test_evaluate_lists_what_its_folders_hold_that_it_does_not_read(sample_dir, tmp_path):
    """evaluate left out a subfolder, a link to nothing and a name that is not UTF-8 without a word, where
    validation and preprocess list them."""
    import os

    from utils.detection.evaluation import labelled_pairs

    for suffix, kind in ((".jpg", "images"), (".xml", "annotations")):
        (tmp_path / f"sample_0000{suffix}").write_bytes((sample_dir / kind / f"sample_0000{suffix}").read_bytes())
    (tmp_path / "more").mkdir()
    (tmp_path / "more" / "sample_0001.jpg").write_bytes((sample_dir / "images" / "sample_0001.jpg").read_bytes())
    (tmp_path / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (tmp_path / os.fsdecode(b"caf\xe9.jpg")).write_bytes(b"")
    pairs, skipped = labelled_pairs(tmp_path, tmp_path)
    assert [pair.image.name for pair in pairs] == ["sample_0000.jpg"]
    reasons = {entry["file"].removeprefix(f"{tmp_path}/"): entry["reason"] for entry in skipped}
    assert reasons["more/"].startswith("a subfolder: its files are not read")
    assert reasons["gone.jpg"].startswith("a symbolic link to nothing")
    assert reasons["caf\\xe9.jpg"] == "the name is not valid UTF-8"


def test_a_camera_raw_renamed_tif_is_refused_by_its_bytes_when_decoded(folder, tmp_path):
    """A name of IMAGE_EXTENSIONS spares the header read at listing: the decode refuses it, with the same reason."""
    from utils.data.images import NotAnImageError, load_rgb

    renamed = tmp_path / "raw.tif"
    renamed.write_bytes((folder / "images" / "raw_unnamed").read_bytes())
    with pytest.raises(NotAnImageError, match=r"raw\.tif: a TIFF whose first picture is a reduced-resolution copy"):
        load_rgb(renamed)


def test_validation_says_a_photo_without_annotation_lacks_only_its_annotation(sample_dir, tmp_path):
    """Its extension (.jfif) is no problem since a photo is its bytes: validation no longer adds "(and its extension
    is not an image extension)" to the missing annotation, as if it were a second one."""
    from utils.data.validation import validate_dataset

    (tmp_path / "camera.jfif").write_bytes((sample_dir / "images" / "sample_0000.jpg").read_bytes())
    report = validate_dataset(tmp_path, tmp_path, progress=False).report
    assert [(problem["kind"], problem["problem"]) for problem in report["problems"]] == \
        [("missing_annotation", f"no annotation camera.xml in {tmp_path}")]


# The camera RAW formats of GIMP's raw loaders (plug-ins/file-raw/file-formats.h: dcraw's and LibRaw's, movie formats
# left out), with Pentax .ptx, Canon .cr3 and GoPro .gpr: .fff (Hasselblad) and .ptx were read as their preview; and
# the TIFF-based ones ExifTool names beside them: Sony .arq, Olympus .ori, Mamiya .mfw, Kodak .dcs and .drf
RAW_FORMATS = ("cr2", "crw", "nef", "nrw", "3fr", "fff", "arw", "srf", "sr2", "bay", "cs1", "ia", "sti", "dc2", "dcr",
               "kdc", "k25", "kc2", "dng", "erf", "cap", "iiq", "mdc", "mrw", "mef", "mos", "orf", "pef", "raw", "pxn",
               "qtk", "raf", "rw2", "rdc", "rwl", "srw", "x3f", "ari", "ptx", "cr3", "gpr", "arq", "ori", "mfw", "dcs",
               "drf")


def test_a_camera_raw_of_every_maker_is_refused_by_its_name_on_both_paths():
    """A TIFF (as Pillow reads a RAW built on TIFF) named as any maker's RAW is refused, when its header is read and
    when it is decoded, whatever the case of its name."""
    from utils.data.images import NotAnImageError, check_image_pixels, load_rgb_bytes

    data = io.BytesIO()
    Image.new("RGB", (16, 12)).save(data, format="TIFF")
    for extension in RAW_FORMATS:
        for name in (f"shot.{extension}", f"SHOT.{extension.upper()}"):
            reason = re.escape(f"{name}: a camera RAW file (.{extension}): not read")
            with pytest.raises(NotAnImageError, match=f"^{reason}"):
                check_image_pixels(data.getvalue(), name=name)
            with pytest.raises(NotAnImageError, match=f"^{reason}"):
                load_rgb_bytes(data.getvalue(), name)
    assert check_image_pixels(data.getvalue(), name="scan.tif") == (16, 12)  # a TIFF photo is read
