#!/usr/bin/env python3
"""Where the headline estimator's error comes from, and whether mixing the estimators removes it (issue #21).

pacc2 (utils/detection/quantify.py) corrects a target's score sums with two things measured on the model's
validation images: what one true face of each class (properly masked or not) produces per predicted class
(the per-face rates) and the share of each predicted class's score that lies on no face (the false share).
Its error on a target comes from those two differing between the validation images and the target. Given
the per-image records bench/class_mix_shift.py writes (--records: truth, confusion matrix and score sums of
every held-out image and of the model's validation images; no models needed), this bench computes for every
held-out fold and test split:

  cc, pacc2        the estimators as the jobs compute them (point figures; class_mix_shift.py gives intervals);
  pacc2, target's false share / target's per-face rates
                   pacc2 with one of the two parts taken from the target's own labels instead of the
                   validation images': how much of the error each part carries (with both, the error is 0).
                   These read the target's truth: they locate the error, they are not estimators;
  mean cc+pacc2, median acc/pacc/pacc2
                   mixtures of the estimators the jobs already compute (the quantification literature's
                   ensembles): whether averaging errors that differ in sign removes them;
  pacc2 by faces found
                   pacc2 solved apart on the images with at most 1, 2-5 and 6 or more faces found (crowds are found and
                   told apart worse than portraits) and the estimated faces summed: whether the rates differ
                   with something the detector sees on the target.

Prints one table and the mean |error| over the folds and over the test splits; --output writes them as JSON.

  .venv/bin/python bench/estimator_error_sources.py \\
      --records bench/results/class_mix_shift_seed{11,7,42}_records.json \\
                bench/results/class_mix_shift_s58_records.json \\
      --output bench/results/estimator_error_sources.json

Exit 0; 2 (one line) on a bad flag or a file that is not such a records file.
"""

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FACES_FOUND_BINS = ((0, 2), (2, 6), (6, float("inf")))  # faces found per image: none or one, a few, a crowd
COLUMNS = {  # the JSON's name: the printed table's heading
    "cc": "cc", "pacc2": "pacc2", "pacc2, target's false share": "tgt false sh.",
    "pacc2, target's per-face rates": "tgt per-face", "mean cc+pacc2": "mean cc,pacc2",
    "median acc/pacc/pacc2": "median adjust.", "pacc2 by faces found": "by faces found"}


def binary_parts(calibration):
    """(observed score sums, per-face rates, false share) of labelled images, properly masked or not pooled."""
    from utils.detection import quantify as Q

    soft = calibration.soft.sum(axis=0)
    observed, rates, truth = Q.masked_or_not(soft.sum(axis=0), soft, calibration.truth.sum(axis=0))
    return (observed, *Q.rates_per_face(rates, truth))


def share(estimated) -> float:
    return 100 * float(estimated[0] / estimated.sum())


def by_faces_found(target, validation) -> float:
    """pacc2 solved apart on the images of each FACES_FOUND_BINS bin (the same bins on both sides), summed."""
    import numpy as np

    from utils.detection import quantify as Q

    found = {name: Q.Units.from_calibration(c).counts.sum(axis=1) for name, c in (("t", target), ("v", validation))}
    total = np.zeros(2)
    for low, high in FACES_FOUND_BINS:
        in_target, in_validation = ((found[n] >= low) & (found[n] < high) for n in ("t", "v"))
        if not in_target.any():
            continue
        if not in_validation.any():  # no rates for this kind of image: take every validation image's
            in_validation = np.ones_like(in_validation)
        soft = validation.soft[in_validation].sum(axis=0)
        total += Q.adjusted_counts(*Q.masked_or_not(target.soft[in_target].sum(axis=0).sum(axis=0), soft,
                                                    validation.truth[in_validation].sum(axis=0)))
    return share(total)


def set_row(name: str, kind: str, rates: dict, held_out: dict) -> dict:
    """Every column's figure and error (points) on one held-out set under one model's validation record."""
    import numpy as np

    from utils.detection import quantify as Q

    validation, target = Q.Calibration.from_record(rates), Q.Calibration.from_record(held_out)
    for part, calibration in (("held-out", target), ("validation", validation)):
        if not calibration.truth.sum():  # no truth or no rates: every figure NaN, the means over the sets too
            raise ValueError(f"{name}: its {part} images hold no labelled face")
    truth = Q.true_percent(target)
    units = Q.Units.from_calibration(target)
    sums = (validation.confusion.sum(axis=0), validation.soft.sum(axis=0), validation.truth.sum(axis=0))
    point = {m: 100 * Q.point_estimate(m, units.counts.sum(axis=0), units.soft.sum(axis=0), sums)[0]
             for m in Q.METHODS}
    observed, per_face, false_share = binary_parts(target)
    _, per_face_validation, false_share_validation = binary_parts(validation)
    figures = {
        "cc": point["cc"], "pacc2": point["pacc2"],
        "pacc2, target's false share": share(Q.counts_from_parts(per_face_validation, false_share, observed)),
        "pacc2, target's per-face rates": share(Q.counts_from_parts(per_face, false_share_validation, observed)),
        "mean cc+pacc2": (point["cc"] + point["pacc2"]) / 2,
        "median acc/pacc/pacc2": float(np.median([point[m] for m in ("acc", "pacc", "pacc2")])),
        "pacc2 by faces found": by_faces_found(target, validation)}
    rounded = lambda a: [round(float(v), 3) for v in np.ravel(a)]  # noqa: E731
    return {"set": name, "kind": kind, "images": len(target), "validation_images": len(validation),
            "true_percent": round(truth, 2), "figures": {c: round(v, 2) for c, v in figures.items()},
            "errors": {c: round(v - truth, 2) for c, v in figures.items()},
            "rates": {"validation": {"per_face": rounded(per_face_validation),
                                     "false_share": rounded(false_share_validation)},
                      "target": {"per_face": rounded(per_face), "false_share": rounded(false_share)}}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", nargs="+", type=Path, required=True,
                   help="records files of bench/class_mix_shift.py --records (folds and/or a final model)")
    p.add_argument("--output", type=Path, default=None, help="JSON file for the table (default: printed only)")
    args = p.parse_args()

    rows = []
    for path in args.records:
        try:
            records = json.loads(path.read_text(encoding="utf-8"))
            sets = [(f"{path.stem} fold {i}", "fold", s) for i, s in enumerate(records["folds"])]
            sets += [(f"{path.stem} test", "test", records["final"])] if records.get("final") else []
            rows += [set_row(name, kind, s["rates"], s["held_out"]) for name, kind, s in sets]
        except (OSError, ValueError, KeyError, TypeError) as error:
            p.error(f"--records {path}: not a records file of bench/class_mix_shift.py ({error})")
    print(f"{'set':<42}{'true %':>7}" + "".join(f"{heading:>15}" for heading in COLUMNS.values()))
    for row in rows:
        print(f"{row['set']:<42}{row['true_percent']:>7.1f}" + "".join(f"{row['errors'][c]:>+15.2f}" for c in COLUMNS))
    summary = {}
    for kind in ("fold", "test"):
        chosen = [row for row in rows if row["kind"] == kind]
        if chosen:
            summary[kind] = {"sets": len(chosen), "mean_abs_error": {
                c: round(sum(abs(row["errors"][c]) for row in chosen) / len(chosen), 2) for c in COLUMNS}}
            print(f"{'mean |error|, ' + str(len(chosen)) + ' ' + kind + ' sets':<49}"
                  + "".join(f"{summary[kind]['mean_abs_error'][c]:>15.2f}" for c in COLUMNS))
    if args.output:
        from utils.atomic import write_json

        write_json(args.output, {"inputs": [str(path) for path in args.records], "sets": rows, "summary": summary})
        print(f"written: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
