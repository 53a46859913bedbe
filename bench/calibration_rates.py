#!/usr/bin/env python3
"""Where an adjusted compliance estimate's error comes from: the validation rates against the set's own.

acc and pacc (utils/detection/quantify.py) correct a set's counts with the rates the model showed on its
validation images: per true face of each class, the boxes (acc) or score sums (pacc) it produced per
predicted class, and the share of each predicted class on no face. Given a labelled set (--test), this
runs the model (the evaluate job's code, at the model's working size and threshold) and, per estimator,
computes the figure twice: with the model's stored validation rates, as the jobs do, and with the rates
measured on the set itself (an oracle: the adjusted estimators then recover the truth exactly). Also
printed: both sets of pacc rates and the per-class face counts each solve gives. A large gap between the
two rows of an estimator says its error is the validation rates' estimation error, not the detector's.
The set is only reported on.

  .venv/bin/python bench/calibration_rates.py --model runs/real60_ws/outputs/model.pt \\
      --test runs/real60_ws/scratch/evaluate/test_set.tar --output bench/results/calibration_rates.json
"""

import argparse
import platform
import sys
from pathlib import Path

import numpy as np


def rates(calibration) -> tuple:
    """(confusion sums, score-sum sums, true faces per class) of a quantify.Calibration."""
    return calibration.confusion.sum(axis=0), calibration.soft.sum(axis=0), calibration.truth.sum(axis=0)


def per_face(rates_sums: np.ndarray, truth: np.ndarray) -> dict:
    """pacc's rates in words (quantify.rates_per_face): per true face the score mass per predicted class,
    and the share of each predicted class's mass on no face."""
    from utils.detection.quantify import rates_per_face

    fitted, false_share = rates_per_face(rates_sums, truth)
    return {"per_true_face": np.round(fitted, 4).tolist(), "on_no_face_share": np.round(false_share, 4).tolist()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="a model file bin/train.py wrote with validation rates")
    p.add_argument("--test", type=Path, required=True, help="a labelled set (folder or flat .tar of images and VOC)")
    p.add_argument("--output", type=Path, default=None, help="JSON file for the figures (default: printed only)")
    args = p.parse_args()

    import torch

    from cross_fitted_rates import held_out_record, load_with_rates  # this folder's: the same model run
    from utils.atomic import write_json
    from utils.classes import CLASSES
    from utils.detection import quantify as Q

    K = len(CLASSES)
    try:
        loaded = load_with_rates(args.model)
        record = held_out_record(loaded, args.test)
    except (ValueError, OSError) as error:  # InputError is a ValueError: a missing or unreadable file, no rates
        p.error(str(error))
    _, meta, threshold = loaded
    own = Q.Calibration.from_record(record)  # the set's own rates: the oracle
    stored = Q.Calibration.from_record(meta["quantification"])
    observed = Q.Units.from_calibration(own)
    counts, soft = observed.counts.sum(axis=0), observed.soft.sum(axis=0)
    truth = own.truth.sum(axis=0)
    true_percent = 100 * truth[CLASSES.index("with_mask")] / truth.sum()

    rows = {}
    print(f"{args.test}: {len(own)} images, {int(truth.sum())} faces, {true_percent:.2f} % properly masked; "
          f"model at {meta['working_size']} px, threshold {threshold:g}; validation rates from {len(stored)} "
          f"images, {int(stored.truth.sum())} faces")
    print(f"{'estimator':<10}{'rates':<12}{'percent':>8}{'error':>8}{'faces':>8}  faces per class "
          f"({', '.join(CLASSES)})")
    for method in Q.METHODS:
        for name, calibration in (("validation", stored), ("the set's", own)):
            if method in Q.UNADJUSTED and name != "validation":
                continue  # cc and pcc use no rates
            sums = rates(calibration)
            share, faces = Q.point_estimate(method, counts, soft, sums)
            solved = None
            if method in Q.CALIBRATED:
                confusion, soft_rates, faces_per_class = sums
                solved = np.round(Q.adjusted_counts(counts if method == "acc" else soft,
                                                    confusion[:, :K] if method == "acc" else soft_rates,
                                                    faces_per_class), 1).tolist()
            rows[f"{method} ({name} rates)" if method in Q.CALIBRATED else method] = {
                "percent": round(100 * share, 2), "error_points": round(100 * share - true_percent, 2),
                "faces": round(faces, 1), "faces_per_class": solved}
            print(f"{method:<10}{name if method in Q.CALIBRATED else '-':<12}{100 * share:>8.2f}"
                  f"{100 * share - true_percent:>+8.2f}{faces:>8.1f}  {solved if solved else ''}")
    print(f"true faces per class: {truth.astype(int).tolist()}")
    figures = {"pacc_rates": {name: per_face(soft_sums, faces_per_class)
                              for name, (_, soft_sums, faces_per_class) in (("validation", rates(stored)),
                                                                            ("the set's", rates(own)))}}
    for name, entry in figures["pacc_rates"].items():
        print(f"pacc rates, {name}: per true face {entry['per_true_face']}; on no face {entry['on_no_face_share']}")
    if args.output:
        write_json(args.output, {
            "model": str(args.model), "test": str(args.test), "images": len(own), "faces": int(truth.sum()),
            "faces_per_class": dict(zip(CLASSES, truth.astype(int).tolist())), "true_percent": round(true_percent, 2),
            "working_size": meta["working_size"], "score_threshold": threshold,
            "validation_images": len(stored), "validation_faces_per_class":
                dict(zip(CLASSES, stored.truth.sum(axis=0).astype(int).tolist())),
            "estimates": rows, **figures, "host": platform.node(), "torch": torch.__version__})
        print(f"written: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
