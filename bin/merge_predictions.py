#!/usr/bin/env python3
"""Merge the outputs of fanned-out predict jobs (one per shard) into the run's compliance figures.

    bin/merge_predictions.py --inputs predictions_shard-*.json --output-dir .
    bin/merge_predictions.py --inputs-dir DIR --expected 12 --output-dir .

Reads each job's predictions_<TAG>.json and writes OUTPUT_DIR/compliance.json (overall,
per shard and per image: faces kept per class and their percent with_mask, with every
skipped file and its reason), predictions.csv (file, xmin, ymin, xmax, ymax, label,
score), compliance_histogram.png (per-image compliance) and compliance_by_folder.png (the
figure with its 95 % interval per folder, the 40 largest at most), plus its run record. The overall
figure is an estimate with its 95 % bootstrap interval (utils/detection/quantify.py).
Per-image figures are recomputed from the detections exactly as a single predict job
computes them, so N shards merged equal one job over the same images. The parts must
come from the same model and threshold, and each part's structure is checked (labels, boxes
inside the image, scores from 0 to 1, the fields of a predictions file): a malformed part is one
line naming the file and the field. Each shard comes once (two parts of one tag, from two runs, are
refused) and a file sits in one part only, read or skipped (else the shards overlap: refused).
--expected N fails when a part is missing.
Exit 0 on success, 2 on bad input (one line naming the file), 1 on a bug.
"""

import argparse
import sys
from pathlib import Path

from utils.cli import plot_file_name, positive_int, print_skipped, run_job
from utils.detection.compliance import compliance_line
from utils.detection.merge import merge_predictions
from utils.errors import InputError
from utils.naming import output_names
from utils.provenance import write_run_record

PART_PATTERN = "predictions_*.json"
OUTPUTS = output_names("merge_predictions")  # the names the workflow declares for this job


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--inputs", nargs="+", type=Path, help="predictions_<TAG>.json files")
    source.add_argument("--inputs-dir", type=Path,
                        help=f"folder holding the parts ({PART_PATTERN}); a workflow stages them there, so its "
                             "arguments never grow with the number of shards")
    parser.add_argument("--expected", type=positive_int, default=None,
                        help="number of parts there must be (default: any)")
    parser.add_argument("--output-dir", type=Path, required=True, help="folder for the merged files")
    parser.add_argument("--histogram", type=plot_file_name, default=OUTPUTS["histogram"],
                        help=f"file name of the per-image compliance histogram (default: {OUTPUTS['histogram']})")
    parser.add_argument("--folder-plot", type=plot_file_name, default=OUTPUTS["folder_plot"],
                        help=f"file name of the plot of the figure per folder (default: {OUTPUTS['folder_plot']})")
    return parser


def main(args) -> int:
    if args.inputs_dir is not None and not args.inputs_dir.is_dir():
        raise InputError(f"{args.inputs_dir}: --inputs-dir is not a folder")
    folders = [str(part) for part in args.inputs or [] if part.is_dir()]
    if folders:
        raise InputError(f"{folders[0]}: a folder, not a predictions_<TAG>.json (give a folder of parts as "
                         "--inputs-dir)")
    parts = args.inputs if args.inputs else sorted(args.inputs_dir.glob(PART_PATTERN))
    if not parts:
        raise InputError(f"{args.inputs_dir}: no {PART_PATTERN} in it to merge")
    missing = [str(part) for part in parts if not part.is_file()]
    if missing:
        raise InputError(f"{missing[0]}: not found" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if args.expected is not None and len(parts) != args.expected:
        raise InputError(f"{args.inputs_dir or 'the inputs'}: {len(parts)} predictions part(s), "
                         f"expected {args.expected}")
    merged = merge_predictions(parts, args.output_dir, args.histogram, args.folder_plot)
    report = merged["report"]
    write_run_record(args.output_dir / OUTPUTS["run_record"], "merge_predictions", vars(args), parts)
    print_skipped(report["skipped"], str(merged["outputs"]["compliance_json"]))
    print(compliance_line(report["overall"], report["estimate"]))
    print(f"{report['num_images']} images from {report['num_parts']} part(s), {len(report['skipped'])} skipped; "
          f"outputs in {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(run_job(main, get_args_parser()))
