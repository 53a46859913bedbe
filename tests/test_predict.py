"""bin/predict.py end to end: corrupt files and odd images, TTA and the operating threshold the model chose,
the working size its validation rates hold at, outputs written all or none, annotated names."""

from __future__ import annotations

import csv
import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from helpers import calibrated_model_file, photo_folders, predict_quick, run_script
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


@pytest.mark.slow  # over 5 s on 2 cores (pyproject.toml)
def test_the_writes_queued_stay_bounded_with_explain(root, sample_dir, tiny_model_file, tmp_path, monkeypatch):
    """Queued writes of drawings were bounded by taking one back per image drawn, but --explain queues the drawing
    and an overlay per box explained: the queue grew by up to --explain-max-boxes an image, each write holding its
    picture (a 12 MP drawing 36 MB), wherever the disk wrote slower than the model explained. Here a write runs only
    when its result is asked for: the writes a slow disk leaves queued."""
    from utils.detection import prediction

    class LazyWriter:
        def __init__(self, *args, **kwargs):
            self.queued, self.most = [], 0
            writers.append(self)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            while self.queued:
                self.queued[0].result()

        def submit(self, fn, *args):
            writer = self

            class Later:
                def result(self):
                    if self in writer.queued:
                        writer.queued.remove(self)
                        fn(*args)

            self.queued.append(Later())
            self.most = max(self.most, len(self.queued))
            return self.queued[-1]

    writers: list[LazyWriter] = []
    monkeypatch.setattr(prediction, "ThreadPoolExecutor", LazyWriter)
    images = sorted((sample_dir / "images").glob("*.jpg"))[:6]
    out = tmp_path / "out"
    assert predict_quick(root, tiny_model_file, images, out, "--batch-size", "1", "--explain", "--explain-method",
                         "eigencam", "--explain-max-boxes", "5") == 0
    records = json.loads((out / "predictions.json").read_text())["images"]
    assert [len(record["explanations"]) for record in records] == [5] * 6  # 6 writes an image
    assert len(list((out / "annotated").glob("explain_*.jpg"))) == 30
    assert writers[0].most <= 4 * 1 + 1 + 5, writers[0].most  # the bound, and one image's writes: 30 queued before
