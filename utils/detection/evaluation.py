"""The evaluate job: COCO mAP, a detection confusion matrix, PR curves, the test loss and the
compliance error on a labelled set.

mAP uses every detection the model keeps (its own low score floor), as COCO
evaluation expects ranked detections; the confusion matrix and the compliance error
(true vs predicted faces per class and percent properly masked) use only detections
at or above --score-threshold, the operating point of the predict job.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from .. import defaults as D
from ..atomic import atomic_files, dump_json
from ..classes import CLASSES, NAME_OF, NO_LABEL_MAP, LabelMap
from ..cli import SKIPPED_PRINTED
from ..data.dataset import VocDetectionDataset, collate
from .compliance import compliance_error, compliance_error_lines, operating_threshold
from .quantify import (UNADJUSTED, Calibration, Units, calibration_problem, calibration_record, calibration_summary,
                       judge, set_estimates, soft_counts, true_percent)
from .engine import evaluate_loss, run_inference
from ..data.images import ImageError, image_size
from .inference import default_num_workers, set_box_voting, too_thin
from ..naming import evaluation_output_names
from .inference_size import inference_box_voting, inference_size, inference_tta, set_inference_size, working_size
from .model import load_model_file
from .metrics import _clean_pred, compute_coco, detection_confusion_matrix, pr_curves, recall_by_iou
from ..data.pairs import SUBFOLDER_NOT_READ, pair_folders, scan_pairs
from .plots import plot_confusion_matrix, plot_pr_curves
from ..data.voc import VocError, clean_objects, parse_voc
from ..errors import InputError
from ..figures import one_decimal

CONFUSION_IOU = D.MATCH_IOU


class EvaluationInputError(InputError):
    """The labelled set cannot be evaluated; the message says why."""


@dataclass
class Evaluation:
    report: dict
    outputs: dict


def labelled_pairs(images_dir, annotations_dir):
    """(pairs, skipped [{file, reason}]) for a folder of images and one of VOC files.

    Each pair is read in full first, its XML parsed and its image decoded: an XML that does not parse or
    an image that does not decode (empty, truncated, not an image) is a listed skip, not a run stopped
    half way by the loader; EvaluationInputError when no pair is left."""
    pairing = pair_folders(images_dir, annotations_dir)
    skipped = [{"file": str(p), "reason": "image without annotation"} for p in pairing.images_without_annotation]
    skipped += [{"file": str(p), "reason": "annotation without image"} for p in pairing.annotations_without_image]
    # what the folders hold that is no input, listed as preprocess and validation list it (it was left out unsaid)
    skipped += [{"file": item["file"], "reason": item["reason"]} for item in pairing.left_out]
    skipped += [{"file": f"{folder}/", "reason": SUBFOLDER_NOT_READ} for folder in pairing.folders]
    pairs, problems = scan_pairs(pairing.pairs)  # a full decode: a truncated file passes a header read
    skipped += [{"file": item["file"], "reason": item["problem"]} for item in problems]
    where = "" if Path(annotations_dir) == Path(images_dir) else f" (annotations: {annotations_dir})"
    if not pairing.pairs:
        raise EvaluationInputError(f"{images_dir}: no image/annotation pairs found{where}")
    if not pairs:
        first = skipped[len(skipped) - len(pairing.pairs)]
        raise EvaluationInputError(f"{images_dir}: none of its {len(pairing.pairs)} image/annotation pairs can be "
                                   f"read{where}, e.g. {first['file']}: {first['reason']}")
    return pairs, skipped


def runnable_pairs(model, pairs) -> tuple[list, list[dict]]:
    """(the pairs *model* can run on, [{file, reason}] for the images too thin for it: inference.too_thin, the reason
    predict lists such an image with, and the service's 422). Evaluated, such an image got no detections, its
    faces counted as missed without a word, while the test loss left it out."""
    runnable, skipped = [], []
    for pair in pairs:
        try:
            width, height = pair.image_size or image_size(pair.image)  # scan_pairs' decode gives it
        except ImageError:
            runnable.append(pair)  # the loader names the file and its problem
            continue
        if problem := too_thin(model, height, width):
            skipped.append({"file": str(pair.image), "reason": problem})
        else:
            runnable.append(pair)
    return runnable, skipped


def load_trained_model(path, device, score_threshold: float | None = None, working_size: int | None = None,
                       tta: bool | None = None, box_voting: bool | None = None):
    """(model, meta, score threshold, where it comes from) for a job that runs a trained model: the
    model file loaded and checked, the threshold given, else the one chosen on validation (ModelError
    naming the file when it cannot be used). The model runs at the working size given, else the one
    chosen on validation (utils/detection/inference_size.py); meta["working_size"] says which, and why.
    meta["tta"] and meta["box_voting"] likewise: flip TTA and box voting as given, else as chosen on validation."""
    model, meta = load_model_file(path, device)  # refuses a file of other classes (model_file.check_model_meta)
    record = meta.get("quantification")
    if record and record.get("working_size") is None:
        # files from before 2026-12-05 do not say where their rates were measured: at the size chosen on
        # validation, or, before that choice was made, at the training size: what inference_size gives unasked
        meta = {**meta, "quantification": {**record, "working_size": inference_size(meta, None)[0]}}
    threshold, source = operating_threshold(meta, score_threshold)
    size, size_source = inference_size(meta, working_size)
    set_inference_size(model, size)
    use_tta, tta_source = inference_tta(meta, tta)
    vote_iou, voting_source = inference_box_voting(meta, box_voting)
    set_box_voting(model, vote_iou)
    return model, {**meta, "working_size": size, "working_size_source": size_source, "tta": use_tta,
                   "tta_source": tta_source, "box_voting": vote_iou is not None, "box_vote_iou": vote_iou,
                   "box_voting_source": voting_source}, threshold, source


def dropped_objects(pairs, label_map: LabelMap = NO_LABEL_MAP) -> list[dict]:
    """Objects the dataset leaves out (unknown class, outside the image, no area), per annotation file.

    Computed here, in this process, because the dataset records them in whichever DataLoader
    worker read the file; image sizes come from the headers, as the dataset's decode would give.
    """
    dropped = []
    for pair in pairs:
        try:
            width, height = image_size(pair.image)
            _, problems = clean_objects(parse_voc(pair.annotation, label_map), width, height, known_classes=CLASSES)
        except (ImageError, VocError):
            continue  # the loader raises for these with the file named; nothing to add here
        if problems:
            dropped.append({"file": str(pair.annotation), "reason": "; ".join(problems)})
    return dropped


def evaluation_loader(pairs, batch_size: int = D.INFERENCE_BATCH_SIZE, num_workers: int | None = None, device=None,
                      label_map: LabelMap = NO_LABEL_MAP) -> DataLoader:
    num_workers = default_num_workers() if num_workers is None else num_workers
    dataset = VocDetectionDataset(pairs, label_map=label_map)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate,
                      pin_memory=torch.device(device or "cpu").type == "cuda")


def _confusion_csv(matrix, labels) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["true \\ predicted", *labels])
    for label, row in zip(labels, matrix):
        writer.writerow([label, *row])
    return buffer.getvalue()


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def format_report(report: dict, listed_in=None) -> str:
    """evaluation.txt: the figures a person reads first. *listed_in*: the file that lists every skipped file and
    every annotation whose faces were dropped or clipped (evaluation.txt, for the copy printed): each list is then
    cut after SKIPPED_PRINTED lines."""

    def entry_lines(entries: list[dict]) -> list[str]:
        printed = entries[:SKIPPED_PRINTED] if listed_in else entries
        rest = len(entries) - len(printed)
        return ([f"  {entry['file']}: {entry['reason']}" for entry in printed]
                + ([f"  and {rest} more: all listed in {listed_in}"] if rest else []))

    lines = [
        f"Evaluation of {report.get('model', 'the model')} on {report['num_images']} images "
        f"({report['num_faces']} labelled faces)",
        "",
        f"mAP@[0.5:0.95]  {_fmt(report['map'])}",
        f"mAP@0.5         {_fmt(report['map_50'])}",
        f"mAP@0.75        {_fmt(report['map_75'])}",
        f"mAR@100         {_fmt(report['mar_100'])}",
        f"mean test loss  {_fmt(report['test_loss'])}",
        "",
        f"{'class':<24}{'faces':>7}{'AP':>9}{'AP50':>9}{'AP75':>9}{'recall':>9}",
    ]
    for name in CLASSES:
        entry = report["per_class"][name]
        lines.append(f"{name:<24}{report['faces_per_class'][name]:>7}{_fmt(entry['ap']):>9}"
                     f"{_fmt(entry['ap_50']):>9}{_fmt(entry['ap_75']):>9}{_fmt(entry['recall']):>9}")
    lines += recall_lines(report.get("recall_by_iou"))
    cm = report["confusion_matrix"]
    lines += ["", f"Confusion matrix (rows = true, columns = predicted; IoU >= {cm['iou_threshold']}, "
                  f"score >= {cm['score_threshold']}):"]
    width = max(len(label) for label in cm["labels"]) + 2
    lines.append(" " * width + "".join(f"{label:>{width}}" for label in cm["labels"]))
    for label, row in zip(cm["labels"], cm["matrix"]):
        lines.append(f"{label:<{width}}" + "".join(f"{count:>{width}}" for count in row))
    lines += ["", "A missed face counts in the background column, a spurious or duplicate box in the "
                  "background row."]
    lines += ["", *compliance_error_lines(report["compliance"])]
    if report.get("quantification"):
        lines += ["", *estimate_lines(report["quantification"])]
    if report["skipped"]:
        lines += ["", f"Skipped {len(report['skipped'])} files:"]
        lines += entry_lines(report["skipped"])
    if report.get("objects_dropped"):
        entries = report["objects_dropped"]
        dropped = sum(entry["reason"].count("object dropped") for entry in entries)
        lines += ["", f"Labelled faces not evaluated as written, in {len(entries)} annotation files: {dropped} "
                      "dropped (unknown class, no area, outside the image), the others clipped to the image:"]
        lines += entry_lines(entries)
    return "\n".join(lines) + "\n"


def recall_lines(recall: dict | None) -> list[str]:
    """evaluation.txt's block: the share of the faces found at each IoU threshold, per class and for any class."""
    if not recall or not (recall["per_class"] or recall["any_class"]):
        return []
    rows = [*recall["per_class"].items(), ("any class", recall["any_class"])]
    lines = ["", "Faces found by IoU threshold (100 detections per image and class; mAR@100 is a row's mean;",
             "'any class' counts a face found whatever class its box says):",
             f"{'IoU':<24}" + "".join(f"{t:>7.2f}" for t in recall["iou_thresholds"])]
    lines += [f"{name:<24}" + "".join("    n/a" if v is None else f"{v:>7.3f}" for v in values)
              for name, values in rows if values]
    lines.append(f"any class: mAP {_fmt(recall['any_class_map'])}, mAP@0.5 {_fmt(recall['any_class_map_50'])}, "
                 f"mAR {_fmt(recall['any_class_mar'])}")
    return lines


def estimate_lines(report: dict) -> list[str]:
    """evaluation.txt's block: every estimator against the truth."""
    truth = report["true_percent"]
    units = report["estimate"]["units"]  # what every estimate rests on, as the report's table and each line say
    lines = [f"Percent properly masked as an estimate (true: {'n/a' if truth is None else f'{one_decimal(truth)}%'} of "
             f"{report['true_faces']} faces in {units} image{'' if units == 1 else 's'}; 95% bootstrap intervals, "
             f"{report['estimate']['replicates']} replicates, seed {report['estimate']['seed']}):",
             f"{'estimator':<10}{'percent':>9}{'interval':>17}{'error':>9}{'truth inside':>14}"]
    for method, result in report["estimates"].items():
        interval = "n/a" if result["low"] is None else f"{one_decimal(result['low'])}-{one_decimal(result['high'])}"
        error = "n/a" if result["error_points"] is None else f"{result['error_points']:+.1f}"
        inside = {True: "yes", False: "no", None: "n/a"}[result["truth_inside"]]
        percent = "n/a" if result["percent"] is None else one_decimal(result["percent"])
        lines.append(f"{method:<10}{percent:>9}{interval:>17}{error:>9}{inside:>14}")
    # why a figure or an interval reads n/a above (no faces found, one image with faces, no spread): the report's
    # table and the printed line say it, and this table said only n/a
    lines += [f"{method:<10}{result['note']}" for method, result in report["estimates"].items() if result.get("note")]
    for method, why in report["unavailable"].items():
        lines.append(f"{method:<10}not computed: {why}")
    headline = report["estimate"]
    lines.append(f"headline estimator: {headline['method']}" + (f" ({headline['fallback']})" if "fallback" in headline
                                                                 else ""))
    widened = [m for m in UNADJUSTED if report["estimates"].get(m, {}).get("calibration_error_points") is not None]
    if widened:
        lines.append(f"{' and '.join(widened)} intervals also span the estimate less its error on the validation "
                     "images; acc, pacc and pacc2 re-estimate their rates from resamples of them.")
    else:
        lines.append("The cc and pcc intervals cover the sampling of images only (no usable validation images).")
    return lines


def per_image_errors(preds, targets, pairs, score_threshold: float, iou_threshold: float = CONFUSION_IOU) -> list[dict]:
    """Each image's detection errors at the operating threshold, worst first (evaluation_images.json).

    The counts are that image's share of the confusion matrix (the same matching): correct
    (right class), confused (a face found with the wrong class), missed (a face not found),
    false (a box on no face, or a second box on one); errors = missed + false + confused.
    """
    images = []
    for pred, target, pair in zip(preds, targets, pairs, strict=True):
        matrix, labels = detection_confusion_matrix([pred], [target], iou_threshold=iou_threshold,
                                                    score_threshold=score_threshold)
        classes = len(labels) - 1  # the last row and column are the background
        correct = sum(matrix[i][i] for i in range(classes))
        found = sum(matrix[i][j] for i in range(classes) for j in range(classes))
        missed = sum(matrix[i][classes] for i in range(classes))
        false = sum(matrix[classes][j] for j in range(classes))
        image_compliance = compliance_error([pred], [target], score_threshold)
        truth, kept = image_compliance["true"], image_compliance["predicted"]
        images.append({"image": pair.image.name, "annotation": pair.annotation.name,
                       "true_faces": truth["faces"], "detections": kept["faces"], "correct": correct,
                       "confused": found - correct, "missed": missed, "false": false,
                       "errors": missed + false + found - correct,
                       "true_percent": truth["percent_properly_masked"],
                       "predicted_percent": kept["percent_properly_masked"]})
    return sorted(images, key=lambda entry: (-entry["errors"], -entry["missed"], entry["image"]))


def evaluated_units(preds, labelled: Calibration, floor: float) -> Units:
    """The evaluated images as targets, counted as predict counts them: kept = the confusion matrices' column
    sums, score sums = each image's soft_counts (its sums rounded once, predict's rule). The column sums of the
    soft matrices, rounded cell by cell, are up to 0.0002 a class an image apart from them: pcc read 40.0 %
    here and 40.01 % in predict for the same detections."""
    plain = [_clean_pred(pred) for pred in preds]
    soft = [list(soft_counts(p["labels"].tolist(), p["scores"].tolist(), floor).values()) for p in plain]
    return Units.of(Units.from_calibration(labelled).counts, soft)


def evaluation_estimates(preds, targets, score_threshold: float, model_calibration: dict | None,
                         method: str = D.COMPLIANCE_ESTIMATOR, floor: float = D.DETECTION_FLOOR, tta: bool = False,
                         working_size: int | None = None, **bootstrap) -> dict:
    """Every estimator on a labelled set against its true percent: estimate, interval, error in
    points and whether the truth lies inside the interval (evaluation.json's "quantification").
    *tta* and *working_size* say how *preds* were made."""
    labelled = Calibration.from_record(calibration_record(preds, targets, score_threshold, "evaluated", floor, tta,
                                                          working_size))
    note = calibration_problem(model_calibration, score_threshold, tta, working_size)
    calibration = None if note else Calibration.from_record(model_calibration)
    report = set_estimates(evaluated_units(preds, labelled, floor), calibration, note, method, **bootstrap)
    truth = true_percent(labelled)
    for result in (report["estimate"], *report["estimates"].values()):
        judge(result, truth)
    report["true_percent"] = None if truth is None else round(truth, 2)
    report["true_faces"] = int(labelled.truth.sum())
    report["calibration"] = calibration_summary(model_calibration, note)
    return report


def evaluate_model(model, pairs, output_dir, device="cpu", score_threshold: float = D.SCORE_THRESHOLD,
                   batch_size: int = D.INFERENCE_BATCH_SIZE, num_workers: int | None = None, skipped=(),
                   settings: dict | None = None, progress: bool = False, label_map: LabelMap = NO_LABEL_MAP,
                   tag: str | None = None, calibration: dict | None = None, tta: bool = False,
                   record=None) -> Evaluation:
    """Evaluate *model* on *pairs* and write evaluation.json/.txt, confusion_matrix.png/.csv, pr_curves.png (and
    the run record *record()* gives), one set.

    *calibration* is the model file's validation record (meta "quantification"): with it the adjusted
    compliance estimators are judged too; without it (older model files) only cc and pcc, said so.
    *tta*: flip test-time augmentation (the test loss is the plain model's).
    """
    output_dir = Path(output_dir)
    names = evaluation_output_names(tag)
    device = torch.device(device)
    pairs, thin = runnable_pairs(model, pairs)
    skipped = [*skipped, *thin]
    if thin and not pairs:
        raise EvaluationInputError(f"no image the model can run on, e.g. {thin[0]['file']}: {thin[0]['reason']}")
    loader = evaluation_loader(pairs, batch_size=batch_size, num_workers=num_workers, device=device,
                               label_map=label_map)
    preds, targets = run_inference(model, loader, device, progress=progress, description="evaluate", tta=tta)
    # torchvision returns losses only in train mode: evaluate_loss runs train mode with BatchNorm kept in
    # eval, no gradients and a fixed sampler seed, so the figure is a true held-out loss.
    losses = evaluate_loss(model, loader, device, progress=progress)
    coco = compute_coco(preds, targets)
    matrix, labels = detection_confusion_matrix(preds, targets, iou_threshold=CONFUSION_IOU,
                                                score_threshold=score_threshold)
    curves = pr_curves(coco, iou_threshold=0.5)
    compliance = compliance_error(preds, targets, score_threshold)
    faces_per_class = {name: 0 for name in CLASSES}
    for target in targets:
        for label in target["labels"].tolist():
            faces_per_class[NAME_OF[int(label)]] += 1
    summary = coco.summary
    object_problems = dropped_objects(pairs, label_map)
    report = {
        **(settings or {}),
        "map": summary["map"],
        "map_50": summary["map_50"],
        "map_75": summary["map_75"],
        "mar_100": summary["mar_100"],
        "map_small": summary["map_small"],
        "map_medium": summary["map_medium"],
        "map_large": summary["map_large"],
        "per_class": summary["per_class"],
        "recall_by_iou": recall_by_iou(preds, targets, coco),
        "test_loss": losses.get("loss"),
        "test_loss_terms": {k: v for k, v in losses.items() if k != "loss"},
        "confusion_matrix": {"labels": labels, "matrix": matrix, "rows": "true", "columns": "predicted",
                             "iou_threshold": CONFUSION_IOU, "score_threshold": score_threshold},
        "compliance": compliance,
        "quantification": evaluation_estimates(preds, targets, score_threshold, calibration, tta=tta,
                                               working_size=working_size(model)),
        "num_images": len(pairs),
        "num_faces": sum(faces_per_class.values()),
        "faces_per_class": faces_per_class,
        "num_detections": sum(len(p["scores"]) for p in preds),
        "skipped": list(skipped),
        "objects_dropped": object_problems,
    }
    outputs = {key: output_dir / names[name] for key, name in (
        ("evaluation_json", "evaluation.json"), ("evaluation_txt", "evaluation.txt"),
        ("confusion_matrix_csv", "confusion_matrix.csv"), ("evaluation_images_json", "evaluation_images.json"),
        ("confusion_matrix_png", "confusion_matrix.png"), ("pr_curves_png", "pr_curves.png"))}
    # One set, renamed in together (utils.atomic.atomic_files): a job stopped while writing them left this run's
    # evaluation.json beside the last run's figures and per-image errors, which nothing told apart.
    with atomic_files() as files:
        with files.writing(outputs["evaluation_json"]) as tmp:
            dump_json(report, tmp)
        with files.writing(outputs["evaluation_txt"]) as tmp:
            tmp.write_text(format_report(report), encoding="utf-8")
        with files.writing(outputs["confusion_matrix_csv"]) as tmp:
            tmp.write_text(_confusion_csv(matrix, labels), encoding="utf-8")
        with files.writing(outputs["evaluation_images_json"]) as tmp:
            dump_json({"score_threshold": score_threshold, "iou_threshold": CONFUSION_IOU, "order": "most errors first",
                       "images": per_image_errors(preds, targets, pairs, score_threshold)}, tmp)
        plot_confusion_matrix(matrix, labels, files.path(outputs["confusion_matrix_png"]),
                              title=f"Detection confusion matrix (IoU {CONFUSION_IOU}, score >= {score_threshold})")
        plot_pr_curves(curves, summary["per_class"], files.path(outputs["pr_curves_png"]))
        if record is not None:  # the run's record too: the last run's beside this run's files named another run
            with files.writing(output_dir / names["evaluate_run.json"]) as tmp:
                dump_json(record(), tmp)
    return Evaluation(report, outputs)
