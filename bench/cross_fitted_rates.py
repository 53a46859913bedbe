#!/usr/bin/env python3
"""pacc with cross-fitted rates against each model's own validation rates, on the folds of a folds run.

pacc (utils/detection/quantify.py) corrects a set's score sums with the rates the model showed on its
validation images (67 on the real data's val split, about 45 for a fold model of a 3-fold run). The
quantification literature measures a classifier's rates by cross-validation instead (Forman 2008),
which rests them on (K-1)/K of the labelled pool. Given the fold models of a `--folds K` run with their
held-out sets (--fold MODEL HELD_OUT, once per fold) and the final model with the test split (--final
MODEL TEST), this runs each model on its set (the evaluate job's code, at the model's working size) and
computes, against each set's truth:

  own         pacc as the jobs compute it, with the model's stored validation rates;
  cross-fit   each fold corrected with the rates the other fold models had on their held-out folds,
              and the test split with the rates of every fold (other models of the same recipe).

Each figure has pacc's seeded bootstrap interval (target images and rate images resampled). Prints a
table; --output writes the figures as JSON. Exit 0; 2 (one line) on a bad flag, a file that cannot be
read or a model without rates; 1 (one line) when a set gives no figure.

  .venv/bin/python bench/cross_fitted_rates.py \\
      --fold runs/X/scratch/train_fold0/model_fold0.pt runs/X/scratch/make_fold0/fold0_held_out.tar ... \\
      --final runs/X/scratch/train/model.pt runs/X/scratch/preprocess_test/test_set.tar --output F.json
"""

import argparse
import contextlib
import platform
import sys
from pathlib import Path


def load_with_rates(model_path: Path):
    """(model, meta, threshold) of a model file whose stored validation record (meta["quantification"])
    can correct counts at its threshold; ValueError saying why the model cannot be used. Also used by
    bench/calibration_rates.py."""
    import torch

    from utils.detection import quantify as Q
    from utils.detection.evaluation import load_trained_model

    model, meta, threshold, _ = load_trained_model(model_path, torch.device("cpu"))
    stored = meta.get("quantification")
    problem = Q.calibration_problem(stored, threshold, meta["tta"], meta["working_size"])
    if problem:
        raise ValueError(f"{model_path}: {problem}")
    return model, meta, threshold


def labelled_predictions(model, meta: dict, labelled: Path) -> tuple[list, list]:
    """(predictions, targets) of a model of load_trained_model on the labelled set *labelled* (a folder or a flat
    .tar with VOC), run as the jobs run it: at its working size, with flip TTA when it chose it on validation.
    ValueError when the set holds no labelled image. Also used by bench/false_share_by_score.py."""
    import torch

    from utils.data.pairs import open_folder
    from utils.detection.engine import run_inference
    from utils.detection.evaluation import evaluation_loader, labelled_pairs

    with contextlib.ExitStack() as stack:
        folder = stack.enter_context(open_folder(labelled))
        pairs, _ = labelled_pairs(folder, folder)
        if not pairs:
            raise ValueError(f"{labelled}: no labelled image")
        return run_inference(model, evaluation_loader(pairs, num_workers=0), torch.device("cpu"), tta=meta["tta"])


def held_out_record(loaded: tuple, labelled: Path) -> dict:
    """The labelled set's per-image record (quantify.calibration_record) under a model of load_with_rates."""
    from utils.detection import quantify as Q

    model, meta, threshold = loaded
    preds, targets = labelled_predictions(model, meta, labelled)
    return Q.calibration_record(preds, targets, threshold, chosen_on=str(labelled), tta=meta["tta"],
                                working_size=meta["working_size"])


def pooled(records: list[dict]) -> dict:
    """One record of the images of *records* (pacc reads only their truth and score sums, which pool;
    the confusion matrices were counted at each model's own threshold, so acc is not computed)."""
    if len({bool(record.get("tta", False)) for record in records}) > 1:
        raise ValueError("the records were made with and without flip TTA: their rates do not pool")
    # the fold models may run at different working sizes: applying one model's rates to another is the experiment
    return {**records[0], "chosen_on": "pooled", "working_size": None,
            "images": [image for record in records for image in record["images"]]}


def against_truth(record: dict, rates: dict) -> dict:
    """pacc on *record*'s images with the rates of *rates*' images: estimate, interval, error, truth inside."""
    from utils.detection import quantify as Q

    labelled = Q.Calibration.from_record(record)
    result = Q.estimate(Q.Units.from_calibration(labelled), "pacc", Q.Calibration.from_record(rates))
    truth = Q.true_percent(labelled)
    Q.judge(result, truth)  # the evaluate job's error and "truth inside"
    if result["error_points"] is None:  # no figure (an interval may be missing: its note says why, truth_inside None)
        raise SystemExit(f"cross_fitted_rates: no figure on {record.get('chosen_on', 'a set')} "
                         f"({result.get('note', 'no labelled face')})")
    return {"percent": result["percent"], "low": result["low"], "high": result["high"],
            "error_points": result["error_points"], "true_percent": round(truth, 2),
            "truth_inside": result["truth_inside"], "images": len(labelled),
            "rate_images": result["calibration_images"]}


def line(name: str, result: dict) -> str:
    inside = {True: "inside", False: "outside", None: "n/a"}[result["truth_inside"]]
    interval = "no interval  " if result["low"] is None else f"{result['low']:>6.2f}-{result['high']:<6.2f}"
    return (f"{name:<24}{result['percent']:>8.2f}  {interval}"
            f"{result['error_points']:>+8.2f}{result['true_percent']:>8.2f}  {inside:<8}{result['rate_images']:>6}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fold", nargs=2, action="append", type=Path, metavar=("MODEL", "HELD_OUT"), required=True,
                   help="a fold model and its held-out set (folder or flat .tar with VOC); once per fold, 2 or more")
    p.add_argument("--final", nargs=2, type=Path, metavar=("MODEL", "TEST"), default=None,
                   help="the final model and the test split (default: folds only)")
    p.add_argument("--output", type=Path, default=None, help="JSON file for the figures (default: printed only)")
    args = p.parse_args()
    if len(args.fold) < 2:
        p.error("--fold: cross-fitting needs two folds or more")

    import numpy as np
    import torch

    from utils.atomic import write_json

    pairs = [*args.fold, *([args.final] if args.final else [])]
    try:  # every model's rates are checked before any inference runs
        loaded = [load_with_rates(model) for model, _ in pairs]
        records = [held_out_record(model, labelled) for model, (_, labelled) in zip(loaded, pairs)]
    except (ValueError, OSError) as error:  # InputError is a ValueError: a missing or unreadable file, no rates
        p.error(str(error))
    final_record = records.pop() if args.final else None
    stored_rates = [meta["quantification"] for _, meta, _ in loaded]
    rows = {"folds": [], "final": None}
    print(f"{'pacc':<24}{'percent':>8}  {'interval':<13}{'error':>8}{'true':>8}  {'truth':<8}{'rate images':>6}")
    for i, (record, stored) in enumerate(zip(records, stored_rates)):
        own = against_truth(record, stored)
        cross = against_truth(record, pooled(records[:i] + records[i + 1:]))
        rows["folds"].append({"own_validation_rates": own, "cross_fitted_rates": cross})
        print(line(f"fold {i}, own rates", own))
        print(line(f"fold {i}, cross-fitted", cross))
    for key in ("own_validation_rates", "cross_fitted_rates"):
        errors = [fold[key]["error_points"] for fold in rows["folds"]]
        rows[f"{key}_mean_abs_error"] = round(float(np.mean(np.abs(errors))), 2)
        rows[f"{key}_truth_inside"] = sum(fold[key]["truth_inside"] is True for fold in rows["folds"])
        print(f"{key.replace('_', ' ')}: mean |error| over the folds {rows[f'{key}_mean_abs_error']:.2f} points, "
              f"truth inside {rows[f'{key}_truth_inside']} of {len(errors)}")
    if args.final:
        rows["final"] = {"own_validation_rates": against_truth(final_record, stored_rates[-1]),
                         "cross_fitted_rates": against_truth(final_record, pooled(records))}
        print(line("test, own rates", rows["final"]["own_validation_rates"]))
        print(line("test, every fold's rates", rows["final"]["cross_fitted_rates"]))
    if args.output:
        inputs = {"folds": [[str(m), str(s)] for m, s in args.fold],
                  "final": None if not args.final else [str(x) for x in args.final]}
        write_json(args.output, {"inputs": inputs, **rows, "host": platform.node(), "torch": torch.__version__})
        print(f"written: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
