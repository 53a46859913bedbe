#!/usr/bin/env python3
"""Every compliance estimator on the folds of a folds run, on each held-out set and on parts of it whose
class mix differs from the validation images'.

The folds of one data set share its class mix, so the error over the folds (kfold_summary.json) cannot
show what an estimator does on photos where, say, masks are worn incorrectly more often. This bench
runs each fold model on its held-out set (the evaluate job's code; cross_fitted_rates.py's loading)
and computes, with the model's own stored validation rates, every estimator of
utils/detection/quantify.py on:

  all         every held-out image;
  incorrect   the images that hold a mask_weared_incorrect face (that class's share rises several fold);
  without     the images that hold a without_mask face;
  with only   the images whose faces are all with_mask (the truth is 100 %).

Per part and estimator: the mean |error| over the folds in points, the mean interval width and in how
many folds the truth lay inside the 95 % interval. --final adds the final model on the test split.
--records writes the per-image records it computed (truth, confusion matrix and score sums per image,
and each model's stored validation record: about 20 kB per set of 180 images, no pixels); --from-records reads
such a file instead of running models, so a study of another estimator needs no models.

  .venv/bin/python bench/class_mix_shift.py \\
      --fold runs/X/scratch/train_fold0/model_fold0.pt runs/X/scratch/make_fold0/fold0_held_out.tar ... \\
      --final runs/X/scratch/train/model.pt runs/X/scratch/preprocess_test/test_set.tar \\
      --records bench/results/X_records.json --output bench/results/X_class_mix_shift.json
  .venv/bin/python bench/class_mix_shift.py --from-records bench/results/X_records.json

Exit 0; 2 (one line) on a bad flag, a file that cannot be read or a model without rates.
"""

import argparse
import json
import platform
import sys
from pathlib import Path

from cross_fitted_rates import held_out_record, load_with_rates

PARTS = {  # name: which images of a held-out set, by their true faces per class (with, without, incorrect)
    "all": lambda truth: True,
    "incorrect": lambda truth: truth[2] > 0,
    "without": lambda truth: truth[1] > 0,
    "with only": lambda truth: truth[0] > 0 and truth[1] == truth[2] == 0,
}


def part_estimates(record: dict, rates: dict, part: str) -> dict | None:
    """Every estimator on the images of *record* in *part*, against their truth; None when none is there."""
    from utils.detection import quantify as Q

    images = [image for image in record["images"] if PARTS[part](image["truth"])]
    if not images:
        return None
    labelled = Q.Calibration.from_record({**record, "images": images})
    truth = Q.true_percent(labelled)
    report = Q.set_estimates(Q.Units.from_calibration(labelled), Q.Calibration.from_record(rates))
    faces = labelled.truth.sum(axis=0)
    row = {"images": len(images), "faces": [int(n) for n in faces], "true_percent": round(truth, 2),
           "estimates": {}}
    for method, result in report["estimates"].items():
        Q.judge(result, truth)  # the evaluate job's error and "truth inside"
        row["estimates"][method] = {key: result[key] for key in ("percent", "low", "high", "error_points",
                                                                 "truth_inside")}
    return row


def summary(sets: list[dict]) -> dict:
    """Per part and estimator over *sets* (one per fold): mean |error|, mean width, truth inside."""
    from utils.detection.quantify import METHODS

    table = {}
    for part in PARTS:
        rows = [s["parts"][part] for s in sets if s["parts"][part] is not None]
        table[part] = {"sets": len(rows)}
        for method in METHODS:
            results = [row["estimates"][method] for row in rows if method in row["estimates"]]
            judged = [r for r in results if r["error_points"] is not None and r["low"] is not None]
            if not judged:
                continue
            table[part][method] = {
                "mean_abs_error": round(sum(abs(r["error_points"]) for r in judged) / len(judged), 2),
                "mean_width": round(sum(r["high"] - r["low"] for r in judged) / len(judged), 2),
                "truth_inside": sum(bool(r["truth_inside"]) for r in judged), "judged": len(judged)}
    return table


def cell(figures: dict) -> str:
    return (f"{figures['mean_abs_error']:.2f} / {figures['mean_width']:.1f} / "
            f"{figures['truth_inside']} of {figures['judged']}")


def print_table(title: str, table: dict) -> None:
    from utils.detection.quantify import METHODS

    print(f"{title}: mean |error| in points / mean 95 % interval width / truth inside")
    print(f"{'part':<11}{'sets':>5}" + "".join(f"{m:>24}" for m in METHODS))
    for part, row in table.items():
        cells = "".join(f"{cell(row[m]):>24}" if m in row else f"{'n/a':>24}" for m in METHODS)
        print(f"{part:<11}{row['sets']:>5}{cells}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fold", nargs=2, action="append", type=Path, metavar=("MODEL", "HELD_OUT"), default=[],
                   help="a fold model and its held-out set (folder or flat .tar with VOC); once per fold")
    p.add_argument("--final", nargs=2, type=Path, metavar=("MODEL", "TEST"), default=None,
                   help="the final model and the test split (default: folds only)")
    p.add_argument("--from-records", type=Path, default=None,
                   help="read the records a --records run wrote instead of running models (default: run them)")
    p.add_argument("--records", type=Path, default=None, help="JSON file for the per-image records (default: none)")
    p.add_argument("--output", type=Path, default=None, help="JSON file for the figures (default: printed only)")
    args = p.parse_args()
    if bool(args.fold or args.final) == bool(args.from_records):
        p.error("give either --fold (and --final) or --from-records")

    from utils.atomic import write_json

    if args.from_records:
        try:
            records = json.loads(args.from_records.read_text(encoding="utf-8"))
            folds, final = records["folds"], records["final"]
        except (OSError, ValueError, KeyError) as error:
            p.error(f"--from-records {args.from_records}: {error}")
    else:
        pairs = [*args.fold, *([args.final] if args.final else [])]
        try:  # every model's rates are checked before any inference runs
            loaded = [load_with_rates(model) for model, _ in pairs]
            sets = [{"model": str(model), "images": str(images), "rates": model_tuple[1]["quantification"],
                     "held_out": held_out_record(model_tuple, images)}
                    for model_tuple, (model, images) in zip(loaded, pairs)]
        except (ValueError, OSError) as error:  # InputError is a ValueError: a missing or unreadable file, no rates
            p.error(str(error))
        final = sets.pop() if args.final else None
        folds = sets
        if args.records:
            write_json(args.records, {"folds": folds, "final": final}, indent=None)  # compact: ~170 kB a 3-fold run
            print(f"written: {args.records}")
    results = {"folds": [{"parts": {part: part_estimates(s["held_out"], s["rates"], part) for part in PARTS}}
                         for s in folds]}
    results["folds_summary"] = summary(results["folds"])
    print_table(f"{len(folds)} folds", results["folds_summary"])
    if final:
        results["final"] = {"parts": {part: part_estimates(final["held_out"], final["rates"], part) for part in PARTS}}
        print_table("test split (final model)", summary([results["final"]]))
    if args.output:
        import torch

        source = str(args.from_records) if args.from_records else [[s["model"], s["images"]] for s in folds]
        write_json(args.output, {"inputs": source, **results, "host": platform.node(), "torch": torch.__version__})
        print(f"written: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
