"""bin/predict.py's inputs: folders, archives and files given more than once, names that are not UTF-8, a figure
per folder; plain tars read where their members lie; images hashed and decoded in one bounded read."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import photo_folders, predict_quick


def test_predict_reads_each_image_once_and_tells_same_named_archives_apart(root, sample_dir, tiny_model_file,
                                                                            tmp_path):
    photos = photo_folders(sample_dir, tmp_path / "photos")
    for site in ("a", "b"):  # two shard folders, each with a shard-000000.tar
        (tmp_path / site).mkdir()
        with tarfile.open(tmp_path / site / "shard-000000.tar", "w") as tar:
            tar.add(photos / "siteA" / "a.jpg", arcname="x.jpg")
    out = tmp_path / "out"
    shard_a, shard_b = tmp_path / "a" / "shard-000000.tar", tmp_path / "b" / "shard-000000.tar"
    assert predict_quick(root, tiny_model_file, [photos, f"{photos}/", photos / "siteA", photos / "siteA" / "a.jpg",
                                                 shard_a, shard_b, shard_a], out, "--no-annotated") == 0
    predictions = json.loads((out / "predictions.json").read_text())
    files = [image["file"] for image in predictions["images"]]
    assert sorted(files) == sorted([f"{photos}/siteA/a.jpg", f"{photos}/siteA/b.jpg", f"{photos}/siteB/cam1/c.jpg",
                                    f"{photos}/siteB/d.jpg", "a/shard-000000.tar:x.jpg", "b/shard-000000.tar:x.jpg"])
    compliance = json.loads((out / "compliance.json").read_text())
    assert set(compliance["per_image"]) == set(files)
    duplicates = [entry for entry in predictions["skipped"] if "the same file as" in entry["reason"]]
    assert len(duplicates) == 4 + 2 + 1 + 1  # photos/ again, siteA's two again, a.jpg by name, the archive again
    assert {"file": f"{photos}/siteA/a.jpg", "reason": f"the same file as {photos}/siteA/a.jpg (listed once)"} in \
        duplicates
    assert len(predictions["skipped"]) == len(duplicates)


def test_predict_gives_a_figure_per_folder_given(root, sample_dir, tiny_model_file, tmp_path):
    photos = photo_folders(sample_dir, tmp_path / "in")
    out = tmp_path / "out"
    assert predict_quick(root, tiny_model_file, [photos / "siteA", photos / "siteB" / "cam1"], out,
                         "--no-annotated") == 0
    predictions = json.loads((out / "predictions.json").read_text())
    assert {image["file"].removeprefix(f"{photos}/"): image["folder"] for image in predictions["images"]} == {
        "siteA/a.jpg": "siteA", "siteA/b.jpg": "siteA", "siteB/cam1/c.jpg": "siteB/cam1"}
    assert set(json.loads((out / "compliance.json").read_text())["per_folder"]) == {"siteA", "siteB/cam1"}


def test_a_folder_whose_every_image_was_skipped_keeps_its_line_per_folder_saying_so(root, sample_dir, tiny_model_file,
                                                                                     tmp_path):
    """A folder of photos none of which could be read was left out of the figures per folder: with siteA read and
    siteB's photos all truncated, compliance.json had no figure per folder at all and drew no plot per folder, as if
    every photo sat in siteA."""
    photos = photo_folders(sample_dir, tmp_path / "in", ("siteA/a.jpg", "siteA/b.jpg"))
    (photos / "siteB").mkdir()
    for name in ("c.jpg", "d.jpg"):
        (photos / "siteB" / name).write_bytes((photos / "siteA" / "a.jpg").read_bytes()[:300])  # truncated
    out = tmp_path / "out"
    assert predict_quick(root, tiny_model_file, [photos], out, "--no-annotated") == 0
    compliance = json.loads((out / "compliance.json").read_text())
    per_folder = compliance["per_folder"]
    assert list(per_folder) == ["siteA", "siteB"] and per_folder["siteA"]["units"] == 2
    assert "images_skipped" not in per_folder["siteA"]
    assert per_folder["siteB"]["percent"] is None and per_folder["siteB"]["units"] == 0
    assert per_folder["siteB"]["images_skipped"] == 2 and "every image in it skipped (2" in per_folder["siteB"]["note"]
    assert {entry["folder"] for entry in compliance["skipped"]} == {"siteB"}
    assert (out / "compliance_by_folder.png").is_file()


def test_predict_rerun_into_a_folder_inside_its_input_reads_no_output_and_leaves_none_stale(
        root, sample_dir, tiny_model_file, tmp_path):
    photos = photo_folders(sample_dir, tmp_path / "photos")
    out = photos / "results"
    assert predict_quick(root, tiny_model_file, [photos], out) == 0
    assert (out / "compliance_by_folder.png").is_file() and len(list((out / "annotated").iterdir())) == 4
    assert predict_quick(root, tiny_model_file, [photos], out) == 0
    predictions = json.loads((out / "predictions.json").read_text())
    assert predictions["num_images"] == 4  # not the first run's annotated images and plot
    assert {entry["file"] for entry in predictions["skipped"]} == {f"{photos}/results"}
    assert "an output of this run" in predictions["skipped"][0]["reason"]
    # a rerun over one folder: no figure per folder, so the last run's plot goes, and its annotated images
    assert predict_quick(root, tiny_model_file, [photos / "siteA"], out, "--annotate-max", "1") == 0
    assert not (out / "compliance_by_folder.png").exists()
    assert len(list((out / "annotated").iterdir())) == 1


def test_predict_lists_a_name_that_is_not_utf8_and_writes_all_its_outputs(root, sample_dir, tiny_model_file,
                                                                            tmp_path, capsys):
    photos = photo_folders(sample_dir, tmp_path / "photos", ("a.jpg",))
    with open(bytes(photos) + b"/caf\xe9.jpg", "wb") as handle:
        handle.write((photos / "a.jpg").read_bytes())
    out = tmp_path / "out"
    assert predict_quick(root, tiny_model_file, [photos], out, "--no-annotated") == 0
    compliance = json.loads((out / "compliance.json").read_text())
    assert compliance["skipped"] == [{"file": f"{photos}/caf\\xe9.jpg", "reason": "the name is not valid UTF-8"}]
    assert compliance["num_images"] == 1 and (out / "predictions.csv").is_file()
    assert "caf\\xe9.jpg: the name is not valid UTF-8" in capsys.readouterr().err


def test_a_plain_tar_is_read_where_its_images_lie_not_unpacked_with_the_items_unpacking_gives(sample_dir, tmp_path,
                                                                                              monkeypatch):
    # A .tar given to predict was unpacked whole into the temporary folder before its first image ran: a user's
    # own 50 GB archive needed 50 GB there first. A plain .tar is now read member by member where the bytes lie
    # (a compressed one is still unpacked), with the names, folders, order, skips and pixels unpacking gives.
    import contextlib

    from utils.detection.inference import ImageFileDataset
    from utils.detection.prediction import collect_inputs

    photos = photo_folders(sample_dir, tmp_path / "photos")
    (photos / "notes.txt").write_text("not an image")
    (photos / "siteA" / ".hidden.jpg").write_bytes(b"hidden: not an input")
    (photos / "siteB" / "broken.jpg").write_bytes(b"not a JPEG")
    for name, mode in (("set.tar", "w"), ("set.tgz", "w:gz")):
        with tarfile.open(tmp_path / name, mode) as tar:
            for file in sorted(photos.rglob("*"), reverse=True):  # members out of path order
                if file.is_file():
                    tar.add(file, arcname=file.relative_to(photos).as_posix())
    unpacked, extractall = [], tarfile.TarFile.extractall

    def counted(self, *args, **kwargs):
        unpacked.append(Path(self.name).name)
        return extractall(self, *args, **kwargs)

    monkeypatch.setattr(tarfile.TarFile, "extractall", counted)
    with contextlib.ExitStack() as stack:
        (plain, plain_skipped), (packed, packed_skipped) = (collect_inputs([tmp_path / name], stack)
                                                            for name in ("set.tar", "set.tgz"))
        assert unpacked == ["set.tgz"]
        assert [item.name for item in plain] == ["set.tar:siteA/a.jpg", "set.tar:siteA/b.jpg",
                                                 "set.tar:siteB/broken.jpg", "set.tar:siteB/cam1/c.jpg",
                                                 "set.tar:siteB/d.jpg"]
        assert [(item.name, item.folder, item.file_name) for item in plain] == \
            [(item.name.replace("set.tgz", "set.tar"), item.folder, item.file_name) for item in packed]
        assert plain_skipped == [{**entry, "file": entry["file"].replace("set.tgz", "set.tar")}
                                 for entry in packed_skipped]
        assert plain_skipped == [{"file": "set.tar:notes.txt", "reason": "not an image file (format not recognised; "
                                                                         "read here: JPEG, PNG, BMP, TIFF, WEBP)"}]
        for decoded, expected in zip(ImageFileDataset(plain), ImageFileDataset(packed)):
            assert decoded.problem == expected.problem and (decoded.image is None) == (expected.image is None)
            assert decoded.image is None or torch.equal(decoded.image, expected.image)


def test_a_tar_member_is_decoded_where_it_lies_without_holding_a_large_one_that_is_no_image(sample_dir, tmp_path):
    # Read where it lies, a member's bytes were read whole before its header was looked at: 8 MB held for an
    # 8 MB member named .jpg that is no image (a 50 GB one, all of it). Now through a window on the archive.
    import tracemalloc

    from utils.data.images import ImageError, load_photo_span, load_rgb
    from utils.data.pairs import members_in_place

    photo = sorted((sample_dir / "images").glob("*.jpg"))[0]
    (tmp_path / "big.jpg").write_bytes(b"\0" * (8 << 20))
    with tarfile.open(tmp_path / "set.tar", "w") as tar:
        tar.add(tmp_path / "big.jpg", arcname="big.jpg")
        tar.add(photo, arcname="photo.jpg")
    big, image = members_in_place(tmp_path / "set.tar")
    decoded = load_photo_span(tmp_path / "set.tar", image.offset, image.size, "set.tar:photo.jpg").image
    assert np.array_equal(np.asarray(decoded), np.asarray(load_rgb(photo)))
    with pytest.raises(ImageError):  # once untraced: Pillow imports the plugins of every format it tries (~1.3 MB)
        load_photo_span(tmp_path / "set.tar", big.offset, big.size, "set.tar:big.jpg")
    tracemalloc.start()
    with pytest.raises(ImageError, match="set.tar:big.jpg: not an image file"):
        load_photo_span(tmp_path / "set.tar", big.offset, big.size, "set.tar:big.jpg")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1 << 20, f"{peak:,} bytes held"


def test_an_image_is_hashed_and_decoded_without_holding_the_file_whole(tmp_path):
    # load_rgb_hashed read the file whole to decode and hash it (predict's, training's and evaluation's scans): a
    # small JPEG with 16 MB after it held ~32 MB where load_rgb holds nothing of it (8 decode threads, 8 times).
    import tracemalloc

    from utils.data.images import load_rgb, load_rgb_hashed
    from utils.provenance import file_sha256

    picture = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(picture, "JPEG")
    (tmp_path / "tail.jpg").write_bytes(picture.getvalue() + b"\0" * (16 << 20))
    tracemalloc.start()
    image, sha256, error = load_rgb_hashed(tmp_path / "tail.jpg")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert error is None and sha256 == file_sha256(tmp_path / "tail.jpg")
    assert np.array_equal(np.asarray(image), np.asarray(load_rgb(tmp_path / "tail.jpg")))
    assert peak < 4 << 20, f"{peak:,} bytes held"


def test_a_tar_member_cut_off_by_a_truncated_archive_is_said_to_be_so_not_called_no_image(sample_dir, tmp_path):
    # Read where it lies (members_in_place, then load_photo_span at the listed offset), a member of an archive cut
    # short after it was listed (a copy still being written, a partial download) read as fewer bytes: 'not an
    # image file' or 'truncated image file', of a JPEG that is whole in the archive the user meant.
    import os

    from utils.data.images import ImageError, load_photo_span
    from utils.data.pairs import members_in_place

    photo = sorted((sample_dir / "images").glob("*.jpg"))[0]
    with tarfile.open(tmp_path / "set.tar", "w") as tar:
        tar.add(photo, arcname="a.jpg")
        tar.add(photo, arcname="b.jpg")
    _, last = members_in_place(tmp_path / "set.tar")
    for cut in (last.offset + last.size // 2, last.offset - 100):
        os.truncate(tmp_path / "set.tar", cut)
        with pytest.raises(ImageError, match=r"set.tar:b.jpg: cannot decode image: the archive set.tar ends at "
                                             r"byte [\d,]+, before this member's last byte"):
            load_photo_span(tmp_path / "set.tar", last.offset, last.size, "set.tar:b.jpg")
