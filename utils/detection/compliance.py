"""The headline figure, percent of faces properly masked, and how far a model's figure is from the truth.

percent_properly_masked = 100 * with_mask / all faces (None when there are no faces).
A detector is judged on it at its operating score threshold: the faces it keeps
there are the faces a user's compliance figure counts. Labels are the detection
labels of utils.classes (1..3) or class names.
"""

from __future__ import annotations

import math

from .. import defaults as D
from ..figures import BELOW_ONLY, NO_FACE_KEPT, kept_text, one_decimal
from ..classes import CLASSES, NAME_OF


SCORE_DECIMALS = 4  # of a detection's score as the outputs list it


def listed_score(score) -> float:
    """A detection's score as predictions.json, the service's answer and the explanations list it: the largest
    value of SCORE_DECIMALS decimals that the score reaches, so that a listed score is at or above a threshold of
    at most that many decimals (the model's, chosen on a 0.05 grid; the page's slider) exactly when the score is
    as the jobs count it (torch, the model's float32 score against the threshold cast to float32). Rounded, a
    0.49996 was listed as 0.5, and the service's count, the page's and any client's re-filtering at 0.5 counted a
    face that predict, predict_video and evaluate do not."""
    import numpy as np

    value, step = np.float32(score), 10**SCORE_DECIMALS
    cut = math.floor(float(value) * step)
    while cut > 0 and np.float32(cut / step) > value:
        cut -= 1
    while np.float32((cut + 1) / step) <= value:
        cut += 1
    return cut / step


def _percent(with_mask: int, faces: int) -> float | None:
    return 100.0 * with_mask / faces if faces else None


def compliance(pred_labels) -> dict:
    """Faces per class and the share properly masked, from predicted labels (ints 1..3 or class names)."""
    counts = {name: 0 for name in CLASSES}
    for label in pred_labels:
        name = label if isinstance(label, str) else NAME_OF.get(int(label))
        if name not in counts:
            raise ValueError(f"unknown class label {label!r}: expected one of {list(CLASSES)} or 1..{len(CLASSES)}")
        counts[name] += 1
    faces = sum(counts.values())
    percent = _percent(counts["with_mask"], faces)
    return {"faces": faces, "counts": counts, "percent_properly_masked": None if percent is None else round(percent, 2)}


def merge_compliance(parts) -> dict:
    """Overall compliance from per-image (or per-shard) compliance dicts: their counts summed."""
    counts = {name: 0 for name in CLASSES}
    for part in parts:
        for name, count in part["counts"].items():
            if name not in counts:
                raise ValueError(f"unknown class {name!r} in a compliance record: expected one of {list(CLASSES)}")
            counts[name] += int(count)
    faces = sum(counts.values())
    percent = _percent(counts["with_mask"], faces)
    return {"faces": faces, "counts": counts, "percent_properly_masked": None if percent is None else round(percent, 2)}


def interval_text(result: dict) -> str:
    """'53.2% properly masked (95% interval 44.0-61.5%, 24 images; pacc2)', or why there is no figure. A headline
    that stands in for the estimator asked for says so: '...; cc instead of pacc2: <why>)'."""
    estimator = result.get("fallback") or result["method"]
    unit = f"{result['units']} {result['unit']}{'s' if result['units'] != 1 else ''}"
    if result["percent"] is None:
        return f"no figure ({result.get('note', 'no faces found')}; {unit}; {estimator})"
    if result["low"] is None:  # the note says why: 'one image: no interval'
        spread = result.get("note") or "no interval: no replicate found a face"
    else:
        spread = (f"{round(100 * result['confidence'])}% interval {one_decimal(result['low'])}-"
                  f"{one_decimal(result['high'])}%")
    return f"{one_decimal(result['percent'])}% properly masked ({spread}, {unit}; {estimator})"


def compliance_line(summary: dict, estimate: dict | None = None) -> str:
    """One printable line, e.g. 'compliance: 42 faces, 30 with_mask, ...: 71.4% with_mask among the faces kept at
    the threshold (cc)'; with the *estimate* of utils.detection.quantify, its figure, 95 % interval, images and
    estimator (then "properly masked"), said to rest on the scores below the threshold when no face is kept at it."""
    counts = ", ".join(f"{summary['counts'][name]} {name}" for name in CLASSES)
    percent = summary["percent_properly_masked"]
    if estimate is not None:
        figure = interval_text(estimate)
        if not summary["faces"] and estimate["percent"] is not None:
            # beside "0 faces" the figure read as if it were of the faces counted
            figure = (f"{NO_FACE_KEPT}; {BELOW_ONLY} "
                      # as stored (one decimal): ':g' wrote 1234567.8 as 1.23457e+06
                      f"({estimate['faces_estimated']:.12g} faces by the estimator): {figure}")
    else:  # the count alone: "properly masked" is the headline estimate's word (utils/figures.py)
        figure = kept_text(percent)
    return f"compliance: {summary['faces']} faces, {counts}: {figure}"


def video_compliance_line(summary: dict) -> str:
    """predict_video's line: compliance_line over the processed frames, how they were pooled and resampled, and the
    mean of the frames' own figures, a percent to one decimal as every percent shown (it printed the stored 47.37,
    no '%', and 'None' where no frame held a face)."""
    mean = summary["mean_percent_per_frame"]
    return (compliance_line(summary["overall"], summary["estimate"]) + f" (pooled over {summary['frames_processed']} "
            f"frames, resampled in blocks of {summary['resampling']['block_frames']}; mean per frame "
            + ("n/a: no frame with a face counted" if mean is None else f"{one_decimal(mean)}%") + ")")


def _labels(entry: dict, score_threshold: float | None = None) -> list[int]:
    """The labels of a target, or of a prediction's detections scoring at least *score_threshold*."""
    # torch here, where the model's tensors are read, not with the module: merge_predictions and the report read
    # the figures from JSON, and importing torch for them cost ~750 MB and ~4 s a job
    import torch

    labels = torch.as_tensor(entry["labels"]).reshape(-1)
    if score_threshold is not None:
        labels = labels[torch.as_tensor(entry["scores"]).reshape(-1) >= score_threshold]
    return [int(label) for label in labels]


def compliance_error(preds, targets, score_threshold: float) -> dict:
    """The predicted compliance figure against the true one, at the operating *score_threshold*.

    - true / predicted: faces per class and percent properly masked over the whole set;
    - error_points: predicted minus true percent (None when either is undefined);
    - per_image_mae_points: the mean absolute difference of the two percentages over the
      images where both are defined (images_compared). An image with faces where the model
      keeps none has no predicted figure: it is counted in images_without_detections, and
      an image where the model keeps faces but none is labelled in images_without_faces.
    """
    true_labels, kept_labels, image_errors = [], [], []
    without_detections = without_faces = 0
    for pred, target in zip(preds, targets, strict=True):
        truth, kept = _labels(target), _labels(pred, score_threshold)
        true_labels += truth
        kept_labels += kept
        true_percent = _percent(sum(label == 1 for label in truth), len(truth))
        kept_percent = _percent(sum(label == 1 for label in kept), len(kept))
        if true_percent is not None and kept_percent is not None:
            image_errors.append(abs(kept_percent - true_percent))
        elif true_percent is not None:
            without_detections += 1
        elif kept_percent is not None:
            without_faces += 1
    true, predicted = compliance(true_labels), compliance(kept_labels)
    true_percent = _percent(true["counts"]["with_mask"], true["faces"])
    kept_percent = _percent(predicted["counts"]["with_mask"], predicted["faces"])
    error = None if true_percent is None or kept_percent is None else kept_percent - true_percent
    return {
        "score_threshold": score_threshold,
        "true": true,
        "predicted": predicted,
        "error_points": None if error is None else round(error, 2),
        "per_image_mae_points": round(sum(image_errors) / len(image_errors), 2) if image_errors else None,
        "images_compared": len(image_errors),
        "images_without_detections": without_detections,
        "images_without_faces": without_faces,
    }


def compliance_error_lines(error: dict) -> list[str]:
    """The compliance-error block of evaluation.txt: true vs predicted per class, the error in points."""
    true, predicted = error["true"], error["predicted"]

    def percent(summary):
        value = summary["percent_properly_masked"]
        return "n/a" if value is None else f"{one_decimal(value)}%"

    # the count (cc), which the headline estimator (pacc2 by default, below) need not be: not called the headline
    lines = [f"Compliance at score >= {error['score_threshold']:g} (the faces kept counted: cc; the headline "
             "estimate, with its interval, is below):",
             f"{'':<24}{'true':>9}{'predicted':>11}"]
    lines += [f"{name:<24}{true['counts'][name]:>9}{predicted['counts'][name]:>11}" for name in CLASSES]
    lines += [f"{'faces':<24}{true['faces']:>9}{predicted['faces']:>11}",
              f"{'with_mask (%)':<24}{percent(true):>9}{percent(predicted):>11}"]
    if error["error_points"] is None:
        lines.append("error: undefined (no faces on one side)")
    else:
        lines.append(f"error: {error['error_points']:+.1f} points (predicted - true)")
    mae = error["per_image_mae_points"]
    lines.append(f"per-image mean absolute error: {'n/a' if mae is None else f'{mae:.1f} points'} over "
                 f"{error['images_compared']} images; {error['images_without_detections']} images with faces "
                 f"but no detection, {error['images_without_faces']} with detections but no labelled face")
    return lines


# ----------------------------------------------------------------------------- the operating threshold

THRESHOLD_CANDIDATES = D.THRESHOLD_CANDIDATES
F1_TOLERANCE = D.THRESHOLD_F1_TOLERANCE


def detection_f1(preds, targets, score_threshold: float, iou_threshold: float = D.MATCH_IOU) -> dict:
    """Class-aware precision, recall and F1 of the detections at or above *score_threshold*.

    A true positive is a kept box matched (IoU >= *iou_threshold*, greedy by score, as in
    the confusion matrix) to a face of the same class.
    """
    from .metrics import detection_confusion_matrix

    matrix, labels = detection_confusion_matrix(preds, targets, iou_threshold=iou_threshold,
                                                score_threshold=score_threshold)
    classes = range(len(labels) - 1)  # the last row and column are background
    true_positives = sum(matrix[i][i] for i in classes)
    kept = sum(matrix[row][column] for row in range(len(labels)) for column in classes)
    faces = sum(matrix[row][column] for row in classes for column in range(len(labels)))
    precision = true_positives / kept if kept else 0.0
    recall = true_positives / faces if faces else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def choose_operating_threshold(preds, targets, candidates=THRESHOLD_CANDIDATES) -> dict:
    """The score threshold a model should be used at, chosen on labelled (validation) images.

    Criterion: the best class-aware F1, and among thresholds within F1_TOLERANCE of it the
    smallest absolute compliance error. F1 first, because a threshold that only zeroes the
    compliance error can do so by cancelling errors (missed unmasked faces against spurious
    masked ones) on a few dozen images and then fail on new photos; within the F1 plateau the
    compliance error, the figure users read, decides.
    """
    rows = []
    for threshold in candidates:
        error = compliance_error(preds, targets, threshold)
        rows.append({"score_threshold": threshold, **detection_f1(preds, targets, threshold),
                     "compliance_error_points": error["error_points"],
                     "per_image_mae_points": error["per_image_mae_points"]})
    best_f1 = max(row["f1"] for row in rows)

    def abs_error(row):
        return math.inf if row["compliance_error_points"] is None else abs(row["compliance_error_points"])

    plateau = [row for row in rows if row["f1"] >= best_f1 - F1_TOLERANCE]
    chosen = min(plateau, key=lambda row: (abs_error(row), -row["f1"], row["score_threshold"]))
    return {**chosen, "criterion": f"best F1 (within {F1_TOLERANCE}), then smallest |compliance error|",
            "images": len(targets), "candidates": rows}


def operating_threshold(model_meta: dict, given: float | None) -> tuple[float, str]:
    """(score threshold, where it comes from) for a job running a model: the flag when given,
    else the threshold stored in the model file, else the project default."""
    if given is not None:
        return given, "--score-threshold"
    stored = (model_meta.get("operating_threshold") or {})
    if stored.get("score_threshold") is not None and stored.get("chosen_on"):
        return float(stored["score_threshold"]), f"the model's, chosen on its {stored['chosen_on']} images"
    return D.SCORE_THRESHOLD, "the default: the model file holds no chosen threshold"
