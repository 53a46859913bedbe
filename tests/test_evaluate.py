"""bin/evaluate.py end to end on a tiny untrained model, and the evaluation plumbing with an oracle model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from helpers import calibrated_model_file, load_script, run_script
from utils import defaults as D
from utils.classes import CLASSES
from utils.data.dataset import VocDetectionDataset
from utils.detection.evaluation import evaluate_model, labelled_pairs
from utils.data.pairs import pack_folder


@pytest.mark.slow
def test_evaluate_cli_writes_every_output(root, sample_dir, tiny_model_file, tmp_path, capsys):
    script = load_script(root, "evaluate")
    # A flat .tar of images and XML files given as both --images and --annotations, as the workflow stages it.
    archive = tmp_path / "test_set.tar"
    flat = tmp_path / "flat"
    flat.mkdir()
    stems = sorted(p.stem for p in (sample_dir / "images").iterdir())[:8]  # 8 images keep the test quick on CPU
    for folder in ("images", "annotations"):
        for file in (sample_dir / folder).iterdir():
            if file.stem in stems:
                (flat / file.name).write_bytes(file.read_bytes())
    pack_folder(flat, archive)
    out = tmp_path / "eval"
    # the model file holds validation rates at 0.05, the threshold this run counts at: acc and pacc are judged too
    model_file = calibrated_model_file(tiny_model_file, tmp_path / "calibrated.pt", score_threshold=0.05)
    args = script.get_args_parser().parse_args(
        ["--images", str(archive), "--annotations", str(archive), "--model", str(model_file),
         "--output-dir", str(out), "--score-threshold", "0.05", "--device", "cpu", "--batch-size", "4"])
    assert script.main(args) == 0
    for name in ("evaluation.json", "evaluation.txt", "confusion_matrix.png", "confusion_matrix.csv",
                 "pr_curves.png", "evaluate_run.json"):
        assert (out / name).is_file(), name
    report = json.loads((out / "evaluation.json").read_text())
    assert report["num_images"] == 8
    for key in ("map", "map_50", "map_75"):
        assert 0.0 <= report[key] <= 1.0  # an untrained model: defined, and low
    assert set(report["per_class"]) == set(CLASSES)
    assert all({"ap", "ap_50", "recall"} <= set(entry) for entry in report["per_class"].values())
    assert math.isfinite(report["test_loss"]) and report["test_loss"] > 0
    assert set(report["test_loss_terms"]) == {"loss_classifier", "loss_box_reg", "loss_objectness",
                                              "loss_rpn_box_reg"}
    matrix = report["confusion_matrix"]
    assert matrix["labels"] == [*CLASSES, "background"]
    # Every labelled face ends in its true row exactly once: matched to a box or missed (background column).
    for i, name in enumerate(CLASSES):
        assert sum(matrix["matrix"][i]) == report["faces_per_class"][name]
    assert report["num_faces"] >= 8
    csv_lines = (out / "confusion_matrix.csv").read_text().splitlines()
    assert csv_lines[0].split(",")[1:] == matrix["labels"] and len(csv_lines) == 5
    text = (out / "evaluation.txt").read_text()
    assert "mAP@0.5 " in text and "mean test loss" in text and "mask_weared_incorrect" in text
    assert "Compliance at score >= 0.05" in text and "per-image mean absolute error" in text
    assert report["compliance"]["true"]["faces"] == report["num_faces"]
    assert report["compliance"]["score_threshold"] == 0.05
    # the figure as an estimate: every estimator with its interval, its error and whether it holds the truth
    quantification = report["quantification"]
    assert quantification["true_faces"] == report["num_faces"]
    assert quantification["true_percent"] == report["compliance"]["true"]["percent_properly_masked"]
    assert set(quantification["estimates"]) == {"cc", "pcc", "acc", "pacc", "pacc2"}
    assert not quantification["unavailable"]
    cc = quantification["estimates"]["cc"]
    assert cc["percent"] == report["compliance"]["predicted"]["percent_properly_masked"]
    assert cc["units"] == 8 and cc["unit"] == "image" and cc["seed"] == 42 and cc["replicates"] == 1000
    for result in quantification["estimates"].values():
        assert {"low", "high", "error_points", "truth_inside", "faces_found"} <= set(result)
        if result["low"] is not None:
            assert result["low"] <= result["percent"] <= result["high"]
    assert quantification["estimates"]["acc"]["calibration_images"] == 20
    # 20 validation images of 1-6 faces: too few faces for an adjusted headline, so cc stands in and says why
    assert quantification["calibration"]["used"] and quantification["calibration"]["faces"] < D.CALIBRATION_MIN_FACES
    assert quantification["estimate"]["method"] == "cc"
    assert "labelled faces" in quantification["estimate"]["fallback"]
    assert "Percent properly masked as an estimate" in text and "truth inside" in text
    assert "mAP@[0.5:0.95]" in capsys.readouterr().out
    # the per-image errors are the confusion matrix split by image, worst image first
    images = json.loads((out / "evaluation_images.json").read_text())["images"]
    assert len(images) == 8 and [e["errors"] for e in images] == sorted((e["errors"] for e in images), reverse=True)
    cells = matrix["matrix"]
    assert sum(e["missed"] for e in images) == sum(row[3] for row in cells[:3])
    assert sum(e["false"] for e in images) == sum(cells[3][:3])
    assert sum(e["correct"] for e in images) == sum(cells[i][i] for i in range(3))
    assert sum(e["true_faces"] for e in images) == report["num_faces"]


class OracleDetector(nn.Module):
    """Returns the ground truth as detections in eval mode and a fixed loss in train mode.

    Images are recognised by their pixel sum, so the evaluation path (loader,
    inference, metrics, files) is tested without a trained network.
    """

    def __init__(self, dataset):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))
        self.truth = {}
        for image, target in dataset:
            self.truth[round(float(image.sum()), 2)] = target

    def forward(self, images, targets=None):
        if self.training:
            return {"loss_classifier": self.anchor + 0.25, "loss_box_reg": self.anchor + 0.5}
        outputs = []
        for image in images:
            target = self.truth[round(float(image.sum()), 2)]
            boxes = target["boxes"].as_subclass(torch.Tensor)
            outputs.append({"boxes": boxes, "labels": target["labels"], "scores": torch.full((len(boxes),), 0.9)})
        return outputs


def test_oracle_model_scores_perfectly(sample_dir, tmp_path):
    pairs, skipped = labelled_pairs(sample_dir / "images", sample_dir / "annotations")
    assert not skipped
    oracle = OracleDetector(VocDetectionDataset(pairs[:8]))
    evaluation = evaluate_model(oracle, pairs[:8], tmp_path, device="cpu", batch_size=3, num_workers=0)
    report = evaluation.report
    assert report["map"] == pytest.approx(1.0) and report["map_50"] == pytest.approx(1.0)
    assert report["test_loss"] == pytest.approx(0.75)
    matrix = report["confusion_matrix"]["matrix"]
    for i, name in enumerate(CLASSES):
        assert matrix[i][i] == report["faces_per_class"][name]
        assert matrix[i][3] == 0 and matrix[3][i] == 0
    for name in CLASSES:
        if report["faces_per_class"][name]:
            assert report["per_class"][name]["ap"] == pytest.approx(1.0)
    # a perfect detector reads the true compliance figure, overall and image by image
    compliance = report["compliance"]
    assert compliance["predicted"] == compliance["true"]
    assert compliance["true"]["counts"] == report["faces_per_class"]
    assert compliance["error_points"] == 0.0 and compliance["per_image_mae_points"] == 0.0
    assert compliance["images_compared"] == 8
    text = (tmp_path / "evaluation.txt").read_text()
    assert "error: +0.0 points" in text
    # every face found, whatever the IoU asked, and in the text as one row per class and one for any class
    recall = report["recall_by_iou"]
    assert recall["any_class"] == pytest.approx([1.0] * 10) and recall["any_class_mar"] == pytest.approx(1.0)
    assert all(row == pytest.approx([1.0] * 10) for row in recall["per_class"].values())
    assert "Faces found by IoU threshold" in text and "any class: mAP 1.0000" in text
    images = json.loads((tmp_path / "evaluation_images.json").read_text())["images"]
    assert {e["image"] for e in images} == {pair.image.name for pair in pairs[:8]}
    assert all(e["errors"] == 0 and e["correct"] == e["true_faces"] == e["detections"] for e in images)


@pytest.mark.slow
def test_evaluate_judges_the_adjusted_estimators_only_at_the_size_their_rates_were_measured_at(
        root, sample_dir, tiny_model_file, tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for stem in sorted(p.stem for p in (sample_dir / "images").iterdir())[:3]:
        for folder, suffix in (("images", ".jpg"), ("annotations", ".xml")):
            (flat / f"{stem}{suffix}").write_bytes((sample_dir / folder / f"{stem}{suffix}").read_bytes())
    model_file = calibrated_model_file(tiny_model_file, tmp_path / "calibrated.pt", 0.05, working_size=128)
    for flags, used in (([], True), (["--image-size", "96"], False)):
        out = tmp_path / f"eval_{used}"
        argv = ["--images", flat, "--annotations", flat, "--model", model_file, "--output-dir", out,
                "--score-threshold", "0.05", "--device", "cpu", *flags]
        assert run_script(root, "evaluate", argv) == 0
        quantification = json.loads((out / "evaluation.json").read_text())["quantification"]
        assert quantification["calibration"]["used"] is used
        assert ("acc" in quantification["estimates"]) is used
    assert quantification["calibration"]["why_not"] == ("the validation rates were measured at a working size of "
                                                        "128 px, these counts at 96 px (--image-size)")


def test_evaluate_reports_bad_model_file(root, sample_dir, tmp_path, capsys):
    bogus = tmp_path / "model.pt"
    bogus.write_bytes(b"not a model")
    argv = ["--images", sample_dir / "images", "--annotations", sample_dir / "annotations",
            "--model", bogus, "--output-dir", tmp_path / "out", "--device", "cpu"]
    assert run_script(root, "evaluate", argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"evaluate: error: {bogus}: not a readable model file") and err.count("\n") == 1
    assert not (tmp_path / "out" / "evaluation.json").exists()


def test_evaluate_reports_empty_set(root, tiny_model_file, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    argv = ["--images", empty, "--annotations", empty, "--model", tiny_model_file,
            "--output-dir", tmp_path / "out", "--device", "cpu"]
    assert run_script(root, "evaluate", argv) == 2
    assert f"{empty}: no image/annotation pairs" in capsys.readouterr().err


def test_dropped_objects_are_reported(sample_dir, tmp_path):
    # A model file of other classes is refused when read: tests/test_edge_model_file.py.
    from utils.detection.evaluation import dropped_objects
    from utils.data.voc import VocObject, parse_voc, write_voc

    pairs, _ = labelled_pairs(sample_dir / "images", sample_dir / "annotations")
    ann = parse_voc(pairs[0].annotation)
    ann.objects.append(VocObject("helmet", 1.0, 1.0, 20.0, 20.0))
    changed = tmp_path / pairs[0].annotation.name
    write_voc(changed, ann)
    dropped = dropped_objects([type(pairs[0])(pairs[0].image, changed), *pairs[1:3]])
    assert len(dropped) == 1 and dropped[0]["file"] == str(changed) and "helmet" in dropped[0]["reason"]


def test_evaluate_lists_unreadable_images_and_dropped_faces_and_goes_on(root, sample_dir, tiny_model_file, tmp_path,
                                                                         capsys):
    from utils.data.voc import VocObject, parse_voc, write_voc

    folder = tmp_path / "set"
    folder.mkdir()
    stems = sorted(p.stem for p in (sample_dir / "images").iterdir())[:4]
    for stem in stems:
        (folder / f"{stem}.jpg").write_bytes((sample_dir / "images" / f"{stem}.jpg").read_bytes())
        (folder / f"{stem}.xml").write_bytes((sample_dir / "annotations" / f"{stem}.xml").read_bytes())
    data = (folder / f"{stems[0]}.jpg").read_bytes()
    (folder / f"{stems[0]}.jpg").write_bytes(data[:len(data) // 2])  # truncated: its header still reads
    (folder / f"{stems[1]}.jpg").write_bytes(b"")
    annotation = parse_voc(folder / f"{stems[2]}.xml")
    annotation.objects.append(VocObject("helmet", 1.0, 1.0, 20.0, 20.0))
    write_voc(folder / f"{stems[2]}.xml", annotation)
    out = tmp_path / "out"
    assert run_script(root, "evaluate", ["--images", folder, "--annotations", folder, "--model", tiny_model_file,
                                         "--output-dir", out, "--device", "cpu", "--workers", "0"]) == 0
    report = json.loads((out / "evaluation.json").read_text())
    assert report["num_images"] == 2
    reasons = {entry["file"]: entry["reason"] for entry in report["skipped"]}
    assert set(reasons) == {str(folder / f"{stems[0]}.jpg"), str(folder / f"{stems[1]}.jpg")}
    assert "truncated" in reasons[str(folder / f"{stems[0]}.jpg")]
    text = (out / "evaluation.txt").read_text()
    assert "Skipped 2 files:" in text and "truncated" in text
    assert "Labelled faces not evaluated as written, in 1 annotation files: 1 dropped" in text
    assert f"{folder / stems[2]}.xml: object " in text and "'helmet'" in text
    assert "'helmet'" in capsys.readouterr().out  # the report printed is the text file's


def test_evaluates_run_record_hashes_its_images_from_the_read_that_checked_them(root, sample_dir, tiny_model_file,
                                                                                 tmp_path, monkeypatch):
    # The run record read every test image once more to hash it, after the check's decode and the evaluation's.
    from utils import provenance

    folder = tmp_path / "set"
    folder.mkdir()
    for stem in sorted(p.stem for p in (sample_dir / "images").iterdir())[:3]:
        (folder / f"{stem}.jpg").write_bytes((sample_dir / "images" / f"{stem}.jpg").read_bytes())
        (folder / f"{stem}.xml").write_bytes((sample_dir / "annotations" / f"{stem}.xml").read_bytes())
    hashed, file_sha256 = [], provenance.file_sha256
    monkeypatch.setattr(provenance, "file_sha256", lambda path, *args: hashed.append(Path(path).suffix)
                        or file_sha256(path, *args))
    assert run_script(root, "evaluate", ["--images", folder, "--annotations", folder, "--model", tiny_model_file,
                                         "--output-dir", tmp_path / "out", "--device", "cpu", "--workers", "0"]) == 0
    assert sorted(hashed) == [".pt", ".xml", ".xml", ".xml"]  # the images' hashes came from their decode
    monkeypatch.undo()
    inputs = [*sorted(folder.iterdir()), tiny_model_file]
    record = json.loads((tmp_path / "out" / "evaluate_run.json").read_text())
    assert record["inputs_sha256"] == provenance.inputs_sha256(inputs)


def test_an_output_dir_that_is_a_file_is_refused_before_any_image_runs(root, tiny_model_file, sample_dir, tmp_path,
                                                                        capsys):
    taken = tmp_path / "taken"
    taken.write_text("x")
    for out in (taken, taken / "sub"):
        argv = ["--images", sample_dir / "images", "--annotations", sample_dir / "annotations",
                "--model", tiny_model_file, "--output-dir", out, "--device", "cpu"]
        assert run_script(root, "evaluate", argv) == 2
        captured = capsys.readouterr()
        assert captured.err.strip() == f"evaluate: error: {taken}: a file, not a folder (--output-dir {out})"
        assert "score threshold" not in captured.out  # the model was not even loaded (it ran every image first)


def test_the_test_loss_leaves_out_an_image_too_thin_for_the_model_as_inference_does(sample_dir, tiny_model_file,
                                                                                     tmp_path):
    # Inference gave a 300x1 px image no detections (inference.too_thin), but evaluate's test loss ran the model on
    # it in train mode and torchvision refused the batch: 'unexpected RuntimeError: Input and output sizes should be
    # greater than 0' (exit 1) after the whole inference pass. The loss now leaves it out, as inference does.
    from PIL import Image

    from utils.data.voc import VocAnnotation, write_voc
    from utils.detection.engine import evaluate_loss
    from utils.detection.evaluation import evaluation_loader
    from utils.detection.model import load_model_file

    folder = tmp_path / "set"
    folder.mkdir()
    Image.new("RGB", (300, 1), (120, 90, 60)).save(folder / "banner.png")
    write_voc(folder / "banner.xml", VocAnnotation(filename="banner.png", width=300, height=1))
    banner = labelled_pairs(folder, folder)[0]
    pairs = labelled_pairs(sample_dir / "images", sample_dir / "annotations")[0][:1]
    model, _ = load_model_file(tiny_model_file)
    device = torch.device("cpu")

    def loss(of):
        return evaluate_loss(model, evaluation_loader(of, batch_size=3, num_workers=0, device=device), device)

    assert loss(pairs + banner) == loss(pairs)  # the banner's batch mates' mean, as if it were not there
    assert loss(banner) == {}  # no image the model can run: no loss, as for an empty set


def test_evaluates_files_are_one_set_a_stop_while_they_are_written_leaves_the_last_runs(sample_dir, tmp_path,
                                                                                        monkeypatch):
    # evaluate wrote its files one after another: stopped between two (Ctrl-C, a kill), it left this run's
    # evaluation.json beside the last run's figures and per-image errors, and nothing told them apart.
    from utils.detection import evaluation as module

    pairs, _ = labelled_pairs(sample_dir / "images", sample_dir / "annotations")
    oracle = OracleDetector(VocDetectionDataset(pairs[:4]))
    evaluate_model(oracle, pairs[:4], tmp_path, device="cpu", batch_size=2, num_workers=0)
    last = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    assert len(last) == 6

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(module, "plot_pr_curves", stopped)  # the last file of the set
    with pytest.raises(KeyboardInterrupt):  # another threshold: other figures in every file
        evaluate_model(oracle, pairs[:4], tmp_path, device="cpu", batch_size=2, num_workers=0, score_threshold=0.95)
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == last  # no temporary left either


@pytest.mark.slow
def test_evaluates_run_record_is_of_the_set_too(root, sample_dir, tiny_model_file, tmp_path, monkeypatch):
    # The run record was written after the set: a stop between them left this run's evaluation beside the last
    # run's record, which named the last run's model and settings.
    from utils import provenance

    flat, out = tmp_path / "flat", tmp_path / "out"
    flat.mkdir()
    for stem in sorted(p.stem for p in (sample_dir / "images").iterdir())[:3]:
        for folder, suffix in (("images", ".jpg"), ("annotations", ".xml")):
            (flat / f"{stem}{suffix}").write_bytes((sample_dir / folder / f"{stem}{suffix}").read_bytes())
    argv = ["--images", flat, "--annotations", flat, "--model", tiny_model_file, "--output-dir", out,
            "--score-threshold", "0.05", "--device", "cpu"]
    assert run_script(root, "evaluate", argv) == 0
    last = {path.name: path.read_bytes() for path in out.iterdir()}
    assert "evaluate_run.json" in last and len(last) == 7

    def stopped(*args, **kwargs):  # a stop as the record is made, the last file
        raise KeyboardInterrupt

    monkeypatch.setattr(provenance, "run_record", stopped)
    assert run_script(root, "evaluate", [*argv[:-3], "0.5", "--device", "cpu"]) == 130  # stopped as it ends
    assert {path.name: path.read_bytes() for path in out.iterdir()} == last
