#!/usr/bin/env python3
"""Summarise a k-fold cross-validation: mean ± std of every metric over the fold models.

Reads the evaluation_fold<i>.json files of bin/evaluate.py (each fold model on its held-out
fold) and writes OUTPUT_DIR/kfold_summary.json (per metric and per class: mean, sample std,
the folds it is defined on, the per-fold values), kfold_summary.txt (the same for people),
kfold_folds.png (per-fold values with mean ± std) and aggregate_folds_run.json (run
record). Metrics: mAP, mAP@0.5, mAP@0.75, mAR@100, the held-out loss, the compliance error
and the per-image MAE of the count at the threshold (cc), the operating score threshold, and
per class AP, AP50, AP75 and recall. Per compliance estimator (cc, pcc, acc, pacc, pacc2:
utils/detection/quantify.py) the error on each fold, the mean absolute error across folds,
on how many folds the truth lay inside its 95 % interval, and the estimator with the smallest
mean |error| (what the default estimator should be chosen by, not one split). Each fold model
chose its score threshold and measured the adjusted estimators' rates on the other folds'
val-split images, never on its held-out fold; the summary says so. The inputs must be
distinct files of different content and, when named evaluation_fold<i>.json, folds 0 to K-1.
Exit 0 on success, 2 when an evaluation file cannot be used (one line naming it), 1 on a bug.
"""

import argparse
import sys
from pathlib import Path

from utils.cli import run_job
from utils.detection.cross_validation import format_summary, write_summary
from utils.naming import output_names
from utils.provenance import write_run_record


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inputs", type=Path, nargs="+", required=True,
                        help="evaluation_fold<i>.json of every fold (two or more)")
    parser.add_argument("--output-dir", type=Path, required=True, help="folder for the kfold_summary files")
    parser.add_argument("--no-plot", action="store_true", help="do not draw kfold_folds.png (default: drawn)")
    return parser


def main(args) -> int:
    names = output_names("aggregate_folds")
    summary = write_summary(args.inputs, args.output_dir, plot=None if args.no_plot else names["plot"])
    write_run_record(args.output_dir / names["run_record"], "aggregate_folds", vars(args), args.inputs)
    print(format_summary(summary), end="")
    print(f"outputs in {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(run_job(main, get_args_parser()))
