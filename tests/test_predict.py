"""bin/predict.py end to end (corrupt files, odd image modes, archives, TTA) and the TTA merge itself."""

from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from helpers import calibrated_model_file, count_opens, run_script
from utils.detection.inference import detect
from utils.detection.compliance import merge_compliance


def run_predict(root, argv):
    return run_script(root, "predict", argv)


@pytest.mark.slow
def test_predict_survives_corrupt_files_and_odd_images(root, sample_dir, tiny_model_file, tmp_path, capsys):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    good = sorted((sample_dir / "images").glob("*.jpg"))[:3]
    for file in good[:2]:
        (inputs / file.name).write_bytes(file.read_bytes())
    (inputs / "site-b").mkdir()  # photos in two folders: one figure per folder too
    (inputs / "site-b" / good[2].name).write_bytes(good[2].read_bytes())
    (inputs / "broken.jpg").write_bytes(good[0].read_bytes()[:300])  # truncated JPEG
    (inputs / "notes.txt").write_text("not an image")
    Image.new("LA", (37, 300), (90, 128)).save(inputs / "tall_grey_alpha.png")  # odd size and mode
    palette = Image.fromarray(np.random.default_rng(0).integers(0, 255, (500, 700, 3), dtype=np.uint8)).convert("P")
    palette.save(inputs / "palette.png")
    out = tmp_path / "out"
    rc = run_predict(root, ["--images", str(inputs), str(tmp_path / "missing.jpg"), "--model", str(tiny_model_file),
                            "--output-dir", str(out), "--score-threshold", "0.05", "--device", "cpu",
                            "--batch-size", "2"])
    assert rc == 0
    captured = capsys.readouterr()
    line = [text for text in captured.out.splitlines() if text.startswith("compliance:")]
    # the model file holds no validation rates: cc stands in for the headline pacc2, and the line says so
    assert len(line) == 1 and "faces" in line[0] and "5 images; cc instead of pacc2: the model file holds" in line[0]

    predictions = json.loads((out / "predictions.json").read_text())
    assert predictions["num_images"] == 5
    skipped = {entry["file"].rsplit("/", 1)[-1]: entry["reason"] for entry in predictions["skipped"]}
    assert set(skipped) == {"broken.jpg", "notes.txt", "missing.jpg"}
    assert "truncated" in skipped["broken.jpg"]
    assert "does not exist" in skipped["missing.jpg"]
    assert "broken.jpg" in captured.err

    annotated = sorted(p.name for p in (out / "annotated").iterdir())
    # a photo in a subfolder: its annotated copy's name carries the folder (naming.annotated_stem)
    assert annotated == sorted([*(f"annotated_{p.stem}.jpg" for p in [*good[:2], inputs / "tall_grey_alpha.png",
                                                                       inputs / "palette.png"]),
                                f"annotated_site-b__{good[2].stem}.jpg"])
    with Image.open(out / "annotated" / "annotated_palette.jpg") as image:
        assert image.size == (700, 500) and image.mode == "RGB"  # annotated at the input's own size

    by_file = {image["file"]: image for image in predictions["images"]}
    for image in predictions["images"]:
        for det in image["detections"]:
            assert det["score"] >= 0.05
            x0, y0, x1, y1 = det["box"]
            assert 0 <= x0 <= x1 <= image["width"] and 0 <= y0 <= y1 <= image["height"]
    csv_text = (out / "predictions.csv").read_text()
    assert csv_text.splitlines()[0] == "file,xmin,ymin,xmax,ymax,label,score"
    rows = list(csv.DictReader(io.StringIO(csv_text)))
    assert rows and {row["label"] for row in rows} <= {"with_mask", "without_mask", "mask_weared_incorrect"}
    assert len(rows) == predictions["num_detections"] == sum(len(i["detections"]) for i in by_file.values())

    compliance = json.loads((out / "compliance.json").read_text())
    assert set(compliance["per_image"]) == set(by_file)
    for name, entry in compliance["per_image"].items():
        assert entry["faces"] == len(by_file[name]["detections"])
    assert compliance["overall"] == merge_compliance(compliance["per_image"].values())
    assert compliance["skipped"] == predictions["skipped"]
    assert (out / "predict_run.json").is_file()
    # the figure as an estimate: the headline with its interval and the images it rests on
    estimate = compliance["estimate"]
    assert estimate["method"] == "cc" and estimate["units"] == 5 and estimate["seed"] == 42
    assert estimate["percent"] == compliance["overall"]["percent_properly_masked"]
    assert estimate["faces_found"] == compliance["overall"]["faces"]
    assert set(compliance["estimates"]) == {"cc", "pcc"} and set(compliance["unavailable"]) == {"acc", "pacc", "pacc2"}
    assert compliance["calibration"]["used"] is False  # an untrained model file holds no validation rates
    for image in predictions["images"]:  # at the floor's threshold the score sums are those of the detections
        assert sum(image["soft_counts"].values()) == pytest.approx(sum(d["score"] for d in image["detections"]),
                                                                   rel=1e-3)  # scores rounded
    assert {folder: entry["units"] for folder, entry in compliance["per_folder"].items()} == {"": 4, "site-b": 1}
    assert by_file[f"{inputs}/site-b/{good[2].name}"]["folder"] == "site-b"
    assert (out / "compliance_by_folder.png").is_file()


def test_predict_tta_and_archive_input(root, sample_dir, tiny_model_file, tmp_path):
    archive = tmp_path / "batch.tar"
    with tarfile.open(archive, "w") as tar:
        for file in sorted((sample_dir / "images").glob("*.jpg"))[:2]:
            tar.add(file, arcname=file.name)
    out = tmp_path / "out"
    annotated_dir = tmp_path / "pictures"
    rc = run_predict(root, ["--images", str(archive), "--model", str(tiny_model_file), "--output-dir", str(out),
                            "--annotated-dir", str(annotated_dir), "--tta", "--score-threshold", "0.0",
                            "--device", "cpu", "--workers", "0"])
    assert rc == 0
    predictions = json.loads((out / "predictions.json").read_text())
    assert predictions["tta"] is True and predictions["num_images"] == 2
    assert all(image["file"].startswith("batch.tar:") for image in predictions["images"])
    assert len(list(annotated_dir.glob("annotated_*.jpg"))) == 2


@pytest.mark.slow
def test_predict_uses_flip_tta_as_the_model_chose_unless_told_otherwise(root, sample_dir, tiny_model_file, tmp_path,
                                                                        capsys):
    from utils.detection.model import load_model_file, save_model_file

    model, meta = load_model_file(tiny_model_file)
    chose = save_model_file(tmp_path / "chose.pt", model, {
        **meta, "inference_size": {"image_size": meta["image_size"], "chosen_on": "validation", "tta": True}})
    image = sorted((sample_dir / "images").iterdir())[0]
    common = ["--images", str(image), "--output-dir", str(tmp_path / "out"), "--device", "cpu", "--no-annotated",
              "--workers", "0"]
    for flags, expected in (([], True), (["--no-tta"], False)):
        assert run_predict(root, [*common, "--model", str(chose), *flags]) == 0
        assert json.loads((tmp_path / "out" / "predictions.json").read_text())["tta"] is expected
    assert "flip TTA off (--no-tta)" in capsys.readouterr().out
    assert run_predict(root, [*common, "--model", str(tiny_model_file)]) == 0  # a file without the choice: off
    assert json.loads((tmp_path / "out" / "predictions.json").read_text())["tta"] is False


@pytest.mark.slow
def test_predict_corrects_counts_only_at_the_working_size_the_rates_were_measured_at(root, sample_dir,
                                                                                    tiny_model_file, tmp_path):
    """The model's validation rates (meta "quantification") hold at the size they were measured at: predicting at
    another --image-size must not correct the counts with them, and says why; so must a merge of such shards. A
    record from before the size was kept holds at the size the model chose (or trained at, before choosing)."""
    measured = calibrated_model_file(tiny_model_file, tmp_path / "measured.pt", 0.5, working_size=160,
                                     chosen_size=160)
    legacy = calibrated_model_file(tiny_model_file, tmp_path / "legacy.pt", 0.5, chosen_size=160)
    image = sorted((sample_dir / "images").iterdir())[0]
    common = ["--images", str(image), "--score-threshold", "0.5", "--device", "cpu", "--no-annotated",
              "--workers", "0"]
    why = "the validation rates were measured at a working size of 160 px, these counts at 128 px (--image-size)"
    for model in (measured, legacy):
        for flags, used in (([], True), (["--image-size", "128"], False)):
            out = tmp_path / f"{model.stem}_{used}"
            assert run_predict(root, [*common, "--model", str(model), "--output-dir", str(out), *flags]) == 0
            compliance = json.loads((out / "compliance.json").read_text())
            assert compliance["working_size"] == (160 if used else 128)
            assert compliance["calibration"]["used"] is used, model.stem
            assert compliance["calibration"].get("why_not") == (None if used else why)
    # a merge of shards made at 128 px corrects nothing either
    merged = tmp_path / "merged"
    assert run_script(root, "merge_predictions", ["--inputs", tmp_path / "legacy_False" / "predictions.json",
                                                  "--output-dir", merged]) == 0
    compliance = json.loads((merged / "compliance.json").read_text())
    assert compliance["calibration"] == {"used": False, "why_not": why}


def test_predict_fails_when_nothing_is_readable(root, tiny_model_file, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    rc = run_predict(root, ["--images", str(bad), "--model", str(tiny_model_file),
                            "--output-dir", str(tmp_path / "out"), "--device", "cpu"])
    assert rc == 2
    assert f"predict: error: {bad}: no image could be processed" in capsys.readouterr().err
    compliance = json.loads((tmp_path / "out" / "compliance.json").read_text())
    assert compliance["overall"]["faces"] == 0 and compliance["overall"]["percent_properly_masked"] is None
    assert compliance["skipped"][0]["file"] == str(bad)


def photo_folders(sample_dir, folder, layout=("siteA/a.jpg", "siteA/b.jpg", "siteB/cam1/c.jpg", "siteB/d.jpg")):
    images = sorted((sample_dir / "images").glob("*.jpg"))
    for name, image in zip(layout, images, strict=False):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(image.read_bytes())
    return folder


def predict_quick(root, model, images, out, *extra):
    return run_predict(root, ["--images", *map(str, images), "--model", str(model), "--output-dir", str(out),
                              "--score-threshold", "0.05", "--device", "cpu", "--workers", "0", *map(str, extra)])


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


def test_predict_writes_all_of_its_outputs_or_none(root, sample_dir, tiny_model_file, tmp_path, monkeypatch):
    from utils.detection import prediction

    photos = photo_folders(sample_dir, tmp_path / "photos")
    out = tmp_path / "out"
    assert predict_quick(root, tiny_model_file, [photos], out, "--no-annotated") == 0

    def broken(images, path):  # part of the CSV written, after predictions.json: neither is left
        path.write_text("file,xmin\n")
        raise UnicodeEncodeError("utf-8", "x", 0, 1, "a failure while the outputs are written")

    monkeypatch.setattr(prediction, "write_predictions_csv", broken)
    assert predict_quick(root, tiny_model_file, [photos], out, "--no-annotated") == 1
    # no half set, and nothing of the last run: only the progress of the images done, for the rerun
    assert sorted(path.name for path in out.iterdir()) == [".predictions.json.progress.jsonl"]


def test_the_prediction_files_are_streamed_not_held_as_text(tmp_path):
    # Rendered as strings first (json.dumps joins a list of every piece), 100k images' files held ~600 MB.
    import tracemalloc

    from utils.detection.prediction import PREDICTION_FILES, write_prediction_files

    for count in (1000, 4000):
        images = [{"file": f"photos/s{k % 9}/{k}.jpg", "folder": f"s{k % 9}", "width": 64, "height": 48,
                   "detections": [{"box": [1.25, 2.5, 30.75, 40.0], "label": "with_mask", "score": 0.9132}] * 3,
                   "compliance": {"faces": 3}} for k in range(count)]
        targets = {key: tmp_path / f"{key}.out" for key in PREDICTION_FILES}
        tracemalloc.start()
        write_prediction_files(targets, {"images": images}, {"per_image": {i["file"]: i["compliance"] for i in images}},
                               images, {}, tmp_path / "plot.png")
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        written = sum(path.stat().st_size for path in targets.values())
        assert peak < written / 4, (count, peak, written)
    assert json.loads(targets["predictions_json"].read_text())["images"] == images
    assert len(targets["predictions_csv"].read_text().splitlines()) == 1 + 3 * count


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
        assert plain_skipped == [{"file": "set.tar:notes.txt", "reason": "not an image file name (extension '.txt')"}]
        for (_, image, problem, _), (_, expected, expected_problem, _) in zip(ImageFileDataset(plain),
                                                                              ImageFileDataset(packed)):
            assert problem == expected_problem and (image is None) == (expected is None)
            assert image is None or torch.equal(image, expected)


def test_a_tar_member_is_decoded_where_it_lies_without_holding_a_large_one_that_is_no_image(sample_dir, tmp_path):
    # Read where it lies, a member's bytes were read whole before its header was looked at: 8 MB held for an
    # 8 MB member named .jpg that is no image (a 50 GB one, all of it). Now through a window on the archive.
    import tracemalloc

    from utils.data.images import ImageError, load_rgb, load_rgb_span
    from utils.data.pairs import members_in_place

    photo = sorted((sample_dir / "images").glob("*.jpg"))[0]
    (tmp_path / "big.jpg").write_bytes(b"\0" * (8 << 20))
    with tarfile.open(tmp_path / "set.tar", "w") as tar:
        tar.add(tmp_path / "big.jpg", arcname="big.jpg")
        tar.add(photo, arcname="photo.jpg")
    big, image = members_in_place(tmp_path / "set.tar")
    decoded = load_rgb_span(tmp_path / "set.tar", image.offset, image.size, "set.tar:photo.jpg")
    assert np.array_equal(np.asarray(decoded), np.asarray(load_rgb(photo)))
    with pytest.raises(ImageError):  # once untraced: Pillow imports the plugins of every format it tries (~1.3 MB)
        load_rgb_span(tmp_path / "set.tar", big.offset, big.size, "set.tar:big.jpg")
    tracemalloc.start()
    with pytest.raises(ImageError, match="set.tar:big.jpg: not an image file"):
        load_rgb_span(tmp_path / "set.tar", big.offset, big.size, "set.tar:big.jpg")
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
    # Read where it lies (members_in_place, then load_rgb_span at the listed offset), a member of an archive cut
    # short after it was listed (a copy still being written, a partial download) read as fewer bytes: 'not an
    # image file' or 'truncated image file', of a JPEG that is whole in the archive the user meant.
    import os

    from utils.data.images import ImageError, load_rgb_span
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
            load_rgb_span(tmp_path / "set.tar", last.offset, last.size, "set.tar:b.jpg")


def _stop_after(monkeypatch, images: int, stop):
    """Make prediction's journal call *stop* after *images* records; returns the list of images the model read."""
    from utils.detection import prediction_progress

    read = []
    add = prediction_progress.PredictionProgress.add

    def counting_add(self, record):
        add(self, record)
        read.append(record["file"])
        if len(read) == images:
            stop()

    monkeypatch.setattr(prediction_progress.PredictionProgress, "add", counting_add)
    return read


def _hashed_inputs(tiny_model_file, sample_dir, tmp_path):
    """A model file and a folder of 4 images and a broken one, all below tmp_path/inputs: (model, photos, the
    images' paths, the inputs_sha256 of a fresh read of them all)."""
    from utils.provenance import inputs_sha256

    model = tmp_path / "inputs" / "model.pt"
    model.parent.mkdir()
    model.write_bytes(tiny_model_file.read_bytes())
    photos = photo_folders(sample_dir, tmp_path / "inputs" / "photos")
    (photos / "siteB" / "broken.jpg").write_bytes(b"not a JPEG")  # read, not decoded: an input all the same
    images = sorted(str(path) for path in photos.rglob("*.jpg"))
    return model, photos, images, inputs_sha256([model, *images])


def test_predict_opens_each_image_once_and_its_run_record_hashes_what_it_read(root, sample_dir, tiny_model_file,
                                                                             tmp_path, monkeypatch):
    # The run record hashed every input after predicting: a second full read of a 100k-image collection. The
    # decode now hashes the bytes it reads, and the record's inputs_sha256 is the value a fresh read gives.
    model, photos, images, expected = _hashed_inputs(tiny_model_file, sample_dir, tmp_path)
    with monkeypatch.context() as patch:
        opens = count_opens(patch, tmp_path / "inputs")
        assert predict_quick(root, model, [photos], tmp_path / "whole", "--no-annotated", "--batch-size", "2") == 0
    assert {path: opens.get(path, 0) for path in images} == dict.fromkeys(images, 1)
    assert opens[str(model)] == 3  # the stand-in check, the load, and one hash for the resume key and the record
    assert json.loads((tmp_path / "whole" / "predict_run.json").read_text())["inputs_sha256"] == expected


def test_a_resumed_predict_run_records_the_hashes_of_the_images_it_did_not_read_again(
        root, sample_dir, tiny_model_file, tmp_path, monkeypatch):
    # The images done before the stop are not read again: their hashes come from the progress file.
    model, photos, images, expected = _hashed_inputs(tiny_model_file, sample_dir, tmp_path)
    with monkeypatch.context() as patch:  # stopped after 3 inputs (2 kept: a whole batch), then resumed
        _stop_after(patch, 3, lambda: (_ for _ in ()).throw(KeyboardInterrupt))
        assert predict_quick(root, model, [photos], tmp_path / "out", "--no-annotated", "--batch-size", "2") == 130
    with monkeypatch.context() as patch:
        opens = count_opens(patch, tmp_path / "inputs")
        assert predict_quick(root, model, [photos], tmp_path / "out", "--no-annotated", "--batch-size", "2") == 0
    assert sorted(opens.get(path, 0) for path in images) == [0, 0, 1, 1, 1]  # the batch kept is not read again
    assert json.loads((tmp_path / "out" / "predict_run.json").read_text())["inputs_sha256"] == expected


@pytest.mark.slow
@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_a_stopped_predict_run_resumes_and_writes_what_a_run_never_stopped_writes(root, sample_dir, tiny_model_file,
                                                                                  tmp_path, monkeypatch, capsys, how):
    # A run over a large collection stopped part way (Ctrl-C, a pool's SIGTERM) lost every image it had done.
    import os
    import signal

    photos = photo_folders(sample_dir, tmp_path / "photos")
    (photos / "siteB" / "broken.jpg").write_bytes(b"not a JPEG")  # a skipped input, recorded as such
    args = ["--annotate-max", "3", "--batch-size", "2"]
    assert predict_quick(root, tiny_model_file, [photos], tmp_path / "whole", *args, "--annotated-tar",
                         tmp_path / "whole.tar") == 0
    out = tmp_path / "out"
    args += ["--annotated-tar", tmp_path / "drawn.tar"]

    def stop():
        if how == "ctrl-c":
            raise KeyboardInterrupt
        os.kill(os.getpid(), signal.SIGTERM)  # the job's handler: it stops after this image

    saved = signal.getsignal(signal.SIGTERM)
    try:
        with monkeypatch.context() as patch:
            first = _stop_after(patch, 3, stop)
            assert predict_quick(root, tiny_model_file, [photos], out, *args) == (130 if how == "ctrl-c" else 143)
    finally:
        signal.signal(signal.SIGTERM, saved)
    assert len(first) == 3 and (out / ".predictions.json.progress.jsonl").is_file()
    if how == "sigterm":  # the outputs not written yet got stand-ins, as train's do
        from utils.stop import is_stand_in

        assert is_stand_in(out / "predictions.json") and is_stand_in(tmp_path / "drawn.tar")
    # a drawing a kill cut short (utils.atomic's temporary) is not packed with the others
    (out / ".predictions.json.progress.annotated" / ".annotated_x.k3j2l1q0.tmp.jpg").write_bytes(b"half")
    capsys.readouterr()
    second = _stop_after(monkeypatch, 99, lambda: None)
    assert predict_quick(root, tiny_model_file, [photos], out, *args) == 0
    # the whole batch done is kept, the batch stopped in is read again as a whole: the same batches as unstopped
    assert "resuming a stopped run: 2 of 5 inputs done" in capsys.readouterr().out
    assert second == first[2:3] + second[1:] and len(second) == 3
    for name in ("predictions.json", "predictions.csv", "compliance.json"):
        assert (out / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    with tarfile.open(tmp_path / "drawn.tar") as drawn, tarfile.open(tmp_path / "whole.tar") as whole:
        assert sorted(drawn.getnames()) == sorted(whole.getnames()) and len(drawn.getnames()) == 3
        for name in whole.getnames():
            assert drawn.extractfile(name).read() == whole.extractfile(name).read(), name
    assert not [path.name for path in out.iterdir() if path.name.startswith(".")]  # progress and drawings gone


@pytest.mark.slow
def test_a_stopped_predict_runs_progress_is_not_used_for_another_model_setting_or_input(root, sample_dir,
                                                                                      tiny_model_file, tmp_path,
                                                                                      monkeypatch, capsys):
    photos = photo_folders(sample_dir, tmp_path / "photos")
    out = tmp_path / "out"
    args = ["--batch-size", "1"]

    def interrupt():
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        _stop_after(patch, 2, interrupt)
        assert predict_quick(root, tiny_model_file, [photos], out, *args) == 130
    (photos / "siteB" / "d.jpg").unlink()  # an input gone: the records may not be of these inputs
    capsys.readouterr()
    read = _stop_after(monkeypatch, 99, lambda: None)
    assert predict_quick(root, tiny_model_file, [photos], out, *args) == 0
    assert "input set (or unreadable); starting afresh" in capsys.readouterr().out and len(read) == 3
    # a kill that cut the last record short: the records before it are kept, the cut one read again
    with monkeypatch.context() as patch:
        _stop_after(patch, 2, interrupt)
        assert predict_quick(root, tiny_model_file, [photos], out, *args, "--score-threshold", "0.1") == 130
    progress = out / ".predictions.json.progress.jsonl"
    progress.write_bytes(progress.read_bytes()[:-20])
    read.clear()
    assert predict_quick(root, tiny_model_file, [photos], out, *args, "--score-threshold", "0.1") == 0
    assert "resuming a stopped run: 1 of 3 inputs done" in capsys.readouterr().out and len(read) == 2
    # a progress file that is not one (deeply nested JSON, not UTF-8): one line, and a run from the start
    for junk in (b"[" * 100000, b"\xff\xfe" * 10, b'{"predict_progress": 1}\n{"file": [1]}\n'):
        with monkeypatch.context() as patch:
            _stop_after(patch, 1, interrupt)
            assert predict_quick(root, tiny_model_file, [photos], out, *args) == 130
        progress.write_bytes(junk)
        read.clear()
        capsys.readouterr()
        assert predict_quick(root, tiny_model_file, [photos], out, *args) == 0
        assert "starting afresh" in capsys.readouterr().out and len(read) == 3


@pytest.mark.slow
def test_a_resumed_run_with_a_tag_keeps_its_own_drawings_not_another_tags(root, sample_dir, tiny_model_file,
                                                                          tmp_path, monkeypatch):
    # Two tags drawing into one folder: a resumed run took the other tag's drawings of the same names for its own.
    import hashlib

    photos = photo_folders(sample_dir, tmp_path / "photos")
    shared = ["--annotated-dir", tmp_path / "drawn", "--batch-size", "1"]
    digests = lambda: {p.name: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
                       for p in (tmp_path / "drawn").iterdir()}
    assert predict_quick(root, tiny_model_file, [photos], tmp_path / "whole", *shared) == 0
    whole = digests()

    def interrupt():
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        _stop_after(patch, 2, interrupt)
        assert predict_quick(root, tiny_model_file, [photos], tmp_path / "a", *shared, "--output-tag", "a") == 130
    assert predict_quick(root, tiny_model_file, [photos], tmp_path / "a", *shared, "--output-tag", "b",
                         "--score-threshold", "0.5") == 0
    assert predict_quick(root, tiny_model_file, [photos], tmp_path / "a", *shared, "--output-tag", "a") == 0
    assert digests() == whole  # tag a's drawings, at its threshold, as a run never stopped drew them


def test_annotated_names_go_in_input_order_to_the_images_read(root, sample_dir, tiny_model_file, tmp_path):
    # Two inputs of one stem, the first unreadable: the one read is annotated_x.jpg, as before the resume work.
    image = next(iter(sorted((sample_dir / "images").glob("*.jpg"))))
    for folder, data in (("a", b"not a JPEG"), ("b", image.read_bytes())):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "x.jpg").write_bytes(data)
    assert predict_quick(root, tiny_model_file, [tmp_path / "a" / "x.jpg", tmp_path / "b" / "x.jpg"],
                         tmp_path / "out") == 0
    assert [p.name for p in (tmp_path / "out" / "annotated").iterdir()] == ["annotated_x.jpg"]


def test_annotated_names_of_many_archives_of_one_set_of_names_cost_one_try_an_image():
    # Camera dumps (IMG_0001.JPG, ... in every archive): each image tried every number its name had been given.
    from pathlib import Path

    from utils.detection.prediction import _annotated_name
    from utils.detection.inference import ImageItem

    class Used(set):
        lookups = 0

        def __contains__(self, name):
            Used.lookups += 1
            return super().__contains__(name)

    for archives in (10, 40):
        items = [ImageItem(f"cam{a}.tar:IMG_{k}.JPG", Path(f"/x/cam{a}/IMG_{k}.JPG")) for a in range(archives)
                 for k in range(5)]
        used, numbers, Used.lookups = Used({"annotated_IMG_0_3.jpg"}), {}, 0  # a name taken by another image
        names = [_annotated_name(item, used, numbers) for item in items]
        assert Used.lookups <= 2 * len(items)
        given = [n for n in range(1, archives + 2) if n != 3][:archives]
        assert names[::5] == [f"annotated_IMG_0{'' if n == 1 else f'_{n}'}.jpg" for n in given]
        assert names[4::5] == [f"annotated_IMG_4{'' if n == 1 else f'_{n}'}.jpg" for n in range(1, archives + 1)]


@pytest.mark.slow
def test_predict_uses_the_models_operating_threshold_unless_told_otherwise(root, sample_dir, tiny_model_file,
                                                                          tmp_path, capsys):
    from utils.detection.model import load_model_file, save_model_file

    model, meta = load_model_file(tiny_model_file)
    chosen = save_model_file(tmp_path / "chosen.pt", model, {
        **meta, "operating_threshold": {"score_threshold": 0.35, "chosen_on": "validation"}})
    image = sorted((sample_dir / "images").iterdir())[0]
    common = ["--images", str(image), "--output-dir", str(tmp_path / "out"), "--device", "cpu", "--no-annotated"]
    assert run_predict(root, [*common, "--model", str(chosen)]) == 0
    assert "predict: score threshold 0.35 (the model's, chosen on its validation images)" in capsys.readouterr().out
    assert run_predict(root, [*common, "--model", str(chosen), "--score-threshold", "0.8"]) == 0
    assert "predict: score threshold 0.8 (--score-threshold)" in capsys.readouterr().out
    assert run_predict(root, [*common, "--model", str(tiny_model_file)]) == 0
    assert "predict: score threshold 0.5 (the default" in capsys.readouterr().out
    # validation rates measured at the model's threshold correct counts made there, and only there
    calibrated = calibrated_model_file(chosen, tmp_path / "calibrated.pt", score_threshold=0.35)
    assert run_predict(root, [*common, "--model", str(calibrated)]) == 0
    compliance = json.loads((tmp_path / "out" / "compliance.json").read_text())
    assert set(compliance["estimates"]) == {"cc", "pcc", "acc", "pacc", "pacc2"}
    assert compliance["calibration"] == {"used": True, "chosen_on": "validation", "images": 20,
                                         "faces": compliance["calibration"]["faces"], "score_threshold": 0.35,
                                         "floor": 0.05, "tta": False, "working_size": 128}
    assert json.loads((tmp_path / "out" / "predictions.json").read_text())["calibration"]["score_threshold"] == 0.35
    assert run_predict(root, [*common, "--model", str(calibrated), "--score-threshold", "0.8"]) == 0
    compliance = json.loads((tmp_path / "out" / "compliance.json").read_text())
    assert "measured at score >= 0.35" in compliance["unavailable"]["acc"]


class LeftHalfDetector(nn.Module):
    """Reports each bright rectangle whose left edge lies in the left half of its input: a stand-in
    that misses faces on the right, so only the flipped pass can find them there."""

    def __init__(self):
        super().__init__()
        self.roi_heads = type("RoiHeads", (), {"detections_per_img": 100})()

    def forward(self, images):
        outputs = []
        for image in images:
            bright = image[0] > 0.5
            columns = bright.any(dim=0).tolist() + [False]
            boxes, start = [], None
            for x, on in enumerate(columns):  # runs of bright columns = rectangles (they never share columns)
                if on and start is None:
                    start = x
                elif not on and start is not None:
                    ys = torch.nonzero(bright[:, start:x].any(dim=1)).reshape(-1)
                    if start < image.shape[-1] / 2:
                        boxes.append([start, int(ys.min()), x, int(ys.max()) + 1])
                    start = None
            boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
            outputs.append({"boxes": boxes, "labels": torch.ones(len(boxes), dtype=torch.int64),
                            "scores": torch.full((len(boxes),), 0.9)})
        return outputs


def test_tta_maps_flipped_boxes_back_and_merges_them():
    image = torch.zeros(3, 40, 100)
    image[:, 5:25, 10:30] = 1.0  # left face; its mirror image would be at x 70..90
    image[:, 15:35, 60:80] = 1.0  # right face, invisible to the stand-in unless flipped (then x 20..40)
    plain = detect(LeftHalfDetector(), [image])[0]
    assert plain["boxes"].tolist() == [[10.0, 5.0, 30.0, 25.0]]
    for result in detect(LeftHalfDetector(), [image, image], tta=True):
        found = sorted(zip(result["boxes"].tolist(), result["scores"].tolist()))
        # The flipped pass finds the right face, mapped back exactly; a wrong un-flip would put it elsewhere.
        assert sum((box for box, _ in found), []) == pytest.approx([10.0, 5.0, 30.0, 25.0, 60.0, 15.0, 80.0, 35.0])
        # Fused by weighted box fusion: a face only one of the two passes found keeps half its score.
        assert [score for _, score in found] == pytest.approx([0.45, 0.45])


def test_tta_merges_the_same_face_found_twice():
    image = torch.zeros(3, 40, 100)
    image[:, 5:25, 42:56] = 1.0  # starts left of centre in both the image and its mirror: both passes see it
    result = detect(LeftHalfDetector(), [image], tta=True)[0]
    assert result["boxes"].reshape(-1).tolist() == pytest.approx([42.0, 5.0, 56.0, 25.0])  # found twice, one fused box
    assert result["scores"].tolist() == pytest.approx([0.9])


class RightBiasedDetector(LeftHalfDetector):
    """Places every box 2 px right of the rectangle: a left-right bias that the flipped pass mirrors."""

    def forward(self, images):
        outputs = super().forward(images)
        for output in outputs:
            output["boxes"] = output["boxes"] + torch.tensor([2.0, 0.0, 2.0, 0.0])
        return outputs


def test_tta_averages_the_two_passes_boxes():
    image = torch.zeros(3, 40, 100)
    image[:, 5:25, 42:56] = 1.0
    assert detect(RightBiasedDetector(), [image])[0]["boxes"].tolist() == [[44.0, 5.0, 58.0, 25.0]]
    # The flipped pass puts it 2 px to the left once mapped back; fusing the two (NMS would keep one of
    # them) averages the bias away.
    result = detect(RightBiasedDetector(), [image], tta=True)[0]
    assert result["boxes"].reshape(-1).tolist() == pytest.approx([42.0, 5.0, 56.0, 25.0])


def test_detect_applies_the_score_threshold():
    image = torch.zeros(3, 20, 20)
    image[:, 2:8, 2:8] = 1.0
    assert len(detect(LeftHalfDetector(), [image], score_threshold=0.95)[0]["boxes"]) == 0
    assert len(detect(LeftHalfDetector(), [image], score_threshold=0.5)[0]["boxes"]) == 1


@pytest.fixture(scope="module")
def untrained_detector():
    """An untrained detector at 128 px that keeps every box (score floor 0), so each image gets many."""
    from utils.detection.model import build_model

    torch.manual_seed(0)
    model = build_model(backbone="mobilenet_v2_fpn", weights="none", image_size=128).eval()
    model.roi_heads.score_thresh = 0.0
    return model


def test_an_images_detections_do_not_depend_on_its_batch_mates(untrained_detector):
    # torchvision pads a batch to its largest image and the first stage ranks proposals over the padding:
    # a landscape photo batched with a portrait one used to get other boxes and scores than alone, so
    # a figure merged from shards depended on how the photos were sharded.
    generator = torch.Generator().manual_seed(1)
    landscape, portrait = torch.rand(3, 90, 160, generator=generator), torch.rand(3, 160, 70, generator=generator)
    together = detect(untrained_detector, [landscape, portrait, landscape])
    for image, batched in zip([landscape, portrait, landscape], together):
        alone = detect(untrained_detector, [image])[0]
        assert len(alone["boxes"]) > 0
        # the same detections; two images of one size run together, whose scores may differ by float rounding
        # (3e-8 here), which reorders the untrained model's tied scores: compared as sets
        assert canonical(batched) == canonical(alone)


def test_evaluation_and_validation_detect_each_image_as_predict_does(untrained_detector):
    """engine.run_inference (evaluate, the validation choices, the estimators' rates) called the model on the loader's
    batch, padded to its largest image: a photo's detections there were not the ones predict counts."""
    from utils.detection.engine import run_inference

    generator = torch.Generator().manual_seed(1)
    landscape, portrait = torch.rand(3, 90, 160, generator=generator), torch.rand(3, 160, 70, generator=generator)
    target = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    loader = [([landscape, portrait], [target, target])]  # one batch of two sizes, as a DataLoader yields it
    for tta in (False, True):
        predictions, _ = run_inference(untrained_detector, loader, torch.device("cpu"), tta=tta)
        for image, evaluated in zip([landscape, portrait], predictions):
            assert canonical(evaluated) == canonical(detect(untrained_detector, [image], tta=tta)[0])


def canonical(result: dict) -> list:
    return sorted((round(score, 4), label, [round(v, 1) for v in box]) for score, label, box in
                  zip(result["scores"].tolist(), result["labels"].tolist(), result["boxes"].tolist()))


def test_an_image_too_thin_for_the_model_is_a_listed_skip(untrained_detector, tmp_path):
    from utils.detection.inference import ImageItem, Skipped, detect_files, too_thin

    Image.new("RGB", (600, 1), (120, 80, 40)).save(tmp_path / "line.png")  # 1 px tall: 0.2 px at 128 px
    Image.new("RGB", (2, 3000), (120, 80, 40)).save(tmp_path / "post.png")
    Image.new("RGB", (160, 90), (120, 80, 40)).save(tmp_path / "photo.png")
    items = [ImageItem(name, tmp_path / name) for name in ("line.png", "photo.png", "post.png")]
    results = list(detect_files(untrained_detector, items, "cpu", batch_size=3, num_workers=0))
    assert [type(result).__name__ for result in results] == ["Skipped", "Detections", "Skipped"]
    for result in (results[0], results[2]):
        assert isinstance(result, Skipped) and "too thin for the detector" in result.reason
    assert "600x1 px" in results[0].reason
    assert too_thin(untrained_detector, 90, 160) is None and too_thin(untrained_detector, 4, 400) is None
    # called directly, the model gets no such image: no detections instead of an error for the batch
    assert len(detect(untrained_detector, [torch.rand(3, 1, 600)])[0]["boxes"]) == 0


def test_a_prediction_file_written_while_the_disk_fills_names_it_and_keeps_the_last_set(tmp_path, monkeypatch):
    # Through atomic_path (write_text) the line named the file; streamed through atomic_files it said
    # 'predict: error: [Errno 28] No space left on device' and named nothing.
    import errno

    from utils.cli import error_message
    from utils.detection import prediction

    targets = {key: tmp_path / name for key, name in zip(prediction.PREDICTION_FILES,
                                                          ("predictions.json", "predictions.csv", "compliance.json"))}
    for target in targets.values():
        target.write_text("the last run's")

    def full_disk(images, path):
        path.write_text("file,xmin\n")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(prediction, "write_predictions_csv", full_disk)
    with pytest.raises(OSError) as raised:
        prediction.write_prediction_files(targets, {"images": []}, {}, [], {}, tmp_path / "plot.png")
    csv_path = targets["predictions_csv"]
    assert error_message(raised.value) == (f"{csv_path}: cannot write predictions.csv (No space left on device); "
                                           "the file there, if any, is as it was")
    assert raised.value.errno == errno.ENOSPC
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(target.name for target in targets.values())
    assert all(target.read_text() == "the last run's" for target in targets.values())
