#!/usr/bin/env python3
"""pacc2 with the share of score on no face taken per score band: does it follow the target (issue #21)?

pacc2 (utils/detection/quantify.py) removes from a target's score sums the share that lay on no face on
the model's validation images (the false share), one share per class. Over the folds of the real data most
of its error is that share differing between the validation images and the target ("Where pacc2's error
comes from" in bench/RESULTS.md). A detection's chance of lying on no face falls with its score, so a
target whose detections score differently (more low-scored boxes on a busy background, say) has another
false share. This bench keeps every detection of each image, labelled by the true face it overlaps (IoU >=
0.5, as quantify's rates) or none, and computes on each target set, point estimates only:

  pacc2              as the jobs compute it (a check: it must equal the evaluate job's point figure);
  pacc2, by band     the false share measured per predicted class (masked or not) and score band on the
                     validation images, and applied to the target's score sums band by band;
  pacc2, floor F     pacc2 on the detections scoring at least F only (rates and sums alike).

The records file (--records) holds every image's truth and detections (true row, class, score) and the
model file's stored validation record, so the figures can be recomputed without the models
(--from-records). Each row also gives pacc2 with the stored rates, which must equal the bench's pacc2 (a
note says when not: the validation set given is then not the model's).

  .venv/bin/python bench/false_share_by_score.py \\
      --fold RUN/scratch/train_fold0/model_fold0.pt RUN/scratch/make_fold0/fold0_val.tar \\
             RUN/scratch/make_fold0/fold0_held_out.tar ...        # once per fold
      --final RUN/scratch/train/model.pt RUN/scratch/preprocess_val RUN/scratch/evaluate/test_set.tar \\
      --records bench/results/X_records.json --output bench/results/X.json

Exit 0; 2 (one line) on a bad flag or a file that cannot be read.
"""

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BANDS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)  # lower edges of the score bands
FLOORS = (0.3, 0.5)


def detection_rows(pred: dict, target: dict) -> list[list]:
    """Every detection of one image scoring at least the detection floor as [true row, class, score]: the row
    the class index of the face it overlaps most at IoU >= 0.5, or 3 (none), as metrics.soft_confusion assigns
    them (its sums by row and class are these rows summed)."""
    from torchvision.ops import box_iou

    from utils.classes import CLASSES, LABEL_OF
    from utils.detection import quantify as Q

    index_of = {LABEL_OF[name]: i for i, name in enumerate(CLASSES)}
    keep = pred["scores"] >= Q.D.DETECTION_FLOOR
    boxes, scores, labels = pred["boxes"][keep].reshape(-1, 4), pred["scores"][keep], pred["labels"][keep]
    rows = np.full(len(boxes), len(CLASSES))
    if len(boxes) and len(target["boxes"]):
        best, face = box_iou(boxes.float(), target["boxes"].float().reshape(-1, 4)).max(dim=1)
        matched = (best >= Q.CALIBRATION_IOU).numpy()
        rows[matched] = [index_of[int(label)] for label in target["labels"][face[matched]]]
    return [[int(r), index_of[int(c)], round(float(v), 4)] for r, c, v in zip(rows, labels.tolist(), scores.tolist())]


def image_records(model_path: Path, *labelled: Path) -> tuple[list[list[dict]], dict]:
    """(per set of *labelled*, per image: truth per class and detection_rows; the model file's stored validation
    record), the model loaded once and run as the evaluate job runs it (working size, flip TTA and box voting as
    chosen on validation)."""
    import torch

    from cross_fitted_rates import labelled_predictions
    from utils.detection import quantify as Q
    from utils.detection.evaluation import load_trained_model

    model, meta, _, _ = load_trained_model(model_path, torch.device("cpu"))
    sets = []
    for folder in labelled:
        preds, targets = labelled_predictions(model, meta, folder)
        sets.append([{"truth": [int(n) for n in Q.class_sums(target["labels"].tolist())],
                      "detections": detection_rows(pred, target)} for pred, target in zip(preds, targets, strict=True)])
    return sets, meta.get("quantification") or {}


def stored_pacc2(stored: dict, target: list[dict]) -> float | None:
    """pacc2 on *target* with the validation rates the model file stores (what the jobs use): the bench's own
    pacc2, from its rerun of the validation images, must read the same, or its validation set is not the model's."""
    from utils.detection import quantify as Q

    if not stored.get("images"):
        return None
    rates = Q.Calibration.from_record(stored)
    soft = score_sums(target, 0.0)[1][0].sum(axis=0)  # per predicted class, every true row
    estimated, _ = Q.point_estimate("pacc2", np.zeros(3), soft, (rates.confusion.sum(axis=0),
                                                                 rates.soft.sum(axis=0), rates.truth.sum(axis=0)))
    return 100 * estimated


def records_problem(sets) -> str | None:
    """What makes a --from-records file unusable, or None."""
    if not isinstance(sets, list) or not sets:
        return "no set"
    for n, one in enumerate(sets):
        for part in ("val", "held_out"):
            images = one.get(part) if isinstance(one, dict) else None
            if not isinstance(images, list) or not images:
                return f"set {n}: no {part} images"
            for image in images:
                truth, detections = (image.get("truth"), image.get("detections")) if isinstance(image, dict) else \
                    (None, None)
                if not (isinstance(truth, list) and len(truth) == 3 and all(isinstance(t, int) and t >= 0
                                                                           for t in truth)):
                    return f"set {n} {part}: a truth that is not three face counts: {truth!r}"
                if not isinstance(detections, list) or not all(
                        isinstance(d, list) and len(d) == 3 and d[0] in (0, 1, 2, 3) and d[1] in (0, 1, 2)
                        and isinstance(d[2], (int, float)) and 0 <= d[2] <= 1 for d in detections):
                    return f"set {n} {part}: detections that are not [row 0-3, class 0-2, score 0-1] lists"
    return None


def score_sums(images: list[dict], floor: float, bands=(0.0,)) -> tuple[np.ndarray, np.ndarray]:
    """(truth (K), score sums (bands, K+1, K)) of *images*: per score band (lower edges *bands*), the scores at or
    above *floor* by true row (the last: no face) and predicted class, quantify's soft matrix per band."""
    truth, sums = np.zeros(3), np.zeros((len(bands), 4, 3))
    for image in images:
        truth += image["truth"]
        for row, column, score in image["detections"]:
            if score >= floor:
                sums[max(0, int(np.searchsorted(bands, score, side="right")) - 1), row, column] += score
    return truth, sums


def share(estimated) -> float:
    total = estimated.sum()
    return float("nan") if total <= 0 else 100 * float(estimated[0] / total)


def estimates(calibration: list[dict], target: list[dict]) -> dict:
    """Point figures of each variant on *target*, with rates from *calibration*; ValueError when either holds
    no labelled face (no rate, no truth to err from). Pooled, rated and solved by quantify's own functions."""
    from utils.detection import quantify as Q

    for name, images in (("validation set", calibration), ("target set", target)):
        if not sum(sum(image["truth"]) for image in images):
            raise ValueError(f"a {name} of {len(images)} images holds no labelled face")

    def pacc2(floor: float, bands=(0.0,)) -> float:
        truth, rates = score_sums(calibration, floor, bands)
        true_faces, observed = score_sums(target, floor, bands)
        # masked or not, band by band: the per-face rates from every band, the false share of each band
        observed, rates, truth = Q.masked_or_not(observed.sum(axis=1), rates, np.broadcast_to(truth, (len(bands), 3)))
        per_face, overall = Q.rates_per_face(rates.sum(axis=0), truth[0])
        _, false_share = Q.rates_per_face(rates, truth)
        false_share = np.where(rates.sum(axis=1) > 0, false_share, overall)  # a band empty on validation: overall
        return share(Q.counts_from_parts(per_face, 0.0, (observed * (1 - false_share)).sum(axis=0)))

    figures = {"pacc2": pacc2(0.0), **{f"pacc2, floor {f:g}": pacc2(f) for f in FLOORS},
               "pacc2, by band": pacc2(0.0, BANDS)}
    truth = np.sum([image["truth"] for image in target], axis=0)
    true_percent = 100 * truth[0] / truth.sum()
    return {"true_percent": round(true_percent, 2),
            "errors": {name: round(value - true_percent, 2) for name, value in figures.items()},
            "percent": {name: round(value, 2) for name, value in figures.items()}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fold", nargs=3, action="append", type=Path, metavar=("MODEL", "VAL", "HELD_OUT"), default=[],
                   help="a fold model, its validation set and its held-out set (folders or .tar); once per fold")
    p.add_argument("--final", nargs=3, type=Path, metavar=("MODEL", "VAL", "TEST"), default=None,
                   help="the final model, its validation set and the test split (default: folds only)")
    p.add_argument("--from-records", type=Path, default=None, help="read a --records file instead of running models")
    p.add_argument("--records", type=Path, default=None, help="JSON file for the per-image records (default: none)")
    p.add_argument("--output", type=Path, default=None, help="JSON file for the figures (default: printed only)")
    args = p.parse_args()
    if bool(args.fold or args.final) == bool(args.from_records):
        p.error("give either --fold (and --final) or --from-records")
    from utils.atomic import write_json

    if args.from_records:
        try:
            sets = json.loads(args.from_records.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            p.error(f"--from-records {args.from_records}: {error}")
        sets = sets.get("sets") if isinstance(sets, dict) else None
        problem = records_problem(sets)
        if problem:
            p.error(f"--from-records {args.from_records}: not a records file of this bench: {problem}")
    else:
        given = [("fold", *paths) for paths in args.fold] + ([("final", *args.final)] if args.final else [])
        for _, *paths in given:
            for path in paths:
                if not path.exists():
                    p.error(f"{path}: not found")
        sets = []
        for kind, model, val, target in given:
            try:
                (val_images, held_out), stored = image_records(model, val, target)
            except (ValueError, OSError) as error:  # InputError is a ValueError: a model file or set it cannot read
                p.error(f"{model}: {error}")
            sets.append({"kind": kind, "model": str(model), "val_path": str(val), "target": str(target),
                         "val": val_images, "held_out": held_out, "stored_rates": stored})
        if args.records:
            write_json(args.records, {"sets": sets}, indent=None)
            print(f"written: {args.records}")
    rows = []
    for one in sets:
        try:
            row = {"kind": one["kind"], "model": one["model"], **estimates(one["val"], one["held_out"])}
        except ValueError as error:
            p.error(f"{one.get('model')} on {one.get('target')} (validation {one.get('val_path')}): {error}")
        stored = stored_pacc2(one.get("stored_rates") or {}, one["held_out"])
        row["pacc2, stored rates"] = None if stored is None else round(stored, 2)
        rows.append(row)
    names = list(rows[0]["errors"])
    print("| set | true % | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for row in rows:
        print(f"| {row['kind']} {Path(row['model']).name} | {row['true_percent']:.1f} | "
              + " | ".join(f"{row['percent'][n]:.1f} ({row['errors'][n]:+.1f})" for n in names) + " |")
        stored = row["pacc2, stored rates"]
        if stored is not None and abs(stored - row["percent"]["pacc2"]) > 0.05:
            print(f"  NOTE: {row['model']}: pacc2 with the model file's stored rates reads {stored}, not "
                  f"{row['percent']['pacc2']}: the validation set given is not the one its rates were measured on")
    folds = [row for row in rows if row["kind"] == "fold"]
    summary = {name: round(float(np.mean([abs(r["errors"][name]) for r in folds])), 2) for name in names} if folds \
        else {}
    if summary:
        print(f"mean |error| over {len(folds)} folds: " + ", ".join(f"{n} {v:.2f}" for n, v in summary.items()))
    if args.output:
        import torch

        write_json(args.output, {"inputs": [[s["model"], s["target"]] for s in sets], "rows": rows,
                                 "folds_mean_abs_error": summary, "bands": BANDS, "floors": FLOORS,
                                 "host": platform.node(), "torch": torch.__version__})
        print(f"written: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
