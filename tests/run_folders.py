"""Small run folders for the report and compare tests: the files the workflow's jobs write, with the
same names and structure, tiny (a few 160x120 images, small matplotlib figures), made in a second.

make_run_folder(path, ...) writes RUN_DIR/outputs/... plus statistics.json, split.csv and,
when given, config.yml; each piece can be left out to test a run that lacks it. build(root, run_dir, capsys)
runs bin/report.py on a run folder and returns its page.
"""

from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path

import yaml
from PIL import Image

from helpers import run_script
from utils.classes import CLASSES
from utils.detection.quantify import METHOD_NAMES
from utils.provenance import write_run_record

FIGURE_NAMES = ("class_distribution.png", "optimization_history.png", "param_importances.png", "loss_curve.png",
                "confusion_matrix.png", "pr_curves.png", "compliance_histogram.png",
                "compliance_by_folder.png")


def _figure(path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3, 2), dpi=50)
    ax.plot([1, 2, 3], [3, 1, 2])
    ax.set_title(title)
    fig.savefig(path)
    plt.close(fig)


def _jpeg(color, size=(160, 120)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "JPEG")
    return buffer.getvalue()


def image_errors(num_images: int) -> list[dict]:
    """Per-image errors as evaluate writes them: image i has i % 4 missed faces and one false box on every third."""
    entries = []
    for i in range(num_images):
        missed, false = i % 4, int(i % 3 == 0)
        entries.append({"image": f"test_img{i:03d}.jpg", "annotation": f"test_img{i:03d}.xml", "true_faces": 4,
                        "detections": 4 - missed + false, "correct": 4 - missed, "confused": 0, "missed": missed,
                        "false": false, "errors": missed + false, "true_percent": 75.0, "predicted_percent": 50.0})
    return sorted(entries, key=lambda e: (-e["errors"], -e["missed"], e["image"]))


def estimate_record(method: str, value: float, low: float, high: float, units: int, truth: float | None = None) -> dict:
    """One estimate as utils.detection.quantify writes it (with its error when *truth* is given)."""
    record = {"method": method, "estimator": METHOD_NAMES[method], "percent": value, "low": low, "high": high,
              "confidence": 0.95, "units": units, "unit": "image", "faces_found": 20, "faces_estimated": 20.0,
              "replicates": 1000, "replicates_defined": 1000, "seed": 42, "calibration_images": None,
              "resampled": "images"}
    if truth is not None:
        record.update(error_points=round(value - truth, 2), truth_inside=low <= truth <= high)
    return record


def make_run_folder(run_dir: Path, *, map_50: float = 0.5, compliance_error: float = 2.0, config: dict | None = None,
                    num_images: int = 6, hpo: bool = True, statistics: bool = True, evaluation: bool = True,
                    figures: bool = True, wall_time_s: float = 100.0) -> Path:
    outputs = run_dir / "outputs"
    outputs.mkdir(parents=True, exist_ok=True)
    true_percent = 75.0
    if evaluation:
        (outputs / "evaluation.json").write_text(json.dumps({
            "model": "model.pt", "backbone": "mobilenet_v2_fpn", "image_size": 128, "working_size": 160,
            "map": map_50 / 2, "map_50": map_50, "map_75": map_50 / 3, "mar_100": 0.4,
            "per_class": {name: {"ap": map_50 / 2, "ap_50": map_50 - 0.1 * i, "ap_75": 0.1, "recall": 0.5}
                          for i, name in enumerate(CLASSES)},
            "test_loss": 0.3, "test_loss_terms": {"loss_classifier": 0.1},
            "confusion_matrix": {"labels": [*CLASSES, "background"],
                                 "matrix": [[10, 1, 0, 2], [0, 5, 0, 1], [1, 0, 2, 1], [3, 1, 0, 0]],
                                 "rows": "true", "columns": "predicted", "iou_threshold": 0.5, "score_threshold": 0.5},
            "compliance": {"score_threshold": 0.5,
                           "true": {"faces": 24,
                                    "counts": {"with_mask": 18, "without_mask": 4, "mask_weared_incorrect": 2},
                                    "percent_properly_masked": true_percent},
                           "predicted": {"faces": 20, "counts": {"with_mask": 15, "without_mask": 4,
                                                                 "mask_weared_incorrect": 1},
                                         "percent_properly_masked": true_percent + compliance_error},
                           "error_points": compliance_error, "per_image_mae_points": 6.5, "images_compared": num_images,
                           "images_without_detections": 0, "images_without_faces": 0},
            "quantification": {
                "estimate": estimate_record("cc", true_percent + compliance_error, 60.0, 90.0, num_images,
                                            true_percent),
                "estimates": {"cc": estimate_record("cc", true_percent + compliance_error, 60.0, 90.0, num_images,
                                                    true_percent),
                              "pcc": estimate_record("pcc", 90.0, 85.0, 95.0, num_images, true_percent)},
                "unavailable": {"acc": "the model file holds no validation rates",
                                "pacc": "the model file holds no validation rates",
                                "pacc2": "the model file holds no validation rates"},
                "true_percent": true_percent, "true_faces": 24, "calibration": {"used": False}},
            "num_images": num_images, "num_faces": 24, "faces_per_class": {"with_mask": 18, "without_mask": 4,
                                                                            "mask_weared_incorrect": 2},
            "num_detections": 30, "skipped": [], "objects_dropped": []}))
        (outputs / "evaluation_images.json").write_text(json.dumps({
            "score_threshold": 0.5, "iou_threshold": 0.5, "order": "most errors first",
            "images": image_errors(num_images)}))
        write_run_record(outputs / "evaluate_run.json", "evaluate", {"images": "test_set.tar", "batch_size": 4})
    per_image = {f"pred_shard-000000.tar:img{i:03d}.jpg": {"faces": 4, "counts": {"with_mask": 2, "without_mask": 2,
                                                                                   "mask_weared_incorrect": 0},
                                                            "percent_properly_masked": 50.0} for i in range(num_images)}
    (outputs / "compliance.json").write_text(json.dumps({
        "num_parts": 1, "num_images": num_images, "skipped": [], "per_image": per_image,
        "overall": {"faces": 4 * num_images, "counts": {"with_mask": 2 * num_images, "without_mask": 2 * num_images,
                                                        "mask_weared_incorrect": 0}, "percent_properly_masked": 50.0},
        "estimate": estimate_record("cc", 50.0, 41.5, 58.5, num_images)}))
    write_run_record(outputs / "merge_predictions_run.json", "merge_predictions", {"expected": 1})
    with tarfile.open(outputs / "annotated_shard-000000.tar", "w") as archive:
        for i in range(num_images):
            data = _jpeg((40 * (i % 6), 120, 200 - 20 * (i % 8)))
            info = tarfile.TarInfo(f"annotated_img{i:03d}.jpg")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    write_run_record(outputs / "predict_shard-000000_run.json", "predict", {"images": ["pred_shard-000000.tar"],
                                                                             "batch_size": 4, "annotate_max": 500})
    (outputs / "preprocess_test_report.json").write_text(json.dumps({"run_record": {"params": {"prefix": "test_"}}}))
    if hpo:
        (outputs / "best_hpo_params.json").write_text(json.dumps({
            "params": {"lr": 0.01, "momentum": 0.9}, "value": 0.2, "objective": "fitness",
            "objective_description": "0.1 * mAP@0.5 + 0.9 * mAP@0.5:0.95", "metrics": {"map": 0.2, "map_50": 0.4},
            "worker_index": 0, "trial": 1, "fixed_params": {"epochs": 1},
            "workers": [{"file": "best_0.json", "best_value": 0.2,
                         "trial_counts": {"complete": 2, "pruned": 0, "fail": 0}}],
            "plot_notes": {}}))
        write_run_record(outputs / "best_0_run.json", "hpo", {"epochs": 1, "n_trials": 2})
    with open(outputs / "train_metrics.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["epoch", "lr", "train_loss", "val_loss", "val_map", "val_map_50", "seconds"])
        writer.writerows([[1, 0.01, 0.9, 0.8, 0.1, 0.2, 12.0], [2, 0.005, 0.6, 0.7, 0.2, 0.4, 11.5]])
    write_run_record(outputs / "model_run.json", "train", {"epochs": 2, "image_size": 128})
    with open(outputs / "class_distribution.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["split", "class", "objects", "images"])
        writer.writerows([[split, name, 5, 3] for split in ("train", "val", "test") for name in CLASSES])
    if figures:
        for name in FIGURE_NAMES:
            _figure(outputs / name, name)
    (run_dir / "split.csv").write_text("image,annotation,split\n" + "".join(
        f"img{i:03d}.jpg,img{i:03d}.xml,{('train', 'val', 'test')[i % 3]}\n" for i in range(12)))
    if statistics:
        (run_dir / "statistics.json").write_text(json.dumps({
            "workflow": "mask-detection", "started": "2026-01-01T00:00:00+0000", "wall_time_s": wall_time_s, "slots": 2,
            "totals": {"jobs": 3, "succeeded": 3, "failed": 0, "reused": 0, "cumulative_job_wall_time_s": wall_time_s},
            "critical_path": {"jobs": ["train", "evaluate"], "job_time_s": wall_time_s * 0.9},
            "jobs": [{"id": job, "transformation": job, "status": "succeeded", "tries": 1, "wall_time_s": seconds}
                     for job, seconds in (("train", wall_time_s * 0.7), ("evaluate", wall_time_s * 0.2),
                                          ("merge_predictions", 1.0))]}))
    if config is not None:
        (run_dir / "config.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    return run_dir


def build(root, run_dir, capsys) -> str:
    """The report page bin/report.py writes for *run_dir*, after checking that it succeeded and printed its path."""
    assert run_script(root, "report", [run_dir]) == 0
    out = capsys.readouterr().out
    assert f"report: {run_dir / 'outputs' / 'report.html'}" in out
    return (run_dir / "outputs" / "report.html").read_text()
