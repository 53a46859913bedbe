"""Detection metrics: COCO mAP, a detection confusion matrix and PR curves (compliance: compliance.py).

Inputs everywhere are torchvision-style lists, one dict per image:
  preds:   {"boxes": FloatTensor[N, 4] XYXY, "scores": FloatTensor[N], "labels": Int64Tensor[N]}
  targets: {"boxes": FloatTensor[M, 4] XYXY, "labels": Int64Tensor[M]}
Labels are the detection labels of utils.classes (1..3; 0 is background and never a class).

AP and recall come from torchmetrics' MeanAveragePrecision on the faster-coco-eval
backend (COCO's own evaluation): nothing here re-implements AP. The per-class AP at
IoU 0.5 and the PR curves are read from the precision array COCO accumulates
(``extended_summary=True``), averaged exactly as COCO's summarize() does.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.ops import box_iou

from .. import defaults as D
from ..classes import BACKGROUND, CLASSES, LABEL_OF, NAME_OF

# faster-coco-eval logs its evaluation steps and summary table at INFO on every call, which the jobs' INFO logging
# printed: 40 lines a validation, most of a train log. The figures it computes are the jobs' to report.
logging.getLogger("faster_coco_eval").setLevel(logging.WARNING)

# COCO's recall thresholds (0, 0.01, ..., 1): the x axis of every PR curve.
RECALL_THRESHOLDS = np.linspace(0.0, 1.0, 101)
# Index of area range "all" and of the largest max-detections setting (100) in COCO's arrays.
_AREA_ALL = 0
_MAXDET_LAST = -1


def _plain(tensor, dtype=None) -> torch.Tensor:
    """A CPU tensor without tv_tensors subclassing (BoundingBoxes confuses some libraries)."""
    tensor = torch.as_tensor(tensor)
    if type(tensor) is not torch.Tensor:
        tensor = tensor.as_subclass(torch.Tensor)
    tensor = tensor.detach().cpu()
    return tensor.to(dtype) if dtype is not None else tensor


def _clean_pred(pred: dict) -> dict:
    return {
        "boxes": _plain(pred["boxes"], torch.float32).reshape(-1, 4),
        "scores": _plain(pred["scores"], torch.float32).reshape(-1),
        "labels": _plain(pred["labels"], torch.int64).reshape(-1),
    }


def _clean_target(target: dict) -> dict:
    return {
        "boxes": _plain(target["boxes"], torch.float32).reshape(-1, 4),
        "labels": _plain(target["labels"], torch.int64).reshape(-1),
    }


def _value(x) -> float | None:
    """COCO writes -1 where a value is undefined (e.g. a class with no ground truth): None in our outputs."""
    x = float(x)
    return None if x < 0 else x


def _coco_mean(values: np.ndarray) -> float | None:
    """COCO summarize(): the mean of the defined (> -1) entries, undefined if there are none."""
    defined = values[values > -1]
    return float(defined.mean()) if defined.size else None


@dataclass
class CocoResult:
    """The summary dict plus the arrays needed for PR curves."""

    summary: dict
    precision: np.ndarray | None  # T x R x K x A x M, -1 where undefined
    iou_thresholds: list[float]
    class_labels: list[int]  # label of each K index
    recall: np.ndarray | None = None  # T x K x A x M, -1 where undefined


def compute_coco(preds, targets, max_detections: int = 100) -> CocoResult:
    """Run COCO evaluation once and return both the summary and the precision array. *max_detections*: COCO's
    cap per image (its "mar_100" in the summary is recall at that cap)."""
    preds = [_clean_pred(p) for p in preds]
    targets = [_clean_target(t) for t in targets]
    if len(preds) != len(targets):
        raise ValueError(f"{len(preds)} predictions for {len(targets)} images: one of each per image is required")
    # COCO's standard cap of 100 detections per image (and class) is kept so that figures compare with published
    # ones; the model may return more (up to DETECTIONS_PER_IMAGE), and COCO simply ranks and cuts them, so the
    # warning torchmetrics gives for it is noise here. Imported here, not with the module: it costs a second or more
    # (scipy.signal, its audio and text metrics), which predict, the service and hpo_merge never need.
    from torchmetrics.detection import MeanAveragePrecision

    metric = MeanAveragePrecision(backend="faster_coco_eval", iou_type="bbox", class_metrics=True,
                                  extended_summary=True, max_detection_thresholds=[1, 10, max_detections])
    metric.warn_on_many_detections = False
    iou_thresholds = [round(float(t), 2) for t in (metric.iou_thresholds or np.linspace(0.5, 0.95, 10))]
    if not preds:
        return CocoResult(_empty_summary(), None, iou_thresholds, [])
    metric.update(preds, targets)
    raw = metric.compute()
    class_labels = [int(c) for c in _plain(raw["classes"]).reshape(-1).tolist()]
    precision = _plain(raw["precision"]).numpy() if "precision" in raw else None
    recall = _plain(raw["recall"]).numpy() if "recall" in raw else None
    map_per_class = _plain(raw["map_per_class"]).reshape(-1).tolist()
    mar_per_class = _plain(raw[f"mar_{max_detections}_per_class"]).reshape(-1).tolist()
    k_of = {label: k for k, label in enumerate(class_labels)}
    t50 = iou_thresholds.index(0.5) if 0.5 in iou_thresholds else None
    per_class = {}
    for name in CLASSES:
        k = k_of.get(LABEL_OF[name])
        entry = {"ap": None, "ap_50": None, "ap_75": None, "recall": None, "recall_50": None}
        if k is not None:
            entry["ap"] = _value(map_per_class[k])
            entry["recall"] = _value(mar_per_class[k])
            if precision is not None and t50 is not None:
                entry["ap_50"] = _coco_mean(precision[t50, :, k, _AREA_ALL, _MAXDET_LAST])
            if precision is not None and 0.75 in iou_thresholds:
                entry["ap_75"] = _coco_mean(precision[iou_thresholds.index(0.75), :, k, _AREA_ALL, _MAXDET_LAST])
            if recall is not None and t50 is not None:
                entry["recall_50"] = _value(recall[t50, k, _AREA_ALL, _MAXDET_LAST])
            if entry["ap"] is None:  # class absent from ground truth: every AP figure is undefined
                entry["ap_50"] = entry["ap_75"] = entry["recall_50"] = None
        per_class[name] = entry
    summary = {
        "map": _value(raw["map"]),
        "map_50": _value(raw["map_50"]),
        "map_75": _value(raw["map_75"]),
        "map_small": _value(raw["map_small"]),
        "map_medium": _value(raw["map_medium"]),
        "map_large": _value(raw["map_large"]),
        "mar_1": _value(raw["mar_1"]),
        "mar_10": _value(raw["mar_10"]),
        "mar_100": _value(raw[f"mar_{max_detections}"]),
        "per_class": per_class,
    }
    return CocoResult(summary, precision, iou_thresholds, class_labels, recall)


def _empty_summary() -> dict:
    keys = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_1", "mar_10", "mar_100")
    summary = {key: None for key in keys}
    summary["per_class"] = {name: {"ap": None, "ap_50": None, "ap_75": None, "recall": None, "recall_50": None}
                            for name in CLASSES}
    return summary


def coco_map(preds, targets) -> dict:
    """COCO metrics: map (0.5:0.95), map_50, map_75, mar_100, ... and per_class {name: {ap, ap_50, recall, ...}}.

    Undefined values (no ground truth at all, or for one class) are None, not COCO's -1.
    """
    return compute_coco(preds, targets).summary


def fitness(summary: dict) -> float | None:
    """Ultralytics' fitness, 0.1 mAP@0.5 + 0.9 mAP@0.5:0.95, of a :func:`coco_map` summary: what the HPO
    and the choice of a model's working size maximise. None when undefined (no labelled faces)."""
    if summary.get("map") is None or summary.get("map_50") is None:
        return None
    return 0.1 * float(summary["map_50"]) + 0.9 * float(summary["map"])


def recall_by_iou(preds, targets, result: CocoResult) -> dict:
    """The share of the faces found at each IoU threshold: per class at COCO's 100 detections per image and
    class (from *result*, the COCO run of :func:`compute_coco`), and for faces whatever their class (a second
    COCO run with every label made one, capped at 100 per image and class too: 300 in all, so a face a box
    of its own class found counts here as well). mAR@100 is the mean of a class's row, so the rows say
    whether it is faces missed (low already at IoU 0.5) or boxes placed loosely (a row falling towards 0.95);
    the class-free row separates finding faces from telling their mask state apart."""
    def row(values):
        return [_value(v) for v in values]

    per_class = {}
    k_of = {label: k for k, label in enumerate(result.class_labels)}
    for name in CLASSES:
        k = k_of.get(LABEL_OF[name])
        if result.recall is not None and k is not None and result.summary["per_class"][name]["ap"] is not None:
            per_class[name] = row(result.recall[:, k, _AREA_ALL, _MAXDET_LAST])
    one = [{**pred, "labels": torch.ones_like(torch.as_tensor(pred["labels"]))} for pred in preds]
    faces = [{**target, "labels": torch.ones_like(torch.as_tensor(target["labels"]))} for target in targets]
    cap = 100 * len(CLASSES)  # the class rows' 100 per image and class, in all
    anyclass = compute_coco(one, faces, max_detections=cap)
    any_row = (row(anyclass.recall[:, 0, _AREA_ALL, _MAXDET_LAST])
               if anyclass.recall is not None and anyclass.summary["mar_100"] is not None else None)  # no faces: None
    return {"iou_thresholds": result.iou_thresholds, "per_class": per_class, "any_class": any_row,
            "any_class_max_detections": cap, "any_class_mar": anyclass.summary["mar_100"],
            "any_class_map": anyclass.summary["map"], "any_class_map_50": anyclass.summary["map_50"]}


def pr_curves(result: CocoResult, iou_threshold: float = 0.5) -> dict:
    """Per-class precision at COCO's 101 recall thresholds, at *iou_threshold*.

    Returns {class_name: {"recall": [...], "precision": [...]}} for classes with ground
    truth. This is COCO's interpolated curve (precision at recall r = the best precision
    at any recall >= r), so it is 0 past the highest recall the detector reached.
    """
    curves = {}
    if result.precision is None or iou_threshold not in result.iou_thresholds:
        return curves
    t = result.iou_thresholds.index(iou_threshold)
    for k, label in enumerate(result.class_labels):
        name = NAME_OF.get(label)
        if name is None or name == BACKGROUND:
            continue
        precision = result.precision[t, :, k, _AREA_ALL, _MAXDET_LAST]
        if result.summary["per_class"].get(name, {}).get("ap") is None:
            continue  # no ground truth: no curve to draw
        defined = precision > -1
        curves[name] = {"recall": RECALL_THRESHOLDS[defined].tolist(), "precision": precision[defined].tolist()}
    return curves


CONFUSION_LABELS = (*CLASSES, BACKGROUND)


def detection_confusion_matrix(preds, targets, iou_threshold: float = D.MATCH_IOU,
                               score_threshold: float = D.SCORE_THRESHOLD):
    """Detection confusion matrix, rows = true class, columns = predicted class, last row/column = background.

    Per image, predictions with score >= *score_threshold* are taken in decreasing
    score order; each is matched to the not-yet-matched ground-truth box of any class
    with the highest IoU, if that IoU >= *iou_threshold* (class-agnostic matching, so
    that a face detected with the wrong class shows up off the diagonal):
      - matched: cell [true class, predicted class];
      - unmatched prediction (a spurious box, or a duplicate of a face already taken):
        cell [background, predicted class]  (the background row);
      - ground truth left unmatched (a missed face): cell [true class, background]
        (the background column).
    The [background, background] cell is always 0. Returns (matrix as nested lists of
    ints, labels in CONFUSION_LABELS order).
    """
    size = len(CONFUSION_LABELS)
    background = size - 1
    index_of = {LABEL_OF[name]: i for i, name in enumerate(CLASSES)}
    matrix = np.zeros((size, size), dtype=np.int64)
    for pred, target in zip(preds, targets, strict=True):
        pred, target = _clean_pred(pred), _clean_target(target)
        keep = pred["scores"] >= score_threshold
        boxes, scores, labels = pred["boxes"][keep], pred["scores"][keep], pred["labels"][keep]
        order = torch.argsort(scores, descending=True, stable=True)
        boxes, labels = boxes[order], labels[order]
        true_boxes, true_labels = target["boxes"], target["labels"]
        matched = torch.zeros(len(true_labels), dtype=torch.bool)
        ious = box_iou(boxes, true_boxes) if len(boxes) and len(true_boxes) else torch.zeros(len(boxes), 0)
        for i in range(len(boxes)):
            predicted = index_of[int(labels[i])]
            candidates = ious[i].clone()
            candidates[matched] = -1.0
            if len(candidates) and float(candidates.max()) >= iou_threshold:
                j = int(candidates.argmax())
                matched[j] = True
                matrix[index_of[int(true_labels[j])], predicted] += 1
            else:
                matrix[background, predicted] += 1
        for j in torch.nonzero(~matched).reshape(-1).tolist():
            matrix[index_of[int(true_labels[j])], background] += 1
    return matrix.tolist(), list(CONFUSION_LABELS)


def soft_confusion(pred, target, iou_threshold: float = D.MATCH_IOU,
                   floor: float = D.DETECTION_FLOOR) -> list[list[float]]:
    """Score sums of one image's detections, rows = true class of the face each overlaps most (IoU >=
    *iou_threshold*; last row: none, background), columns = the detection's class.

    Every detection scoring at least *floor* counts with its score. Unlike the confusion matrix,
    matching is many-to-one: torchvision emits one box per class above its score floor for the same
    proposal, and the probabilistic count sums all of them, so the rates that correct it must too.
    """
    pred, target = _clean_pred(pred), _clean_target(target)
    keep = pred["scores"] >= floor
    boxes, scores, labels = pred["boxes"][keep], pred["scores"][keep], pred["labels"][keep]
    index_of = {LABEL_OF[name]: i for i, name in enumerate(CLASSES)}
    sums = np.zeros((len(CLASSES) + 1, len(CLASSES)), dtype=np.float64)
    rows = np.full(len(boxes), len(CLASSES))
    if len(boxes) and len(target["boxes"]):
        best, face = box_iou(boxes, target["boxes"]).max(dim=1)
        matched = best >= iou_threshold
        rows[matched.numpy()] = [index_of[int(label)] for label in target["labels"][face[matched]]]
    for row, label, score in zip(rows.tolist(), labels.tolist(), scores.tolist()):
        sums[row, index_of[int(label)]] += score
    return sums.tolist()


def proposal_recall(proposals, targets, iou_threshold: float = 0.5) -> dict:
    """Share of the labelled faces that some region proposal overlaps by at least *iou_threshold*, overall
    and per class: the most a detector's second stage can find (proposals from engine.run_proposals)."""
    found = {name: 0 for name in CLASSES}
    faces = {name: 0 for name in CLASSES}
    for boxes, target in zip(proposals, targets, strict=True):
        names = [NAME_OF[int(label)] for label in target["labels"]]
        hit = (box_iou(target["boxes"], boxes).max(dim=1).values >= iou_threshold).tolist() if len(boxes) \
            else [False] * len(names)
        for name, is_found in zip(names, hit):
            faces[name] += 1
            found[name] += int(is_found)
    total = sum(faces.values())
    return {"recall": sum(found.values()) / total if total else None, "faces": total,
            "per_class": {name: {"found": found[name], "faces": faces[name]} for name in CLASSES},
            "iou_threshold": iou_threshold,
            "proposals_per_image": sum(len(b) for b in proposals) / len(proposals) if proposals else 0.0}
